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
    (
        "value-matrix-subclass",
        dict(value=np.asmatrix(V[0, 0])),
        TypeError,
        r"value must be a plain numpy.ndarray.*numpy.asarray",
    ),
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
    (
        "batch-mismatch",
        dict(key=np.concatenate([K, K])),
        ValueError,
        r"key has batch shape \(4,\) but query has \(2,\)",
    ),
    ("d-mismatch", dict(key=K[..., :4]), ValueError, r"key's last axis \(4\) must equal query's last axis D \(8\)"),
    (
        "kv-length-mismatch",
        dict(value=V[:, :, :6]),
        ValueError,
        r"value must have the same head count and length as key",
    ),
    ("kv-heads-mismatch", dict(value=V[:, :1]), ValueError, r"value must have the same head count"),
    (
        "heads-not-multiple",
        dict(key=np.zeros((2, 3, 7, 8), np.float32), value=np.zeros((2, 3, 7, 3), np.float32)),
        ValueError,
        r"query heads \(4\) must be a multiple of key/value heads \(3\)",
    ),
    ("d-zero", dict(query=Q[..., :0], key=K[..., :0]), ValueError, r"head size D .* at least 1"),
    # mask
    ("mask-list", dict(mask=[[True]]), TypeError, r"mask must be a numpy.ndarray"),
    ("mask-int", dict(mask=np.ones((5, 7), np.int8)), TypeError, r"mask has dtype int8.*astype\(bool\)"),
    (
        "mask-shape",
        dict(mask=np.ones((5, 6), bool)),
        ValueError,
        r"mask with shape \(5, 6\) is not broadcastable to .*\(2, 4, 5, 7\)",
    ),
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
    (
        "seed-negative",
        dict(dropout_p=0.1, dropout_seed=-1),
        ValueError,
        r"dropout_seed must be in \[0, 2\*\*64\), got -1",
    ),
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


@pytest.mark.parametrize(
    "name,over,exc,pattern", [b for b in BAD if "backend" not in b[1]], ids=[b[0] for b in BAD if "backend" not in b[1]]
)
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
    with pytest.raises(
        ValueError, match=r"grad_out has shape \(2, 4, 5, 2\), expected the output's shape \(2, 4, 5, 3\)"
    ):
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
        (
            dict(
                causal=np.bool_(True),
                window=(np.int64(2), 10**15),
                scale=np.float32(0.5),
                dropout_p=0.0,
                dropout_seed=3,
            ),
            dict(causal=True, window=(2, 10**15), scale=0.5),
        ),
        (
            dict(scale=2, dropout_p=np.float64(0.2), dropout_seed=np.uint64(2**64 - 1)),
            dict(scale=2.0, dropout_p=0.2, dropout_seed=2**64 - 1),
        ),
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


# -- packed varlen, merge_attention, new options ---------------------------------------------------------------
_VQ = rng.standard_normal((4, 12, 8)).astype(np.float32)
_VK = rng.standard_normal((2, 15, 8)).astype(np.float32)
_CQ = np.array([0, 5, 12], np.int32)
_CK = np.array([0, 9, 15], np.int32)

VARLEN_BAD = [
    ("cu-list", dict(cu_seqlens_q=[0, 5, 12]), TypeError, r"cu_seqlens_q must be a numpy .*integer array"),
    ("cu-float", dict(cu_seqlens_q=_CQ.astype(np.float32)), TypeError, r"cu_seqlens_q has dtype float32.*integer"),
    ("cu-bool", dict(cu_seqlens_k=np.array([False, True, True])), TypeError, r"cu_seqlens_k has dtype bool"),
    (
        "cu-decreasing",
        dict(cu_seqlens_q=np.array([0, 7, 5, 12])),
        ValueError,
        r"non-decreasing.*\[2\] = 5 < .*\[1\] = 7",
    ),
    ("cu-start", dict(cu_seqlens_k=np.array([1, 9, 15])), ValueError, r"cu_seqlens_k must start at 0"),
    (
        "cu-end",
        dict(cu_seqlens_q=np.array([0, 5, 11])),
        ValueError,
        r"must end at total_q .* = 12, got cu_seqlens_q\[-1\] = 11",
    ),
    ("cu-length-mismatch", dict(cu_seqlens_k=np.array([0, 15])), ValueError, r"same length \(B \+ 1\), got 3 and 2"),
    ("cu-2d", dict(cu_seqlens_q=_CQ[None]), ValueError, r"cu_seqlens_q must be 1-D"),
    ("query-4d", dict(query=_VQ[None]), ValueError, r"query must be 3-D \(heads, total tokens, head size\)"),
    ("alibi-shape", dict(alibi_slopes=np.ones((3, 4), np.float32)), ValueError, r"alibi_slopes with shape \(3, 4\)"),
    ("softcap-zero", dict(softcap=0.0), ValueError, r"softcap must be finite and positive"),
    ("mask-keyword", dict(mask=np.ones(3, bool)), TypeError, r"unexpected keyword argument 'mask'"),
]


