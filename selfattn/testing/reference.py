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

__all__ = ["allowed", "dropout_scale", "forward", "vjp"]


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


def dropout_scale(batch_heads_shape, n, m, p, seed):
    """``keep / (1 - p)`` as float64 ``(*batch, Hq, N, M)``, from the documented counter hash."""
    if p == 0.0:
        return np.ones(tuple(batch_heads_shape) + (n, m))
    count = int(np.prod(batch_heads_shape))
    keep = keep_mask(seed, np.arange(count), np.arange(n), np.arange(m), p)
    return keep.reshape(tuple(batch_heads_shape) + (n, m)) / (1.0 - p)


def _as4(query, key, value, mask, grad_out=None):
    # 2-D inputs are one head with no batch: give them a head axis.
    if query.ndim == 2:
        query, key, value = query[None], key[None], value[None]
        mask = None if mask is None else np.asarray(mask)[None] if np.ndim(mask) >= 1 else mask
        grad_out = None if grad_out is None else grad_out[None]
    return query, key, value, mask, grad_out


def _probabilities(q, k, mask, causal, window, scale):
    n, m = q.shape[-2], k.shape[-2]
    s = q @ np.swapaxes(k, -1, -2) * scale
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
    return p, lse


def forward(query, key, value, *, mask=None, causal=False, window=None, scale=None, dropout_p=0.0, dropout_seed=None):
    """Return ``(out, lse, weights)`` in float64 for the given call."""
    two_d = query.ndim == 2
    q, k, v, mask, _ = _as4(*(np.asarray(x, np.float64) for x in (query, key, value)), mask)
    group = q.shape[-3] // k.shape[-3]
    k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, lse = _probabilities(q, k, mask, causal, window, scale)
    z = dropout_scale(q.shape[:-2], q.shape[-2], k.shape[-2], dropout_p, dropout_seed)
    out = (p * z) @ v
    if two_d:
        return out[0], lse[0], p[0]
    return out, lse, p


def vjp(query, key, value, grad_out, *, mask=None, causal=False, window=None, scale=None, dropout_p=0.0,
        dropout_seed=None):
    """Return float64 ``(dq, dk, dv)``: gradients of ``sum(out * grad_out)``."""
    two_d = query.ndim == 2
    q, k, v, mask, do = _as4(*(np.asarray(x, np.float64) for x in (query, key, value)), mask,
                             np.asarray(grad_out, np.float64))
    hkv, group = k.shape[-3], q.shape[-3] // k.shape[-3]
    kr, vr = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, _ = _probabilities(q, kr, mask, causal, window, scale)
    z = dropout_scale(q.shape[:-2], q.shape[-2], kr.shape[-2], dropout_p, dropout_seed)
    dv = np.swapaxes(p * z, -1, -2) @ do
    dp = (do @ np.swapaxes(vr, -1, -2)) * z
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
    dq = ds @ kr * scale
    dk = np.swapaxes(ds, -1, -2) @ q * scale

    def fold(g):  # sum the query heads that share one key/value head
        return g.reshape(g.shape[:-3] + (hkv, group) + g.shape[-2:]).sum(axis=-3)

    dk, dv = fold(dk), fold(dv)
    if two_d:
        return dq[0], dk[0], dv[0]
    return dq, dk, dv
