"""Tests of selfattn.nn's LayerNorm, FeedForward and Transformer encoder blocks (and their PyTorch equality)."""

import numpy as np
import pytest
from _nn_support import BACKENDS, _ref_mha, _sd, _torch, perturb, skip_unless_supported

from selfattn import nn


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ----------------------------------------------------------------------------- LayerNorm / FF / encoder
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
    y_train = enc(x, training=True, rng=np.random.default_rng(0))  # dropout_p=0: training changes nothing
    np.testing.assert_array_equal(y_train, enc(x))


def test_encoder_training_applies_dropout_where_documented(backend):
    """dropout_p > 0: training = attention dropout, then dropout on the attention and feed-forward outputs.

    Recomputed from the layer's own parts with a generator seeded alike, drawing in the documented order
    (attention seed, attention-output mask, feed-forward hidden mask, feed-forward-output mask).
    """
    skip_unless_supported(backend, None, "dropout")
    p = 0.25
    enc = nn.TransformerEncoder(1, 8, 2, 16, dropout_p=p, dtype=np.float64, seed=0)
    layer = enc.layers[0]
    x = np.random.default_rng(0).normal(size=(2, 5, 8))
    y = enc(x, training=True, rng=np.random.default_rng(5), backend=backend)
    rng = np.random.default_rng(5)

    def drop(t):
        return np.where(rng.random(t.shape) >= p, t / (1 - p), 0)

    seed = int(rng.integers(0, 2**63))
    attn = layer.self_attn(x, training=True, dropout_seed=seed, backend=backend)
    np.testing.assert_allclose(
        attn, _ref_mha(layer.self_attn, x, dropout_p=p, dropout_seed=seed)[0], rtol=1e-10, atol=1e-12
    )
    h = layer.norm1(x + drop(attn))
    expect = layer.norm2(h + drop(layer.ff(h, training=True, rng=rng)))
    np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-12)
    assert np.abs(y - enc(x)).max() > 0.1  # and it is not the eval output
    np.testing.assert_array_equal(enc(x, rng=np.random.default_rng(5)), enc(x))  # eval ignores rng


# ----------------------------------------------------------------------------- PyTorch equality
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first, activation):
    torch = _torch()
    torch.manual_seed(2)
    tl = (
        torch.nn.TransformerEncoderLayer(
            16, 4, 32, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first
        )
        .double()
        .eval()
    )
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
        square = torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
        ref_c = tl(torch.from_numpy(x), src_mask=square, is_causal=True).numpy()
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


# ----------------------------------------------------------------------------- dtypes (issue 12)

FLOATS = [np.float16, np.float32, np.float64]


def _block(kind, dtype):
    """A layer of each kind with non-trivial parameters, and a float64 twin with the same values."""
    rng = np.random.default_rng(0)
    make = {
        "layernorm": lambda dt: nn.LayerNorm(16, dtype=dt),
        "feedforward": lambda dt: nn.FeedForward(16, 24, activation="gelu", dtype=dt, seed=0),
        "encoder_layer": lambda dt: nn.TransformerEncoderLayer(16, 4, 24, dtype=dt, seed=0),
        "encoder": lambda dt: nn.TransformerEncoder(2, 16, 4, 24, norm_first=True, final_norm=True, dtype=dt, seed=0),
    }[kind]
    layer = perturb(make(dtype), rng)
    return layer, make(np.float64).load_state_dict(layer.params)


@pytest.mark.parametrize("layer_dtype", FLOATS)
@pytest.mark.parametrize("in_dtype", FLOATS)
@pytest.mark.parametrize("kind", ["layernorm", "feedforward", "encoder_layer", "encoder"])
def test_blocks_return_the_input_dtype(kind, in_dtype, layer_dtype):
    layer, twin = _block(kind, layer_dtype)
    before = layer.state_dict()
    x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype(in_dtype)
    out = layer(x)
    assert out.dtype == in_dtype and out.shape == x.shape
    ref = twin(x.astype(np.float64))
    tol = {np.float16: 5e-2, np.float32: 1e-4, np.float64: 1e-10}[in_dtype]  # float16 through two layers
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=tol, atol=tol)
    for name, value in layer.params.items():
        assert value.dtype == layer_dtype
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize("kind", ["layernorm", "feedforward", "encoder_layer", "encoder"])
def test_blocks_integer_input_uses_the_layer_dtype(kind):
    layer, _ = _block(kind, np.float16)
    assert layer(np.arange(32).reshape(2, 16) % 3).dtype == np.float16


def test_encoder_layer_dropout_in_float16_keeps_the_dtype():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout_p=0.3, seed=0)
    x = np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float16)
    a = layer(x, training=True, rng=np.random.default_rng(1))
    assert a.dtype == np.float16
    np.testing.assert_array_equal(a, layer(x, training=True, rng=np.random.default_rng(1)))
    assert not np.array_equal(a, layer(x))


# ----------------------------------------------------------------------------- one state-dict mechanism for stacks


