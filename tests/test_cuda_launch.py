"""Host-side logic of the CuPy backend (``selfattn/backends/_cuda/launch.py``), on the CPU.

Kernel names and source selection, launch configuration, kernel choice
(fused or blockwise, tensor cores or not), the tensor-core layout check, mask
broadcast strides, band and dropout arguments, and the packed argument tuple
checked against the C parameter lists in ``attn.cu``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from _cuda_cases import pack_for

from selfattn._dropout import split_seed, threshold
from selfattn._problem import normalize, normalize_varlen
from selfattn.backends._cuda import launch

# -- host-side launch logic ---------------------------------------------------


def test_cuda_folder_holds_runtime_files_only():
    """The package's CUDA folder ships the kernel sources and their host logic; tools and the emulator live outside."""
    here = Path(launch.__file__).resolve().parent
    assert sorted(p.name for p in here.iterdir() if p.name != "__pycache__") == [
        "__init__.py",
        "attn.cu",
        "common.cuh",
        "launch.py",
    ]


def test_kernel_names_present_in_source():
    src = launch.kernel_source("attn.cu")
    for name in launch.kernel_names("attn.cu"):
        assert re.search(rf"\b{name}\b", src), name
    assert len(launch.kernel_names()) == 3 * len(launch.DMAX_CHOICES) + len(launch.TC_DMAX_CHOICES) + 2


def test_kernel_source_only_selects_one_instantiation():
    name = launch.fwd_kernel_name(np.float16, 128)
    src = launch.kernel_source("attn.cu", only=name)
    assert src.count("SA_DEFINE_FWD(attn_fwd_") == 1 and f"SA_DEFINE_FWD({name}," in src
    assert "sa_fmix32" in src  # common.cuh prepended
    assert "dropout_tile_float32" in src
    assert "SA_DEFINE_FWD_TC(attn_fwd_tc_" not in src  # the tensor-core kernels are left out too
    tc = launch.tc_kernel_name(64)
    src = launch.kernel_source("attn.cu", only=tc)
    assert f"SA_DEFINE_FWD_TC({tc}," in src and len(re.findall(r"^SA_DEFINE_FWD(_TC)?\(", src, re.M)) == 1
    assert "SA_DEFINE_FWD(attn_fwd_" not in src
    with pytest.raises(KeyError):
        launch.kernel_source("attn.cu", only="attn_fwd_float16_48")
    with pytest.raises(KeyError):
        launch.kernel_source("attn.cu", only="attn_fwd_tc_float16_256")


def test_bm_matches_source():
    src = launch.kernel_source("attn.cu")
    assert re.search(rf"#define SA_BM {launch.BM}\b", src)
    # Both forwards give a block BM query rows (pack_fwd_args counts row blocks once).
    assert re.search(rf"#define SA_TC_BM {launch.BM}\b", src)
    assert re.search(rf"#define SA_TC_THREADS {launch.TC_THREADS}\b", src)
    assert re.search(r"#if !defined\(__CUDA_ARCH__\) \|\| __CUDA_ARCH__ >= " + str(launch.TC_MIN_CC * 10), src)


@pytest.mark.parametrize(
    "d, dv, want",
    [
        (8, 8, 32),
        (32, 16, 32),
        (64, 64, 64),
        (40, 64, 64),
        (96, 64, 128),
        (128, 128, 128),
        (6, 8, None),
        (64, 60, None),
        (136, 64, None),
        (0, 8, None),
    ],
)
def test_pick_tc_dmax(d, dv, want):
    assert launch.pick_tc_dmax(d, dv) == want
    assert launch.tc_ok(np.float16, d, dv, False, 90) == (want is not None)
    assert not launch.tc_ok(np.float16, d, dv, True, 90)  # weights: blockwise path
    assert not launch.tc_ok(np.float16, d, dv, False, 75)  # no mma.m16n8k16 / cp.async before sm_80
    assert not launch.tc_ok(np.float32, d, dv, False, 90)


