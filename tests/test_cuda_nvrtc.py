"""The CuPy backend's kernel sources compile: NVRTC for sm_80/sm_90, and the dropout hash on the host.

No GPU needed. NVRTC comes from ``.ci/requirements-nvrtc.txt`` (cuda-python +
nvidia-cuda-nvrtc-cu12); without it these tests skip with the reason. The
compile goes through ``tools/nvrtc_check.py``, the same code a developer runs
by hand; it also reads ptxas's resource report (registers, spills).
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from _tools import tool

from selfattn._dropout import keep_mask, threshold
from selfattn.backends._cuda import launch

ARCHES = ("sm_80", "sm_90")


# -- NVRTC compilation ------------------------------------------------------


def _nvrtc():
    nvrtc_check = tool("nvrtc_check")
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
        cubin = nc.compile_source(
            launch.kernel_source(fname), arch, name=fname, name_expressions=launch.kernel_names(fname), report=report
        )
        assert len(cubin) > 1000
        # The tensor-core forwards must keep S, P, O and the Q fragments in registers:
        # a spill would put local-memory traffic in the inner loop (a silent slowdown).
        for dm in launch.TC_DMAX_CHOICES:
            r = report[launch.tc_kernel_name(dm)]
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (dm, r)
            assert 0 < r["registers"] <= 255 and r["smem"] <= 48 * 1024, (dm, r)


@pytest.mark.parametrize(
    "broken, what",
    [
        ('extern "C" __global__ void k(float* x) { x[0] = 1.0f }', "syntax error"),
        ('extern "C" __global__ void k(float* x) { int* p = x; p[0] = 1; }', "type error"),
        ('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }', "undefined identifier"),
    ],
)
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


def _cxx():
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build common.cuh")
    return cxx


def test_common_header_needs_the_generated_constants(tmp_path):
    """common.cuh does not repeat the hash constants: without launch.hash_defines() it refuses to compile."""
    cxx = _cxx()
    src = tmp_path / "bare.cpp"
    src.write_text((launch._HERE / "common.cuh").read_text())
    res = subprocess.run([cxx, "-fsyntax-only", "-x", "c++", str(src)], capture_output=True, text=True)
    assert res.returncode != 0 and "dropout hash constants are missing" in res.stderr
    src.write_text(launch.hash_defines() + (launch._HERE / "common.cuh").read_text())
    subprocess.run([cxx, "-fsyntax-only", "-x", "c++", str(src)], check=True)


def test_dropout_hash_host_compiled_matches_core(tmp_path):
    cxx = _cxx()
    hdr = launch.hash_defines() + (launch._HERE / "common.cuh").read_text()
    prog = (
        hdr
        + r"""
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
"""
    )
    src = tmp_path / "hash.cpp"
    src.write_text(prog)
    exe = tmp_path / "hash"
    subprocess.run([cxx, "-O1", "-x", "c++", str(src), "-o", str(exe)], check=True)
    for seed, p in ((0, 0.1), (2**64 - 1, 0.5), (0x123456789ABCDEF0, 0.9), (42, 0.999)):
        got = subprocess.run(
            [str(exe), str(seed), str(threshold(p))], check=True, capture_output=True, text=True
        ).stdout
        want = keep_mask(seed, np.array([0, 7, 2147483646]), np.arange(5) * 1000003, np.arange(9) * 999983, p)
        assert got == "".join("1" if x else "0" for x in want.reshape(-1))


def test_tool_compiles_one_kernel_alone(capsys):
    """``--kernel`` compiles just that instantiation (what a developer runs while editing a kernel)."""
    nc = _nvrtc()
    name = launch.tc_kernel_name(32)
    assert nc.main(["--arch", "sm_80", "--kernel", name]) == 0
    out = capsys.readouterr().out
    assert f"ok  {name}" in out and "no spills" in out.split(name)[-1].splitlines()[0]
    assert nc.main(["--arch", "sm_80", "--kernel", "attn_fwd_float16_48"]) == 1
    assert "not a forward kernel" in capsys.readouterr().err
