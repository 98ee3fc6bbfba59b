"""Tests of selfattn.nn.MultiHeadAttention: the reference attention, finite differences, PyTorch, dtypes,
fail-fast weights, PyTorch keywords, softcap/ALiBi and the packed variable-length path."""

import math

import numpy as np
import pytest
from _nn_support import (
    BACKENDS,
    TOL,
    _fd_check,
    _ref_mha,
    _sd,
    _torch,
    capabilities,
    naive_mha,
    perturb,
    skip_unless_supported,
)

from selfattn import nn


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
    np.testing.assert_allclose(layer(xq, xk2, xv2, key_mask=key_mask), layer(xq, xk, xv, key_mask=key_mask), rtol=1e-12)


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
    np.testing.assert_allclose(layer(x), _ref_mha(layer, x)[0], rtol=1e-10, atol=1e-12)  # eval: no dropout
    a = layer(x, training=True, dropout_seed=3)
    b = layer(x, training=True, dropout_seed=3)
    np.testing.assert_array_equal(a, b)
    # Training drops attention weights with the documented pattern of dropout_seed and rescales by 1/(1-p).
    np.testing.assert_allclose(a, _ref_mha(layer, x, dropout_p=0.5, dropout_seed=3)[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        layer(x, training=True, dropout_seed=4),
        _ref_mha(layer, x, dropout_p=0.5, dropout_seed=4)[0],
        rtol=1e-10,
        atol=1e-12,
    )


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
    np.testing.assert_array_equal(
        nn.MultiHeadAttention(64, 4, seed=5).params["q_weight"], nn.MultiHeadAttention(64, 4, seed=5).params["q_weight"]
    )


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(embed_dim=10, num_heads=3), ValueError, "embed_dim"),
        (dict(embed_dim=8, num_heads=4, kv_heads=3), ValueError, "kv_heads"),
        (dict(embed_dim=8.0, num_heads=2), TypeError, "embed_dim"),
        (dict(embed_dim=8, num_heads=0), ValueError, "num_heads"),
        (dict(embed_dim=8, num_heads=2, dropout_p=1.0), ValueError, "dropout_p"),
        (dict(embed_dim=8, num_heads=2, dtype=np.int32), TypeError, "dtype"),
    ],
)
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


# ----------------------------------------------------------------------------- PyTorch equality


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


# ----------------------------------------------------------------------------- dtypes (issue 12)

FLOATS = [np.float16, np.float32, np.float64]


@pytest.mark.parametrize("layer_dtype", FLOATS)
@pytest.mark.parametrize("in_dtype", FLOATS)
def test_mha_output_has_the_input_dtype(backend, in_dtype, layer_dtype):
    skip_unless_supported(backend, in_dtype)
    rng = np.random.default_rng(0)
    layer = perturb(nn.MultiHeadAttention(16, 4, kv_heads=2, dtype=layer_dtype, seed=0), rng)
    before = layer.state_dict()
    x = rng.normal(size=(2, 5, 16)).astype(in_dtype)
    out, w = layer(x, causal=True, need_weights=True, backend=backend)
    assert out.dtype == in_dtype and w.dtype == in_dtype
    ref, ref_w = _ref_mha(layer, x.astype(np.float64), causal=True)
    tol = TOL[in_dtype]
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(w.astype(np.float64), ref_w.mean(axis=1), rtol=tol, atol=tol)
    for name, value in layer.params.items():  # the call casts copies; the parameters stay as they were
        assert value.dtype == layer_dtype
        np.testing.assert_array_equal(value, before[name])


def test_mha_integer_input_uses_the_layer_dtype_and_mixed_floats_promote():
    layer = nn.MultiHeadAttention(8, 2, kdim=3, vdim=3, dtype=np.float64, seed=0)
    tokens = np.arange(24).reshape(1, 3, 8) % 5
    assert layer(tokens, np.ones((1, 2, 3), np.int32)).dtype == np.float64
    assert nn.MultiHeadAttention(8, 2, dtype=np.float16, seed=0)(tokens).dtype == np.float16
    # the call computes in numpy.result_type of the float inputs
    q32, k64 = np.ones((1, 3, 8), np.float32), np.ones((1, 2, 3), np.float64)
    assert layer(q32, k64).dtype == np.float64
    assert layer(q32, k64.astype(np.float16)).dtype == np.float32