def test_tc_layout_ok():
    x = np.zeros((2, 3, 5, 8), np.float16)

    def ok(a, addr=0):
        return launch.tc_layout_ok(a.shape, a.strides, a.itemsize, addr)

    assert ok(x) and not ok(x, 8)  # base address must be 16-byte aligned
    assert not ok(np.asfortranarray(x))  # last axis must have unit stride
    assert not ok(np.zeros((2, 3, 5, 12), np.float16))  # 24-byte rows
    assert not ok(np.zeros((2, 3, 5, 16), np.float16)[..., ::2])  # every other element
    assert ok(np.zeros((2, 3, 5, 16), np.float16)[..., :8])  # 32-byte row stride, 8 used
    assert ok(np.zeros((1, 1, 1, 8), np.float16).transpose(2, 1, 0, 3))  # size-1 axes: any stride
    assert ok(np.broadcast_to(np.zeros((1, 1, 5, 8), np.float16), (2, 3, 5, 8)))  # 0 strides


@pytest.mark.parametrize(
    "d, dv, want",
    [
        (1, 1, 32),
        (32, 32, 32),
        (33, 8, 64),
        (64, 128, 128),
        (128, 64, 128),
        (200, 256, 256),
        (257, 16, None),
        (16, 300, None),
    ],
)
def test_pick_dmax(d, dv, want):
    assert launch.pick_dmax(d, dv) == want
    assert launch.fused_ok(d, dv, False) == (want is not None)
    assert not launch.fused_ok(d, dv, True)


@pytest.mark.parametrize(
    "d, dv, n, m, weights, want",
    [
        (64, 64, 4096, 4096, False, "fused"),
        (64, 64, 1, 32768, False, "blockwise"),
        (64, 64, 15, 256, False, "blockwise"),
        (64, 64, 16, 256, False, "fused"),
        (64, 64, 1, 255, False, "fused"),
        (64, 64, 4096, 4096, True, "blockwise"),
        (300, 64, 4096, 4096, False, "blockwise"),
    ],
)
def test_forward_path(d, dv, n, m, weights, want):
    assert launch.forward_path(d, dv, n, m, weights) == want


def test_fwd_launch():
    assert launch.fwd_launch(2, 3, 0)[0] is None
    grid, block, nrb, total = launch.fwd_launch(2, 3, 130)
    assert block == (64,) and nrb == 3 and total == 18 and grid == (18,)
    assert launch.fwd_launch(2, 3, 130, launch.TC_THREADS) == ((18,), (128,), 3, 18)
    grid, _, nrb, total = launch.fwd_launch(2**20, 2**10, 2**10)
    assert total == 2**30 * 16 and grid == (launch.GRID_MAX,)  # the kernel loops over the rest


def test_elementwise_launch():
    assert launch.elementwise_launch(0)[0] is None
    assert launch.elementwise_launch(1) == ((1,), (256,))
    assert launch.elementwise_launch(257) == ((2,), (256,))
    assert launch.elementwise_launch(10**12)[0] == (65536,)


def test_mask_strides_broadcast_and_views():
    base = np.zeros((3, 1, 5, 7), dtype=np.float32)
    assert launch.mask_strides(base.shape, base.strides, 4) == (35, 0, 7, 1)
    bc = np.broadcast_to(np.zeros((1, 1, 1, 7), dtype=bool), (1, 4, 5, 7))
    assert launch.mask_strides(bc.shape, bc.strides, 1) == (0, 0, 0, 1)
    t = np.zeros((2, 2, 7, 5), dtype=np.float64).swapaxes(-1, -2)
    assert launch.mask_strides(t.shape, t.strides, 8) == (70, 35, 1, 5)
    with pytest.raises(ValueError):
        launch.mask_strides((2, 3), (3, 1), 1)
    assert launch.mask_kind(None) == 0 and launch.mask_kind(np.bool_) == 1
    assert [launch.mask_kind(t) for t in (np.float16, np.float32, np.float64)] == [2, 3, 4]


def test_band_args():
    assert launch.band_args(None, None) == (0, 0, 0, 0)
    assert launch.band_args(3, 0) == (1, 3, 1, 0)
    assert launch.band_args(None, 5)[2:] == (1, 5)
    assert launch.band_args(2**40, None)[1] == 2**31 - 1
    assert all(isinstance(x, np.int32) for x in launch.band_args(1, 2))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.999999])
def test_dropout_args(p):
    seed = 0xDEADBEEF12345678
    thr, lo, hi, sc, use = launch.dropout_args(p, seed)
    assert int(thr) == threshold(p) and (int(lo), int(hi)) == split_seed(seed)
    assert (int(lo), int(hi)) == (0x12345678, 0xDEADBEEF)
    assert sc == pytest.approx(1 / (1 - p)) and use == 1
    assert thr.dtype == lo.dtype == hi.dtype == np.uint32
    assert launch.dropout_args(0.0, None)[-1] == 0


