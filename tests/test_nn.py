"""Tests of selfattn.nn: layers vs the reference attention, finite differences and PyTorch."""

import math

import numpy as np
import pytest

import selfattn
from selfattn import nn
from selfattn.testing import reference

BACKENDS = [r.name for r in selfattn.list_backends()
            if r.available and r.capabilities is not None and r.capabilities.array_type == "numpy"]


def _ref_mha(layer, xq, xk=None, xv=None, mask=None, causal=False):
    """MultiHeadAttention recomputed in float64 with the reference attention."""
    p = {k: v.astype(np.float64) for k, v in layer.params.items()}
    xk = xq if xk is None else xk
    xv = xk if xv is None else xv
    b, n, _ = xq.shape
    m = xk.shape[1]
    h, hkv, hd = layer.num_heads, layer.kv_heads, layer.head_dim

    def lin(x, w, bname):
        return x @ p[w].T + (p[bname] if bname in p else 0)

    q = lin(xq, "q_weight", "q_bias").reshape(b, n, h, hd).transpose(0, 2, 1, 3)
    k = lin(xk, "k_weight", "k_bias").reshape(b, m, hkv, hd).transpose(0, 2, 1, 3)
    v = lin(xv, "v_weight", "v_bias").reshape(b, m, hkv, hd).transpose(0, 2, 1, 3)
    o, _, w = reference.forward(q, k, v, mask=mask, causal=causal)
    o = o.transpose(0, 2, 1, 3).reshape(b, n, -1)
    return lin(o, "out_weight", "out_bias"), w


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ----------------------------------------------------------------------------- MultiHeadAttention vs reference

