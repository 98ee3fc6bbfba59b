"""Conformance of packed variable-length batches and of ``merge_attention``, for every backend.

* Varlen calls (``scaled_dot_product_attention_varlen`` and its VJP) against
  the oracle run one sequence at a time (:func:`selfattn.testing.reference.forward_varlen`):
  empty sequences, N_s != M_s, causal, windows, soft-capping, ALiBi per head
  and per sequence, GQA, dropout (the padded call's pattern), float16/32/64.
* A varlen call equals the padded, key-masked call on the same backend and
  seed (self-attention, causal), bit for bit in the dropout pattern.
* ``merge_attention``: attention over a random split of the keys, merged,
  equals attention over all keys (a property test); empty pieces merge to 0
  and ``-inf``, never NaN.

A backend without the ``varlen`` capability must raise
:class:`selfattn.UnsupportedFeatureError`.
"""

from __future__ import annotations

import numpy as np
import pytest

import selfattn
from selfattn import UnsupportedFeatureError
from selfattn.testing import reference
from selfattn.testing.compare import assert_close, backend_options, host, to_backend


def _caps(name):
    return selfattn.get_backend(name).capabilities


VARLEN_CASES = [
    # (name, lengths_q, lengths_k, hq, hkv, d, dv, options)
    ("self-causal", [5, 0, 17, 40, 9], None, 4, 2, 16, 16, {"causal": True}),
    ("cross-n-ne-m", [5, 3, 17, 9, 0], [7, 0, 30, 4, 6], 2, 2, 8, 12, {}),
    ("cross-causal-window", [12, 30, 1], [20, 10, 33], 4, 1, 8, 8, {"causal": True, "window": (6, 2)}),
    ("softcap-alibi-heads", [9, 21, 4], None, 4, 2, 16, 16, {"softcap": 3.0, "alibi": "heads", "causal": True}),
    ("alibi-per-sequence", [9, 21, 4], [11, 21, 8], 2, 2, 8, 8, {"alibi": "sequences"}),
    ("dropout", [13, 0, 25, 7], None, 4, 2, 8, 8, {"dropout_p": 0.3, "dropout_seed": 2**63 + 5, "causal": True}),
    ("one-sequence", [70], [90], 2, 1, 16, 16, {"window": 10}),
]


def _varlen_arrays(case, dtype):
    name, lq, lk, hq, hkv, d, dv, opts = case
    lk = lq if lk is None else lk
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    cq = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
    q = rng.standard_normal((hq, int(cq[-1]), d)).astype(dtype)
    k = rng.standard_normal((hkv, int(ck[-1]), d)).astype(dtype)
    v = rng.standard_normal((hkv, int(ck[-1]), dv)).astype(dtype)
    opts = dict(opts)
    slope_dtype = np.float64 if dtype == "float64" else np.float32
    if opts.get("alibi") == "heads":
        opts["alibi_slopes"] = (2.0 ** -np.arange(1, hq + 1)).astype(slope_dtype)
    elif opts.get("alibi") == "sequences":
        opts["alibi_slopes"] = (rng.random((len(lq), hq)) * 0.5).astype(slope_dtype)
    opts.pop("alibi", None)
    return q, k, v, cq, ck, opts


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen_matches_oracle(selfattn_backend, case, dtype):
    q, k, v, cq, ck, opts = _varlen_arrays(case, dtype)
    caps = _caps(selfattn_backend)
    bq, bk, bv = to_backend(caps.array_type, q, k, v)
    bopts = backend_options(caps.array_type, opts)
    need = {"varlen", "vjp"} | {f for f in ("causal", "window", "softcap", "dropout") if opts.get(f)}
    need |= {"alibi"} if "alibi_slopes" in opts else set()
    need |= {"gqa"} if q.shape[0] != k.shape[0] else set()
    if "dropout_p" in opts:
        need.add("dropout")
    if caps.missing(caps.array_type, dtype, need):
        with pytest.raises(UnsupportedFeatureError):
            selfattn.scaled_dot_product_attention_varlen(bq, bk, bv, cq, ck, backend=selfattn_backend, **bopts)
        return
    out, lse = selfattn.scaled_dot_product_attention_varlen(
        bq, bk, bv, cq, ck, return_lse=True, backend=selfattn_backend, **bopts
    )
    ref_out, ref_lse = reference.forward_varlen(q, k, v, cq, ck, **opts)
    smax = max(
        reference.score_max(q[:, a:b], k[:, c:e], scale=opts.get("scale"), softcap=opts.get("softcap"))
        for a, b, c, e in zip(cq[:-1], cq[1:], ck[:-1], ck[1:], strict=True)
    )
    assert host(out).shape == ref_out.shape and host(out).dtype == q.dtype
    assert_close(out, ref_out, dtype, "out", score_max=smax, bound=_varlen_bound(q, k, v, cq, ck, opts)["out"])
    assert_close(lse, ref_lse, dtype, "lse", score_max=smax)
    o, backward = selfattn.scaled_dot_product_attention_varlen_vjp(
        bq, bk, bv, cq, ck, backend=selfattn_backend, **bopts
    )
    g = np.random.default_rng(7).standard_normal(o.shape).astype(dtype)
    grads = backward(to_backend(caps.array_type, g)[0])
    refs = reference.vjp_varlen(q, k, v, g, cq, ck, **opts)
    bounds = _varlen_bound(q, k, v, cq, ck, opts, g)
    for what, got, exp, x in zip(("dq", "dk", "dv"), grads, refs, (q, k, v), strict=True):
        assert host(got).shape == x.shape and host(got).dtype == x.dtype, what
        assert_close(got, exp, dtype, what, score_max=smax, bound=bounds.get(what))