def _c_signature(macro: str):
    src = launch.kernel_source("attn.cu")
    m = re.search(rf"#define {macro}\((?:T, )?A\)((?:[^\n]*\\\n)*[^\n]*)", src)
    assert m, macro
    body = m.group(1).replace("\\\n", " ")
    params = []
    for part in body.split(","):
        part = part.strip()
        ctype, name = part.rsplit(" ", 1)
        if "*" in ctype or name.startswith("*"):
            params.append((name.lstrip("*"), "ptr"))
        else:
            params.append((name, ctype))
    return params


def test_fwd_signature_matches_kernel_source():
    assert _c_signature("SA_FWD_ARGS") == list(launch.FWD_SIGNATURE)


def test_dropout_signature_matches_kernel_source():
    assert _c_signature("SA_DROP_ARGS") == list(launch.DROPOUT_SIGNATURE)


def test_pack_fwd_args_types_and_values():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 7, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, 7, 3)).astype(np.float32)
    mask = rng.random((2, 1, 1, 7)) > 0.3
    pb = normalize(q, k, v, mask=mask, causal=True, window=(3, 9), dropout_p=0.25, dropout_seed=5, return_lse=True)
    args = pack_for(pb)
    assert len(args) == len(launch.FWD_SIGNATURE)
    d = dict(zip((n for n, _ in launch.FWD_SIGNATURE), args, strict=True))
    for (name, ctype), val in zip(launch.FWD_SIGNATURE, args, strict=True):
        if ctype != "ptr":
            assert np.dtype(type(val)) == np.dtype(launch._CTYPES[ctype]), name
    assert (d["Hq"], d["G"], d["N"], d["M"], d["D"], d["Dv"]) == (4, 2, 5, 7, 8, 3)
    assert (d["ms0"], d["ms1"], d["ms2"], d["ms3"]) == (7, 0, 0, 1)
    assert (d["has_lower"], d["lower"], d["has_upper"], d["upper"]) == (1, 3, 1, 0)
    assert d["mask_kind"] == 1 and d["use_dropout"] == 1 and d["seed_lo"] == 5 and d["seed_hi"] == 0
    assert d["threshold"] == threshold(0.25) and d["write_lse"] == 1 and d["n_row_blocks"] == 1
    assert d["total_blocks"] == 8 and d["scale"] == pytest.approx(8**-0.5)
    # GQA: key strides are those of the (B, Hkv, M, D) key, not an expanded copy.
    assert (d["ks0"], d["ks1"], d["ks2"], d["ks3"]) == (112, 56, 8, 1)


def test_pack_rejects_overflow():
    with pytest.raises(OverflowError):
        launch._pack((("n", "int"),), {"n": 2**31})
    with pytest.raises(KeyError):
        launch._pack((("n", "int"),), {})


def test_row_block_budget():
    from selfattn.backends._blockwise import BANDED_ROWS, row_block

    bb, rows = row_block(8, 16, 4096, 4096, 4, 256 * 2**20, False)
    assert bb == 1 and 16 * rows * 4096 * 4 <= 256 * 2**20 and rows == 1024
    assert row_block(8, 2, 16, 16, 4, 2**20, False) == (8, 16)
    assert row_block(1, 1, 10**6, 10**6, 8, 1, False) == (1, 1)
    assert row_block(1, 1, 4096, 16, 4, 2**30, True)[1] == BANDED_ROWS


# -- the dropout hash's constants: defined once, in selfattn._dropout ---------------------------


