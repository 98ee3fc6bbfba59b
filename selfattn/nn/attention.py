"""Multi-head (and grouped-query) attention with input and output projections."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .. import (
    scaled_dot_product_attention,
    scaled_dot_product_attention_varlen,
    scaled_dot_product_attention_varlen_vjp,
    scaled_dot_product_attention_vjp,
)
from .._memory import format_bytes, require
from ._checks import (
    FLOAT_DTYPES,
    LAYER_KEYWORDS,
    accumulation_dtype,
    as_activation,
    bool_arg,
    compute_dtype,
    dropout_arg,
    dtype_arg,
    int_arg,
    refuse_keywords,
)
from ._module import Module, torch_linear_init, xavier_uniform
from .functional import linear
from .positional import alibi_slopes

__all__ = ["MultiHeadAttention"]

Array = NDArray[Any]
#: ``backward(grad_out) -> (d_query, d_key, d_value, d_params)`` returned by :meth:`MultiHeadAttention.vjp`.
Pullback = Callable[[ArrayLike], tuple[Array, Array | None, Array | None, dict[str, Array]]]

_CALL_KEYWORDS = (
    "key",
    "value",
    "mask",
    "key_mask",
    "causal",
    "need_weights",
    "average_weights",
    "training",
    "dropout_seed",
    "cu_seqlens",
    "cu_seqlens_k",
    "backend",
)
_NO_WEIGHTS = "vjp returns no attention weights; call the layer with need_weights=True to get them"
_VJP_KEYWORDS = {
    **LAYER_KEYWORDS,
    **dict.fromkeys(("need_weights", "average_weights", "return_weights", "average_attn_weights"), _NO_WEIGHTS),
}
_INIT_KEYWORDS = ("kv_heads", "kdim", "vdim", "bias", "dropout_p", "softcap", "alibi", "dtype", "seed")


@dataclass(slots=True)  # not frozen: a frozen dataclass costs several µs per call at tutorial sizes
class _Call:
    """One validated :class:`MultiHeadAttention` call, before any computation (read-only by convention).

    ``query``/``key``/``value`` are in the compute dtype ``dtype`` and batched
    ``(B, N, E)``/``(B, M, kdim)``/``(B, M, vdim)`` (unbatched inputs got a
    batch axis of 1), or packed ``(total, E)``/``(total_k, kdim)``/... when
    ``cu_seqlens_q`` is set.
    """

    query: Array
    key: Array
    value: Array
    dtype: np.dtype[Any]
    #: The caller's dtypes of query, key, value (the vjp returns float gradients in them).
    input_dtypes: tuple[np.dtype[Any], np.dtype[Any], np.dtype[Any]]
    unbatched: bool
    self_attention: bool
    value_given: bool
    mask: Array | None
    causal: bool
    dropout_p: float
    dropout_seed: int | None
    cu_seqlens_q: Array | None = None
    cu_seqlens_k: Array | None = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens_q is not None

    def grad_dtype(self, i: int) -> np.dtype[Any]:
        """dtype of the gradient of input ``i`` (0 query, 1 key, 2 value): its float dtype, else ``dtype``."""
        dt = self.input_dtypes[i]
        return dt if dt.kind == "f" else self.dtype


def _split_heads(x: Array, heads: int) -> Array:
    """``(..., L, heads*hd)`` -> ``(..., heads, L, hd)`` (a view): ``(B, H, N, hd)`` batched, ``(H, T, hd)`` packed."""
    # swapaxes, not moveaxis: the layers run at sizes where moveaxis' Python-level checks show up.
    split: Array = x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads).swapaxes(-2, -3)
    return split


def _merge_heads(x: Array) -> Array:
    """Inverse of :func:`_split_heads`: ``(..., H, L, hd)`` -> ``(..., L, H*hd)``."""
    y = x.swapaxes(-3, -2)
    merged: Array = y.reshape(*y.shape[:-2], y.shape[-2] * y.shape[-1])
    return merged


def _rows(x: Array) -> Array:
    """All leading axes flattened: ``(..., F)`` -> ``(rows, F)``."""
    return x.reshape(-1, x.shape[-1])


def _softcap_arg(softcap: Any) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be None or a positive float, got {type(softcap).__name__} {softcap!r}")
    value = float(softcap)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"softcap must be finite and positive (e.g. 50.0), got {softcap!r}")
    return value


def _cu_seqlens_arg(name: str, cu: Any, total: int) -> Array:
    """A packed batch's offsets: int array ``(B + 1,)``, 0, non-decreasing, ending at ``total``."""
    arr = np.asarray(cu)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array (B + 1 sequence offsets), got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"{name} must be 1-D with B + 1 offsets [0, ..., total], got shape {arr.shape}")
    if arr[0] != 0 or arr[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at the packed length {total}, got {arr[0]} ... {arr[-1]}")
    if arr.size > 1 and np.any(np.diff(arr) < 0):
        bad = int(np.argmax(np.diff(arr) < 0))
        raise ValueError(f"{name} must be non-decreasing, got {arr[bad]} then {arr[bad + 1]} at index {bad}")
    return arr


class MultiHeadAttention(Module):
    """Multi-head (and grouped-query) attention with input/output projections.

    Computes, for query ``(B, N, E)`` and key/value ``(B, M, kdim)``/``(B, M, vdim)``::

        q = query @ q_weight.T + q_bias        -> (B, num_heads, N, E/num_heads)
        k = key   @ k_weight.T + k_bias        -> (B, kv_heads,  M, E/num_heads)
        v = value @ v_weight.T + v_bias        -> (B, kv_heads,  M, E/num_heads)
        o = scaled_dot_product_attention(q, k, v, ...)    # GQA: K/V never repeated
        out = concat_heads(o) @ out_weight.T + out_bias   -> (B, N, E)

    Parameters (``self.params``, arrays of ``dtype``): ``q_weight (E, E)``,
    ``k_weight (kv_heads*hd, kdim)``, ``v_weight (kv_heads*hd, vdim)``,
    ``out_weight (E, E)`` and, with ``bias=True``, ``q_bias``, ``k_bias``,
    ``v_bias``, ``out_bias``. Initialisation follows PyTorch: the input
    projections are Xavier-uniform (over the packed ``(3E, E)`` matrix when
    ``kdim == vdim == E`` and ``kv_heads == num_heads``, as PyTorch does;
    separately otherwise), ``out_weight`` is PyTorch's default Linear init
    ``U(±1/sqrt(E))`` and all biases are zero. ``seed`` seeds
    ``numpy.random.default_rng``.

    Options: ``dropout_p`` is dropout on the attention weights, applied only
    in calls with ``training=True``. ``softcap`` (float > 0) soft-caps the
    scaled scores, ``softcap * tanh(s / softcap)`` (Gemma 2). ``alibi=True``
    adds ALiBi biases with the standard slopes for ``num_heads`` heads
    (:func:`selfattn.nn.alibi_slopes`; ``self.alibi_slopes`` holds them,
    float64), ``-slope[h] * |i + (M - N) - j|``; use it instead of position
    embeddings.

    Dtypes: a call computes in its inputs' float dtype and returns it (the
    parameters are cast for the call; integer inputs use ``dtype``); see
    the dtype rule in :mod:`selfattn.nn`. Masks: bool True = may attend,
    ``key_mask`` True = real token (the opposite of PyTorch's bool masks).

    Raises TypeError/ValueError naming the argument for non-integer sizes,
    ``embed_dim % num_heads != 0``, ``num_heads % kv_heads != 0``, a bad
    dtype, ``dropout_p`` outside [0, 1), a non-positive ``softcap``, or a
    keyword of ``torch.nn.MultiheadAttention`` (``dropout``, ``batch_first``,
    ...: the message names the selfattn equivalent). Use :meth:`from_torch`
    to load ``torch.nn.MultiheadAttention`` weights.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout_p: float = 0.0,
        softcap: float | None = None,
        alibi: bool = False,
        dtype: DTypeLike = np.float32,
        seed: int | None = None,
        **unexpected: Any,
    ) -> None:
        if unexpected:
            refuse_keywords("MultiHeadAttention", unexpected, _INIT_KEYWORDS)
        super().__init__()
        self.embed_dim = int_arg("embed_dim", embed_dim)
        self.num_heads = int_arg("num_heads", num_heads)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        self.kv_heads = self.num_heads if kv_heads is None else int_arg("kv_heads", kv_heads)
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of kv_heads ({self.kv_heads})")
        self.kdim = self.embed_dim if kdim is None else int_arg("kdim", kdim)
        self.vdim = self.embed_dim if vdim is None else int_arg("vdim", vdim)
        self.bias = bool_arg("bias", bias)
        self.dropout_p = dropout_arg(dropout_p)
        self.softcap = _softcap_arg(softcap)
        self.alibi = bool_arg("alibi", alibi)
        #: ALiBi slopes ``(num_heads,)`` float64 when ``alibi=True``, else None.
        self.alibi_slopes = alibi_slopes(self.num_heads) if self.alibi else None
        self.dtype = dtype_arg(dtype)
        self.head_dim = self.embed_dim // self.num_heads
        e, kvd = self.embed_dim, self.kv_heads * self.head_dim
        rng = np.random.default_rng(seed)
        if self.kdim == e and self.vdim == e and kvd == e:
            packed = xavier_uniform(rng, (3 * e, e), self.dtype)
            qw, kw, vw = packed[:e], packed[e : 2 * e], packed[2 * e :]
        else:
            qw = xavier_uniform(rng, (e, e), self.dtype)
            kw = xavier_uniform(rng, (kvd, self.kdim), self.dtype)
            vw = xavier_uniform(rng, (kvd, self.vdim), self.dtype)
        ow, _ = torch_linear_init(rng, e, e, self.dtype, bias=False)
        self._own = {"q_weight": qw, "k_weight": kw, "v_weight": vw, "out_weight": ow}
        if self.bias:
            for name, size in (("q_bias", e), ("k_bias", kvd), ("v_bias", kvd), ("out_bias", e)):
                self._own[name] = np.zeros(size, self.dtype)

    def __repr__(self) -> str:
        extra = "" if self.kv_heads == self.num_heads else f", kv_heads={self.kv_heads}"
        extra += "" if self.softcap is None else f", softcap={self.softcap}"
        extra += ", alibi=True" if self.alibi else ""
        return (
            f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}{extra}, "
            f"kdim={self.kdim}, vdim={self.vdim}, bias={self.bias}, dtype={self.dtype})"
        )

    # -- PyTorch interop --------------------------------------------------------------------------------------------
    @classmethod
    def from_torch(
        cls, state_dict: Mapping[str, ArrayLike], num_heads: int, *, dtype: DTypeLike | None = None
    ) -> MultiHeadAttention:
        """Build a layer from a ``torch.nn.MultiheadAttention`` state dict given as NumPy arrays.

        Accepts ``in_proj_weight (3E, E)`` or ``q_proj_weight``/``k_proj_weight``/
        ``v_proj_weight`` (PyTorch uses these when ``kdim``/``vdim`` differ from
        ``E``), optional ``in_proj_bias (3E,)``, ``out_proj.weight`` and optional
        ``out_proj.bias``. ``bias_k``/``bias_v`` (``add_bias_kv=True``) are not
        supported (ValueError). ``dtype`` defaults to the arrays' dtype. The
        PyTorch module must be built with ``batch_first=True`` for the inputs
        to line up as ``(B, N, E)`` (the weights are the same either way).
        Convert PyTorch masks as described in :mod:`selfattn.nn`:
        ``mask=~attn_mask`` (bool), ``key_mask=~key_padding_mask``.
        """
        sd = {k: np.asarray(v) for k, v in state_dict.items()}
        if "bias_k" in sd or "bias_v" in sd:
            raise ValueError("state_dict has bias_k/bias_v (add_bias_kv=True), which is not supported")
        if "out_proj.weight" not in sd:
            raise KeyError("state_dict lacks 'out_proj.weight'; is it a torch.nn.MultiheadAttention state dict?")
        e = sd["out_proj.weight"].shape[0]
        if "in_proj_weight" in sd:
            w = sd["in_proj_weight"]
            qw, kw, vw = w[:e], w[e : 2 * e], w[2 * e :]
        elif all(k in sd for k in ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            qw, kw, vw = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
        else:
            raise KeyError("state_dict needs 'in_proj_weight' or q_proj_weight/k_proj_weight/v_proj_weight")
        has_bias = "in_proj_bias" in sd
        dt = qw.dtype if dtype is None else dtype
        layer = cls(e, num_heads, kdim=kw.shape[1], vdim=vw.shape[1], bias=has_bias, dtype=dt)
        new = {"q_weight": qw, "k_weight": kw, "v_weight": vw, "out_weight": sd["out_proj.weight"]}
        if has_bias:
            b = sd["in_proj_bias"]
            new.update(
                q_bias=b[:e],
                k_bias=b[e : 2 * e],
                v_bias=b[2 * e :],
                out_bias=sd.get("out_proj.bias", np.zeros(e, layer.dtype)),
            )
        layer.load_state_dict(new)
        return layer

    # -- validation -------------------------------------------------------------------------------------------------
    def _validate(
        self,
        query: Any,
        key: Any,
        value: Any,
        *,
        mask: Any,
        key_mask: Any,
        causal: Any,
        training: Any,
        dropout_seed: int | None,
        cu_seqlens: Any,
        cu_seqlens_k: Any,
    ) -> _Call:
        causal = bool_arg("causal", causal)
        training = bool_arg("training", training)
        packed = cu_seqlens is not None
        if cu_seqlens_k is not None and not packed:
            raise ValueError("cu_seqlens_k was given without cu_seqlens; pass both for packed cross-attention")
        ndims = (2,) if packed else (2, 3)
        layout = "(total, {0}) (packed; cu_seqlens is set)" if packed else "(B, L, {0}) or (L, {0})"
        xq = as_activation("query", query, self.embed_dim, ndims=ndims, layout=layout)
        if key is None and value is not None:
            raise ValueError("value was given without key; pass key too (or neither for self-attention)")
        if key is None and self.kdim != self.embed_dim:
            raise ValueError(f"self-attention needs kdim == embed_dim; this layer has kdim={self.kdim}, pass key")
        xk = xq if key is None else as_activation("key", key, self.kdim, ndims=ndims, layout=layout)
        if value is None:
            if key is not None and self.vdim != self.kdim:
                raise ValueError("value is required when vdim != kdim")
            if key is None and self.vdim != self.embed_dim:
                raise ValueError("value is required when vdim != embed_dim")
            xv = xk
        else:
            xv = as_activation("value", value, self.vdim, ndims=ndims, layout=layout)
        if not (xk.ndim == xq.ndim == xv.ndim):
            raise ValueError(
                f"query, key and value must all be batched (3-D) or all unbatched (2-D), "
                f"got shapes {xq.shape}, {xk.shape}, {xv.shape}"
            )
        if xk.shape[-2] != xv.shape[-2]:
            raise ValueError(f"key and value must have the same length M, got {xk.shape[-2]} and {xv.shape[-2]}")
        unbatched = xq.ndim == 2 and not packed
        cu_q = cu_k = None
        if packed:
            if mask is not None or key_mask is not None:
                raise ValueError(
                    "mask and key_mask cannot be combined with cu_seqlens: packed sequences attend only "
                    "within themselves (use causal=True for causal masking within each sequence)"
                )
            cu_q = _cu_seqlens_arg("cu_seqlens", cu_seqlens, xq.shape[0])
            cu_k = cu_q if cu_seqlens_k is None else _cu_seqlens_arg("cu_seqlens_k", cu_seqlens_k, xk.shape[0])
            if cu_k.shape != cu_q.shape:
                raise ValueError(
                    f"cu_seqlens and cu_seqlens_k must describe the same number of sequences, got "
                    f"{cu_q.size - 1} and {cu_k.size - 1}"
                )
            full_mask = None
        else:
            b, n = (1, xq.shape[0]) if unbatched else xq.shape[:2]
            if not unbatched and (xk.shape[0] != b or xv.shape[0] != b):
                raise ValueError(
                    f"query, key and value must share the batch size, got {xq.shape[0]}, {xk.shape[0]}, {xv.shape[0]}"
                )
            full_mask = self._combine_masks(mask, key_mask, b, n, xk.shape[-2], unbatched)
        # Validated: now cast once (self-attention keeps key = value = query: one array, one cast).
        dt = compute_dtype((xq, None if key is None else xk, None if value is None else xv), self.dtype)
        cq = xq.astype(dt, copy=False)
        ck = cq if key is None else xk.astype(dt, copy=False)
        cv = ck if value is None else xv.astype(dt, copy=False)
        if unbatched:
            cq, ck, cv = cq[None], ck[None], cv[None]
        drop = self.dropout_p if training else 0.0
        if drop > 0.0 and dropout_seed is None:
            dropout_seed = int(np.random.default_rng().integers(0, 2**63))
        return _Call(
            query=cq,
            key=ck,
            value=cv,
            dtype=dt,
            input_dtypes=(xq.dtype, xk.dtype, xv.dtype),
            unbatched=unbatched,
            self_attention=key is None,
            value_given=value is not None,
            mask=full_mask,
            causal=causal,
            dropout_p=drop,
            dropout_seed=dropout_seed,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
        )

    def _combine_masks(
        self, mask: Array | None, key_mask: Any, b: int, n: int, m: int, unbatched: bool
    ) -> Array | None:
        """``mask`` broadcastable to ``(B, H, N, M)`` and ``key_mask`` ``(B, M)`` as one mask (never expanded)."""
        h = self.num_heads
        if mask is not None:
            if not isinstance(mask, np.ndarray):
                raise TypeError(
                    f"mask must be a numpy.ndarray (bool True = attend, or float additive), got {type(mask).__name__}"
                )
            if mask.dtype != bool and mask.dtype not in FLOAT_DTYPES:
                raise TypeError(f"mask must be bool (True = attend) or float (additive), got dtype {mask.dtype}")
            if mask.ndim not in (2, 3, 4) or (mask.ndim == 3 and not unbatched):
                raise ValueError(
                    f"mask must have shape (N, M) or (B|1, H|1, N, M) (or (H|1, N, M) for unbatched "
                    f"inputs), got {mask.shape}; reshape a PyTorch (B*H, N, M) mask with "
                    f".reshape(B, H, N, M)"
                )
            if mask.ndim == 3:
                mask = mask[None]
            target = (b, h, n, m)
            # Compared from the right: an (N, M) mask has only the trailing two axes.
            if any(s not in (1, t) for s, t in zip(mask.shape[::-1], target[::-1], strict=False)):
                raise ValueError(f"mask with shape {mask.shape} does not broadcast to (B, H, N, M) = {target}")
        if key_mask is None:
            return mask
        km = np.asarray(key_mask)
        if km.dtype != bool:
            raise TypeError(
                f"key_mask must be a bool array (True = real token, False = padding), got dtype "
                f"{km.dtype}; for a PyTorch key_padding_mask pass ~key_padding_mask"
            )
        if unbatched and km.ndim == 1:
            km = km[None]
        if km.shape != (b, m):
            raise ValueError(f"key_mask must have shape (B, M) = {(b, m)}, got {km.shape}")
        km4 = km[:, None, None, :]
        if mask is None:
            return km4
        combined: Array = mask & km4 if mask.dtype == bool else mask + np.where(km4, 0.0, -np.inf).astype(mask.dtype)
        return combined

    def _check_weights_memory(self, call: _Call, average_weights: bool) -> None:
        """MemoryError before any computation when ``need_weights=True``'s weights cannot be allocated."""
        b, n, m = call.query.shape[0], call.query.shape[1], call.key.shape[1]
        item = call.dtype.itemsize
        per_head = b * self.num_heads * n * m * item
        nbytes = per_head + (b * n * m * item if average_weights else 0) + b * n * self.embed_dim * item
        shape = (b, self.num_heads, n, m)
        what = (
            f"need_weights=True: the attention weights {shape} ({format_bytes(per_head)} of {call.dtype}) "
            + ("and their head average " if average_weights else "")
            + "with the output"
        )
        hint = (
            "drop need_weights=True (the output alone never materialises the N x M weights); "
            "average_weights=True does not help, the per-head weights are formed before they are averaged; "
            "or call the layer on a slice of the queries at a time"
        )
        require(nbytes, "numpy", what, hint, call.query)

    # -- forward ----------------------------------------------------------------------------------------------------
    def _project(self, call: _Call) -> tuple[Array, Array, Array]:
        """Input projections, heads split: ``(B, H, N, hd)`` batched or ``(H, total, hd)`` packed, in ``call.dtype``."""
        p, dt = self._own, call.dtype
        q = linear(call.query, p["q_weight"], p.get("q_bias"), dtype=dt)
        k = linear(call.key, p["k_weight"], p.get("k_bias"), dtype=dt)
        v = linear(call.value, p["v_weight"], p.get("v_bias"), dtype=dt)
        return _split_heads(q, self.num_heads), _split_heads(k, self.kv_heads), _split_heads(v, self.kv_heads)

    def _attention_options(self, call: _Call) -> dict[str, Any]:
        slopes = self.alibi_slopes
        if slopes is not None and call.dtype != np.float64:
            slopes = slopes.astype(np.float32)
        return {
            "causal": call.causal,
            "softcap": self.softcap,
            "alibi_slopes": slopes,
            "dropout_p": call.dropout_p,
            "dropout_seed": call.dropout_seed,
        }

    def _output(self, attn: Array, call: _Call) -> tuple[Array, Array]:
        """``(heads merged (..., L, E), out)``: the attention output before and after ``out_proj``."""
        merged = _merge_heads(attn)
        out = linear(merged, self._own["out_weight"], self._own.get("out_bias"), dtype=call.dtype)
        return merged, (out[0] if call.unbatched else out)

    def __call__(
        self,
        query: ArrayLike,
        key: ArrayLike | None = None,
        value: ArrayLike | None = None,
        *,
        mask: Array | None = None,
        key_mask: ArrayLike | None = None,
        causal: bool = False,
        need_weights: bool = False,
        average_weights: bool = True,
        training: bool = False,
        dropout_seed: int | None = None,
        cu_seqlens: ArrayLike | None = None,
        cu_seqlens_k: ArrayLike | None = None,
        backend: str | None = None,
        **unexpected: Any,
    ) -> Array | tuple[Array, Array]:
        """Apply the layer.

        Parameters
        ----------
        query : ``(B, N, E)`` (or unbatched ``(N, E)``) float or int array
            The output has ``query``'s float dtype (see the dtype rule in
            :mod:`selfattn.nn`; integer input uses the layer's dtype).
        key, value : ``(B, M, kdim)``, ``(B, M, vdim)``, optional
            Omit both for self-attention (key = value = query). If only
            ``value`` is omitted it defaults to ``key``.
        mask : bool or float array, optional
            Shape ``(N, M)`` or ``(B|1, H|1, N, M)``. Bool True = may attend
            (PyTorch's ``attn_mask``: pass ``~attn_mask``); float is added to
            the scaled scores.
        key_mask : bool ``(B, M)``, optional
            True = real token, False = padding, never attended (PyTorch's
            ``key_padding_mask``: pass ``~key_padding_mask``).
        causal : bool
            Bottom-right aligned causal masking (query ``i`` sees keys
            ``j <= i + M - N``; PyTorch's ``is_causal`` for N = M).
        need_weights, average_weights : bool
            With ``need_weights`` return ``(out, weights)``: ``weights`` is
            ``(B, N, M)`` averaged over heads if ``average_weights`` else
            ``(B, H, N, M)`` per head (probabilities before dropout, in the
            output dtype). Weights that cannot be allocated raise MemoryError
            before any computation (``average_weights`` forms the per-head
            weights first, so it needs them too).
        training : bool
            Apply ``dropout_p`` (only when True). ``dropout_seed`` fixes the
            pattern (the same on every backend).
        cu_seqlens, cu_seqlens_k : int arrays ``(B + 1,)``, optional
            Packed variable-length batch: ``query`` is ``(total, E)`` holding
            the B sequences one after another, sequence ``b`` being rows
            ``cu_seqlens[b]:cu_seqlens[b+1]``; each attends only within itself
            (``causal``, ALiBi positions local to it). ``key``/``value``
            ``(total_k, kdim)`` are split by ``cu_seqlens_k`` (default
            ``cu_seqlens``). Returns ``(total, E)``; no ``mask``, ``key_mask``
            or ``need_weights``. Equals the padded call with ``key_mask`` on
            the real rows, with work proportional to the real tokens only.
        backend : str, optional
            selfattn backend for the attention core.

        Returns ``out`` ``(B, N, E)`` (or ``(N, E)``, or ``(total, E)``), or
        ``(out, weights)``. N = 0 or M = 0 is allowed; rows with nothing to
        attend get attention output 0 (so ``out`` = ``out_bias``), never NaN.
        PyTorch keywords (``key_padding_mask``, ``attn_mask``, ``is_causal``,
        ``average_attn_weights``, ...) raise a TypeError naming the selfattn
        equivalent.
        """
        if unexpected:
            refuse_keywords("MultiHeadAttention.__call__", unexpected, _CALL_KEYWORDS)
        need_weights = bool_arg("need_weights", need_weights)
        average_weights = bool_arg("average_weights", average_weights)
        call = self._validate(
            query,
            key,
            value,
            mask=mask,
            key_mask=key_mask,
            causal=causal,
            training=training,
            dropout_seed=dropout_seed,
            cu_seqlens=cu_seqlens,
            cu_seqlens_k=cu_seqlens_k,
        )
        if call.packed:
            if need_weights:
                raise ValueError(
                    "need_weights=True is not available with cu_seqlens (the packed path never forms "
                    "the weights); call the layer on a padded batch with key_mask= to get them"
                )
            return self._output(self._attend_packed(call, backend), call)[1]
        if need_weights:
            self._check_weights_memory(call, average_weights)
        q, k, v = self._project(call)
        res = scaled_dot_product_attention(
            q, k, v, mask=call.mask, return_weights=need_weights, backend=backend, **self._attention_options(call)
        )
        attn, weights = res if isinstance(res, tuple) else (res, None)
        out = self._output(attn, call)[1]
        if weights is None:
            return out
        if average_weights:
            weights = weights.mean(axis=1, dtype=accumulation_dtype(weights.dtype)).astype(weights.dtype)
        return out, (weights[0] if call.unbatched else weights)

    def _attend_packed(self, call: _Call, backend: str | None) -> Array:
        q, k, v = self._project(call)
        res = scaled_dot_product_attention_varlen(
            q, k, v, call.cu_seqlens_q, call.cu_seqlens_k, backend=backend, **self._attention_options(call)
        )
        assert not isinstance(res, tuple)  # return_lse is False
        out: Array = res
        return out

    def vjp(
        self,
        query: ArrayLike,
        key: ArrayLike | None = None,
        value: ArrayLike | None = None,
        *,
        mask: Array | None = None,
        key_mask: ArrayLike | None = None,
        causal: bool = False,
        training: bool = False,
        dropout_seed: int | None = None,
        cu_seqlens: ArrayLike | None = None,
        cu_seqlens_k: ArrayLike | None = None,
        backend: str | None = None,
        **unexpected: Any,
    ) -> tuple[Array, Pullback]:
        """Forward pass plus a pullback for training.

        Takes the arguments of :meth:`__call__` (without ``need_weights``;
        the packed ``cu_seqlens`` path included) and returns ``(out,
        backward)``. ``backward(grad_out)`` (``grad_out`` of ``out``'s shape,
        any float dtype) returns ``(d_query, d_key, d_value, d_params)``:
        gradients of ``sum(out * grad_out)`` w.r.t. the inputs, each in its
        input's float dtype (``d_key``/``d_value`` are None when
        ``key``/``value`` were omitted; their contributions are then summed
        into ``d_query``/``d_key``), and a dict with one gradient per entry of
        ``self.params``, in the parameters' dtype (float32 master weights keep
        float32 gradients under float16 activations). The attention gradient
        comes from :func:`selfattn.scaled_dot_product_attention_vjp` (same
        dropout pattern as the forward); float16 products accumulate in
        float32. The parameters at call time are used for the backward too; do
        not update them in place between the two. ``backward`` may be called
        several times.
        """
        if unexpected:
            refuse_keywords(
                "MultiHeadAttention.vjp", unexpected, [k for k in _CALL_KEYWORDS if "weights" not in k], _VJP_KEYWORDS
            )
        call = self._validate(
            query,
            key,
            value,
            mask=mask,
            key_mask=key_mask,
            causal=causal,
            training=training,
            dropout_seed=dropout_seed,
            cu_seqlens=cu_seqlens,
            cu_seqlens_k=cu_seqlens_k,
        )
        q, k, v = self._project(call)
        if call.packed:
            attn, attn_back = scaled_dot_product_attention_varlen_vjp(
                q, k, v, call.cu_seqlens_q, call.cu_seqlens_k, backend=backend, **self._attention_options(call)
            )
        else:
            attn, attn_back = scaled_dot_product_attention_vjp(
                q, k, v, mask=call.mask, backend=backend, **self._attention_options(call)
            )
        merged, out = self._output(attn, call)
        params = dict(self._own)  # the arrays of this forward, even if the dict is reassigned later

        def backward(grad_out: ArrayLike) -> tuple[Array, Array | None, Array | None, dict[str, Array]]:
            g = np.asarray(grad_out)
            if g.dtype.kind != "f":
                raise TypeError(f"grad_out must be a float array, got dtype {g.dtype}")
            if g.shape != out.shape:
                raise ValueError(f"grad_out has shape {g.shape}, expected the output's shape {out.shape}")
            return self._backward(call, params, merged, attn_back, g)

        return out, backward

    def _backward(
        self,
        call: _Call,
        params: dict[str, Array],
        merged: Array,
        attn_back: Callable[[Array], tuple[Array, Array, Array]],
        grad_out: Array,
    ) -> tuple[Array, Array | None, Array | None, dict[str, Array]]:
        acc = accumulation_dtype(call.dtype)

        def w(name: str) -> Array:
            return params[name].astype(acc, copy=False)

        g = grad_out.astype(acc, copy=False)
        if call.unbatched:
            g = g[None]
        grads = {"out_weight": _rows(g).T @ _rows(merged).astype(acc, copy=False)}
        if self.bias:
            grads["out_bias"] = _rows(g).sum(axis=0)
        d_attn = _split_heads((g @ w("out_weight")).astype(call.dtype), self.num_heads)
        dq, dk, dv = attn_back(np.ascontiguousarray(d_attn))
        d_proj = {"q": _merge_heads(dq), "k": _merge_heads(dk), "v": _merge_heads(dv)}
        d_in = {}
        for name, x in (("q", call.query), ("k", call.key), ("v", call.value)):
            dp = _rows(d_proj[name]).astype(acc, copy=False)
            grads[f"{name}_weight"] = dp.T @ _rows(x).astype(acc, copy=False)
            if self.bias:
                grads[f"{name}_bias"] = dp.sum(axis=0)
            d_in[name] = d_proj[name].astype(acc, copy=False) @ w(f"{name}_weight")
        dxq: Array = d_in["q"]
        dxk: Array | None = d_in["k"]
        dxv: Array | None = d_in["v"]
        if call.self_attention:
            dxq, dxk, dxv = dxq + d_in["k"] + d_in["v"], None, None
        elif not call.value_given:
            dxk, dxv = d_in["k"] + d_in["v"], None

        def finish(grad: Array, dtype: np.dtype[Any]) -> Array:
            return (grad[0] if call.unbatched else grad).astype(dtype, copy=False)

        d_params = {name: grads[name].astype(params[name].dtype, copy=False) for name in params}
        return (
            finish(dxq, call.grad_dtype(0)),
            None if dxk is None else finish(dxk, call.grad_dtype(1)),
            None if dxv is None else finish(dxv, call.grad_dtype(2)),
            d_params,
        )
