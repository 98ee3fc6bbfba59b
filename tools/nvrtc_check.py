"""Compile every CUDA kernel source of the CuPy backend with NVRTC, without a GPU.

Usage, from a checkout::

    python tools/nvrtc_check.py [--arch sm_80 --arch sm_90] [--kernel attn_fwd_tc_float16_64 ...]

Needs the ``cuda-python`` bindings and an NVRTC library
(``pip install -r .ci/requirements-nvrtc.txt``). Prints each kernel's registers,
shared memory and spills (ptxas); exits 1 (printing the NVRTC log) if a source
fails to compile, 2 if NVRTC is not installed. ``--kernel`` compiles only the
named forward kernels, each alone, as the backend does at run time (seconds
instead of minutes: for checking one kernel's registers while editing it).
CI runs the same compile through ``tests/test_cuda_nvrtc.py``. Not part of
the package: a developer/CI tool.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# Run from a checkout: import selfattn from it, installed or not.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from selfattn.backends._cuda.launch import KERNEL_SOURCES, kernel_names, kernel_source  # noqa: E402

__all__ = [
    "NvrtcUnavailable",
    "load_nvrtc",
    "compile_source",
    "compile_all",
    "compile_kernels",
    "resource_usage",
    "main",
]

DEFAULT_ARCHES = ("sm_80", "sm_90")


class NvrtcUnavailable(RuntimeError):
    """cuda-python or the NVRTC shared library is not installed."""


class CompileError(RuntimeError):
    """NVRTC rejected a source; the message carries the compiler log."""


def load_nvrtc():
    """Return the ``nvrtc`` bindings module, or raise :class:`NvrtcUnavailable` saying what to install."""
    try:
        from cuda.bindings import nvrtc  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import nvrtc  # older cuda-python
        except ImportError as exc:
            raise NvrtcUnavailable(
                "the cuda-python NVRTC bindings are not installed; pip install cuda-python nvidia-cuda-nvrtc-cu12"
            ) from exc
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # the bindings load libnvrtc lazily
        raise NvrtcUnavailable(
            f"the NVRTC library could not be loaded ({type(exc).__name__}: {exc}); pip install nvidia-cuda-nvrtc-cu12"
        ) from exc
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcUnavailable(f"nvrtcVersion failed: {err}")
    return nvrtc


def _check(nvrtc, result, what):
    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"{what} failed: {err}")
    return result[1:] if len(result) > 1 else None


def compile_source(
    source: str, arch: str = "sm_80", name: str = "selfattn.cu", name_expressions=(), nvrtc=None, report=None
) -> bytes:
    """Compile ``source`` for ``arch`` (e.g. ``"sm_90"``) to a CUBIN; :class:`CompileError` with the log on failure.

    ``name_expressions`` (``extern "C"`` kernel names) must all appear in the
    CUBIN's symbol table, so a missing or misspelt kernel is an error too.
    With a dict ``report``, ptxas runs verbose and ``report`` receives
    :func:`resource_usage` of its log: ``{kernel: {"registers", "spill_stores",
    "spill_loads", "smem"}}``.
    """
    nvrtc = nvrtc or load_nvrtc()
    (prog,) = _check(nvrtc, nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        # A real sm_XX target makes NVRTC run ptxas too and return a CUBIN, so
        # register/shared-memory limits of the architecture are checked as well.
        # No -std flag: CuPy's RawModule passes none either (NVRTC default dialect).
        opts = [f"--gpu-architecture={arch}".encode()]
        if report is not None:
            opts.append(b"--ptxas-options=-v")
        (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[:1]
        (log_size,) = _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * log_size
        _check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        log = log.decode(errors="replace").rstrip("\x00 \n")
        if res != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC failed to compile {name} for {arch}:\n{log}")
        if report is not None:
            report.update(resource_usage(log))
        (size,) = _check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        for kname in name_expressions:
            if kname.encode() + b"\x00" not in cubin:
                raise CompileError(f"kernel {kname} missing from the CUBIN of {name} for {arch}")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def resource_usage(ptxas_log: str) -> dict:
    """Per-kernel registers, spill bytes and static shared memory from a verbose ptxas log."""
    out, cur = {}, None
    for line in ptxas_log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([A-Za-z_]\w*)'?", line)
        if m:
            cur = out.setdefault(m.group(1), {"registers": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["spill_stores"], cur["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(m.group(1)) if m else 0
    return out


def compile_all(arches=DEFAULT_ARCHES, reports=None) -> dict:
    """Compile every source in :data:`launch.KERNEL_SOURCES` for each arch; return ``{(file, arch): cubin_bytes}``.

    With a dict ``reports``, ``reports[(file, arch)]`` receives the ptxas resource usage per kernel.
    """
    nvrtc = load_nvrtc()
    results = {}
    for fname in KERNEL_SOURCES:
        for arch in arches:
            rep = {} if reports is not None else None
            results[(fname, arch)] = compile_source(
                kernel_source(fname), arch, name=fname, name_expressions=kernel_names(fname), nvrtc=nvrtc, report=rep
            )
            if rep is not None:
                reports[(fname, arch)] = rep
    return results


def compile_kernels(names, arches=DEFAULT_ARCHES, reports=None) -> dict:
    """Compile each forward kernel of ``names`` alone (``kernel_source(..., only=name)``) for each arch.

    Returns ``{(name, arch): cubin_bytes}``; ``reports[(name, arch)]`` receives ptxas's resource usage.
    """
    nvrtc = load_nvrtc()
    results = {}
    for name in names:
        fname = next((f for f in KERNEL_SOURCES if name in kernel_names(f)), None)
        if fname is None or not name.startswith("attn_fwd_"):
            raise CompileError(f"{name!r} is not a forward kernel of {', '.join(KERNEL_SOURCES)}")
        for arch in arches:
            rep = {} if reports is not None else None
            results[(name, arch)] = compile_source(
                kernel_source(fname, only=name), arch, name=name, name_expressions=(name,), nvrtc=nvrtc, report=rep
            )
            if rep is not None:
                reports[(name, arch)] = rep
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="target, e.g. sm_80 (repeatable; default sm_80 and sm_90)")
    ap.add_argument(
        "--kernel", action="append", help="compile only this forward kernel, e.g. attn_fwd_tc_float16_64 (repeatable)"
    )
    args = ap.parse_args(argv)
    reports = {}
    try:
        arches = tuple(args.arch or DEFAULT_ARCHES)
        if args.kernel:
            results = compile_kernels(args.kernel, arches, reports)
        else:
            results = compile_all(arches, reports)
    except NvrtcUnavailable as exc:
        print(f"skipped: {exc}", file=sys.stderr)
        return 2
    except CompileError as exc:
        print(exc, file=sys.stderr)
        return 1
    for (fname, arch), cubin in results.items():
        count = len(kernel_names(fname)) if fname in KERNEL_SOURCES else 1
        print(f"ok  {fname:12s} {arch}  {count} kernel{'s' * (count > 1)}, {len(cubin)} bytes of CUBIN")
        for kname, r in sorted(reports.get((fname, arch), {}).items()):
            spilled = r["spill_stores"] or r["spill_loads"]
            spill = f"spills {r['spill_stores']}/{r['spill_loads']} B" if spilled else "no spills"
            print(f"      {kname:28s} {r['registers']:3d} registers  {r['smem'] / 1024:5.1f} KiB smem  {spill}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