@pytest.mark.parametrize("name, over, exc, pattern", VARLEN_BAD, ids=[r[0] for r in VARLEN_BAD])
def test_malformed_varlen_call_raises_clear_error(name, over, exc, pattern):
    args = dict(query=_VQ, key=_VK, value=_VK, cu_seqlens_q=_CQ, cu_seqlens_k=_CK)
    args.update(over)
    with pytest.raises(exc, match=pattern):
        selfattn.scaled_dot_product_attention_varlen(
            args.pop("query"),
            args.pop("key"),
            args.pop("value"),
            args.pop("cu_seqlens_q"),
            args.pop("cu_seqlens_k"),
            **args,
        )


OPTION_BAD = [
    ("softcap-str", dict(softcap="5"), TypeError, r"softcap must be None or a positive float, got '5'"),
    ("softcap-neg", dict(softcap=-1.0), ValueError, r"softcap must be finite and positive"),
    ("softcap-inf", dict(softcap=float("inf")), ValueError, r"softcap must be finite"),
    ("alibi-list", dict(alibi_slopes=[0.5] * 4), TypeError, r"alibi_slopes must be a numpy.ndarray"),
    ("alibi-int", dict(alibi_slopes=np.ones(4, np.int32)), TypeError, r"alibi_slopes has dtype int32"),
    ("alibi-f16", dict(alibi_slopes=np.ones(4, np.float16)), TypeError, r"float32 or float64"),
    ("alibi-heads", dict(alibi_slopes=np.ones(3, np.float32)), ValueError, r"alibi_slopes with shape \(3,\)"),
    ("alibi-batch", dict(alibi_slopes=np.ones((3, 4), np.float32)), ValueError, r"broadcastable to \(2,\)"),
]