@pytest.mark.parametrize("kv_heads", [None, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_mha_self_attention_matches_reference(backend, kv_heads, causal):
    rng = np.random.default_rng(0)
    layer = nn.MultiHeadAttention(16, 4, kv_heads=kv_heads, dtype=np.float64, seed=1)
    for name in layer.params:  # non-zero biases so they are exercised
        layer.params[name] = layer.params[name] + rng.normal(size=layer.params[name].shape) * 0.1
    x = rng.normal(size=(3, 7, 16))
    out, w = layer(x, causal=causal, need_weights=True, average_weights=False, backend=backend)
    ref, ref_w = _ref_mha(layer, x, causal=causal)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(w, ref_w, rtol=1e-10, atol=1e-12)
    _, wavg = layer(x, causal=causal, need_weights=True, backend=backend)
    np.testing.assert_allclose(wavg, ref_w.mean(axis=1), rtol=1e-10, atol=1e-12)


def test_mha_cross_attention_kdim_vdim_and_masks(backend):
    rng = np.random.default_rng(1)
    layer = nn.MultiHeadAttention(12, 3, kdim=5, vdim=7, dtype=np.float64, seed=2)
    xq, xk, xv = rng.normal(size=(2, 4, 12)), rng.normal(size=(2, 6, 5)), rng.normal(size=(2, 6, 7))
    bool_mask = rng.random((4, 6)) < 0.7
    bool_mask[:, 0] = True
    key_mask = np.array([[True] * 6, [True] * 4 + [False] * 2])
    out = layer(xq, xk, xv, mask=bool_mask, key_mask=key_mask, backend=backend)
    full = bool_mask[None, None] & key_mask[:, None, None, :]
    ref, _ = _ref_mha(layer, xq, xk, xv, mask=full)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    # additive float mask combined with key_mask
    fmask = rng.normal(size=(2, 1, 4, 6))
    out = layer(xq, xk, xv, mask=fmask, key_mask=key_mask, backend=backend)
    ref, _ = _ref_mha(layer, xq, xk, xv, mask=fmask + np.where(key_mask, 0, -np.inf)[:, None, None, :])
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    # padding keys have no influence
    xk2, xv2 = xk.copy(), xv.copy()
    xk2[1, 4:] = 100.0
    xv2[1, 4:] = -50.0
    np.testing.assert_allclose(layer(xq, xk2, xv2, key_mask=key_mask), layer(xq, xk, xv, key_mask=key_mask),
                               rtol=1e-12)


def test_mha_unbatched_fully_masked_and_float32():
    layer = nn.MultiHeadAttention(8, 2, seed=0)
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    out = layer(x)
    assert out.shape == (5, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out, layer(x[None])[0], rtol=1e-6)
    # rows with nothing to attend give out_bias (zero here), never NaN
    mask = np.ones((5, 5), bool)
    mask[2] = False
    out = layer(x, mask=mask)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[2], layer.params["out_bias"])


def test_mha_dropout_only_in_training_and_seeded():
    layer = nn.MultiHeadAttention(8, 2, dropout_p=0.5, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).normal(size=(2, 6, 8))
    np.testing.assert_array_equal(layer(x), layer(x))
    a = layer(x, training=True, dropout_seed=3)
    b = layer(x, training=True, dropout_seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, layer(x))


def test_mha_state_dict_roundtrip(tmp_path):
    layer = nn.MultiHeadAttention(8, 2, kv_heads=1, seed=0)
    path = tmp_path / "mha.npz"
    np.savez(path, **layer.state_dict())
    other = nn.MultiHeadAttention(8, 2, kv_heads=1, seed=99)
    other.load_state_dict(np.load(path))
    x = np.random.default_rng(0).normal(size=(1, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), other(x))
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"q_weight": layer.params["q_weight"]})
    bad = layer.state_dict()
    bad["k_weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="k_weight"):
        other.load_state_dict(bad)


def test_mha_init_matches_pytorch_scheme():
    layer = nn.MultiHeadAttention(64, 4, seed=0)
    bound = math.sqrt(6 / (64 + 3 * 64))
    for k in ("q_weight", "k_weight", "v_weight"):
        assert np.abs(layer.params[k]).max() <= bound
        assert np.abs(layer.params[k]).max() > 0.9 * bound
    for k in ("q_bias", "k_bias", "v_bias", "out_bias"):
        assert not layer.params[k].any()
    assert np.abs(layer.params["out_weight"]).max() <= 1 / 8
    gqa = nn.MultiHeadAttention(64, 4, kv_heads=2, seed=0)
    assert gqa.params["k_weight"].shape == (32, 64)
    np.testing.assert_array_equal(nn.MultiHeadAttention(64, 4, seed=5).params["q_weight"],
                                  nn.MultiHeadAttention(64, 4, seed=5).params["q_weight"])


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(embed_dim=10, num_heads=3), ValueError, "embed_dim"),
    (dict(embed_dim=8, num_heads=4, kv_heads=3), ValueError, "kv_heads"),
    (dict(embed_dim=8.0, num_heads=2), TypeError, "embed_dim"),
    (dict(embed_dim=8, num_heads=0), ValueError, "num_heads"),
    (dict(embed_dim=8, num_heads=2, dropout_p=1.0), ValueError, "dropout_p"),
    (dict(embed_dim=8, num_heads=2, dtype=np.int32), TypeError, "dtype"),
])
def test_mha_constructor_errors(kwargs, exc, word):
    e, h = kwargs.pop("embed_dim"), kwargs.pop("num_heads")
    with pytest.raises(exc, match=word):
        nn.MultiHeadAttention(e, h, **kwargs)


def test_mha_call_errors():
    layer = nn.MultiHeadAttention(8, 2, seed=0)
    x = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(ValueError, match="query"):
        layer(np.zeros((2, 3, 5)))
    with pytest.raises(TypeError, match="query"):
        layer(np.array([["a"] * 8]))
    with pytest.raises(ValueError, match="key_mask"):
        layer(x, key_mask=np.ones((2, 4), bool))
    with pytest.raises(TypeError, match="key_mask"):
        layer(x, key_mask=np.ones((2, 3), np.int64))
    with pytest.raises(TypeError, match="mask"):
        layer(x, mask=np.ones((3, 3), np.int64))
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=np.ones((6, 3, 3), bool))
    with pytest.raises(ValueError, match="batch"):
        layer(x, np.zeros((3, 3, 8)))
    with pytest.raises(TypeError, match="causal"):
        layer(x, causal="yes")


# ----------------------------------------------------------------------------- gradients

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


