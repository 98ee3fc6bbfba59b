"""Helpers shared by the tests of selfattn.nn (tests/test_nn_*.py): oracles, finite differences, PyTorch."""

from __future__ import annotations

import math

import numpy as np
import pytest

import selfattn
from selfattn.testing import reference

BACKENDS = [
    r.name
    for r in selfattn.list_backends()
    if r.available and r.capabilities is not None and r.capabilities.array_type == "numpy"
]


def capabilities(backend):
    """The declared capabilities of a backend (dtypes and features), for skipping what it does not support."""
    return next(r.capabilities for r in selfattn.list_backends() if r.name == backend)


def skip_unless_supported(backend, dtype=None, *features):
    caps = capabilities(backend)
    missing = [np.dtype(dtype).name] if dtype is not None and np.dtype(dtype).name not in caps.dtypes else []
    missing += [f for f in features if f not in caps.features]
    if missing:
        pytest.skip(f"backend {backend!r} does not declare {', '.join(missing)}")


#: Tolerance of a layer computed in a dtype against the same layer computed in float64.
TOL = {np.float16: 2e-2, np.float32: 2e-5, np.float64: 1e-10}


def _ref_mha(layer, xq, xk=None, xv=None, mask=None, causal=False, **attention):
    """MultiHeadAttention recomputed in float64 with the reference attention (``attention``: dropout options)."""
    p = {k: v.astype(np.float64) for k, v in layer.params.items()}
    xk = xq if xk is None else xk
    xv = xk if xv is None else xv
    b, n, _ = xq.shape
    m = xk.shape[1]
    h, hkv, hd = layer.num_heads, layer.kv_heads, layer.head_dim

    def lin(x, w, bname):
        return x @ p[w].T + p.get(bname, 0)

    q = lin(xq, "q_weight", "q_bias").reshape(b, n, h, hd).transpose(0, 2, 1, 3)
    k = lin(xk, "k_weight", "k_bias").reshape(b, m, hkv, hd).transpose(0, 2, 1, 3)
    v = lin(xv, "v_weight", "v_bias").reshape(b, m, hkv, hd).transpose(0, 2, 1, 3)
    o, _, w = reference.forward(q, k, v, mask=mask, causal=causal, **attention)
    o = o.transpose(0, 2, 1, 3).reshape(b, n, -1)
    return lin(o, "out_weight", "out_bias"), w


def naive_attention(q, k, v, *, causal=False, softcap=None, slopes=None):
    """float64 attention written out in full, with softcap and ALiBi (FlashAttention 2's definitions).

    ``q (..., H, N, D)``, ``k``/``v`` ``(..., Hkv, M, D)``. Scores ``q.k / sqrt(D)``,
    then ``softcap * tanh(s / softcap)``, then ``- slope[h] * |i + M - N - j|``,
    then the bottom-right causal band, softmax; rows with nothing allowed give 0.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[-3] // k.shape[-3]
    k, v = np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3)
    n, m = q.shape[-2], k.shape[-2]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    i, j = np.arange(n)[:, None], np.arange(m)[None, :]
    if slopes is not None:
        s = s - np.asarray(slopes, np.float64)[:, None, None] * np.abs(i + (m - n) - j)
    allowed = np.broadcast_to(j <= i + (m - n), s.shape) if causal else np.ones(s.shape, bool)
    s = np.where(allowed, s, -np.inf)
    top = np.where(allowed.any(-1, keepdims=True), s.max(-1, keepdims=True), 0.0)
    e = np.where(allowed, np.exp(s - top), 0.0)
    den = e.sum(-1, keepdims=True)
    p = np.divide(e, den, out=np.zeros_like(e), where=den > 0)
    return p @ v


def naive_mha(layer, xq, xk=None, xv=None, *, causal=False):
    """MultiHeadAttention with softcap/ALiBi, in float64, from the layer's parameters and :func:`naive_attention`."""
    p = {k: v.astype(np.float64) for k, v in layer.params.items()}
    xk = xq if xk is None else xk
    xv = xk if xv is None else xv

    def lin(x, name, heads):
        y = x @ p[f"{name}_weight"].T + p.get(f"{name}_bias", 0)
        return y.reshape(*y.shape[:-1], heads, -1).swapaxes(-2, -3)

    o = naive_attention(
        lin(xq, "q", layer.num_heads),
        lin(xk, "k", layer.kv_heads),
        lin(xv, "v", layer.kv_heads),
        causal=causal,
        softcap=layer.softcap,
        slopes=layer.alibi_slopes,
    )
    o = o.swapaxes(-2, -3).reshape(*xq.shape[:-1], -1)
    return o @ p["out_weight"].T + p.get("out_bias", 0)


def perturb(layer, rng, scale=0.1):
    """Add noise to every parameter of a layer or stack (non-zero biases, so they are exercised)."""
    layer.load_state_dict({name: value + rng.normal(size=value.shape) * scale for name, value in layer.params.items()})
    return layer


def _fd_check(f, x, g, analytic, eps=1e-6, samples=6, rng=None):
    """Central finite differences of sum(f() * g) at random entries of x (modified in place, restored)."""
    rng = rng or np.random.default_rng(0)
    flat = x.reshape(-1)
    for idx in rng.choice(flat.size, size=min(samples, flat.size), replace=False):
        old = flat[idx]
        flat[idx] = old + eps
        up = np.sum(f() * g)
        flat[idx] = old - eps
        down = np.sum(f() * g)
        flat[idx] = old
        num = (up - down) / (2 * eps)
        assert abs(num - analytic.reshape(-1)[idx]) <= 1e-6 * max(1.0, abs(num)), (idx, num, analytic.reshape(-1)[idx])


def _torch():
    return pytest.importorskip("torch", reason="PyTorch not installed: pip install torch (CPU build is enough)")


def _sd(module):
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