def test_hash_constants_are_generated_from_the_core(monkeypatch):
    from selfattn import _dropout

    defines = launch.hash_defines()
    for macro, attr in (
        ("SA_MUL_BH", "MUL_BH"),
        ("SA_MUL_ROW", "MUL_ROW"),
        ("SA_MUL_COL", "MUL_COL"),
        ("SA_FMIX_1", "FMIX_1"),
        ("SA_FMIX_2", "FMIX_2"),
    ):
        assert re.search(rf"^#define {macro} 0x0*{getattr(_dropout, attr):X}u$", defines, re.M), macro
    # No CUDA source repeats them: they reach the kernels only through the generated lines.
    for fname in ("common.cuh", "attn.cu"):
        text = (launch._HERE / fname).read_text().upper()
        for attr in ("MUL_BH", "MUL_ROW", "MUL_COL", "FMIX_1", "FMIX_2"):
            assert f"{getattr(_dropout, attr):X}" not in text, (fname, attr)
    assert launch.kernel_source("attn.cu", only="-").startswith(defines)
    monkeypatch.setattr(_dropout, "MUL_COL", 0x12345679)
    assert "#define SA_MUL_COL 0x12345679u" in launch.kernel_source("attn.cu", only="-")
    monkeypatch.setattr(_dropout, "MUL_COL", 2**32)
    with pytest.raises(ValueError, match="not a uint32"):
        launch.hash_defines()


# -- softcap, ALiBi, chunk coordinates and varlen in the packed arguments ------------------------


def _named(args):
    return dict(zip((n for n, _ in launch.FWD_SIGNATURE), args, strict=True))


def test_pack_fwd_args_plain_call_turns_every_feature_off():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 7, 8)).astype(np.float32)
    d = _named(pack_for(normalize(q, k, k, causal=True)))
    assert d["offset"] == 2 and d["softcap"] == 0.0 and d["use_alibi"] == 0 and d["varlen"] == 0
    assert d["use_dropout"] == 0 and d["use_batch_index"] == 0
    assert (d["head_start"], d["total_heads"], d["row_start"], d["col_start"]) == (0, 4, 0, 0)
    for name in ("mask", "mask_index", "alibi", "batch_index", "cu_q", "cu_k", "tile_seq", "tile_row"):
        assert d[name] == "NONE", name  # absent arrays: the placeholder


def test_pack_fwd_args_chunk_softcap_alibi():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 4, 50, 8)).astype(np.float32)
    k = rng.standard_normal((3, 2, 60, 8)).astype(np.float32)
    slopes = rng.uniform(0.1, 0.5, 4)
    full = normalize(q, k, k, causal=True, softcap=7.5, alibi_slopes=slopes, dropout_p=0.2, dropout_seed=3)
    pb = full.chunk(batches=(1, 3), heads=(2, 4), rows=(10, 30), keys=(5, 40))
    d = _named(pack_for(pb))
    assert d["offset"] == 10 + 10 - 5 and d["M"] == 35 and d["N"] == 20  # (60 - 50) + i0 - j0
    assert d["softcap"] == 7.5 and d["use_alibi"] == 1
    np.testing.assert_array_equal(d["alibi"], np.broadcast_to(slopes, (3, 4))[1:3, 2:4].astype(np.float32))
    assert d["use_batch_index"] == 1 and list(d["batch_index"]) == [1, 2]
    assert (d["head_start"], d["total_heads"], d["row_start"], d["col_start"]) == (2, 4, 10, 5)
    assert all(isinstance(d[n], np.int64) for n in ("offset", "head_start", "total_heads", "row_start"))
    # Without dropout the counters are not needed, and no batch index is read.
    nodrop = normalize(q, k, k, causal=True).chunk(batches=(1, 3))
    assert _named(pack_for(nodrop))["use_batch_index"] == 0


def test_pack_fwd_args_rejects_missing_pieces():
    q = np.zeros((1, 1, 4, 8), np.float32)
    base = dict(
        q=q,
        k=q,
        v=q,
        out=q,
        lse=q,
        shapes_strides={a: (q.shape, q.strides, 4) for a in "qkv"},
        sizes=dict(B=1, Hq=1, Hkv=1, N=4, M=4, D=8, Dv=8),
        scale=1.0,
        lower=None,
        upper=None,
        dropout_p=0.0,
        dropout_seed=None,
        write_lse=True,
    )
    with pytest.raises(ValueError, match="no placeholder"):
        launch.pack_fwd_args(**base)
    ph = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="softcap"):
        launch.pack_fwd_args(**base, softcap=0.0, placeholder=ph)
    from selfattn.backends import Coordinates

    chunk = Coordinates(batch_index=np.array([3]), total_heads=2)
    with pytest.raises(ValueError, match="batch_index"):
        launch.pack_fwd_args(**dict(base, dropout_p=0.5, dropout_seed=1), coords=chunk, placeholder=ph)
    tables = dict(cu_q=ph, cu_k=ph, tile_seq=ph, tile_row=ph, n_tiles=1)
    with pytest.raises(ValueError, match="batch 1"):
        launch.pack_fwd_args(**dict(base, sizes=dict(base["sizes"], B=2)), varlen=tables, placeholder=ph)
    d = _named(launch.pack_fwd_args(**base, varlen=dict(tables, n_tiles=5), placeholder=ph))
    assert d["varlen"] == 1 and d["total_blocks"] == 5 and d["n_row_blocks"] == 0