@pytest.mark.parametrize("in_dtype", FLOATS)
def test_mha_vjp_gradient_dtypes(in_dtype):
    """Input gradients in each input's dtype, parameter gradients in the parameters' dtype (float32 here)."""
    rng = np.random.default_rng(1)
    layer = perturb(nn.MultiHeadAttention(12, 3, kdim=5, vdim=7, seed=2), rng)
    ref_layer = nn.MultiHeadAttention(12, 3, kdim=5, vdim=7, dtype=np.float64).load_state_dict(layer.params)
    xq = rng.normal(size=(2, 4, 12)).astype(in_dtype)
    xk, xv = rng.normal(size=(2, 6, 5)), rng.normal(size=(2, 6, 7)).astype(np.float32)
    out, back = layer.vjp(xq, xk, xv, backend="numpy")
    assert out.dtype == np.result_type(in_dtype, np.float64, np.float32)  # key is float64
    g = rng.normal(size=out.shape)
    dq, dk, dv, dp = back(g.astype(np.float16))  # any float grad_out dtype is accepted
    assert (dq.dtype, dk.dtype, dv.dtype) == (in_dtype, np.float64, np.float32)
    assert all(v.dtype == np.float32 for v in dp.values()) and set(dp) == set(layer.params)
    ref_out, ref_back = ref_layer.vjp(xq.astype(np.float64), xk, xv.astype(np.float64), backend="numpy")
    rq, rk, rv, rp = ref_back(g.astype(np.float16).astype(np.float64))
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    tol = 2e-2 if in_dtype == np.float16 else 1e-4
    for got, want in [(dq, rq), (dk, rk), (dv, rv)] + [(dp[k], rp[k]) for k in rp]:
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("in_dtype", [np.float16, np.float32])
def test_mha_vjp_low_precision_against_float64(in_dtype):
    """float16 activations with float32 master weights: the mixed-precision training step."""
    rng = np.random.default_rng(4)
    layer = perturb(nn.MultiHeadAttention(16, 4, seed=0), rng)
    ref_layer = nn.MultiHeadAttention(16, 4, dtype=np.float64).load_state_dict(layer.params)
    x = rng.normal(size=(2, 6, 16)).astype(in_dtype)
    out, back = layer.vjp(x, causal=True)
    assert out.dtype == in_dtype
    g = rng.normal(size=out.shape).astype(in_dtype)
    dx, dk, dv, dp = back(g)
    assert dx.dtype == in_dtype and dk is None and dv is None
    assert {v.dtype for v in dp.values()} == {np.dtype(np.float32)}
    ref_out, ref_back = ref_layer.vjp(x.astype(np.float64), causal=True)
    rx, _, _, rp = ref_back(g.astype(np.float64))
    tol = TOL[in_dtype]
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    for got, want in [(dx, rx)] + [(dp[k], rp[k]) for k in rp]:
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


# ----------------------------------------------------------------------------- fail fast on need_weights (issue 12)


def test_need_weights_that_cannot_be_allocated_fail_before_any_work(monkeypatch):
    layer = nn.MultiHeadAttention(8, 2, seed=0)
    x = np.ones((1, 200_000, 8), np.float32)  # weights (1, 2, 2e5, 2e5) float32: 320 GB
    computed = []
    monkeypatch.setattr("selfattn.nn.attention.linear", lambda *a, **k: computed.append(1))
    for average in (True, False):
        with pytest.raises(MemoryError) as info:
            layer(x, need_weights=True, average_weights=average)
        msg = str(info.value)
        assert "need_weights" in msg and "(1, 2, 200000, 200000)" in msg and "GiB" in msg
        assert "drop need_weights=True" in msg and "average_weights" in msg
    assert not computed


def test_need_weights_memory_check_uses_the_device_limit(monkeypatch):
    layer = nn.MultiHeadAttention(8, 2, seed=0)
    x = np.ones((2, 30, 8), np.float32)
    monkeypatch.setattr("selfattn._memory.available_bytes", lambda array_type, like=None: 10_000)
    monkeypatch.setattr("selfattn._memory.CHECK_FROM_BYTES", 0)  # check even this small result
    with pytest.raises(MemoryError, match=r"\(2, 2, 30, 30\).*more than this machine can allocate"):
        layer(x, need_weights=True)
    assert layer(x).shape == x.shape  # without the weights the call is small: no check, no error
    monkeypatch.setattr("selfattn._memory.available_bytes", lambda array_type, like=None: 10**9)
    assert layer(x, need_weights=True)[1].shape == (2, 30, 30)