@pytest.mark.parametrize("name, over, exc, pattern", OPTION_BAD, ids=[r[0] for r in OPTION_BAD])
def test_malformed_softcap_and_alibi(name, over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(**over)


TORCH_KEYWORDS = [
    ("is_causal", True, r"causal=True.*bottom-right.*top-left.*tril"),
    ("attn_mask", np.ones((5, 7), bool), r"mask=.*True = may attend.*opposite of nn.MultiheadAttention"),
    ("enable_gqa", True, r"grouped-query attention needs no flag"),
    ("softmax_scale", 0.1, r"use scale="),
    ("window_size", (2, 2), r"window=\(left, right\)"),
    ("need_weights", True, r"return_weights=True"),
    ("key_padding_mask", np.zeros((2, 7), bool), r"~key_padding_mask"),
]


@pytest.mark.parametrize("name, value, pattern", TORCH_KEYWORDS, ids=[r[0] for r in TORCH_KEYWORDS])
def test_pytorch_and_flash_attention_keywords_name_the_equivalent(name, value, pattern):
    for fn in (selfattn.scaled_dot_product_attention, selfattn.scaled_dot_product_attention_vjp):
        with pytest.raises(TypeError, match=rf"unexpected keyword argument '{name}': .*{pattern}"):
            fn(Q, K, V, **{name: value})


VARLEN_FOREIGN = [
    ("max_seqlen_q", 7, r"reads the sequence lengths from cu_seqlens_q"),
    ("max_seqlen_k", 7, r"reads the sequence lengths from cu_seqlens_k"),
    ("softmax_scale", 0.1, r"use scale="),
    ("return_attn_probs", True, r"return_lse=True.*packed batches do not return the weights"),
    ("attn_mask", None, r"packed sequences take no mask: cu_seqlens_q/cu_seqlens_k delimit them"),
    ("is_causal", True, r"causal=True.*bottom-right"),
]


@pytest.mark.parametrize("name, value, pattern", VARLEN_FOREIGN, ids=[r[0] for r in VARLEN_FOREIGN])
def test_flash_attention_varlen_keywords_name_the_equivalent(name, value, pattern):
    q = np.ones((2, 5, 8), np.float32)
    cu = np.array([0, 2, 5])
    for fn in (selfattn.scaled_dot_product_attention_varlen, selfattn.scaled_dot_product_attention_varlen_vjp):
        with pytest.raises(TypeError, match=rf"unexpected keyword argument '{name}': .*{pattern}"):
            fn(q, q, q, cu, cu, **{name: value})


def test_misspelled_keyword_suggests_the_right_one():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'causl'; did you mean 'causal'\?"):
        _call(causl=True)


def test_impossible_result_fails_before_any_work(monkeypatch):
    """The weights of N = M = 100 000 (37 GiB here) are refused at once, with the size and the way out."""
    import time

    q = np.zeros((1, 1, 100_000, 64), np.float32)
    for backend in [r.name for r in selfattn.list_backends() if r.available and r.capabilities.array_type == "numpy"]:
        monkeypatch.setattr("selfattn._memory.available_bytes", lambda array_type, like=None: 8 * 2**30)
        t0 = time.perf_counter()
        with pytest.raises(
            MemoryError,
            match=r"return_weights=True: the attention weights \(1, 1, 100000, 100000\) "
            r"\(37\.3 GiB of float32\).*drop return_weights=True.*return_lse=True",
        ):
            selfattn.scaled_dot_product_attention(q, q, q, return_weights=True, backend=backend)
        assert time.perf_counter() - t0 < 5.0  # refused, not computed (a generous bound for a loaded machine)
    with pytest.raises(MemoryError, match=r"the output \(1, 1, 100000, 64\).*split the call"):
        monkeypatch.setattr("selfattn._memory.available_bytes", lambda array_type, like=None: 1)
        monkeypatch.setattr("selfattn._memory.CHECK_FROM_BYTES", 0)
        selfattn.scaled_dot_product_attention(q, q, q)


MERGE_BAD = [
    ("empty", dict(outputs=[], lses=[]), ValueError, r"outputs is empty"),
    ("length", dict(lses=[np.zeros(3, np.float32)]), ValueError, r"same length, got 2 and 1"),
    ("not-sequence", dict(outputs=np.zeros((2, 3, 4), np.float32)), TypeError, r"outputs must be a list or tuple"),
    ("list-item", dict(outputs=[[0.0], [0.0]]), TypeError, r"outputs\[0\] must be a numpy.ndarray"),
    (
        "dtype",
        dict(outputs=[np.zeros((3, 4), np.float32), np.zeros((3, 4))]),
        TypeError,
        r"outputs\[1\] has dtype float64 but outputs\[0\] has float32",
    ),
    (
        "shape",
        dict(outputs=[np.zeros((3, 4), np.float32), np.zeros((3, 5), np.float32)]),
        ValueError,
        r"outputs\[1\] has shape \(3, 5\)",
    ),
    ("lse-dtype", dict(lses=[np.zeros(3), np.zeros(3)]), TypeError, r"lses\[0\] has dtype float64; for float32"),
    ("lse-shape", dict(lses=[np.zeros(4, np.float32)] * 2), ValueError, r"lses\[0\] has shape \(4,\), expected \(3,\)"),
]


@pytest.mark.parametrize("name, over, exc, pattern", MERGE_BAD, ids=[r[0] for r in MERGE_BAD])
def test_merge_attention_validates(name, over, exc, pattern):
    args = dict(outputs=[np.zeros((3, 4), np.float32)] * 2, lses=[np.zeros(3, np.float32)] * 2)
    args.update(over)
    with pytest.raises(exc, match=pattern):
        selfattn.merge_attention(args["outputs"], args["lses"])


@pytest.mark.parametrize("view", ["query", "all"])
def test_bnhd_layout_as_swapaxes_views(view):
    """Data laid out (B, N, H, D) is passed as a swapaxes view, no copy, and gives the same result."""
    x = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)  # (B, N, H, D)
    y = rng.standard_normal((2, 7, 2, 8)).astype(np.float32)
    q = x.swapaxes(1, 2)
    k = y.swapaxes(1, 2) if view == "all" else np.ascontiguousarray(y.swapaxes(1, 2))
    assert np.shares_memory(q, x)
    expect = selfattn.scaled_dot_product_attention(
        np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(k), causal=True, backend="numpy"
    )
    for backend in [r.name for r in selfattn.list_backends() if r.available and r.capabilities.array_type == "numpy"]:
        got = selfattn.scaled_dot_product_attention(q, k, k, causal=True, backend=backend)
        np.testing.assert_allclose(got, expect, rtol=2e-5, atol=2e-6)