def test_varlen_tiles():
    cu_q = np.array([0, 130, 130, 135, 199])  # 130 rows, none, 5, 64
    cu_k = np.array([0, 10, 17, 17, 217])  # 10 keys, 7, none, 200
    seq, row = launch.varlen_tiles(cu_q, cu_k, None, None)
    # Sequence 1 has no queries (no tile); sequence 2 has no keys but keeps its tile (rows -> 0, -inf).
    assert sorted(zip(seq.tolist(), row.tolist(), strict=True)) == [(0, 0), (0, 64), (0, 128), (2, 0), (3, 0)]
    assert seq.dtype == row.dtype == np.int64
    # The most keys first, ties in table order: 200 keys, then the three 10-key tiles, then none.
    assert list(zip(seq.tolist(), row.tolist(), strict=True)) == [(3, 0), (0, 0), (0, 64), (0, 128), (2, 0)]
    # Causal, bottom-right per sequence (M - N = -120 for sequence 0): its tiles reach 0, 8 and 10 keys.
    seq, row = launch.varlen_tiles(cu_q, cu_k, None, 0)
    assert list(zip(seq.tolist(), row.tolist(), strict=True)) == [(3, 0), (0, 128), (0, 64), (0, 0), (2, 0)]
    assert [len(x) for x in launch.varlen_tiles(np.array([0, 0]), np.array([0, 5]), None, None)] == [0, 0]
    assert launch.varlen_launch(4, 0) == (None, (64,), 0)
    assert launch.varlen_launch(4, 5, launch.TC_THREADS) == ((20,), (128,), 20)


# -- which forward runs ---------------------------------------------------------------------


def _route(pb, cc=90, **settings):
    from selfattn.backends.cupy_ import CupyBackend

    return CupyBackend(**settings)._route(pb, cc)


def test_every_contract_option_runs_fused():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 4, 80, 64)).astype(np.float16)
    k = rng.standard_normal((2, 2, 90, 64)).astype(np.float16)
    tc, cc16 = ("fused", launch.tc_kernel_name(64)), ("fused", launch.fwd_kernel_name("float16", 64))
    slopes = np.full(4, 0.1, np.float32)
    for kw in (dict(softcap=5.0), dict(alibi_slopes=slopes, causal=True), dict(dropout_p=0.1, window=3)):
        assert _route(normalize(q, k, k, **kw)) == tc, kw
        assert _route(normalize(q, k, k, **kw), cc=75) == cc16, kw
        assert _route(normalize(q, k, k, **kw), tensor_cores=False) == cc16, kw
    chunk = normalize(q, k, k, causal=True, dropout_p=0.3).chunk(batches=(1, 2), rows=(16, 80), keys=(10, 60))
    assert chunk.is_chunk and _route(chunk) == tc
    assert _route(normalize(q, k, k, return_weights=True, softcap=2.0)) == ("blockwise", None)
    long = rng.standard_normal((2, 2, 300, 64)).astype(np.float16)
    assert _route(normalize(q, long, long).chunk(rows=(0, 1))) == ("blockwise", None)  # decode-like chunk
    cu_q, cu_k = np.array([0, 30, 80]), np.array([0, 1, 90])
    assert _route(normalize_varlen(q[0], k[0], k[0], cu_q, cu_k, alibi_slopes=slopes)) == tc
    # Varlen stays fused even with one query row per sequence (decode-like): the alternative is a Python loop.
    one = np.array([0, 1, 2])
    assert _route(normalize_varlen(q[0, :, :2], k[0], k[0], one, np.array([0, 40, 90]))) == tc
    big = rng.standard_normal((2, 10, 300)).astype(np.float32)
    assert _route(normalize_varlen(big, big, big, np.array([0, 10]), np.array([0, 10]))) == ("blockwise", None)