# ----------------------------------------------------------------------------- PyTorch keywords (issue 12)


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("key_padding_mask", np.zeros((2, 3), bool), ["key_mask=~key_padding_mask", "True for a real token"]),
        ("attn_mask", np.zeros((3, 3), bool), ["mask=~attn_mask", "True = may attend", "opposite"]),
        ("is_causal", True, ["causal=True", "bottom-right"]),
        ("average_attn_weights", False, ["average_weights="]),
        ("return_weights", True, ["need_weights=True"]),
        ("enable_gqa", True, ["kv_heads="]),
        ("key_mask_", None, ["did you mean 'key_mask'"]),
    ],
)
def test_mha_call_refuses_pytorch_keywords(name, value, words):
    layer = nn.MultiHeadAttention(8, 2, seed=0)
    x = np.ones((2, 3, 8), np.float32)
    with pytest.raises(TypeError, match="unexpected keyword argument") as info:
        layer(x, **{name: value})
    for word in words:
        assert word in str(info.value)
    with pytest.raises(TypeError, match="unexpected keyword argument") as info:
        layer.vjp(x, **{name: value})
    if name in ("return_weights", "average_attn_weights"):
        assert "vjp returns no attention weights" in str(info.value)
    else:
        for word in words:
            assert word in str(info.value)
    with pytest.raises(TypeError, match="vjp returns no attention weights"):
        layer.vjp(x, need_weights=True)


@pytest.mark.parametrize(
    "name, word",
    [
        ("dropout", "dropout_p="),
        ("batch_first", "batch first"),
        ("add_bias_kv", "not supported"),
        ("device", "NumPy"),
        ("num_head", "did you mean"),
    ],
)
def test_mha_constructor_refuses_pytorch_keywords(name, word):
    with pytest.raises(TypeError, match="MultiHeadAttention\\(\\) got an unexpected keyword") as info:
        nn.MultiHeadAttention(8, 2, **{name: 0.1})
    assert word in str(info.value)


