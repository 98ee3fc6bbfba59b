"""Argument checks shared by the layers, the dtype rule, and the PyTorch-keyword refusal.

Every check raises before any computation, naming the argument, the value and
the fix, so a layer call fails the same way whichever backend it would run on.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Collection, Iterable, Mapping
from typing import Any, NoReturn

import numpy as np
from numpy.typing import DTypeLike, NDArray

from .._api import FOREIGN_KEYWORDS

__all__ = [
    "FLOAT_DTYPES",
    "LAYER_KEYWORDS",
    "accumulation_dtype",
    "as_activation",
    "bool_arg",
    "compute_dtype",
    "dropout_arg",
    "dtype_arg",
    "eps_arg",
    "int_arg",
    "refuse_keywords",
]

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_FLOAT16, _FLOAT32 = FLOAT_DTYPES[:2]


def int_arg(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an ``int >= minimum`` (bools are not ints here)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    result = int(value)  # numpy integers -> int
    if result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result}")
    return result


def bool_arg(name: str, value: Any) -> bool:
    """``value`` as a ``bool``; anything but ``bool``/``numpy.bool_`` is a TypeError (no truthiness)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def dtype_arg(dtype: DTypeLike, name: str = "dtype") -> np.dtype[Any]:
    """A parameter dtype: float16, float32 or float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float16, float32 or float64, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got {dt}")
    return dt


def dropout_arg(p: Any) -> float:
    """A dropout probability in [0, 1)."""
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(p).__name__} {p!r}")
    result = float(p)
    if not 0.0 <= result < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {result}")
    return result


def eps_arg(eps: Any) -> float:
    """A finite positive epsilon."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real) or not 0 < float(eps) < np.inf:
        raise ValueError(f"eps must be a finite positive float, got {eps!r}")
    return float(eps)


def as_activation(
    name: str, x: Any, last: int, *, ndims: Collection[int] = (2, 3), layout: str = "(..., {0})"
) -> NDArray[Any]:
    """Validate an activation array without casting it.

    ``x`` must be a real float or integer array (NumPy, or anything
    ``numpy.asarray`` accepts; CuPy arrays and PyTorch tensors are refused with
    the conversion to use) whose last axis is ``last`` and whose number of
    axes is in ``ndims``. ``layout`` describes the expected shape in messages
    (``{0}`` stands for ``last``; formatted only when raising).
    Returns ``numpy.asarray(x)`` (no copy for an ndarray).
    """
    if isinstance(x, np.ndarray):
        arr = x
    else:
        if type(x).__module__.split(".")[0] in ("cupy", "torch", "jax", "jaxlib"):
            raise TypeError(
                f"{name} must be a numpy.ndarray, got {type(x).__module__}.{type(x).__name__}; "
                "convert it first (e.g. tensor.numpy() or cupy.asnumpy(x))"
            )
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError):  # ragged nesting, objects NumPy cannot convert
            raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}") from None
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real float (or int) array, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        raise ValueError(f"{name} must have shape {layout.format(last)}, got shape {arr.shape}")
    if arr.shape[-1] != last:
        raise ValueError(f"{name} has feature size {arr.shape[-1]} (shape {arr.shape}), expected {last}")
    return arr


