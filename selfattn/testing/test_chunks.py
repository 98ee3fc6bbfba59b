"""The ``"chunks"`` contract: a backend that declares it computes exact pieces of a larger call.

For every backend that declares ``"chunks"``, a call is split with
:meth:`selfattn.backends.Problem.chunk` over batches, query heads (whole
grouped-query groups), query rows and keys; each piece runs on the backend
(through the dispatcher's capability gate); the key pieces of each block are
merged with :func:`selfattn.merge_attention`; the assembled result must equal
the whole call on the same backend -- band, ALiBi distances and dropout
pattern at their global positions. A backend without ``"chunks"`` must refuse
a chunk with :class:`selfattn.UnsupportedFeatureError`.
"""

from __future__ import annotations

import numpy as np
import pytest

import selfattn
from selfattn._capabilities import required_features
from selfattn._dispatch import select
from selfattn._problem import normalize
from selfattn.testing.compare import assert_close, host, to_backend

#: (name, (B, Hq, Hkv, N, M, D, Dv), mask (kind, shape) or None, options, dtype)
CHUNK_CASES = [
    (
        "causal-gqa-dropout",
        (2, 4, 2, 29, 37, 8, 6),
        None,
        {"causal": True, "dropout_p": 0.3, "dropout_seed": 2**64 - 3},
        "float64",
    ),
    ("window-bool-mask", (1, 2, 2, 31, 23, 8, 8), ("bool", (31, 23)), {"window": (6, 2)}, "float32"),
    ("float-mask-n>m-causal", (2, 2, 1, 33, 20, 4, 4), ("float", (2, 1, 1, 20)), {"causal": True}, "float64"),
    ("softcap-alibi", (2, 4, 4, 17, 26, 8, 8), None, {"softcap": 3.0, "alibi": True, "causal": True}, "float64"),
    ("float16", (1, 2, 1, 24, 30, 16, 16), None, {"dropout_p": 0.2, "dropout_seed": 9}, "float16"),
]


def _arrays(shape, mask_spec, options, dtype, seed=0):
    b, hq, hkv, n, m, d, dv = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, n, d)).astype(dtype)
    k = rng.standard_normal((b, hkv, m, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, m, dv)).astype(dtype)
    mask = None
    if mask_spec is not None:
        kind, mshape = mask_spec
        mask = rng.random(mshape) > 0.25 if kind == "bool" else rng.standard_normal(mshape)
    opts = dict(options)
    slopes = np.linspace(0.1, 0.6, hq) if opts.pop("alibi", False) else None
    return q, k, v, mask, slopes, opts


def _cuts(total, parts):
    """``parts`` uneven, non-empty ``[start, stop)`` ranges covering ``range(total)`` (fewer if total is small)."""
    edges = sorted({0, total} | {max(1, min(total - 1, round(total * f))) for f in (0.3, 0.55, 0.8)[: parts - 1]})
    return list(zip(edges[:-1], edges[1:], strict=True))


@pytest.mark.parametrize("case", CHUNK_CASES, ids=[c[0] for c in CHUNK_CASES])
def test_chunks_merge_to_the_whole_call(selfattn_backend, case):
    name, shape, mask_spec, options, dtype = case
    caps = selfattn.get_backend(selfattn_backend).capabilities
    q, k, v, mask, slopes, opts = _arrays(shape, mask_spec, options, dtype)
    bq, bk, bv, bm, bs = to_backend(caps.array_type, q, k, v, mask, slopes)
    pb = normalize(bq, bk, bv, mask=bm, alibi_slopes=bs, return_lse=True, **opts)
    piece = pb.chunk(rows=(1, pb.n))
    need = required_features(piece)
    assert "chunks" in need
    if caps.missing(caps.array_type, dtype, need):
        with pytest.raises(selfattn.UnsupportedFeatureError):
            select(piece, selfattn_backend)
        return
    be = select(pb, selfattn_backend)
    whole_out, whole_lse, _ = (host(x) for x in be.forward(pb))
    out = np.zeros(whole_out.shape, whole_out.dtype)
    lse = np.zeros(whole_lse.shape, whole_lse.dtype)
    spread = np.zeros(whole_out.shape)  # sum_i w_i |out_i| of the key pieces, w_i = exp(lse_i - lse)
    b, hq, hkv = shape[:3]
    group = hq // hkv
    heads = [(h0 * group, h1 * group) for h0, h1 in _cuts(hkv, 2)]
    for batches in _cuts(b, 2):
        for hs in heads:
            for rows in _cuts(pb.n, 3):
                parts = []
                for keys in _cuts(pb.m, 4):
                    chunk = pb.chunk(batches=batches, heads=hs, rows=rows, keys=keys)
                    o, lse_part, _ = select(chunk, selfattn_backend).forward(chunk)
                    parts.append((host(o), host(lse_part)))
                o, lse_block = selfattn.merge_attention([p[0] for p in parts], [p[1] for p in parts])
                block = (slice(*batches), slice(*hs), slice(*rows))
                out[block], lse[block] = o, lse_block
                with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                    for o_i, lse_i in parts:
                        w = np.nan_to_num(np.exp(lse_i.astype(np.float64) - whole_lse[block].astype(np.float64)))
                        spread[block] += w[..., None] * np.abs(o_i.astype(np.float64))
    # Each piece's output was rounded to the dtype on its own before the merge: allow an ulp of each
    # piece's share, plus the whole call's own rounding (the rule of the merge property test).
    bound = 2 * float(np.finfo(dtype).eps) * (spread + np.abs(whole_out.astype(np.float64)))
    assert_close(out, whole_out.astype(np.float64), dtype, bound=bound)
    assert_close(lse, whole_lse.astype(np.float64), dtype, what="lse")