def test_mha_need_weights_matches_torch_after_keyword_translation():
    """The TypeError's advice (key_mask=~key_padding_mask, mask=~attn_mask) gives PyTorch's result."""
    torch = _torch()
    torch.manual_seed(5)
    tm = torch.nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    layer = nn.MultiHeadAttention.from_torch(_sd(tm), 2)
    x = np.random.default_rng(5).normal(size=(2, 4, 8))
    kpm = np.array([[False] * 4, [False, False, True, True]])
    attn_mask = np.triu(np.ones((4, 4), bool), 1)
    with torch.no_grad():
        ref, ref_w = tm(
            *(torch.from_numpy(x),) * 3,
            key_padding_mask=torch.from_numpy(kpm),
            attn_mask=torch.from_numpy(attn_mask),
            average_attn_weights=False,
        )
    out, w = layer(x, key_mask=~kpm, mask=~attn_mask, need_weights=True, average_weights=False)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(w, ref_w.numpy(), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- softcap and ALiBi (issue 16)


@pytest.mark.parametrize("softcap, alibi", [(None, True), (2.0, False), (0.5, True)])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_mha_softcap_and_alibi_match_the_oracle(backend, softcap, alibi, kv_heads):
    rng = np.random.default_rng(6)
    layer = perturb(
        nn.MultiHeadAttention(16, 4, kv_heads=kv_heads, softcap=softcap, alibi=alibi, dtype=np.float64, seed=1),
        rng,
        scale=0.5,
    )
    assert (layer.alibi_slopes is not None) == alibi and layer.softcap == softcap
    x = rng.normal(size=(2, 7, 16))
    for causal in (False, True):
        out = layer(x, causal=causal, backend=backend)
        np.testing.assert_allclose(out, naive_mha(layer, x, causal=causal), rtol=1e-10, atol=1e-12)
    # cross-attention with M != N: ALiBi distances are bottom-right aligned, like causal
    xk = rng.normal(size=(2, 11, 16))
    np.testing.assert_allclose(
        layer(x, xk, causal=True, backend=backend), naive_mha(layer, x, xk, causal=True), rtol=1e-10, atol=1e-12
    )


def test_mha_alibi_slopes_are_the_standard_ones_and_change_the_result():
    layer = nn.MultiHeadAttention(24, 8, alibi=True, seed=0)
    np.testing.assert_array_equal(layer.alibi_slopes, [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256])
    assert nn.MultiHeadAttention(24, 12, alibi=True).alibi_slopes.shape == (12,)
    plain = nn.MultiHeadAttention(24, 8, seed=0)
    x = np.random.default_rng(0).normal(size=(1, 9, 24)).astype(np.float32)
    assert not np.allclose(layer(x), plain(x), atol=1e-3)
    assert "alibi=True" in repr(layer) and "softcap=3.0" in repr(nn.MultiHeadAttention(8, 2, softcap=3.0))


@pytest.mark.parametrize("in_dtype", FLOATS)
def test_mha_softcap_alibi_dtypes_and_vjp(in_dtype):
    """Slopes go to the core as float32 (float64 for float64 calls); the vjp includes softcap's factor."""
    rng = np.random.default_rng(7)
    layer = perturb(nn.MultiHeadAttention(8, 2, softcap=1.5, alibi=True, dtype=np.float64, seed=3), rng)
    x = rng.normal(size=(2, 5, 8))
    out = layer(x.astype(in_dtype), causal=True)
    assert out.dtype == in_dtype
    np.testing.assert_allclose(
        out.astype(np.float64),
        naive_mha(layer, x.astype(in_dtype).astype(np.float64), causal=True),
        rtol=TOL[in_dtype],
        atol=TOL[in_dtype],
    )
    if in_dtype == np.float64:
        out, back = layer.vjp(x, causal=True)
        g = rng.normal(size=out.shape)
        dx, _, _, dp = back(g)
        f = lambda: layer(x, causal=True)  # noqa: E731
        _fd_check(f, x, g, dx)
        _fd_check(f, layer.params["q_weight"], g, dp["q_weight"])


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(softcap="1"), TypeError, "softcap"),
        (dict(alibi=1), TypeError, "alibi"),
    ],
)
def test_mha_softcap_alibi_constructor_errors(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        nn.MultiHeadAttention(8, 2, **kwargs)


# ----------------------------------------------------------------------------- packed variable-length path (issue 16)

VARLEN_BACKENDS = [b for b in BACKENDS if "varlen" in capabilities(b).features]
VARLEN_DROPOUT_BACKENDS = [b for b in VARLEN_BACKENDS if "dropout" in capabilities(b).features]


def _pack(rng, lengths, features):
    """Padded ``(B, L, F)`` with garbage in the padding, its key_mask ``(B, L)``, the packed rows and cu_seqlens."""
    b, longest = len(lengths), max(max(lengths), 1)
    padded = rng.normal(size=(b, longest, features)) * 3
    key_mask = np.arange(longest)[None, :] < np.array(lengths)[:, None]
    packed = padded[key_mask]  # row-major: sequence after sequence
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return padded, key_mask, packed, cu


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("opts", [{}, {"alibi": True}, {"softcap": 1.0, "kv_heads": 2}])
def test_packed_call_equals_the_padded_key_masked_call(backend, causal, opts):
    rng = np.random.default_rng(8)
    layer = perturb(nn.MultiHeadAttention(16, 4, dtype=np.float64, seed=0, **opts), rng)
    padded, key_mask, packed, cu = _pack(rng, [3, 0, 6, 1, 4], 16)
    out = layer(packed, cu_seqlens=cu, causal=causal, backend=backend)
    assert out.shape == (14, 16) and out.dtype == np.float64
    ref = layer(padded, key_mask=key_mask, causal=causal, backend=backend)
    np.testing.assert_allclose(out, ref[key_mask], rtol=1e-10, atol=1e-12)
    if opts:  # the padded path is itself checked against the oracle, sequence by sequence
        for i, (a, z) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
            if z > a:
                np.testing.assert_allclose(
                    out[a:z], naive_mha(layer, padded[i, : z - a], causal=causal), rtol=1e-10, atol=1e-12
                )


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
def test_packed_cross_attention_equals_the_padded_call(backend):
    rng = np.random.default_rng(9)
    layer = perturb(nn.MultiHeadAttention(12, 3, kdim=5, vdim=7, dtype=np.float64, seed=1), rng)
    q_pad, q_mask, q, cu_q = _pack(rng, [2, 3, 0, 4], 12)
    k_pad, k_mask, k, cu_k = _pack(rng, [5, 0, 2, 3], 5)
    v_pad = rng.normal(size=k_pad.shape[:2] + (7,))
    v = v_pad[k_mask]
    out = layer(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=cu_k, backend=backend)
    ref = layer(q_pad, k_pad, v_pad, key_mask=k_mask, backend=backend)
    np.testing.assert_allclose(out, ref[q_mask], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out[2:5], np.broadcast_to(layer.params["out_bias"], (3, 12)))  # no keys: out_bias


@pytest.mark.parametrize("backend", VARLEN_DROPOUT_BACKENDS)
def test_packed_dropout_equals_the_padded_call_on_the_same_seed(backend):
    rng = np.random.default_rng(10)
    layer = perturb(nn.MultiHeadAttention(8, 2, dropout_p=0.4, dtype=np.float64, seed=2), rng)
    padded, key_mask, packed, cu = _pack(rng, [4, 2, 5], 8)
    kw = {"training": True, "dropout_seed": 123, "causal": True, "backend": backend}
    out = layer(packed, cu_seqlens=cu, **kw)
    np.testing.assert_allclose(out, layer(padded, key_mask=key_mask, **kw)[key_mask], rtol=1e-10, atol=1e-12)
    assert not np.allclose(out, layer(packed, cu_seqlens=cu, causal=True, backend=backend))


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
@pytest.mark.parametrize("in_dtype", FLOATS)
def test_packed_vjp_equals_the_padded_vjp(backend, in_dtype):
    skip_unless_supported(backend, in_dtype)
    rng = np.random.default_rng(11)
    layer = perturb(nn.MultiHeadAttention(16, 4, kv_heads=2, alibi=True, seed=3), rng)
    padded, key_mask, packed, cu = _pack(rng, [3, 5, 0, 2], 16)
    padded, packed = padded.astype(in_dtype), packed.astype(in_dtype)
    out, back = layer.vjp(packed, cu_seqlens=cu, causal=True, backend=backend)
    ref_out, ref_back = layer.vjp(padded, key_mask=key_mask, causal=True, backend=backend)
    assert out.dtype == in_dtype
    tol = TOL[in_dtype] if in_dtype != np.float64 else 1e-5  # float32 parameters
    np.testing.assert_allclose(out.astype(np.float64), ref_out[key_mask], rtol=tol, atol=tol)
    g = rng.normal(size=out.shape).astype(in_dtype)
    g_padded = np.zeros(ref_out.shape, in_dtype)
    g_padded[key_mask] = g
    dx, dk, dv, dp = back(g)
    rx, _, _, rp = ref_back(g_padded)
    assert dx.dtype == in_dtype and dk is None and dv is None
    np.testing.assert_allclose(dx.astype(np.float64), rx[key_mask], rtol=tol, atol=tol)
    for name, grad in dp.items():
        assert grad.dtype == np.float32
        np.testing.assert_allclose(grad, rp[name], rtol=tol, atol=tol * max(1.0, np.abs(rp[name]).max()))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"cu_seqlens": np.array([0, 4, 2, 6])}, ValueError, "non-decreasing"),
        ({"cu_seqlens": np.array([0, 2, 5])}, ValueError, "end at the packed length 6"),
        ({"cu_seqlens": np.array([1, 2, 6])}, ValueError, "start at 0"),
        ({"cu_seqlens": np.array([0.0, 6.0])}, TypeError, "integer"),
        ({"cu_seqlens": np.array([[0, 6]])}, ValueError, "1-D"),
        ({"cu_seqlens": np.array([0, 6]), "key_mask": np.ones((1, 6), bool)}, ValueError, "key_mask"),
        ({"cu_seqlens": np.array([0, 6]), "mask": np.ones((6, 6), bool)}, ValueError, "cu_seqlens"),
        ({"cu_seqlens": np.array([0, 6]), "need_weights": True}, ValueError, "need_weights"),
        ({"cu_seqlens_k": np.array([0, 6])}, ValueError, "cu_seqlens_k was given without cu_seqlens"),
        ({"cu_seqlens": np.array([0, 3, 6]), "cu_seqlens_k": np.array([0, 6])}, ValueError, "same number of sequences"),
    ],
)
def test_packed_call_errors_before_any_work(monkeypatch, kwargs, exc, words):
    layer = nn.MultiHeadAttention(8, 2, seed=0)
    monkeypatch.setattr("selfattn.nn.attention.linear", lambda *a, **k: pytest.fail("computed before validating"))
    with pytest.raises(exc, match=words):
        layer(np.ones((6, 8), np.float32), **kwargs)
    with pytest.raises(ValueError, match=r"\(total, 8\)"):
        layer(np.ones((1, 6, 8), np.float32), cu_seqlens=np.array([0, 6]))
