"""Neural-network layers built on :func:`selfattn.scaled_dot_product_attention`.

>>> import numpy as np
>>> from selfattn.nn import MultiHeadAttention
>>> mha = MultiHeadAttention(32, 4, seed=0)
>>> mha(np.ones((2, 10, 32), np.float32), causal=True).shape
(2, 10, 32)

Layers keep their parameters as plain NumPy arrays in ``layer.params`` and
depend on NumPy and selfattn only. :class:`MultiHeadAttention` has a
``vjp`` for training; the PyTorch ``from_torch`` loaders reproduce
``torch.nn.MultiheadAttention`` / ``TransformerEncoderLayer`` /
``TransformerEncoder`` (``batch_first=True``) inference outputs. Masks use
selfattn's convention (bool True = attend, ``key_mask`` True = real token),
the opposite of PyTorch's bool masks; see :mod:`selfattn.nn.layers`.
"""

from .layers import (FeedForward, LayerNorm, MultiHeadAttention, TransformerEncoder, TransformerEncoderLayer, erf,
                     gelu)
from .positional import apply_rotary, sinusoidal_positions

__all__ = ["MultiHeadAttention", "LayerNorm", "FeedForward", "TransformerEncoderLayer", "TransformerEncoder",
           "sinusoidal_positions", "apply_rotary", "gelu", "erf"]
