"""The public attention functions: validate once, dispatch, reshape the result."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from ._dispatch import Explanation, select
from ._memory import format_bytes, require
from ._problem import Array, Problem, _as_dask, _dask_holds_numpy, array_library, normalize, normalize_varlen

__all__ = [
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_vjp",
    "scaled_dot_product_attention_varlen",
    "scaled_dot_product_attention_varlen_vjp",
    "explain",
]

#: Keywords of other libraries' attention functions, with the selfattn way to say them and the
#: difference that matters. Passing one is a TypeError that says so.
FOREIGN_KEYWORDS: dict[str, str] = {
    # torch.nn.functional.scaled_dot_product_attention
    "is_causal": (
        "use causal=True. Note selfattn's causal mask is bottom-right aligned (query i sees keys "
        "j <= i + M - N, as FlashAttention >= 2.1); PyTorch's is_causal is top-left aligned (j <= i). "
        "They agree when N == M; for PyTorch's alignment with N != M pass "
        "mask=numpy.tril(numpy.ones((N, M), bool)) instead"
    ),
    "attn_mask": (
        "use mask=. A boolean mask means True = may attend (as in PyTorch's scaled_dot_product_attention, "
        "but the opposite of nn.MultiheadAttention's attn_mask and key_padding_mask, where True = "
        "masked out: pass ~mask); a float mask is added to the scaled scores"
    ),
    "enable_gqa": (
        "grouped-query attention needs no flag: pass key/value with fewer heads (query heads must be "
        "a multiple of key/value heads); K/V are never copied per query head"
    ),
    # nn.MultiheadAttention / flash_attn / jax.nn.dot_product_attention
    "key_padding_mask": (
        "pass a boolean mask=... of shape (B, 1, 1, M) with True = real token, i.e. "
        "mask=~key_padding_mask[:, None, None, :] (PyTorch's True means padding)"
    ),
    "need_weights": "use return_weights=True (the probabilities before dropout, (..., Hq, N, M))",
    "softmax_scale": "use scale=",
    "window_size": (
        "use window=(left, right) with non-negative ints (None for no window); FlashAttention's "
        "(-1, -1) means no window"
    ),
    "return_attn_probs": "use return_weights=True (probabilities) and/or return_lse=True (log-sum-exp)",
    "deterministic": "selfattn's results are deterministic on every backend; drop the argument",
    "bias": "pass an additive float mask=... (broadcastable to (..., Hq, N, M))",
    "local_window_size": "use window=(left, right)",
    "query_seq_lengths": (
        "pass a boolean key/query padding mask=..., or pack the sequences and call scaled_dot_product_attention_varlen"
    ),
    "key_value_seq_lengths": (
        "pass a boolean mask=... of shape (B, 1, 1, M) (True = real key), or pack the "
        "sequences and call scaled_dot_product_attention_varlen"
    ),
    "dropout_rng": "use dropout_seed= (an int; the pattern is a pure function of it)",
    # flash_attn_varlen_func
    "max_seqlen_q": "not needed: selfattn reads the sequence lengths from cu_seqlens_q; drop the argument",
    "max_seqlen_k": "not needed: selfattn reads the sequence lengths from cu_seqlens_k; drop the argument",
}

#: What the packed variable-length functions say instead, where their options differ.
_VARLEN_FOREIGN: dict[str, str] = {
    "return_attn_probs": (
        "use return_lse=True for the log-sum-exp; packed batches do not return the weights (call "
        "scaled_dot_product_attention on one sequence with return_weights=True for them)"
    ),
    "need_weights": (
        "packed batches do not return the weights (call scaled_dot_product_attention on one sequence "
        "with return_weights=True for them)"
    ),
    "attn_mask": "packed sequences take no mask: cu_seqlens_q/cu_seqlens_k delimit them; use causal= or window=",
    "key_padding_mask": "packed sequences have no padding: cu_seqlens_q/cu_seqlens_k delimit them",
}

_OWN_KEYWORDS = (
    "mask",
    "causal",
    "window",
    "scale",
    "softcap",
    "alibi_slopes",
    "dropout_p",
    "dropout_seed",
    "return_lse",
    "return_weights",
    "backend",
)


def _refuse_keywords(func: str, unexpected: dict[str, Any], own: tuple[str, ...] = _OWN_KEYWORDS) -> None:
    """Raise the TypeError Python would, naming the selfattn equivalent of a foreign keyword."""
    name = next(iter(unexpected))
    msg = f"{func}() got an unexpected keyword argument {name!r}"
    if "varlen" in func and name in _VARLEN_FOREIGN:
        raise TypeError(f"{msg}: {_VARLEN_FOREIGN[name]}")
    if name in FOREIGN_KEYWORDS:
        raise TypeError(f"{msg}: {FOREIGN_KEYWORDS[name]}")
    close = difflib.get_close_matches(name, own, n=1)
    raise TypeError(msg + (f"; did you mean {close[0]!r}?" if close else ""))


def _package(pb: Problem, out: Array, lse: Array | None, weights: Array | None) -> Array | tuple[Array, ...]:
    result = [out.reshape(pb.out_shape(pb.dv))]
    if pb.return_lse:
        assert lse is not None
        result.append(lse.reshape(pb.lse_shape()))
    if pb.return_weights:
        assert weights is not None
        result.append(weights.reshape(pb.out_shape(pb.m)))
    return result[0] if len(result) == 1 else tuple(result)


def _check_result_memory(pb: Problem) -> None:
    """MemoryError before any work when the call's results cannot be allocated."""
    nbytes = pb.output_bytes()
    shape = pb.out_shape(pb.m)
    if pb.return_weights:
        wbytes = pb.batch * pb.q_heads * pb.n * pb.m * pb.dtype.itemsize
        what = (
            f"return_weights=True: the attention weights {shape} ({format_bytes(wbytes)} of {pb.dtype}) with the output"
        )
        hint = (
            "drop return_weights=True (the output never materialises them); use return_lse=True for the "
            "per-row log-sum-exp (O(N)), or compute the weights for a slice of the queries at a time"
        )
    else:
        what = f"the output {pb.out_shape(pb.dv)}"
        hint = "split the call along its batch or query axis (rows are independent)"
    require(nbytes, pb.array_type, what, hint, pb.query)


