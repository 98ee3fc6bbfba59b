"""Neural-network layers built on :func:`selfattn.scaled_dot_product_attention`.

>>> import numpy as np
>>> from selfattn.nn import MultiHeadAttention
>>> mha = MultiHeadAttention(32, 4, seed=0)
>>> mha(np.ones((2, 10, 32), np.float32), causal=True).shape
(2, 10, 32)

Layers keep their parameters as plain NumPy arrays in ``layer.params`` and
depend on NumPy and selfattn only: ``numpy.savez(path, **layer.state_dict())``
saves a layer and ``layer.load_state_dict(numpy.load(path))`` restores it
(stacks use flat dotted names such as ``"layers.0.self_attn.q_weight"``).
Layers compute with NumPy matmuls and call the attention core (``backend=``
is passed through), so they run on every NumPy-array backend.
:class:`MultiHeadAttention` has a ``vjp`` for training and a packed
variable-length path (``cu_seqlens=``); the ``from_torch`` loaders reproduce
``torch.nn.MultiheadAttention`` / ``TransformerEncoderLayer`` /
``TransformerEncoder`` (``batch_first=True``) inference outputs.

Modules: :mod:`~selfattn.nn.attention` (MultiHeadAttention),
:mod:`~selfattn.nn.normalization` (LayerNorm), :mod:`~selfattn.nn.feedforward`
(FeedForward), :mod:`~selfattn.nn.transformer` (TransformerEncoderLayer,
TransformerEncoder), :mod:`~selfattn.nn.positional` (sinusoidal, rotary and
ALiBi position encodings), :mod:`~selfattn.nn.functional` (linear, dropout,
erf, gelu, relu).

Dtype rule
----------
A layer's parameters have the layer's ``dtype`` (float16, float32 or float64;
default float32): that is what ``state_dict`` saves and what an optimizer
updates. A call computes in the float dtype of its input and returns that
dtype: float16/32/64 in, the same out. The parameters are cast to the input's
dtype for the call (they are not changed); integer inputs are converted to the
layer's dtype. When query, key and value of one call have different float
dtypes, the call computes in ``numpy.result_type`` of them. float16 matrix
products and reductions accumulate in float32 and are rounded once (as the
attention core does for float16); LayerNorm statistics are computed in
float64. In :meth:`MultiHeadAttention.vjp`, each input's gradient has that
input's dtype and each parameter's gradient the parameter's dtype (float32
master weights under float16 activations get float32 gradients, as in mixed-
precision training). To compute in the layer's own dtype, cast the input
(``x.astype(layer.dtype)``).

Mask conventions (differ from PyTorch's ``nn.MultiheadAttention``!)
-------------------------------------------------------------------
* ``mask`` boolean: **True = may attend** (PyTorch ``attn_mask`` bool: True =
  *not* allowed, so pass ``~torch_mask``). A float ``mask`` is added to the
  scaled scores in both libraries (``-inf`` excludes) and is passed unchanged.
  PyTorch's 3-D ``(B*H, N, M)`` attn_mask becomes ``mask.reshape(B, H, N, M)``.
* ``key_mask`` ``(B, M)`` boolean: **True = real token** (PyTorch
  ``key_padding_mask`` bool: True = padding, so pass ``~key_padding_mask``).
* ``causal=True``: bottom-right aligned; equal to PyTorch's ``is_causal`` /
  ``generate_square_subsequent_mask`` for self-attention (N = M).
* A query row that may attend nothing gets output ``out_proj.bias`` (its
  attention output is 0), where PyTorch gives NaN.

Passing PyTorch's keyword names (``key_padding_mask=``, ``attn_mask=``,
``is_causal=``, ``average_attn_weights=``, ``src_key_padding_mask=``,
``dropout=``, ``batch_first=``, ...) to a layer or its call raises a TypeError
that names the selfattn equivalent and the difference that matters.
"""

from .attention import MultiHeadAttention
from .feedforward import FeedForward
from .functional import erf, gelu
from .normalization import LayerNorm
from .positional import alibi_slopes, apply_rotary, sinusoidal_positions
from .transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = [
    "FeedForward",
    "LayerNorm",
    "MultiHeadAttention",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "alibi_slopes",
    "apply_rotary",
    "erf",
    "gelu",
    "sinusoidal_positions",
]
