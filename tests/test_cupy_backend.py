"""Tests of the CuPy backend.

Most of them run without a GPU: the kernel sources are compiled with NVRTC for
sm_80 and sm_90, the host-side logic (launch configuration, tiling, mask
strides, argument packing, dropout parameters) is checked on the CPU, the
kernel's dropout hash is built with the host C++ compiler and compared bit for
bit with ``selfattn._dropout``, the fused kernel's tile algorithm is emulated
in NumPy from the packed arguments, and the blockwise (cuBLAS) paths run with
NumPy standing in for CuPy. The tests at the end need a CUDA device and skip,
with the backend's own reason, where there is none.

CI packages for the compile tests: ``pip install cuda-python nvidia-cuda-nvrtc-cu12``.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import selfattn
from selfattn._dropout import keep_mask, split_seed, threshold
from selfattn._problem import normalize
from selfattn.backends import cupy_ as cupy_backend_mod
from selfattn.backends import numpy_
from selfattn.backends._cuda import launch

ARCHES = ("sm_80", "sm_90")


# -- import and availability ---------------------------------------------

def test_import_does_not_import_cupy():
    code = ("import sys, selfattn, selfattn.backends.cupy_ as m; "
            "m.backend.capabilities; assert 'cupy' not in sys.modules, 'cupy imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_capabilities_declared():
    caps = cupy_backend_mod.backend.capabilities
    assert caps.array_type == "cupy"
    assert caps.dtypes == frozenset(selfattn.DTYPES)
    assert caps.features == frozenset(selfattn.FEATURES)
    assert cupy_backend_mod.backend.priority == 10
    assert cupy_backend_mod.backend.name == "cupy"


def test_availability_without_cupy(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "cupy" else real(n, *a))
    ok, reason = cupy_backend_mod.CupyBackend().availability()
    assert not ok
    assert "cupy is not installed" in reason and "pip install 'selfattn[cuda12]'" in reason


def _fake_cupy(monkeypatch, get_count):
    monkeypatch.setattr(cupy_backend_mod, "_driver_probe", lambda: (True, ""))
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_count))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n == "cupy" else real(n, *a))


def test_availability_no_driver(monkeypatch):
    def boom():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    _fake_cupy(monkeypatch, boom)
    ok, reason = cupy_backend_mod.CupyBackend().availability()
    assert not ok
    assert "no usable CUDA driver/device" in reason and "cudaErrorInsufficientDriver" in reason


def test_availability_zero_devices(monkeypatch):
    _fake_cupy(monkeypatch, lambda: 0)
    ok, reason = cupy_backend_mod.CupyBackend().availability()
    assert not ok and "no CUDA device" in reason


def test_availability_with_device(monkeypatch):
    _fake_cupy(monkeypatch, lambda: 2)
    assert cupy_backend_mod.CupyBackend().availability() == (True, "")


def test_availability_driver_probe_failure_skips_cupy_import(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object())
    monkeypatch.setattr(cupy_backend_mod, "_driver_probe", lambda: (False, "no CUDA driver: could not load libcuda.so.1"))
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    ok, reason = cupy_backend_mod.CupyBackend().availability()
    assert (ok, reason) == (False, "no CUDA driver: could not load libcuda.so.1")
    assert "cupy" not in sys.modules


def test_driver_probe_runs_here():
    ok, reason = cupy_backend_mod._driver_probe()
    assert isinstance(ok, bool) and (ok or "CUDA" in reason)


def _real_availability():
    return cupy_backend_mod.CupyBackend().availability()


def test_list_backends_reports_cupy():
    rec = {r.name: r for r in selfattn.list_backends()}["cupy"]
    ok, reason = _real_availability()
    assert rec.available == ok
    assert rec.capabilities is not None and rec.capabilities.array_type == "cupy"
    if not ok:
        assert rec.reason  # e.g. "cupy is not installed; ..." or "no usable CUDA driver/device: ..."
        if importlib.util.find_spec("cupy") is None:
            assert "selfattn[cuda12]" in rec.reason
        else:
            assert "CUDA" in rec.reason


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed")
def test_real_cupy_without_device_gives_reason():
    ok, reason = _real_availability()
    if ok:
        pytest.skip("a CUDA device is present")
    assert "CUDA" in reason


# -- NVRTC compilation ------------------------------------------------------

def _nvrtc():
    from selfattn.backends._cuda import nvrtc_check
    try:
        nvrtc_check.load_nvrtc()
    except nvrtc_check.NvrtcUnavailable as exc:
        pytest.skip(f"NVRTC not available: {exc}")
    return nvrtc_check


@pytest.mark.parametrize("arch", ARCHES)
def test_kernels_compile_nvrtc(arch):
    nc = _nvrtc()
    for fname in launch.KERNEL_SOURCES:
        report = {}
        cubin = nc.compile_source(launch.kernel_source(fname), arch, name=fname,
                                  name_expressions=launch.kernel_names(fname), report=report)
        assert len(cubin) > 1000
        # The tensor-core forwards must keep S, P, O and the Q fragments in registers:
        # a spill would put local-memory traffic in the inner loop (a silent slowdown).
        for dm in launch.TC_DMAX_CHOICES:
            r = report[launch.tc_kernel_name(dm)]
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (dm, r)
            assert 0 < r["registers"] <= 255 and r["smem"] <= 48 * 1024, (dm, r)


@pytest.mark.parametrize("broken, what", [
    ("extern \"C\" __global__ void k(float* x) { x[0] = 1.0f }", "syntax error"),
    ("extern \"C\" __global__ void k(float* x) { int* p = x; p[0] = 1; }", "type error"),
    ("extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }", "undefined identifier"),
])
def test_broken_source_fails_to_compile(broken, what):
    nc = _nvrtc()
    with pytest.raises(nc.CompileError, match="NVRTC failed"):
        nc.compile_source(broken, "sm_80", name_expressions=("k",))


def test_missing_kernel_is_detected():
    nc = _nvrtc()
    src = 'extern "C" __global__ void present(float* x) { x[0] = 1.0f; }'
    nc.compile_source(src, "sm_80", name_expressions=("present",))
    with pytest.raises(nc.CompileError, match="missing"):
        nc.compile_source(src, "sm_80", name_expressions=("absent",))


def test_broken_attn_source_fails():
    """A one-character slip in the real kernel source is caught (not just toy sources)."""
    nc = _nvrtc()
    name = launch.fwd_kernel_name("float32", 32)
    src = launch.kernel_source("attn.cu", only=name).replace("l_run *= corr;", "l_run *= corr", 1)
    with pytest.raises(nc.CompileError):
        nc.compile_source(src, "sm_80", name_expressions=(name,))


# -- the kernel's dropout hash, compiled on the host -------------------------

def test_dropout_hash_host_compiled_matches_core(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build common.cuh")
    hdr = (launch._HERE / "common.cuh").read_text()
    prog = hdr + r'''
#include <cstdio>
#include <cstdlib>
int main(int argc, char** argv) {
    unsigned long long seed = strtoull(argv[1], 0, 10);
    sa_u32 thr = (sa_u32)strtoul(argv[2], 0, 10);
    sa_u32 k0 = (sa_u32)(seed & 0xFFFFFFFFull), k1 = (sa_u32)(seed >> 32);
    unsigned bhs[3] = {0u, 7u, 2147483646u};
    for (int a = 0; a < 3; ++a)
        for (unsigned i = 0; i < 5; ++i)
            for (unsigned j = 0; j < 9; ++j) {
                unsigned ii = i * 1000003u, jj = j * 999983u;
                sa_u32 row = sa_row_hash(sa_head_hash(k0, k1, bhs[a]), ii);
                putchar(sa_keep(row, jj, thr) ? '1' : '0');
            }
    return 0;
}
'''
    src = tmp_path / "hash.cpp"
    src.write_text(prog)
    exe = tmp_path / "hash"
    subprocess.run([cxx, "-O1", "-x", "c++", str(src), "-o", str(exe)], check=True)
    for seed, p in ((0, 0.1), (2**64 - 1, 0.5), (0x123456789ABCDEF0, 0.9), (42, 0.999)):
        got = subprocess.run([str(exe), str(seed), str(threshold(p))], check=True,
                             capture_output=True, text=True).stdout
        want = keep_mask(seed, np.array([0, 7, 2147483646]), np.arange(5) * 1000003, np.arange(9) * 999983, p)
        assert got == "".join("1" if x else "0" for x in want.reshape(-1))


# -- host-side launch logic ---------------------------------------------------

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


@pytest.mark.parametrize("d, dv, want", [(8, 8, 32), (32, 16, 32), (64, 64, 64), (40, 64, 64), (96, 64, 128),
                                         (128, 128, 128), (6, 8, None), (64, 60, None), (136, 64, None),
                                         (0, 8, None)])
def test_pick_tc_dmax(d, dv, want):
    assert launch.pick_tc_dmax(d, dv) == want
    assert launch.tc_ok(np.float16, d, dv, False, 90) == (want is not None)
    assert not launch.tc_ok(np.float16, d, dv, True, 90)     # weights: blockwise path
    assert not launch.tc_ok(np.float16, d, dv, False, 75)    # no mma.m16n8k16 / cp.async before sm_80
    assert not launch.tc_ok(np.float32, d, dv, False, 90)


def test_tc_layout_ok():
    x = np.zeros((2, 3, 5, 8), np.float16)
    ok = lambda a, addr=0: launch.tc_layout_ok(a.shape, a.strides, a.itemsize, addr)
    assert ok(x) and not ok(x, 8)                       # base address must be 16-byte aligned
    assert not ok(np.asfortranarray(x))                 # last axis must have unit stride
    assert not ok(np.zeros((2, 3, 5, 12), np.float16))  # 24-byte rows
    assert not ok(np.zeros((2, 3, 5, 16), np.float16)[..., ::2])  # every other element
    assert ok(np.zeros((2, 3, 5, 16), np.float16)[..., :8])  # 32-byte row stride, 8 used
    assert ok(np.zeros((1, 1, 1, 8), np.float16).transpose(2, 1, 0, 3))  # size-1 axes: any stride
    assert ok(np.broadcast_to(np.zeros((1, 1, 5, 8), np.float16), (2, 3, 5, 8)))  # 0 strides


@pytest.mark.parametrize("d, dv, want", [(1, 1, 32), (32, 32, 32), (33, 8, 64), (64, 128, 128),
                                         (128, 64, 128), (200, 256, 256), (257, 16, None), (16, 300, None)])
def test_pick_dmax(d, dv, want):
    assert launch.pick_dmax(d, dv) == want
    assert launch.fused_ok(d, dv, False) == (want is not None)
    assert not launch.fused_ok(d, dv, True)


@pytest.mark.parametrize("d, dv, n, m, weights, want", [
    (64, 64, 4096, 4096, False, "fused"), (64, 64, 1, 32768, False, "blockwise"),
    (64, 64, 15, 256, False, "blockwise"), (64, 64, 16, 256, False, "fused"), (64, 64, 1, 255, False, "fused"),
    (64, 64, 4096, 4096, True, "blockwise"), (300, 64, 4096, 4096, False, "blockwise"),
])
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


def _pack_for(pb, out="OUT", lse="LSE"):
    ss = {a: (x.shape, x.strides, x.itemsize) for a, x in (("q", pb.query), ("k", pb.key), ("v", pb.value))}
    mdt = None
    if pb.mask is not None:
        ss["m"] = (pb.mask.shape, pb.mask.strides, pb.mask.itemsize)
        mdt = pb.mask.dtype
    return launch.pack_fwd_args(
        q=pb.query, k=pb.key, v=pb.value, out=out, lse=lse, mask=pb.mask, mask_index=pb.mask_index,
        mask_dtype=mdt, shapes_strides=ss,
        sizes=dict(B=pb.batch, Hq=pb.q_heads, Hkv=pb.kv_heads, N=pb.n, M=pb.m, D=pb.d, Dv=pb.dv),
        scale=pb.scale, lower=pb.lower, upper=pb.upper, dropout_p=pb.dropout_p,
        dropout_seed=pb.dropout_seed, write_lse=pb.want_lse)


def test_pack_fwd_args_types_and_values():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 7, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, 7, 3)).astype(np.float32)
    mask = rng.random((2, 1, 1, 7)) > 0.3
    pb = normalize(q, k, v, mask=mask, causal=True, window=(3, 9), dropout_p=0.25, dropout_seed=5, return_lse=True)
    args = _pack_for(pb)
    assert len(args) == len(launch.FWD_SIGNATURE)
    d = dict(zip((n for n, _ in launch.FWD_SIGNATURE), args))
    for (name, ctype), val in zip(launch.FWD_SIGNATURE, args):
        if ctype != "ptr":
            assert np.dtype(type(val)) == np.dtype(launch._CTYPES[ctype]), name
    assert (d["Hq"], d["G"], d["N"], d["M"], d["D"], d["Dv"]) == (4, 2, 5, 7, 8, 3)
    assert (d["ms0"], d["ms1"], d["ms2"], d["ms3"]) == (7, 0, 0, 1)
    assert (d["has_lower"], d["lower"], d["has_upper"], d["upper"]) == (1, 3, 1, 0)
    assert d["mask_kind"] == 1 and d["use_dropout"] == 1 and d["seed_lo"] == 5 and d["seed_hi"] == 0
    assert d["threshold"] == threshold(0.25) and d["write_lse"] == 1 and d["n_row_blocks"] == 1
    assert d["total_blocks"] == 8 and d["scale"] == pytest.approx(8 ** -0.5)
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


# -- NumPy emulation of the fused kernel, driven by the packed arguments ----

def _memory(x):
    """The memory an array views, as a flat array indexed by element offsets (what the kernel sees)."""
    assert all(st >= 0 for st in x.strides)
    span = 1 + sum((n - 1) * st // x.itemsize for n, st in zip(x.shape, x.strides)) if x.size else 0
    return np.lib.stride_tricks.as_strided(x, shape=(span,), strides=(x.itemsize,))


def emulate_fused(pb):
    """What attn_fwd_* computes, tile by tile, reading inputs only through the packed arguments."""
    args = dict(zip((n for n, _ in launch.FWD_SIGNATURE), _pack_for(pb)))
    A = np.float64 if pb.dtype == np.float64 else np.float32
    BN = min(32, 32768 // (2 * launch.pick_dmax(pb.d, pb.dv) * np.dtype(A).itemsize))
    Hq, G, N, M, D, Dv = (int(args[x]) for x in ("Hq", "G", "N", "M", "D", "Dv"))
    qf, kf, vf = (_memory(x) for x in (pb.query, pb.key, pb.value))
    st = {a: [int(args[f"{a}s{i}"]) for i in range(4)] for a in "qkvm"}
    B = pb.batch
    out = np.zeros((B, Hq, N, Dv), A)
    lse = np.zeros((B, Hq, N), A)
    off = M - N
    thr, lo, hi = int(args["threshold"]), int(args["seed_lo"]), int(args["seed_hi"])
    mflat = None if pb.mask is None else _memory(pb.mask)
    for bh in range(B * Hq):
        b, h = divmod(bh, Hq)
        hk = h // G
        for i0 in range(0, N, launch.BM):
            i1 = min(N, i0 + launch.BM)
            j0, j1 = 0, M
            if args["has_lower"]:
                j0 = max(0, i0 + off - int(args["lower"]))
            if args["has_upper"]:
                j1 = min(M, i1 - 1 + off + int(args["upper"]) + 1)
            j1 = max(j0, j1)
            for i in range(i0, i1):
                qr = np.array([qf[b * st["q"][0] + h * st["q"][1] + i * st["q"][2] + c * st["q"][3]] for c in range(D)], A) * A(args["scale"])
                acc = np.zeros(Dv, A); m_run = A(-np.inf); l_run = A(0); nan = False
                for jt in range(j0, j1, BN):
                    js = [j for j in range(jt, jt + BN) if j < j1]
                    s = []
                    for j in js:
                        kr = np.array([kf[b * st["k"][0] + hk * st["k"][1] + j * st["k"][2] + c * st["k"][3]] for c in range(D)], A)
                        x = A(np.dot(qr, kr))
                        if args["mask_kind"]:
                            mo = int(pb.mask_index[b]) * st["m"][0] + h * st["m"][1] + i * st["m"][2] + j * st["m"][3]
                            mv = mflat[mo]
                            x = x + (A(0) if mv is True or (args["mask_kind"] == 1 and mv) else (A(-np.inf) if args["mask_kind"] == 1 else A(mv)))
                        rel = j - (i + off)
                        if (args["has_lower"] and rel < -int(args["lower"])) or (args["has_upper"] and rel > int(args["upper"])):
                            x = A(-np.inf)
                        nan |= bool(np.isnan(x))
                        s.append(x)
                    s = np.array(s, A)
                    tmax = np.max(s[~np.isnan(s)], initial=-np.inf)
                    m_new = max(m_run, tmax)
                    if m_new == -np.inf:
                        continue
                    with np.errstate(invalid="ignore"):
                        corr = np.exp(A(m_run - m_new))
                        l_run *= corr; acc *= corr
                        for x, j in zip(s, js):
                            p = np.exp(A(x - m_new)); l_run += p
                            if args["use_dropout"]:
                                keep = keep_mask((hi << 32) | lo, np.array([bh]), np.array([i]), np.array([j]), pb.dropout_p)[0, 0, 0]
                                p = p * A(args["drop_scale"]) if keep else A(0)
                            vr = np.array([vf[b * st["v"][0] + hk * st["v"][1] + j * st["v"][2] + c * st["v"][3]] for c in range(Dv)], A)
                            acc += p * vr
                    m_run = m_new
                if nan:
                    out[b, h, i] = np.nan; lse[b, h, i] = np.nan
                elif l_run > 0:
                    out[b, h, i] = acc / l_run; lse[b, h, i] = m_run + np.log(l_run)
                else:
                    out[b, h, i] = 0; lse[b, h, i] = -np.inf
    return out.astype(pb.dtype), lse


EMU_CASES = [
    dict(),
    dict(causal=True),
    dict(window=(2, 1)),
    dict(causal=True, window=(3, 0), mask="bool_row"),
    dict(mask="float_full"),
    dict(mask="bool_batch", dropout_p=0.3, dropout_seed=123),
]


def _make(case, dtype=np.float32, shape=(2, 4, 2, 70, 40, 6, 5), contiguous=True):
    rng = np.random.default_rng(7)
    B, Hq, Hkv, N, M, D, Dv = shape
    q = rng.standard_normal((B, Hq, N, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, M, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, M, Dv)).astype(dtype)
    if not contiguous:
        q = np.asfortranarray(q)
        k = rng.standard_normal((B, Hkv, D, M)).astype(dtype).swapaxes(-1, -2)
    kw = dict(case)
    mk = kw.pop("mask", None)
    if mk == "bool_row":
        kw["mask"] = rng.random((1, 1, M)) > 0.2
    elif mk == "float_full":
        kw["mask"] = rng.standard_normal((B, Hq, N, M)).astype(np.float32)
    elif mk == "bool_batch":
        kw["mask"] = rng.random((B, 1, N, M)) > 0.5
    return q, k, v, kw


@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: "-".join(f"{k}" for k in c) or "plain")
def test_fused_kernel_emulation_matches_numpy(case):
    q, k, v, kw = _make(case, contiguous=len(case) % 2 == 0)
    pb = normalize(q, k, v, return_lse=True, **kw)
    out, lse, _ = numpy_.backend.forward(pb)
    eo, el = emulate_fused(pb)
    np.testing.assert_allclose(eo, out, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(el, lse, rtol=2e-5, atol=2e-6)


def test_fused_kernel_emulation_fully_masked_and_nan():
    q, k, v, _ = _make({}, shape=(1, 1, 1, 6, 5, 4, 3))
    mask = np.ones((6, 5), bool); mask[1] = False
    q[0, 0, 3, 0] = np.nan
    pb = normalize(q[0, 0], k[0, 0], v[0, 0], mask=mask, return_lse=True)
    with np.errstate(invalid="ignore"):
        out, lse, _ = numpy_.backend.forward(pb)
    eo, el = emulate_fused(pb)
    np.testing.assert_array_equal(eo[0, 0, 1], 0) ; assert el[0, 0, 1] == -np.inf
    assert np.isnan(eo[0, 0, 3]).all() and np.isnan(el[0, 0, 3])
    np.testing.assert_allclose(eo, out, rtol=2e-5, atol=2e-6)


# -- the blockwise (cuBLAS) paths, with NumPy standing in for CuPy ------------

def _numpy_as_cupy_backend(monkeypatch, block_bytes=4096):
    be = cupy_backend_mod.CupyBackend(block_bytes=block_bytes)

    def fake_z(self, xp, pb, b0, b1, i0, i1, j0, j1):
        keep = keep_mask(pb.dropout_seed, np.arange(b0 * pb.q_heads, b1 * pb.q_heads),
                         np.arange(i0, i1), np.arange(j0, j1), pb.dropout_p)
        z = keep * pb.compute_dtype.type(1.0 / (1.0 - pb.dropout_p))
        return z.reshape(b1 - b0, pb.kv_heads, pb.group * (i1 - i0), j1 - j0)

    monkeypatch.setattr(cupy_backend_mod.CupyBackend, "_dropout_z", fake_z)
    return be


BLOCK_CASES = EMU_CASES + [dict(window=(0, 0), mask="float_full", dropout_p=0.5, dropout_seed=2**63 + 11)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(f"{k}" for k in c) or "plain")
def test_blockwise_paths_match_numpy(monkeypatch, case, dtype):
    be = _numpy_as_cupy_backend(monkeypatch)
    q, k, v, kw = _make(case, dtype=dtype, contiguous=len(case) % 2 == 1)
    pb = normalize(q, k, v, return_lse=True, return_weights=True, needs_vjp=True, **kw)
    ref_o, ref_l, ref_w = numpy_.backend.forward(pb)
    with np.errstate(all="ignore"):
        o, l, w = be._forward_blockwise(np, pb)
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == np.float16 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(o, ref_o, **tol)
    np.testing.assert_allclose(l, ref_l, **tol)
    np.testing.assert_allclose(w, ref_w, **tol)
    g = np.random.default_rng(1).standard_normal(ref_o.shape).astype(dtype)
    ref = numpy_.backend.backward(pb, ref_o, ref_l, g)
    with np.errstate(all="ignore"):
        got = be._backward(np, pb, ref_o, ref_l, g)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, **tol)


# -- on a GPU ----------------------------------------------------------------

def _need_gpu():
    ok, reason = _real_availability()
    if not ok:
        pytest.skip(f"cupy backend unavailable: {reason}")
    import cupy
    return cupy


GPU_CASES = BLOCK_CASES + [dict(causal=True, mask="bool_row", dropout_p=0.2, dropout_seed=9)]


@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 40, 6, 5), (1, 2, 1, 130, 150, 64, 64), (1, 1, 1, 33, 17, 200, 256)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(f"{k}" for k in c) or "plain")
def test_gpu_forward_and_vjp_match_numpy(case, dtype, shape):
    cupy = _need_gpu()
    q, k, v, kw = _make(case, dtype=dtype, shape=shape, contiguous=len(case) % 2 == 0)
    ref_out, ref_lse = selfattn.scaled_dot_product_attention(q, k, v, return_lse=True, backend="numpy", **kw)
    ckw = {n: (cupy.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    cq, ck, cv = (cupy.asarray(x) for x in (q, k, v))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out, lse = selfattn.scaled_dot_product_attention(cq, ck, cv, return_lse=True, backend="cupy", **ckw)
    stream.synchronize()
    assert isinstance(out, cupy.ndarray) and out.dtype == dtype and lse.dtype == ref_lse.dtype
    tol = dict(rtol=5e-3, atol=5e-3) if dtype == np.float16 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cupy.asnumpy(out), ref_out, **tol)
    np.testing.assert_allclose(cupy.asnumpy(lse), ref_lse, **tol)
    w = selfattn.scaled_dot_product_attention(cq, ck, cv, return_weights=True, backend="cupy", **ckw)[1]
    ref_w = selfattn.scaled_dot_product_attention(q, k, v, return_weights=True, backend="numpy", **kw)[1]
    np.testing.assert_allclose(cupy.asnumpy(w), ref_w, **tol)
    g = np.random.default_rng(3).standard_normal(ref_out.shape).astype(dtype)
    _, bwd = selfattn.scaled_dot_product_attention_vjp(q, k, v, backend="numpy", **kw)
    _, cbwd = selfattn.scaled_dot_product_attention_vjp(cq, ck, cv, backend="cupy", **ckw)
    for a, b in zip(cbwd(cupy.asarray(g)), bwd(g)):
        np.testing.assert_allclose(cupy.asnumpy(a), b, **tol)


def test_gpu_fully_masked_rows_and_nan():
    cupy = _need_gpu()
    q, k, v, _ = _make({}, shape=(1, 1, 1, 6, 5, 4, 3))
    q = q[0, 0]; k = k[0, 0]; v = v[0, 0]
    mask = np.ones((6, 5), bool); mask[1] = False
    q[3, 0] = np.nan
    out, lse = selfattn.scaled_dot_product_attention(
        cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), mask=cupy.asarray(mask), return_lse=True, backend="cupy")
    out, lse = cupy.asnumpy(out), cupy.asnumpy(lse)
    assert (out[1] == 0).all() and lse[1] == -np.inf
    assert np.isnan(out[3]).all() and np.isnan(lse[3])


@pytest.mark.parametrize("case", [dict(), dict(causal=True),
                                  dict(window=(100, 20), mask="bool_row", dropout_p=0.1, dropout_seed=4)],
                         ids=lambda c: "-".join(c) or "plain")
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_tensor_core_forward_matches_cuda_cores_and_numpy(case, d):
    cupy = _need_gpu()
    be = cupy_backend_mod.backend
    if be._compute_capability(cupy) < launch.TC_MIN_CC:
        pytest.skip(f"compute capability {be._compute_capability(cupy)} < {launch.TC_MIN_CC}: no tensor-core kernel")
    q, k, v, kw = _make(case, dtype=np.float16, shape=(2, 8, 2, 300, 517, d, d))
    ref_out, ref_lse = selfattn.scaled_dot_product_attention(q, k, v, return_lse=True, backend="numpy", **kw)
    ckw = {n: (cupy.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    cq, ck, cv = (cupy.asarray(x) for x in (q, k, v))
    got = {}
    for tc in (True, False):
        be.tensor_cores = tc
        try:
            got[tc] = selfattn.scaled_dot_product_attention(cq, ck, cv, return_lse=True, backend="cupy", **ckw)
        finally:
            be.tensor_cores = True
    for out, lse in got.values():
        np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float64), ref_out, rtol=5e-3, atol=5e-3)
        np.testing.assert_allclose(cupy.asnumpy(lse), ref_lse, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_gpu_forward_memory_is_linear(dtype):
    """The fused forwards allocate their output and lse, nothing that grows with N*M."""
    cupy = _need_gpu()
    pool = cupy.get_default_memory_pool()
    q = cupy.ones((1, 8, 16384, 64), dtype=dtype)
    pool.free_all_blocks()
    before = pool.used_bytes()
    out, lse = selfattn.scaled_dot_product_attention(q, q, q, return_lse=True, backend="cupy")
    cupy.cuda.Device().synchronize()
    extra = pool.total_bytes() - before - out.nbytes - lse.nbytes
    assert extra <= 2**20, f"{extra / 2**20:.1f} MiB beyond out and lse"


def test_bench_gpu_markdown_renders_missing_torch():
    from selfattn.backends._cuda import bench_gpu
    rows = [dict(shape="(4,16,4096,64)", dtype="float16", causal=False, pass_="fwd", ms=2.0, tflops=137.4,
                 torch_ms=None, torch_tflops=None, ratio=None, mib=0.0)]
    md = bench_gpu.markdown(rows, "Test GPU")
    assert "| (4,16,4096,64) | float16 | False | fwd | 2.00 | 137.40 | n/a | n/a | n/a | 0.0 |" in md
    assert bench_gpu._flops(4, 16, 4096, 64, True, False) == 4.0 * 4 * 16 * 4096 * 4096 * 64 / 2


def test_gpu_report_fills_the_doc_from_measurements():
    """gpu_report's text handling, with made-up facts (the numbers only come from a GPU run)."""
    from selfattn.backends._cuda import gpu_report as gr

    doc = (launch._HERE.parents[2] / "docs" / "gpu-validation.md").read_text()
    assert "**Status: not yet run on a GPU.**" in doc and "gpu_report:placeholder begin" in doc
    facts = {"device": "Test GPU", "commit": "abc123", "date (UTC)": "2026-01-01 00:00", "torch": "9.9"}
    tests = [("conformance suite on `cupy`", "python -m pytest ...", 0, "391 passed in 80.00s")]
    rows = [dict(shape="(4,16,4096,64)", dtype="float16", causal=c, pass_="fwd", ms=1.0, tflops=1.0,
                 torch_ms=1.0, torch_tflops=1.0, ratio=r, mib=0.0) for c, r in ((False, 0.61), (True, 0.42))]
    summary = gr.summarize_bench(rows)
    assert "0.42-0.61x" in summary and "not met by 1 of 2" in summary
    bench = gr.render("bench", facts, bench_md="| table |", bench_summary=summary)
    text = gr.update_report(doc, "bench", bench, "run on Test GPU at commit abc123.")
    text = gr.update_report(text, "tests", gr.render("tests", facts, tests=tests), "run on Test GPU at commit abc123.")
    assert "**Status: run on Test GPU at commit abc123.**" in text and "not yet run on a GPU" not in text
    assert "placeholder" not in text and "Expectations" not in text
    assert text.index("gpu_report:tests begin") < text.index("gpu_report:bench begin")
    assert "| conformance suite on `cupy` | `python -m pytest ...` | 0 | 391 passed in 80.00s |" in text
    again = gr.update_report(text, "bench", gr.render("bench", facts, bench_md="| new |", bench_summary="s"), "x.")
    assert again.count("gpu_report:bench begin") == 1 and "| new |" in again and "| table |" not in again
    assert "## What has been checked without a GPU" in again
    assert gr._summary_line("....\n= 12 passed, 3 skipped in 4.00s =\n") == "12 passed, 3 skipped in 4.00s"
    assert gr.summarize_bench([dict(rows[0], ratio=0.9)]).endswith("met (stretch goal too).")


