"""Every malformed call we could think of raises a clear TypeError or ValueError.

Each row: the call's keyword arguments (over valid defaults), the expected
exception type, and a regex the message must match (it must name the argument
and what to do). Validation runs before dispatch, so the result is the same for
every backend; the test checks that by running each row on every available
backend for NumPy arrays.
"""

import numpy as np
import pytest

import selfattn

rng = np.random.default_rng(0)
Q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
K = rng.standard_normal((2, 2, 7, 8)).astype(np.float32)
V = rng.standard_normal((2, 2, 7, 3)).astype(np.float32)

BAD = [
    # array types
    ("query-list", dict(query=Q.tolist()), TypeError, r"query must be a numpy.ndarray.*numpy.asarray"),
    ("key-scalar", dict(key=1.0), TypeError, r"key must be a numpy.ndarray"),
    ("value-matrix-subclass", dict(value=np.asmatrix(V[0, 0])), TypeError, r"value must be a plain numpy.ndarray.*numpy.asarray"),
    ("query-masked-array", dict(query=np.ma.masked_array(Q)), TypeError, r"plain numpy.ndarray"),
    ("query-int", dict(query=Q.astype(np.int32)), TypeError, r"query has integer data.*astype"),
    ("key-bool", dict(key=K > 0), TypeError, r"key has boolean data"),
    ("value-complex", dict(value=V.astype(np.complex64)), TypeError, r"value has complex data"),
    ("query-longdouble", dict(query=Q.astype(np.longdouble)), TypeError, r"float16, float32 or float64"),
    ("mixed-dtypes", dict(key=K.astype(np.float64)), TypeError, r"share one dtype.*float32, float64"),
    ("query-object", dict(query=Q.astype(object)), TypeError, r"query has dtype object"),
    # shapes
    ("query-1d", dict(query=Q[0, 0, 0]), ValueError, r"query must have at least 2 dimensions"),
    ("ndim-mismatch", dict(query=Q[0]), ValueError, r"same number of dimensions"),
    ("batch-mismatch", dict(key=np.concatenate([K, K])), ValueError, r"key has batch shape \(4,\) but query has \(2,\)"),
    ("d-mismatch", dict(key=K[..., :4]), ValueError, r"key's last axis \(4\) must equal query's last axis D \(8\)"),
    ("kv-length-mismatch", dict(value=V[:, :, :6]), ValueError, r"value must have the same head count and length as key"),
    ("kv-heads-mismatch", dict(value=V[:, :1]), ValueError, r"value must have the same head count"),
    ("heads-not-multiple", dict(key=np.zeros((2, 3, 7, 8), np.float32), value=np.zeros((2, 3, 7, 3), np.float32)),
     ValueError, r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
    ("d-zero", dict(query=Q[..., :0], key=K[..., :0]), ValueError, r"head size D .* at least 1"),
    # mask
    ("mask-list", dict(mask=[[True]]), TypeError, r"mask must be a numpy.ndarray"),
    ("mask-int", dict(mask=np.ones((5, 7), np.int8)), TypeError, r"mask has dtype int8.*astype\(bool\)"),
    ("mask-shape", dict(mask=np.ones((5, 6), bool)), ValueError, r"mask with shape \(5, 6\) is not broadcastable to .*\(2, 4, 5, 7\)"),
    ("mask-too-many-dims", dict(mask=np.ones((1, 2, 4, 5, 7), bool)), ValueError, r"not broadcastable"),
    ("mask-heads", dict(mask=np.ones((3, 1, 1), bool)), ValueError, r"not broadcastable"),
    # options
    ("causal-int", dict(causal=1), TypeError, r"causal must be True or False, got 1"),
    ("causal-str", dict(causal="yes"), TypeError, r"causal must be True or False"),
    ("return-lse-none", dict(return_lse=None), TypeError, r"return_lse must be True or False"),
    ("return-weights-str", dict(return_weights="all"), TypeError, r"return_weights must be True or False"),
    ("window-negative", dict(window=-1), ValueError, r"window sizes must be non-negative, got window=-1"),
    ("window-float", dict(window=2.5), TypeError, r"window must be an int, got 2.5"),
    ("window-triple", dict(window=(1, 2, 3)), ValueError, r"window must be an int or a \(left, right\) pair"),
    ("window-bool", dict(window=True), TypeError, r"window must be an int"),
    ("window-right-neg", dict(window=(2, -3)), ValueError, r"non-negative"),
    ("window-str-item", dict(window=(2, "3")), TypeError, r"window\[1\] \(right\) must be an int"),
    ("scale-zero", dict(scale=0.0), ValueError, r"scale must be finite and positive, got 0.0"),
    ("scale-negative", dict(scale=-1.0), ValueError, r"scale must be finite and positive"),
    ("scale-nan", dict(scale=float("nan")), ValueError, r"scale must be finite"),
    ("scale-inf", dict(scale=float("inf")), ValueError, r"scale must be finite"),
    ("scale-str", dict(scale="0.1"), TypeError, r"scale must be a float, got '0.1'"),
    ("scale-array", dict(scale=np.ones(2)), TypeError, r"scale must be a float"),
    ("dropout-one", dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    ("dropout-negative", dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout-nan", dict(dropout_p=float("nan")), ValueError, r"dropout_p must be in"),
    ("dropout-str", dict(dropout_p="0.1"), TypeError, r"dropout_p must be a float"),
    ("seed-negative", dict(dropout_p=0.1, dropout_seed=-1), ValueError, r"dropout_seed must be in \[0, 2\*\*64\), got -1"),
    ("seed-too-big", dict(dropout_p=0.1, dropout_seed=2**64), ValueError, r"dropout_seed must be in"),
    ("seed-float", dict(dropout_p=0.1, dropout_seed=1.5), TypeError, r"dropout_seed must be an int, got 1.5"),
    ("backend-int", dict(backend=1), TypeError, r"backend must be a backend name"),
    ("backend-unknown", dict(backend="torch"), ValueError, r"unknown backend 'torch'"),
]


def _call(**over):
    args = dict(query=Q, key=K, value=V)
    args.update(over)
    return selfattn.scaled_dot_product_attention(args.pop("query"), args.pop("key"), args.pop("value"), **args)


@pytest.mark.parametrize("name,over,exc,pattern", BAD, ids=[b[0] for b in BAD])
def test_malformed_call_raises_clear_error(name, over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(**over)


@pytest.mark.parametrize("name,over,exc,pattern", [b for b in BAD if "backend" not in b[1]], ids=[b[0] for b in BAD if "backend" not in b[1]])
def test_every_backend_fails_the_same_way(name, over, exc, pattern):
    names = [r.name for r in selfattn.list_backends() if r.available and r.capabilities.array_type == "numpy"]
    messages = set()
    for backend in names:
        with pytest.raises(exc, match=pattern) as err:
            _call(backend=backend, **over)
        messages.add(str(err.value))
    assert len(messages) == 1


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="is_causal"):
        _call(is_causal=True)


def test_positional_options_are_refused():
    with pytest.raises(TypeError):
        selfattn.scaled_dot_product_attention(Q, K, V, None, True)


def test_foreign_tensor_hint():
    class FakeTensor:  # looks like a torch tensor to the error message
        __module__ = "torch"

    with pytest.raises(TypeError, match=r"detach\(\).cpu\(\).numpy\(\)"):
        _call(query=FakeTensor())


def test_backward_validates_grad_out():
    out, backward = selfattn.scaled_dot_product_attention_vjp(Q, K, V)
    with pytest.raises(ValueError, match=r"grad_out has shape \(2, 4, 5, 2\), expected the output's shape \(2, 4, 5, 3\)"):
        backward(np.zeros((2, 4, 5, 2), np.float32))
    with pytest.raises(TypeError, match=r"grad_out has dtype float64, expected float32"):
        backward(np.zeros(out.shape))
    with pytest.raises(TypeError, match=r"grad_out must be a numpy array"):
        backward(out.tolist())
    with pytest.raises(TypeError):
        selfattn.scaled_dot_product_attention_vjp(Q, K, V, return_lse=True)


def test_valid_edge_values_are_accepted():
    # These look odd but are valid: numpy scalars for options, huge windows, p = 0 with a seed, int scale.
    # Each gives exactly the result of the plain spelling, and that matches the oracle.
    from selfattn.testing import reference
    from selfattn.testing.compare import assert_close

    for odd, plain in (
        (dict(causal=np.bool_(True), window=(np.int64(2), 10**15), scale=np.float32(0.5), dropout_p=0.0,
              dropout_seed=3), dict(causal=True, window=(2, 10**15), scale=0.5)),
        (dict(scale=2, dropout_p=np.float64(0.2), dropout_seed=np.uint64(2**64 - 1)),
         dict(scale=2.0, dropout_p=0.2, dropout_seed=2**64 - 1)),
    ):
        out = _call(**odd)
        np.testing.assert_array_equal(out, _call(**plain))
        expected = reference.forward(Q, K, V, **plain)[0]
        assert_close(out, expected, "float32", "out", score_max=reference.score_max(Q, K, scale=plain["scale"]))


def test_oversized_extent_is_rejected_before_any_kernel(monkeypatch):
    import selfattn._problem as problem

    monkeypatch.setattr(problem, "MAX_EXTENT", 6)
    with pytest.raises(ValueError, match=r"key length M = 7 exceeds the supported maximum 6"):
        _call()


def test_inputs_are_not_modified_and_readonly_is_fine():
    q, k, v = (x.copy() for x in (Q, K, V))
    for x in (q, k, v):
        x.setflags(write=False)
    mask = np.ones((5, 7), bool)
    mask.setflags(write=False)
    out, backward = selfattn.scaled_dot_product_attention_vjp(q, k, v, mask=mask, causal=True, dropout_p=0.2)
    backward(np.ones_like(out))
    for a, b in ((q, Q), (k, K), (v, V)):
        assert np.array_equal(a, b)
