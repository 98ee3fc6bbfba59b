"""The oracle: deliberately simple, materialized, float64 attention.

Every backend is tested against these functions. They build the full
``(..., Hq, N, M)`` score matrix, repeat K/V per query head, and follow the
definitions literally, so they are short enough to check by eye. Do not use
them for real work.

Shapes and options are those of :func:`selfattn.scaled_dot_product_attention`;
all results are float64 NumPy arrays with the caller-facing shapes.
"""

from __future__ import annotations

import math

import numpy as np

from .._dropout import keep_mask

__all__ = ["allowed", "dropout_scale", "forward", "vjp", "score_max", "rounding_bounds", "forward_varlen", "vjp_varlen"]


def allowed(n, m, causal=False, window=None):
    """Boolean ``(N, M)``: True where causal/window masking lets query ``i`` see key ``j``."""
    i = np.arange(n)[:, None] + (m - n)  # bottom-right alignment
    j = np.arange(m)[None, :]
    ok = np.ones((n, m), dtype=bool)
    if causal:
        ok &= j <= i
    if window is not None:
        left, right = (window, window) if np.ndim(window) == 0 else window
        ok &= (j >= i - left) & (j <= i + right)
    return ok


def dropout_scale(batch_heads_shape, n, m, p, seed, bh_start=0):
    """``keep / (1 - p)`` as float64 ``(*batch, Hq, N, M)``, from the documented counter hash.

    Batch·head counters run from ``bh_start`` (a packed sequence ``s`` uses ``s * Hq``).
    """
    if p == 0.0:
        return np.ones(tuple(batch_heads_shape) + (n, m))
    count = int(np.prod(batch_heads_shape))
    keep = keep_mask(seed, bh_start + np.arange(count), np.arange(n), np.arange(m), p)
    return keep.reshape(tuple(batch_heads_shape) + (n, m)) / (1.0 - p)


def _as4(query, key, value, mask, grad_out=None):
    # 2-D inputs are one head with no batch: give them a head axis.
    if query.ndim == 2:
        query, key, value = query[None], key[None], value[None]
        mask = None if mask is None else np.asarray(mask)[None] if np.ndim(mask) >= 1 else mask
        grad_out = None if grad_out is None else grad_out[None]
    return query, key, value, mask, grad_out