def _varlen_bound(q, k, v, cq, ck, opts, g=None):
    """:func:`reference.rounding_bounds`, sequence by sequence, in the packed layout."""
    shapes = {"out": q.shape[:2] + v.shape[2:], "dq": q.shape, "dk": k.shape}
    bounds = {what: np.zeros(shape) for what, shape in shapes.items()}
    hq = q.shape[0]
    for s, (a, b, c, e) in enumerate(zip(cq[:-1], cq[1:], ck[:-1], ck[1:], strict=True)):
        o = dict(opts)
        if o.get("alibi_slopes") is not None and np.ndim(o["alibi_slopes"]) == 2:
            o["alibi_slopes"] = o["alibi_slopes"][s]
        got = reference.rounding_bounds(
            q[:, a:b], k[:, c:e], v[:, c:e], None if g is None else g[:, a:b], _bh_start=s * hq, **o
        )
        bounds["out"][:, a:b] = got["out"]
        if g is not None:
            bounds["dq"][:, a:b] = got["dq"]
            bounds["dk"][:, c:e] = got["dk"]
    return bounds


def test_varlen_equals_the_padded_masked_call(selfattn_backend):
    """Sequence b as batch entry b, right-padded, keys masked: the same output, dropout pattern included."""
    caps = _caps(selfattn_backend)
    need = {"varlen", "bool_mask", "causal", "dropout", "gqa"}
    if caps.missing(caps.array_type, "float64", need):
        pytest.skip(
            "backend lacks varlen or a feature of the padded call (test_varlen_matches_oracle checks the error)"
        )
    lens = [9, 0, 23, 4, 16]
    hq, hkv, d = 4, 2, 8
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((h, int(cu[-1]), d)) for h in (hq, hkv, hkv))
    longest = max(lens)
    qp, kp, vp = (np.zeros((len(lens), x.shape[0], longest, d)) for x in (q, k, v))
    for b, n in enumerate(lens):
        for dst, src in ((qp, q), (kp, k), (vp, v)):
            dst[b, :, :n] = src[:, cu[b] : cu[b + 1]]
    key_mask = (np.arange(longest)[None, :] < np.array(lens)[:, None])[:, None, None, :]
    kw = dict(causal=True, dropout_p=0.4, dropout_seed=2**40 + 9, backend=selfattn_backend)
    bq, bk, bv, bqp, bkp, bvp, bmask = to_backend(caps.array_type, q, k, v, qp, kp, vp, key_mask)
    packed = host(selfattn.scaled_dot_product_attention_varlen(bq, bk, bv, cu, cu, **kw))
    padded = host(selfattn.scaled_dot_product_attention(bqp, bkp, bvp, mask=bmask, **kw))
    for b, n in enumerate(lens):
        np.testing.assert_allclose(packed[:, cu[b] : cu[b + 1]], padded[b, :, :n], rtol=1e-12, atol=1e-13)
        assert np.array_equal(packed[:, cu[b] : cu[b + 1]] == 0, padded[b, :, :n] == 0)  # same dropped weights


# -- merge_attention -------------------------------------------------------------------------------------------
def test_merge_of_empty_pieces_is_zero_and_neg_inf():
    out = np.ones((2, 3, 4), np.float32)
    lse = np.full((2, 3), -np.inf, np.float32)
    o, ls = selfattn.merge_attention([out, out * 2], [lse, lse])
    assert np.all(o == 0) and np.all(np.isneginf(ls)) and o.dtype == np.float32


