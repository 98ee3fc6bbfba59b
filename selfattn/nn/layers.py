"""The layers under their former module name (selfattn 0.1 had them all in ``selfattn.nn.layers``).

Kept so that ``from selfattn.nn.layers import MultiHeadAttention`` still works;
new code imports from :mod:`selfattn.nn`. The layers now live in
:mod:`selfattn.nn.attention`, :mod:`~selfattn.nn.normalization`,
:mod:`~selfattn.nn.feedforward` and :mod:`~selfattn.nn.transformer`.
"""

from .attention import MultiHeadAttention
from .feedforward import FeedForward
from .functional import erf, gelu
from .normalization import LayerNorm
from .transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = [
    "FeedForward",
    "LayerNorm",
    "MultiHeadAttention",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "erf",
    "gelu",
]