def compute_dtype(arrays: Iterable[NDArray[Any] | None], default: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype a layer call computes in (the dtype rule of :mod:`selfattn.nn`).

    ``numpy.result_type`` of the floating-point arrays among ``arrays`` (for a
    single input: its own dtype); ``default`` (the layer's parameter dtype) when
    none is floating point (integer inputs). ``None`` entries are ignored.
    """
    floats = {a.dtype for a in arrays if a is not None and a.dtype.kind == "f"}
    if not floats:
        return default
    dt = floats.pop() if len(floats) == 1 else np.result_type(*floats)
    if dt not in FLOAT_DTYPES:  # float128 and the like: no backend computes in it
        raise TypeError(f"inputs of dtype {dt} are not supported; use float16, float32 or float64")
    return dt


def accumulation_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """Matrix products and reductions of float16 activations run in float32 (as the attention core does)."""
    return _FLOAT32 if dtype == _FLOAT16 else dtype


# ----------------------------------------------------------------------------- PyTorch keywords on the layers

_KEY_PADDING = (
    "use key_mask=~key_padding_mask: selfattn's key_mask is True for a real token, the opposite of "
    "PyTorch's key_padding_mask (True = padding); shape (B, M)"
)
_ATTN_MASK = (
    "use mask=~attn_mask for a boolean attn_mask: selfattn's boolean mask is True = may attend, the "
    "opposite of nn.MultiheadAttention's (True = masked out); a float attn_mask is additive in both and "
    "passes unchanged; a (B*H, N, M) one becomes mask=attn_mask.reshape(B, H, N, M)"
)

#: Keywords of PyTorch's layers (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
#: ``nn.TransformerEncoder``: their constructors and ``forward``), with the selfattn way to say them.
#: Keywords shared with the functional API reuse :data:`selfattn._api.FOREIGN_KEYWORDS`' wording.
LAYER_KEYWORDS: dict[str, str] = {
    # forward()
    "is_causal": FOREIGN_KEYWORDS["is_causal"],
    "attn_mask": _ATTN_MASK,
    "src_mask": _ATTN_MASK.replace("attn_mask", "src_mask"),
    "key_padding_mask": _KEY_PADDING,
    "src_key_padding_mask": _KEY_PADDING.replace("key_padding_mask", "src_key_padding_mask"),
    "average_attn_weights": (
        "use average_weights= (with need_weights=True: True gives (B, N, M) averaged over heads, False (B, H, N, M))"
    ),
    "return_weights": "use need_weights=True (returns (out, weights))",
    "enable_gqa": (
        "grouped-query attention needs no flag: build the layer with kv_heads= (num_heads must be a "
        "multiple of it); K/V are never copied per query head"
    ),
    "window_size": "sliding windows are not a layer option; call selfattn.scaled_dot_product_attention(window=...)",
    "alibi_slopes": (
        "use alibi=True when building MultiHeadAttention (slopes for its head count, see selfattn.nn.alibi_slopes)"
    ),
    # constructors
    "dropout": "use dropout_p= (a float in [0, 1); dropout runs only in calls with training=True)",
    "batch_first": (
        "selfattn layers are always batch first: inputs are (B, N, E) (or unbatched (N, E)); drop "
        "the argument and pass batch-first data (x.swapaxes(0, 1) for PyTorch's default (N, B, E))"
    ),
    "add_bias_kv": "not supported: selfattn's MultiHeadAttention has no bias_k/bias_v",
    "add_zero_attn": "not supported: selfattn's MultiHeadAttention adds no zero key/value",
    "device": "selfattn layers hold NumPy arrays on the host; drop the argument",
    "d_model": "use embed_dim= (the first positional argument)",
    "nhead": "use num_heads= (the second positional argument)",
    "dim_feedforward": "use ff_dim= (the third positional argument)",
    "norm": "use final_norm=True (a LayerNorm after the last layer, TransformerEncoder.norm)",
    "encoder_layer": (
        "build the stack directly: TransformerEncoder(num_layers, embed_dim, num_heads, ff_dim, ...), "
        "or TransformerEncoder.from_torch(state_dict, num_heads) for PyTorch weights"
    ),
    "enable_nested_tensor": "selfattn has no nested tensors; drop the argument (padding uses key_mask=)",
}


def refuse_keywords(
    func: str, unexpected: Mapping[str, Any], own: Iterable[str], table: Mapping[str, str] = LAYER_KEYWORDS
) -> NoReturn:
    """Raise the TypeError Python would, naming the selfattn equivalent of a foreign keyword.

    The message starts as Python's own (``f() got an unexpected keyword argument 'x'``) and
    adds the hint from ``table``, or the closest of ``own`` (the function's keywords).
    """
    name = next(iter(unexpected))
    msg = f"{func}() got an unexpected keyword argument {name!r}"
    if name in table:
        raise TypeError(f"{msg}: {table[name]}")
    close = difflib.get_close_matches(name, list(own), n=1)
    raise TypeError(msg + (f"; did you mean {close[0]!r}?" if close else ""))