@pytest.mark.parametrize("mode", ["self", "cross", "key_only"])
@pytest.mark.parametrize("kv_heads", [None, 1])
def test_mha_vjp_finite_differences(backend, mode, kv_heads):
    rng = np.random.default_rng(3)
    kdim = 16 if mode != "cross" else 6
    vdim = 16 if mode != "cross" else 5
    if mode == "key_only":
        vdim = kdim = 7
    layer = nn.MultiHeadAttention(16, 4, kv_heads=kv_heads, kdim=kdim, vdim=vdim, dtype=np.float64, seed=4)
    for name in layer.params:
        layer.params[name] = layer.params[name] + rng.normal(size=layer.params[name].shape) * 0.1
    xq = rng.normal(size=(2, 5, 16))
    xk = None if mode == "self" else rng.normal(size=(2, 6, kdim))
    xv = rng.normal(size=(2, 6, vdim)) if mode == "cross" else None
    key_mask = np.ones((2, 5 if mode == "self" else 6), bool)
    key_mask[1, -1] = False
    kw = dict(key_mask=key_mask, causal=(mode == "self"), backend=backend)
    out, back = layer.vjp(xq, xk, xv, **kw)
    np.testing.assert_allclose(out, layer(xq, xk, xv, **kw), rtol=1e-12, atol=1e-14)
    g = rng.normal(size=out.shape)
    dq, dk, dv, dp = back(g)
    assert set(dp) == set(layer.params)
    f = lambda: layer(xq, xk, xv, **kw)  # noqa: E731
    _fd_check(f, xq, g, dq)
    if mode == "self":
        assert dk is None and dv is None
    else:
        _fd_check(f, xk, g, dk)
    if mode == "cross":
        _fd_check(f, xv, g, dv)
    else:
        assert dv is None
    for name, grad in dp.items():
        assert grad.shape == layer.params[name].shape
        _fd_check(f, layer.params[name], g, grad, samples=4)


def test_mha_vjp_with_dropout_consistent():
    rng = np.random.default_rng(5)
    layer = nn.MultiHeadAttention(8, 2, dropout_p=0.3, dtype=np.float64, seed=0)
    x = rng.normal(size=(1, 4, 8))
    kw = dict(training=True, dropout_seed=11)
    out, back = layer.vjp(x, **kw)
    np.testing.assert_array_equal(out, layer(x, **kw))
    g = rng.normal(size=out.shape)
    dq, _, _, dp = back(g)
    _fd_check(lambda: layer(x, **kw), x, g, dq)
    _fd_check(lambda: layer(x, **kw), layer.params["v_weight"], g, dp["v_weight"])
    with pytest.raises(ValueError, match="grad_out"):
        back(np.zeros((1, 4, 7)))


# ----------------------------------------------------------------------------- positional encodings

def test_sinusoidal_positions():
    p = nn.sinusoidal_positions(50, 16)
    assert p.shape == (50, 16) and p.dtype == np.float32
    np.testing.assert_allclose(p[7, 4], math.sin(7 / 10000 ** (4 / 16)), rtol=1e-6)
    np.testing.assert_allclose(p[7, 5], math.cos(7 / 10000 ** (4 / 16)), rtol=1e-6)
    assert nn.sinusoidal_positions(0, 4).shape == (0, 4)
    assert nn.sinusoidal_positions(3, 5, dtype=np.float64).shape == (3, 5)
    with pytest.raises(ValueError, match="length"):
        nn.sinusoidal_positions(-1, 4)
    with pytest.raises(TypeError, match="dim"):
        nn.sinusoidal_positions(3, 4.5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_relative_and_norm(interleaved):
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(1, 8)), rng.normal(size=(1, 8))

    def dot(m, n):
        return float(nn.apply_rotary(q, np.array([m]), interleaved=interleaved)[0]
                     @ nn.apply_rotary(k, np.array([n]), interleaved=interleaved)[0])

    assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-10)
    assert dot(5, 2) != pytest.approx(dot(5, 3), rel=1e-3)
    x = rng.normal(size=(2, 3, 10, 8)).astype(np.float32)
    r = nn.apply_rotary(x, np.arange(10), interleaved=interleaved)
    assert r.dtype == np.float32 and r.shape == x.shape
    np.testing.assert_allclose(np.linalg.norm(r, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(nn.apply_rotary(x, np.zeros(10), interleaved=interleaved), x)


def test_rotary_layouts_are_permutations():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6))
    perm = np.concatenate([np.arange(0, 6, 2), np.arange(1, 6, 2)])  # interleaved -> half-split order
    inter = nn.apply_rotary(x, np.arange(4), interleaved=True)
    half = nn.apply_rotary(x[:, perm], np.arange(4), interleaved=False)
    np.testing.assert_allclose(inter[:, perm], half, rtol=1e-12)
    # explicit check of the half-split formula at one position
    theta = 3 * 10000.0 ** (-np.arange(0, 6, 2) / 6)
    x1, x2 = x[3, :3], x[3, 3:]
    np.testing.assert_allclose(nn.apply_rotary(x, np.arange(4))[3],
                               np.concatenate([x1 * np.cos(theta) - x2 * np.sin(theta),
                                               x2 * np.cos(theta) + x1 * np.sin(theta)]), rtol=1e-12)
    with pytest.raises(ValueError, match="even"):
        nn.apply_rotary(np.zeros((2, 5)), np.arange(2))
    with pytest.raises(ValueError, match="positions"):
        nn.apply_rotary(np.zeros((2, 4)), np.arange(3))
    with pytest.raises(TypeError, match="x"):
        nn.apply_rotary(np.zeros((2, 4), np.int32), np.arange(2))


