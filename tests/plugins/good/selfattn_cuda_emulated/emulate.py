"""Run the CuPy backend's CUDA kernels on a CPU: the real ``attn.cu`` source, compiled by g++.

``simt.hpp`` (beside this file) turns the CUDA dialect into host C++ (one OS thread per CUDA
thread, one block at a time, warp collectives and tensor-core instructions
emulated with the PTX ISA's fragment layouts, cp.async copies landing as late
or as early as the PTX memory model allows);
this module compiles ``launch.kernel_source(...)`` with it into a shared
library and exposes each ``extern "C"`` kernel as a callable with CuPy's
``RawKernel`` calling convention, ``kernel(grid, block, args)``, where the
pointer arguments are NumPy arrays. So the backend's host code can run
unchanged with NumPy standing in for CuPy and these kernels standing in for
the compiled ones: the tests do exactly that.

It is a correctness tool, not a fast path: a launch of a few hundred threads
takes milliseconds to seconds. It needs a C++20 compiler with ``_Float16``
(g++ >= 12 or clang++ >= 15 on x86-64; ``$CXX`` overrides) on a system with
POSIX threads and shared libraries; :func:`compiler` says which compiler,
:func:`check_toolchain` whether it can build the emulator. Built libraries are
cached by content hash in ``$TMPDIR/selfattn-simt-<uid>``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from selfattn.backends._cuda import launch

__all__ = ["EmulatorUnavailable", "EmulationError", "compiler", "check_toolchain", "load", "EmulatedKernel"]

_HEADER = Path(__file__).resolve().parent / "simt.hpp"
_CTYPES = {"int": ctypes.c_int32, "long long": ctypes.c_int64, "double": ctypes.c_double,
           "sa_u32": ctypes.c_uint32}
_CPP_TYPES = {"int": "int", "long long": "long long", "double": "double", "sa_u32": "sa_u32"}
_lock = threading.Lock()
_libs: dict = {}


class EmulatorUnavailable(RuntimeError):
    """No C++ compiler able to build the emulator here."""


class EmulationError(RuntimeError):
    """The emulated kernel faulted (the message says how: misaligned access, divergent barrier...)."""


def compiler() -> str:
    """Path of the C++ compiler used (``$CXX``, else g++, else clang++); raise :class:`EmulatorUnavailable`."""
    for cand in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise EmulatorUnavailable("no C++ compiler (g++ or clang++) on PATH to build the CUDA emulator")


_PROBE = ('extern "C" __global__ void simt_probe(float* x) {\n'
          '    __shared__ float s[32];\n'
          '    s[threadIdx.x] = (float)sa_f2h(1.5f);\n'
          '    __syncthreads();\n'
          '    x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, s[threadIdx.x], 1);\n'
          '}\n')
_toolchain_error: list = []


def check_toolchain() -> None:
    """Build and run a tiny kernel once per process; raise :class:`EmulatorUnavailable` if that fails.

    Tells a compiler that cannot build the emulator (no C++20, no ``_Float16``)
    apart from a kernel source that does not compile (a real error).
    """
    with _lock:
        if _toolchain_error:
            if _toolchain_error[0]:
                raise EmulatorUnavailable(_toolchain_error[0])
            return
    try:
        x = np.zeros(32, np.float32)
        load("simt_probe", source=_PROBE, signature=(("x", "ptr"),))((1,), (32,), (x,))
        if not (x == np.float32(np.float16(1.5).view(np.uint16))).all():
            raise EmulatorUnavailable(f"the emulator's probe kernel computed {x[:4]}...")
    except (EmulatorUnavailable, EmulationError, OSError) as exc:
        msg = f"the host C++ compiler cannot run the CUDA emulator: {exc}"
        with _lock:
            _toolchain_error[:] = [msg]
        raise EmulatorUnavailable(msg) from exc
    with _lock:
        _toolchain_error[:] = [""]


def _launcher(name: str, signature) -> str:
    args = []
    for i, (_, ctype) in enumerate(signature):
        if ctype == "ptr":
            args.append(f"simt::AnyPtr{{*(void**)a[{i}]}}")
        else:
            args.append(f"*({_CPP_TYPES[ctype]}*)a[{i}]")
    call = f"{name}(" + ", ".join(args) + ")"
    return (f'extern "C" int simt_launch_{name}(unsigned gx, unsigned bx, void** a) {{\n'
            f"    return simt::launch(gx, bx, [=] {{ {call}; }});\n}}\n")


def _build(names: tuple, source: str, signature) -> ctypes.CDLL:
    src = source + "\n" + "".join(_launcher(n, signature or launch.kernel_signature(n)) for n in names)
    cxx = compiler()
    key = hashlib.sha256((src + _HEADER.read_text() + cxx).encode()).hexdigest()[:20]
    cache = Path(tempfile.gettempdir()) / f"selfattn-simt-{os.getuid() if hasattr(os, 'getuid') else 0}"
    cache.mkdir(parents=True, exist_ok=True)
    lib_path = cache / f"{key}.so"
    if not lib_path.exists():
        # Per-process file names: parallel test workers may build the same library at once.
        cpp = cache / f"{key}.{os.getpid()}.cpp"
        cpp.write_text(src)
        tmp = cache / f"{key}.{os.getpid()}.so"
        cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-include", str(_HEADER),
               "-x", "c++", str(cpp), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        cpp.unlink(missing_ok=True)
        if res.returncode != 0:
            raise EmulatorUnavailable(f"building the CUDA emulator failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    lib.simt_error.restype = ctypes.c_char_p
    lib.simt_set_ranges.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong)]
    return lib


class EmulatedKernel:
    """One kernel of ``attn.cu`` run on the CPU; call as ``kernel(grid, block, args)`` like a CuPy RawKernel."""

    def __init__(self, lib, name: str, signature=None):
        self.name = name
        self._lib = lib
        self._fn = getattr(lib, f"simt_launch_{name}")
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        self._sig = tuple(signature or launch.kernel_signature(name))

    def __call__(self, grid, block, args, copies="late"):
        """Launch on the CPU. ``copies`` picks when cp.async copies land: "late" (at
        their wait) or "early" (at issue); a correct kernel gives the same result either way."""
        if copies not in ("late", "early"):
            raise ValueError(f"copies must be 'late' or 'early', got {copies!r}")
        if len(args) != len(self._sig):
            raise TypeError(f"{self.name} takes {len(self._sig)} arguments, got {len(args)}")
        keep, ranges = [], []
        for (pname, ctype), val in zip(self._sig, args):
            if ctype == "ptr":
                if not isinstance(val, np.ndarray):
                    raise TypeError(f"{self.name}: argument {pname} must be a NumPy array, got {type(val).__name__}")
                lo = val.ctypes.data + sum(min(0, (n - 1) * st) for n, st in zip(val.shape, val.strides))
                hi = val.ctypes.data + sum(max(0, (n - 1) * st) for n, st in zip(val.shape, val.strides)) + val.itemsize
                ranges += [lo, hi] if val.size else []
                keep.append(ctypes.c_void_p(val.ctypes.data))
            else:
                keep.append(_CTYPES[ctype](val.item() if hasattr(val, "item") else val))
        argv = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.pointer(x), ctypes.c_void_p) for x in keep])
        rng = (ctypes.c_ulonglong * len(ranges))(*ranges)
        with _lock:  # the emulator's launch state is global
            self._lib.simt_set_ranges(len(ranges) // 2, rng)
            self._lib.simt_set_copy_mode(int(copies == "early"))
            rc = self._fn(int(grid[0]), int(block[0]), argv)
            if rc != 0:
                raise EmulationError(f"{self.name}: {self._lib.simt_error().decode()}")


def load(name: str, source=None, signature=None) -> EmulatedKernel:
    """The emulated kernel ``name`` (a forward ``attn_fwd_*`` or ``dropout_tile_*``), built once per process.

    Each forward is built alone (as the backend compiles it); the dropout kernels share one library.
    ``source`` replaces ``launch.kernel_source("attn.cu", only=...)`` (the tests use it to show
    that a broken kernel is caught, and to probe single instructions); a kernel that is not in
    ``attn.cu`` also needs its ``signature``, ``((name, C type), ...)`` as in ``launch.FWD_SIGNATURE``.
    """
    only = name if name.startswith("attn_fwd_") else "-"
    if name.startswith("attn_fwd_") or signature is not None:
        names = (name,)
    else:
        names = tuple(n for n in launch.kernel_names() if n.startswith("dropout_tile_"))
    if source is None:
        source = launch.kernel_source("attn.cu", only=only)
    with _lock:
        key = (names, source, tuple(signature or ()))
        lib = _libs.get(key)
        if lib is None:
            lib = _libs[key] = _build(names, source, signature)
    return EmulatedKernel(lib, name, signature)