def test_merge_keeps_float16_outputs_and_float32_lse():
    rng = np.random.default_rng(0)
    outs = [rng.standard_normal((3, 5)).astype(np.float16) for _ in range(3)]
    lses = [rng.standard_normal(3).astype(np.float32) for _ in range(3)]
    o, ls = selfattn.merge_attention(outs, lses)
    assert o.dtype == np.float16 and ls.dtype == np.float32
    w = np.exp(np.stack(lses).astype(np.float64) - np.logaddexp.reduce(np.stack(lses).astype(np.float64)))
    ref = sum(wi[:, None] * oi.astype(np.float64) for wi, oi in zip(w, outs, strict=True))
    np.testing.assert_allclose(o, ref, rtol=2e-3, atol=2e-3)


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    st = None  # type: ignore[assignment]

if st is not None:

    @st.composite
    def _splits(draw):
        hq = draw(st.sampled_from([1, 2, 4]))
        hkv = hq // draw(st.sampled_from([1, hq]))
        n, m = draw(st.integers(1, 20)), draw(st.integers(1, 40))
        cuts = sorted(draw(st.lists(st.integers(0, m), min_size=0, max_size=4)))
        dtype = draw(st.sampled_from(["float16", "float32", "float64"]))
        mask = draw(st.sampled_from([None, "bool", "float"]))
        return dict(hq=hq, hkv=hkv, n=n, m=m, cuts=cuts, dtype=dtype, mask=mask, seed=draw(st.integers(0, 2**31)))

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_splits())
    def test_property_merge_of_a_key_split_equals_the_whole(selfattn_backend, split):
        """Attention over pieces of the keys (any split, empty pieces included), merged, equals attention over all."""
        caps = _caps(selfattn_backend)
        need = {"lse"} | ({"gqa"} if split["hkv"] != split["hq"] else set())
        need |= {"bool_mask" if split["mask"] == "bool" else "float_mask"} if split["mask"] else set()
        if caps.missing(caps.array_type, split["dtype"], need):
            return
        rng = np.random.default_rng(split["seed"])
        dt, n, m = split["dtype"], split["n"], split["m"]
        q = rng.standard_normal((2, split["hq"], n, 8)).astype(dt)
        k = rng.standard_normal((2, split["hkv"], m, 8)).astype(dt)
        v = rng.standard_normal((2, split["hkv"], m, 6)).astype(dt)
        mask = None
        if split["mask"] == "bool":
            mask = rng.random((n, m)) > 0.3
        elif split["mask"] == "float":
            mask = rng.standard_normal((n, m)).astype("float32" if dt == "float16" else dt)
        bq, bk, bv, bm = to_backend(caps.array_type, q, k, v, mask)
        whole_out, whole_lse = selfattn.scaled_dot_product_attention(
            bq, bk, bv, mask=bm, return_lse=True, backend=selfattn_backend
        )
        edges = [0] + split["cuts"] + [m]
        outs, lses = [], []
        for j0, j1 in zip(edges[:-1], edges[1:], strict=True):
            piece_mask = None if bm is None else bm[:, j0:j1]
            o, ls = selfattn.scaled_dot_product_attention(
                bq, bk[:, :, j0:j1], bv[:, :, j0:j1], mask=piece_mask, return_lse=True, backend=selfattn_backend
            )
            outs.append(o)
            lses.append(ls)
        out, lse = selfattn.merge_attention(outs, lses)
        smax = reference.score_max(q, k, mask=mask)
        # Each piece's output was rounded to the dtype on its own (up to an ulp of its own size, which a
        # small merged value does not share): allow eps * sum_i w_i |out_i|, plus the whole call's rounding.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            w = [np.nan_to_num(np.exp(host(ls).astype(np.float64) - host(whole_lse).astype(np.float64))) for ls in lses]
        spread = sum(wi[..., None] * np.abs(host(o).astype(np.float64)) for wi, o in zip(w, outs, strict=True))
        eps = float(np.finfo(dt).eps)
        bound = 2 * eps * (spread + np.abs(host(whole_out).astype(np.float64)))
        assert_close(out, host(whole_out).astype(np.float64), dt, "out", score_max=smax, bound=bound)
        assert_close(lse, host(whole_lse).astype(np.float64), dt, "lse", score_max=smax)