def test_cupy_inputs_without_a_device_give_a_clear_error(monkeypatch):
    """CuPy arrays on a machine whose CuPy cannot reach a GPU: a NoBackendError that says why."""
    import importlib.machinery

    from selfattn import _dispatch

    if _real_availability()[0]:
        pytest.skip("a CUDA device is present")
    fake = types.ModuleType("cupy")
    fake.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    fake.ndarray = type("ndarray", (np.ndarray,), {})  # what the dispatcher tests arrays against
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 0))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    _dispatch.registry.reset()
    try:
        q = np.ones((2, 4, 8), np.float32).view(fake.ndarray)
        with pytest.raises(selfattn.NoBackendError) as info:
            selfattn.scaled_dot_product_attention(q, q, q)
        msg = str(info.value)
        assert "cupy arrays" in msg and "cupy: skipped" in msg and ("CUDA driver" in msg or "CUDA device" in msg)
        with pytest.raises(selfattn.BackendUnavailableError, match="CUDA"):
            selfattn.scaled_dot_product_attention(q, q, q, backend="cupy")
    finally:
        _dispatch.registry.reset()


def test_bench_gpu_runs_with_stand_ins(monkeypatch):
    """bench_gpu's loops, timing and table on the CPU: NumPy for CuPy, the NumPy backend for the call.

    Catches a slip in the benchmark code before it costs GPU time; the numbers mean nothing.
    """
    from selfattn.backends._cuda import bench_gpu

    class Event:
        def record(self):
            self.t = __import__("time").perf_counter()

        def synchronize(self):
            pass

    class Pool:
        def free_all_blocks(self):
            pass

        def used_bytes(self):
            return 0

        def total_bytes(self):
            return 0

    class Rng:
        def __init__(self, seed):
            self.g = np.random.default_rng(seed)

        def standard_normal(self, shape, dtype):
            return self.g.standard_normal(shape).astype(dtype)

    fake = types.SimpleNamespace(
        float16=np.float16, float32=np.float32, dtype=np.dtype,
        random=types.SimpleNamespace(default_rng=Rng), get_default_memory_pool=Pool,
        cuda=types.SimpleNamespace(Event=Event, Device=lambda: types.SimpleNamespace(synchronize=lambda: None),
                                   get_elapsed_time=lambda a, b: max(b.t - a.t, 1e-9) * 1e3))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(bench_gpu, "_torch", lambda: (None, None))
    sdpa, vjp = selfattn.scaled_dot_product_attention, selfattn.scaled_dot_product_attention_vjp
    monkeypatch.setattr(selfattn, "scaled_dot_product_attention", lambda *a, backend=None, **k: sdpa(*a, backend="numpy", **k))
    monkeypatch.setattr(selfattn, "scaled_dot_product_attention_vjp",
                        lambda *a, backend=None, **k: vjp(*a, backend="numpy", **k))
    rows = bench_gpu.run([(1, 2, 64, 16)], [np.float16, np.float32], 2) + bench_gpu.run_decode([(1, 2, 300, 16)], 2)
    passes = [(r["dtype"], r["causal"], r["pass_"]) for r in rows]
    assert ("float16", True, "fwd (CUDA cores)") in passes and ("float32", False, "fwd+bwd") in passes
    assert ("float16", False, "decode fwd (fused kernel)") in passes
    assert launch.DECODE_MAX_ROWS == 16 and cupy_backend_mod.backend.tensor_cores  # restored
    assert all(r["ms"] > 0 and r["ratio"] is None for r in rows)
    assert bench_gpu.markdown(rows, "stand-in").count("\n| (1,2,") == len(rows)