# ----------------------------------------------------------------------------- LayerNorm / FF / encoder

def test_erf_and_gelu():
    x = np.linspace(-9, 9, 20001)
    np.testing.assert_allclose(nn.erf(x), [math.erf(v) for v in x], rtol=1e-14, atol=1e-15)
    assert np.isnan(nn.erf(np.array([np.nan]))).all()
    np.testing.assert_allclose(nn.gelu(x), x * 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x])),
                               rtol=1e-13, atol=1e-13)


def test_layernorm_and_feedforward_basics():
    ln = nn.LayerNorm(6, dtype=np.float64)
    x = np.random.default_rng(0).normal(size=(2, 3, 6)) * 5 + 3
    y = ln(x)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-4)
    np.testing.assert_array_equal(ln(np.ones((1, 6))), 0)
    with pytest.raises(ValueError, match="x"):
        ln(np.zeros((2, 5)))
    ff = nn.FeedForward(6, 12, activation="gelu", dtype=np.float64, seed=0)
    p = ff.params
    h = x @ p["linear1_weight"].T + p["linear1_bias"]
    np.testing.assert_allclose(ff(x), nn.gelu(h) @ p["linear2_weight"].T + p["linear2_bias"], rtol=1e-12)
    with pytest.raises(ValueError, match="activation"):
        nn.FeedForward(6, 12, activation="tanh")


def test_encoder_runs_and_saves(tmp_path, backend):
    enc = nn.TransformerEncoder(2, 8, 2, 16, norm_first=True, final_norm=True, seed=0)
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    key_mask = np.array([[True] * 5, [True] * 3 + [False] * 2])
    y = enc(x, key_mask=key_mask, backend=backend)
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
    np.savez(tmp_path / "enc.npz", **enc.state_dict())
    other = nn.TransformerEncoder(2, 8, 2, 16, norm_first=True, final_norm=True, seed=1)
    other.load_state_dict(np.load(tmp_path / "enc.npz"))
    np.testing.assert_allclose(other(x, key_mask=key_mask), y, rtol=1e-5, atol=1e-6)  # BLAS alignment may differ
    y_train = enc(x, training=True, rng=np.random.default_rng(0))  # dropout_p=0: same as eval
    np.testing.assert_allclose(y_train, enc(x), rtol=1e-6)