def _probabilities(q, k, mask, causal, window, scale, softcap=None, alibi_slopes=None):
    """``(p, lse, t)``: probabilities, log-sum-exp, and ``tanh(s/softcap)`` (None without soft-capping).

    In the API's order: scale, softcap, + ALiBi ``-slope_h |i + (M-N) - j|``,
    + mask, band, softmax.
    """
    n, m = q.shape[-2], k.shape[-2]
    s = q @ np.swapaxes(k, -1, -2) * scale
    t = None
    if softcap is not None:
        t = np.tanh(s / softcap)
        s = softcap * t
    if alibi_slopes is not None:
        dist = np.abs(np.arange(n)[:, None] + (m - n) - np.arange(m)[None, :])
        slopes = np.asarray(alibi_slopes, np.float64)
        s = s - slopes.reshape(slopes.shape + (1, 1)) * dist
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask.astype(np.float64)
    s = np.where(allowed(n, m, causal, window), s, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = s.max(axis=-1, keepdims=True) if m else np.full(s.shape[:-1] + (1,), -np.inf)
        mx = np.where(np.isneginf(mx), 0.0, mx)
        e = np.exp(s - mx)
        total = e.sum(axis=-1, keepdims=True)
        p = np.where(total == 0, 0.0, e / np.where(total == 0, 1.0, total))
        lse = (mx + np.log(total))[..., 0]
    return p, lse, t


def forward(
    query,
    key,
    value,
    *,
    mask=None,
    causal=False,
    window=None,
    scale=None,
    softcap=None,
    alibi_slopes=None,
    dropout_p=0.0,
    dropout_seed=None,
    _bh_start=0,
):
    """Return ``(out, lse, weights)`` in float64 for the given call."""
    two_d = query.ndim == 2
    q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
    q, k, v, mask, _ = _as4(q, k, v, mask)
    group = q.shape[-3] // k.shape[-3]
    k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, lse, _ = _probabilities(q, k, mask, causal, window, scale, softcap, alibi_slopes)
    z = dropout_scale(q.shape[:-2], q.shape[-2], k.shape[-2], dropout_p, dropout_seed, _bh_start)
    out = (p * z) @ v
    if two_d:
        return out[0], lse[0], p[0]
    return out, lse, p


def vjp(
    query,
    key,
    value,
    grad_out,
    *,
    mask=None,
    causal=False,
    window=None,
    scale=None,
    softcap=None,
    alibi_slopes=None,
    dropout_p=0.0,
    dropout_seed=None,
    _bh_start=0,
):
    """Return float64 ``(dq, dk, dv)``: gradients of ``sum(out * grad_out)`` (none for mask or ALiBi slopes)."""
    two_d = query.ndim == 2
    q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
    q, k, v, mask, do = _as4(q, k, v, mask, np.asarray(grad_out, np.float64))
    hkv, group = k.shape[-3], q.shape[-3] // k.shape[-3]
    kr, vr = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, _, t = _probabilities(q, kr, mask, causal, window, scale, softcap, alibi_slopes)
    z = dropout_scale(q.shape[:-2], q.shape[-2], kr.shape[-2], dropout_p, dropout_seed, _bh_start)
    dv = np.swapaxes(p * z, -1, -2) @ do
    dp = (do @ np.swapaxes(vr, -1, -2)) * z
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
    if t is not None:
        ds = ds * (1.0 - t * t)  # d(softcap·tanh(s/softcap))/ds
    dq = ds @ kr * scale
    dk = np.swapaxes(ds, -1, -2) @ q * scale

    def fold(g):  # sum the query heads that share one key/value head
        return g.reshape(g.shape[:-3] + (hkv, group) + g.shape[-2:]).sum(axis=-3)

    dk, dv = fold(dk), fold(dv)
    if two_d:
        return dq[0], dk[0], dv[0]
    return dq, dk, dv


def rounding_bounds(
    query,
    key,
    value,
    grad_out=None,
    *,
    mask=None,
    causal=False,
    window=None,
    scale=None,
    softcap=None,
    alibi_slopes=None,
    dropout_p=0.0,
    dropout_seed=None,
    _bh_start=0,
) -> dict:
    """Per-element float64 error allowances for two roundings that standard attention algorithms make.

    Returns ``{"out": ...}``, plus ``"dq"`` and ``"dk"`` when ``grad_out`` is
    given, each shaped like that output. With ``eps`` one unit in the last
    place of the input dtype:

    * ``out``: ``eps * sum_j P~_ij |V_jd|`` (``P~`` the dropped, rescaled
      weights). Tensor-core kernels (FlashAttention's, the CuPy backend's
      float16 forward) round the weights to the input dtype before the
      ``P @ V`` product, each by up to half an ulp.
    * ``dq``, ``dk``: a FlashAttention-style backward forms
      ``delta_i = sum_d dO_id * O_id`` from the output as returned (rounded to
      the input dtype). With ``dS_ij = P_ij (dP_ij - delta_i)``, an error
      ``e_i <= eps * sum_d |dO_id| |O_id|`` in ``delta_i`` moves ``dq_i`` by
      ``scale * e_i * sum_j P_ij k_j`` and ``dk_j`` by ``scale * sum_i P_ij e_i q_i``;
      the bounds are those sums in absolute values.

    ``eps`` is twice the half-ulp of one rounding, which also covers a
    backend's own rounding before ours. Both terms are negligible for float32
    and float64; for float16 they are the dominant, unavoidable errors.
    """
    eps = float(np.finfo(np.asarray(query).dtype).eps)
    two_d = query.ndim == 2
    q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
    q, k, v, mask, do = _as4(q, k, v, mask, None if grad_out is None else np.asarray(grad_out, np.float64))
    hkv, group = k.shape[-3], q.shape[-3] // k.shape[-3]
    kr, vr = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, _, _ = _probabilities(q, kr, mask, causal, window, scale, softcap, alibi_slopes)
    z = dropout_scale(q.shape[:-2], q.shape[-2], kr.shape[-2], dropout_p, dropout_seed, _bh_start)
    bounds = {"out": eps * ((p * z) @ np.abs(vr))}
    if do is not None:
        out = (p * z) @ vr
        e = eps * np.sum(np.abs(do) * np.abs(out), axis=-1, keepdims=True)  # (..., Hq, N, 1)
        pe = p * e
        bounds["dq"] = pe @ np.abs(kr) * scale
        bk = np.swapaxes(pe, -1, -2) @ np.abs(q) * scale
        bounds["dk"] = bk.reshape(bk.shape[:-3] + (hkv, group) + bk.shape[-2:]).sum(axis=-3)
    if two_d:
        bounds = {name: b[0] for name, b in bounds.items()}
    return bounds


def score_max(query, key, *, mask=None, scale=None, softcap=None, alibi_slopes=None) -> float:
    """The largest logit magnitude over every pair (0.0 when empty): scaled, soft-capped, with ALiBi and a float mask.

    A float ``mask`` is added (a bool mask changes nothing here): the number
    measures how large the logits of a call are, which is what rounding
    errors in a backend's softmax grow with (see
    :func:`selfattn.testing.cases.logit_headroom`). Non-finite entries are ignored.

    With ``softcap`` the scaled scores are rounded *before* the cap: a score
    computed as a cancelling sum of large terms carries an error of about
    ``eps * |raw scores|`` that ``tanh`` passes on near 0 (slope 1), however
    small the capped logits are. So the uncapped magnitude counts too
    (measured: a float32 call with raw logits ~100 and ``softcap = 1`` gave the
    NumPy backend an lse error 1.18x the tolerance computed from the capped
    logits, 4.0; a hypothesis draw found it).
    """
    q, k = np.asarray(query, np.float64), np.asarray(key, np.float64)
    if q.ndim == 2:
        q, k = q[None], k[None]
    if q.size == 0 or k.size == 0:
        return 0.0
    group = q.shape[-3] // k.shape[-3]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n, m = q.shape[-2], k.shape[-2]
    with np.errstate(invalid="ignore", over="ignore"):
        s = q @ np.swapaxes(np.repeat(k, group, axis=-3), -1, -2) * scale
        raw = 0.0
        if softcap is not None:
            finite = np.abs(s[np.isfinite(s)])
            raw = float(finite.max()) if finite.size else 0.0
            s = softcap * np.tanh(s / softcap)
        if alibi_slopes is not None:
            slopes = np.asarray(alibi_slopes, np.float64)
            s = s - slopes.reshape(slopes.shape + (1, 1)) * np.abs(np.arange(n)[:, None] + (m - n) - np.arange(m))
        if mask is not None and np.asarray(mask).dtype != bool:
            s = s + np.asarray(mask, np.float64)  # broadcasts like the scores (2-D inputs too)
    s = np.abs(s[np.isfinite(s)])
    return max(float(s.max()) if s.size else 0.0, raw)


def _sequences(cu_seqlens_q, cu_seqlens_k):
    cq, ck = np.asarray(cu_seqlens_q, np.int64), np.asarray(cu_seqlens_k, np.int64)
    return [(int(cq[s]), int(cq[s + 1]), int(ck[s]), int(ck[s + 1])) for s in range(len(cq) - 1)]


def _sequence_options(options, s):
    opts = dict(options)
    slopes = opts.get("alibi_slopes")
    if slopes is not None and np.ndim(slopes) == 2:
        opts["alibi_slopes"] = np.asarray(slopes)[s]
    return opts


def forward_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, **options):
    """``(out, lse)`` of a packed variable-length call, one sequence at a time with :func:`forward`.

    Sequence ``s`` is an ordinary call on its own rows and keys (bottom-right
    aligned on its own lengths), with ALiBi row ``s`` and the dropout counters
    of batch entry ``s`` of the padded call.
    """
    hq = query.shape[0]
    out = np.zeros(query.shape[:2] + value.shape[2:])
    lse = np.full(query.shape[:2], -np.inf)
    for s, (q0, q1, k0, k1) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        o, ls, _ = forward(
            query[:, q0:q1], key[:, k0:k1], value[:, k0:k1], _bh_start=s * hq, **_sequence_options(options, s)
        )
        out[:, q0:q1], lse[:, q0:q1] = o, ls
    return out, lse


def vjp_varlen(query, key, value, grad_out, cu_seqlens_q, cu_seqlens_k, **options):
    """``(dq, dk, dv)`` of a packed variable-length call, one sequence at a time with :func:`vjp`."""
    hq = query.shape[0]
    dq, dk, dv = np.zeros(query.shape), np.zeros(key.shape), np.zeros(value.shape)
    for s, (q0, q1, k0, k1) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        g = vjp(
            query[:, q0:q1],
            key[:, k0:k1],
            value[:, k0:k1],
            grad_out[:, q0:q1],
            _bh_start=s * hq,
            **_sequence_options(options, s),
        )
        dq[:, q0:q1], dk[:, k0:k1], dv[:, k0:k1] = g
    return dq, dk, dv