def scaled_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Array | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    return_lse: bool = False,
    return_weights: bool = False,
    backend: str | None = None,
    **unexpected: Any,
) -> Array | tuple[Array, ...]:
    """Exact attention ``softmax(query @ key.T * scale + mask) @ value``.

    Parameters
    ----------
    query : array ``(..., Hq, N, D)`` or ``(N, D)``
    key : array ``(..., Hkv, M, D)`` or ``(M, D)``
    value : array ``(..., Hkv, M, Dv)`` or ``(M, Dv)``
        ``numpy.ndarray`` (or ``cupy.ndarray`` with the cupy backend), all of
        one library and one dtype among float16, float32, float64. Axis -3 is
        the head axis; axes before it are batch axes and must match exactly.
        ``Hq`` must be a multiple of ``Hkv``: query head ``h`` uses key/value
        head ``h // (Hq // Hkv)`` (grouped-query attention; K/V are not copied).
        N = 0 and M = 0 are allowed. Non-contiguous and read-only arrays are
        fine; inputs are never modified. Data laid out ``(B, N, H, D)`` (as
        PyTorch's ``batch_first`` layers and FlashAttention use) is passed as a
        view, ``query.swapaxes(-2, -3)``, with no copy; every backend runs such
        views at full speed.
    mask : bool or float array broadcastable to ``(..., Hq, N, M)``, optional
        Boolean: True = may attend (as PyTorch's ``scaled_dot_product_attention``
        and JAX; the opposite of ``nn.MultiheadAttention``'s masks). Float:
        added to the scaled scores (``-inf`` excludes). Never expanded to full size.
    causal : bool
        Bottom-right aligned: query ``i`` may attend key ``j`` iff
        ``j <= i + (M - N)`` (FlashAttention >= 2.1). PyTorch's ``is_causal`` is
        top-left aligned (``j <= i``); for that, pass
        ``mask=numpy.tril(numpy.ones((N, M), bool))`` instead. With N > M the
        first ``N - M`` rows attend nothing.
    window : int or (left, right), optional
        Sliding window: query ``i`` may attend ``j`` iff
        ``i + (M-N) - left <= j <= i + (M-N) + right``; ``w`` means ``(w, w)``.
        With ``causal`` the right reach is also capped at 0.
    scale : float, optional
        Finite positive score scale; default ``1/sqrt(D)``.
    softcap : float > 0, optional
        Logit soft-capping (Gemma 2, Grok): the scaled scores ``s`` become
        ``softcap * tanh(s / softcap)`` before any bias or mask is added.
    alibi_slopes : float32/float64 array ``(Hq,)`` or ``(..., Hq)``, optional
        ALiBi: adds ``-slope[h] * |i + (M - N) - j|`` to the (soft-capped)
        scores (FlashAttention 2's definition, bottom-right aligned like
        ``causal``); batch axes broadcast. No gradient is computed for it.
    dropout_p : float in [0, 1)
        Dropout on the attention weights; kept weights are scaled by
        ``1/(1-p)``. The pattern is a pure function of ``dropout_seed`` and the
        element's (batch·head, i, j) index (see :mod:`selfattn._dropout`), so it
        is identical on every backend and in the backward pass.
    dropout_seed : int in [0, 2**64), optional
        Seed of the pattern; None draws a fresh one (when ``dropout_p > 0``).
    return_lse : bool
        Also return the natural log-sum-exp of the masked, scaled scores,
        ``(..., Hq, N)``, float32 for float16 inputs, else the input dtype.
    return_weights : bool
        Also return the attention probabilities ``(..., Hq, N, M)`` (before
        dropout), in the input dtype. This materializes N x M values.
    backend : str, optional
        Run on this backend or raise; see :func:`selfattn.use_backend`.

    Order of operations: scale, softcap, + ALiBi bias, + float mask / bool
    mask, causal/window band, softmax, dropout.

    Returns
    -------
    out, or the tuple ``(out, lse?, weights?)`` in that order.
        ``out`` has shape ``(..., Hq, N, Dv)`` and the input dtype (float16
        inputs accumulate in float32).

    Edge cases: a query row with nothing to attend (fully masked, or M = 0)
    gets output 0, lse ``-inf`` and weights 0, never NaN. NaN in a query row,
    or in a key/value row that a query attends, propagates to that query's
    outputs; whether NaN in a key/value row that a query may *not* attend
    reaches it is unspecified (a backend may skip masked blocks entirely).

    Raises
    ------
    TypeError, ValueError
        Malformed arguments, with the argument, the value and the fix named;
        keywords of PyTorch's or FlashAttention's functions (``is_causal``,
        ``attn_mask``, ``enable_gqa``, ...) name the selfattn equivalent.
    MemoryError
        Before any computation, when the results cannot be allocated (e.g.
        ``return_weights`` for very long sequences): the message names the size.
    selfattn.UnsupportedFeatureError
        The chosen backend does not declare a capability the call needs.
    selfattn.BackendNotFoundError, selfattn.BackendUnavailableError, selfattn.NoBackendError
        Backend selection failed; the message lists what is installed.
    """
    if unexpected:
        _refuse_keywords("scaled_dot_product_attention", unexpected)
    pb = normalize(
        query,
        key,
        value,
        mask=mask,
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        return_lse=return_lse,
        return_weights=return_weights,
    )
    impl = select(pb, backend)
    _check_result_memory(pb)
    out, lse, weights = impl.forward(pb)
    return _package(pb, out, lse, weights)