def test_stack_parameter_names_and_sharing():
    enc = nn.TransformerEncoder(2, 8, 2, 16, final_norm=True, seed=0)
    names = set(enc.params)
    layer_names = set(enc.layers[0].params)
    assert names == {f"layers.{i}.{k}" for i in range(2) for k in layer_names} | {"norm.weight", "norm.bias"}
    assert {"self_attn.q_weight", "ff.linear1_weight", "norm2.bias"} <= layer_names
    assert enc.num_parameters() == sum(v.size for v in enc.params.values()) == 2 * enc.layers[0].num_parameters() + 16
    # the flat dict shares the arrays: an in-place optimizer step reaches the layer
    enc.params["layers.1.self_attn.out_weight"] -= 1.0
    np.testing.assert_array_equal(
        enc.layers[1].self_attn.params["out_weight"], enc.params["layers.1.self_attn.out_weight"]
    )
    with pytest.raises(AttributeError, match="load_state_dict"):
        enc.params = {}


def test_stack_load_state_dict_is_all_or_nothing():
    enc = nn.TransformerEncoder(2, 8, 2, 16, final_norm=True, seed=0)
    other = nn.TransformerEncoder(2, 8, 2, 16, final_norm=True, seed=1)
    before = other.state_dict()
    bad = enc.state_dict()
    bad["layers.1.ff.linear2_weight"] = np.zeros((3, 3), np.float32)  # last in load order: nothing may change
    with pytest.raises(ValueError, match="layers.1.ff.linear2_weight"):
        other.load_state_dict(bad)
    for name, value in other.params.items():
        np.testing.assert_array_equal(value, before[name])
    missing = enc.state_dict()
    del missing["norm.bias"]
    missing["layers.2.norm1.weight"] = np.ones(8)
    with pytest.raises(KeyError, match=r"missing \['norm.bias'\], unexpected \['layers.2.norm1.weight'\]"):
        other.load_state_dict(missing)
    assert other.load_state_dict(enc.state_dict()) is other
    x = np.random.default_rng(0).normal(size=(1, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(other(x, backend="numpy"), enc(x, backend="numpy"))
    # a float64 state dict loads into a float32 stack as float32
    other.load_state_dict({k: v.astype(np.float64) for k, v in enc.state_dict().items()})
    assert {v.dtype for v in other.params.values()} == {np.dtype(np.float32)}


def test_encoder_without_layers():
    x = np.random.default_rng(0).normal(size=(2, 3, 8))
    empty = nn.TransformerEncoder(0, 8, 2, 16)
    y = empty(x)
    np.testing.assert_array_equal(y, x)
    assert y is not x and empty.params == {} and repr(empty).startswith("TransformerEncoder(0 layers")
    normed = nn.TransformerEncoder(0, 8, 2, 16, final_norm=True)
    np.testing.assert_allclose(normed(x), nn.LayerNorm(8, dtype=np.float64)(x), rtol=1e-12)
    assert set(normed.state_dict()) == {"norm.weight", "norm.bias"}


# ----------------------------------------------------------------------------- PyTorch keywords (issue 12)


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("src_key_padding_mask", np.zeros((2, 4), bool), ["key_mask=~src_key_padding_mask", "True for a real token"]),
        ("src_mask", np.zeros((4, 4), bool), ["mask=~src_mask", "True = may attend"]),
        ("is_causal", True, ["causal=True", "bottom-right"]),
        ("key_padding_mask", np.zeros((2, 4), bool), ["key_mask=~key_padding_mask"]),
    ],
)
@pytest.mark.parametrize("cls", ["TransformerEncoderLayer", "TransformerEncoder"])
def test_blocks_refuse_pytorch_call_keywords(cls, name, value, words):
    layer = getattr(nn, cls)(*((8, 2, 16) if cls == "TransformerEncoderLayer" else (1, 8, 2, 16)))
    with pytest.raises(TypeError, match=rf"{cls}.__call__\(\) got an unexpected keyword argument '{name}'") as info:
        layer(np.ones((2, 4, 8), np.float32), **{name: value})
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "name, word",
    [
        ("d_model", "embed_dim="),
        ("nhead", "num_heads="),
        ("dim_feedforward", "ff_dim="),
        ("dropout", "dropout_p="),
        ("batch_first", "batch first"),
    ],
)
def test_blocks_refuse_pytorch_constructor_keywords(name, word):
    with pytest.raises(TypeError, match="TransformerEncoderLayer\\(\\) got an unexpected keyword") as info:
        nn.TransformerEncoderLayer(8, 2, 16, **{name: 1})
    assert word in str(info.value)
    with pytest.raises(TypeError, match="norm="):
        nn.TransformerEncoder(1, 8, 2, 16, norm=nn.LayerNorm(8))


def test_encoder_layer_grouped_query_and_errors():
    layer = nn.TransformerEncoderLayer(8, 4, 16, kv_heads=2, seed=0)
    assert layer.params["self_attn.k_weight"].shape == (4, 8)
    assert nn.TransformerEncoder(2, 8, 4, 16, kv_heads=1).layers[1].self_attn.kv_heads == 1
    with pytest.raises(ValueError, match="x"):
        layer(np.ones((2, 3, 5)))
    with pytest.raises(TypeError, match="training"):
        layer(np.ones((2, 3, 8)), training=1)
    with pytest.raises(TypeError, match="norm_first"):
        nn.TransformerEncoderLayer(8, 2, 16, norm_first="yes")