def test_import_is_light():
    import subprocess
    import sys
    code = ("import sys, selfattn.nn; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'scipy', 'numba', 'cupy')]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- PyTorch equality

def _torch():
    return pytest.importorskip("torch", reason="PyTorch not installed: pip install torch (CPU build is enough)")


def _sd(module):
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kdim_vdim", [None, (5, 7)])
def test_mha_matches_torch(kdim_vdim):
    torch = _torch()
    torch.set_grad_enabled(False)
    try:
        _mha_matches_torch(torch, kdim_vdim)
    finally:
        torch.set_grad_enabled(True)


def _mha_matches_torch(torch, kdim_vdim):
    torch.manual_seed(0)
    kd, vd = kdim_vdim or (None, None)
    tm = torch.nn.MultiheadAttention(12, 3, batch_first=True, kdim=kd, vdim=vd).double().eval()
    with torch.no_grad():
        for prm in tm.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)  # non-zero biases
    layer = nn.MultiHeadAttention.from_torch(_sd(tm), 3)
    assert layer.dtype == np.float64
    rng = np.random.default_rng(0)
    b, n, m = 2, 4, 6
    xq = rng.normal(size=(b, n, 12))
    xk = rng.normal(size=(b, m, kd or 12))
    xv = rng.normal(size=(b, m, vd or 12))
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    # no mask, weights averaged and per head
    ref, ref_w = tm(t(xq), t(xk), t(xv), need_weights=True)
    out, w = layer(xq, xk, xv, need_weights=True)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(w, ref_w.numpy(), rtol=1e-10, atol=1e-12)
    ref, ref_w = tm(t(xq), t(xk), t(xv), need_weights=True, average_attn_weights=False)
    _, w = layer(xq, xk, xv, need_weights=True, average_weights=False)
    np.testing.assert_allclose(w, ref_w.numpy(), rtol=1e-10, atol=1e-12)
    # PyTorch bool masks: True = NOT allowed. Ours: True = attend -> invert.
    t_mask = torch.from_numpy(rng.random((n, m)) < 0.3)
    t_mask[:, 0] = False
    kpm = torch.tensor([[False] * m, [False] * (m - 2) + [True] * 2])
    ref, _ = tm(t(xq), t(xk), t(xv), attn_mask=t_mask, key_padding_mask=kpm)
    out = layer(xq, xk, xv, mask=~t_mask.numpy(), key_mask=~kpm.numpy())
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    # float attn_mask is additive in both; a (B*H, N, M) one reshapes to (B, H, N, M)
    f_mask = rng.normal(size=(b * 3, n, m))
    ref, _ = tm(t(xq), t(xk), t(xv), attn_mask=t(f_mask))
    out = layer(xq, xk, xv, mask=f_mask.reshape(b, 3, n, m))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_mha_self_causal_matches_torch_float32():
    torch = _torch()
    torch.manual_seed(1)
    tm = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    layer = nn.MultiHeadAttention.from_torch(_sd(tm), 4)
    x = np.random.default_rng(1).normal(size=(3, 9, 16)).astype(np.float32)
    tx = torch.from_numpy(x)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(9)
    with torch.no_grad():
        ref, _ = tm(tx, tx, tx, attn_mask=causal, need_weights=False)
    np.testing.assert_allclose(layer(x, causal=True), ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first, activation):
    torch = _torch()
    torch.manual_seed(2)
    tl = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, activation=activation, batch_first=True,
                                          norm_first=norm_first).double().eval()
    with torch.no_grad():
        for prm in tl.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    layer = nn.TransformerEncoderLayer.from_torch(_sd(tl), 4, norm_first=norm_first, activation=activation)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 7, 16))
    kpm = np.zeros((2, 7), bool)
    kpm[1, 5:] = True
    with torch.no_grad():
        ref = tl(torch.from_numpy(x), src_key_padding_mask=torch.from_numpy(kpm)).numpy()
        ref_c = tl(torch.from_numpy(x), src_mask=torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64),
                   is_causal=True).numpy()
    out = layer(x, key_mask=~kpm)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out[1, :5], ref[1, :5], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(layer(x, causal=True), ref_c, rtol=1e-9, atol=1e-10)


def test_encoder_stack_matches_torch_float32():
    torch = _torch()
    torch.manual_seed(3)
    proto = torch.nn.TransformerEncoderLayer(16, 2, 24, batch_first=True, activation="gelu")
    te = torch.nn.TransformerEncoder(proto, 3, norm=torch.nn.LayerNorm(16), enable_nested_tensor=False).eval()
    enc = nn.TransformerEncoder.from_torch(_sd(te), 2, activation="gelu")
    assert len(enc.layers) == 3 and enc.norm is not None
    x = np.random.default_rng(3).normal(size=(2, 6, 16)).astype(np.float32)
    with torch.no_grad():
        ref = te(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(enc(x), ref, rtol=1e-4, atol=1e-5)


def test_mha_from_torch_without_bias_and_rejects_bias_kv():
    torch = _torch()
    torch.manual_seed(4)
    with torch.no_grad():
        tm = torch.nn.MultiheadAttention(8, 2, bias=False, batch_first=True).double().eval()
        layer = nn.MultiHeadAttention.from_torch(_sd(tm), 2)
        assert "q_bias" not in layer.params
        x = np.random.default_rng(4).normal(size=(2, 3, 8))
        tx = torch.from_numpy(x)
        np.testing.assert_allclose(layer(x), tm(tx, tx, tx)[0].numpy(), rtol=1e-10, atol=1e-12)
        tkv = torch.nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
    with pytest.raises(ValueError, match="add_bias_kv"):
        nn.MultiHeadAttention.from_torch(_sd(tkv), 2)