def scaled_dot_product_attention_vjp(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Array | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    backend: str | None = None,
    **unexpected: Any,
) -> tuple[Array, Callable[[Array], tuple[Array, Array, Array]]]:
    """Attention forward plus a pullback: ``out, backward = ...; dq, dk, dv = backward(grad_out)``.

    Arguments are those of :func:`scaled_dot_product_attention` (without
    ``return_lse``/``return_weights``). Only ``query``, ``key``, ``value`` (and
    ``mask``), ``out`` and the log-sum-exp are kept between the two passes: the
    backward recomputes the probabilities blockwise, reuses the forward's
    dropout pattern, and sums ``dk``/``dv`` over the query heads sharing a
    key/value head. ``backward`` may be called several times.

    ``grad_out`` must have ``out``'s shape, dtype and array library. The
    gradients have the shapes and dtype of ``query``, ``key`` and ``value``;
    rows with nothing to attend contribute zero gradient. The gradients of an
    additive mask and of ALiBi slopes are not computed; with ``softcap`` the
    ``1 - tanh²`` factor is included.
    """
    if unexpected:
        own = tuple(k for k in _OWN_KEYWORDS if k not in ("return_lse", "return_weights"))
        _refuse_keywords("scaled_dot_product_attention_vjp", unexpected, own)
    pb = normalize(
        query,
        key,
        value,
        mask=mask,
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        needs_vjp=True,
    )
    return _with_backward(pb, select(pb, backend), query.shape, key.shape, value.shape)


def _with_backward(
    pb: Problem, impl: Any, q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...]
) -> tuple[Array, Callable[[Array], tuple[Array, Array, Array]]]:
    """Run the forward of a VJP call and return ``(out, backward)``."""
    _check_result_memory(pb)
    out4, lse4, _ = impl.forward(pb)
    out = out4.reshape(pb.out_shape(pb.dv))

    def backward(grad_out: Array) -> tuple[Array, Array, Array]:
        """Gradients ``(dq, dk, dv)`` of ``sum(out * grad_out)`` w.r.t. query, key, value."""
        lib = array_library(grad_out)
        if lib is None:
            raise TypeError(
                f"grad_out must be a {pb.array_type} array like the output, got {type(grad_out).__name__}; "
                "convert it first (e.g. numpy.asarray(grad_out))"
            )
        if lib == "numpy" and pb.array_type == "dask" and _dask_holds_numpy(out):
            grad_out = _as_dask(grad_out)  # as normalize() wraps NumPy inputs (no copy)
            lib = "dask"
        if lib != pb.array_type:
            raise TypeError(f"grad_out is a {lib} array but the output is a {pb.array_type} array")
        if grad_out.dtype != out.dtype:
            raise TypeError(
                f"grad_out has dtype {grad_out.dtype}, expected {out.dtype} (the output's dtype); "
                f"cast it with grad_out.astype({out.dtype})"
            )
        if tuple(grad_out.shape) != tuple(out.shape):
            raise ValueError(
                f"grad_out has shape {tuple(grad_out.shape)}, expected the output's shape {tuple(out.shape)}"
            )
        dq, dk, dv = impl.backward(pb, out4, lse4, grad_out.reshape(out4.shape))
        return dq.reshape(q_shape), dk.reshape(k_shape), dv.reshape(v_shape)

    return out, backward


def explain(
    query: Array, key: Array, value: Array, *, vjp: bool = False, backend: str | None = None, **options: Any
) -> Explanation:
    """The backend decision for a call, without computing it.

    Takes the arguments of :func:`scaled_dot_product_attention` (``vjp=True``
    explains :func:`scaled_dot_product_attention_vjp` instead). Returns an
    :class:`~selfattn.Explanation` whose ``backend`` is the chosen name, or None
    with ``error`` set when the call would fail; ``trail`` lists each backend
    considered and why it was taken, passed over ("small problem") or skipped,
    then the chosen backend's plan (kernels, threads, graph size) where it
    describes one. Invalid arguments still raise.
    """
    bad = {k: v for k, v in options.items() if k not in _OWN_KEYWORDS}
    if bad:
        _refuse_keywords("explain", bad)
    pb = normalize(query, key, value, needs_vjp=vjp, **options)
    trail: list[str] = []
    try:
        impl = select(pb, backend, trail=trail)
    except Exception as exc:
        return Explanation(None, trail, f"{type(exc).__name__}: {exc}")
    try:
        plan = impl.plan(pb) if callable(getattr(impl, "plan", None)) else ""
    except Exception as exc:  # diagnostics only
        plan = f"unavailable ({type(exc).__name__}: {exc})"
    if plan:
        trail.append(f"{impl.name} plan: {plan}")
    return Explanation(impl.name, trail)


_VARLEN_KEYWORDS = (
    "causal",
    "window",
    "scale",
    "softcap",
    "alibi_slopes",
    "dropout_p",
    "dropout_seed",
    "return_lse",
    "backend",
)


def scaled_dot_product_attention_varlen(
    query: Array,
    key: Array,
    value: Array,
    cu_seqlens_q: Array,
    cu_seqlens_k: Array,
    *,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Array | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    **unexpected: Any,
) -> Array | tuple[Array, Array]:
    """Attention over a packed batch of variable-length sequences (FlashAttention's ``varlen`` layout).

    Parameters
    ----------
    query : array ``(Hq, total_q, D)``
    key : array ``(Hkv, total_k, D)``
    value : array ``(Hkv, total_k, Dv)``
        Heads first, like the rest of the API; the sequences are concatenated
        along axis 1. Dtypes and array libraries as in
        :func:`scaled_dot_product_attention`; GQA as there.
    cu_seqlens_q, cu_seqlens_k : integer arrays of length ``B + 1``
        Cumulative lengths: non-decreasing, starting at 0 and ending at
        ``total_q`` / ``total_k``. Sequence ``b`` has queries
        ``[cu_q[b], cu_q[b+1])`` and keys ``[cu_k[b], cu_k[b+1])`` and attends
        only within them. Empty sequences are allowed.
    causal, window, scale, softcap, dropout_p, dropout_seed, return_lse, backend
        As in :func:`scaled_dot_product_attention`, with causal, window and
        ALiBi positions local to each sequence (bottom-right aligned per
        sequence: ``j <= i + (M_b - N_b)``).
    alibi_slopes : float32/float64 array ``(Hq,)`` or ``(B, Hq)``, optional

    Dropout draws exactly the pattern of the equivalent padded call (sequence
    ``b`` as batch entry ``b``, local positions), so the result equals the
    padded, key-masked call on the same seed. Work and memory scale with
    ``Σ N_b·M_b``, never with ``B·max N·max M``.

    Returns
    -------
    ``out (Hq, total_q, Dv)``, or ``(out, lse)`` with ``lse (Hq, total_q)``
    (float32 for float16 inputs). Query rows of a sequence with no keys get
    output 0 and lse ``-inf``.

    Raises
    ------
    TypeError, ValueError
        Malformed arguments (``cu_seqlens`` decreasing, with wrong ends, of a
        non-integer dtype, or of different lengths for q and k), named, before
        any kernel runs.
    """
    if unexpected:
        _refuse_keywords("scaled_dot_product_attention_varlen", unexpected, _VARLEN_KEYWORDS)
    pb = normalize_varlen(
        query,
        key,
        value,
        cu_seqlens_q,
        cu_seqlens_k,
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        return_lse=return_lse,
    )
    impl = select(pb, backend)
    _check_result_memory(pb)
    out, lse, _ = impl.forward(pb)
    return _package(pb, out, lse, None)


def scaled_dot_product_attention_varlen_vjp(
    query: Array,
    key: Array,
    value: Array,
    cu_seqlens_q: Array,
    cu_seqlens_k: Array,
    *,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Array | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    backend: str | None = None,
    **unexpected: Any,
) -> tuple[Array, Callable[[Array], tuple[Array, Array, Array]]]:
    """:func:`scaled_dot_product_attention_varlen` plus a pullback ``backward(grad_out) -> (dq, dk, dv)``.

    As :func:`scaled_dot_product_attention_vjp`, for the packed layout:
    ``grad_out`` is ``(Hq, total_q, Dv)``; the gradients have the shapes of
    ``query``, ``key`` and ``value``.
    """
    if unexpected:
        _refuse_keywords(
            "scaled_dot_product_attention_varlen_vjp",
            unexpected,
            tuple(k for k in _VARLEN_KEYWORDS if k != "return_lse"),
        )
    pb = normalize_varlen(
        query,
        key,
        value,
        cu_seqlens_q,
        cu_seqlens_k,
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        needs_vjp=True,
    )
    return _with_backward(pb, select(pb, backend), query.shape, key.shape, value.shape)
