"""The stand-in GPU of the tests: CuPy on NumPy with emulated kernels, a CUDA driver library, GPU tools.

``tests/standin/cupy`` is the stand-in CuPy (see its docstring),
``tests/standin/bin`` holds stand-in ``nvidia-smi`` and ``compute-sanitizer``,
and :func:`libcuda_dir` builds a ``libcuda.so.1`` whose ``cuInit`` and
``cuDeviceGetCount`` succeed, so ``selfattn.backends.cupy_._driver_probe`` finds
a "driver" in a subprocess without being patched. :func:`standin_env` puts the
three on a subprocess's paths (the dry run of the GPU script);
:func:`use_standin_cupy` does it in this process (for a fixture).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "standin"

_LIBCUDA = r"""
#include <stdlib.h>
int cuInit(unsigned flags) { (void)flags; return 0; }
int cuDeviceGetCount(int* count) {
    const char* n = getenv("CUPY_STANDIN_DEVICES");
    *count = n ? atoi(n) : 1;
    return 0;
}
int cuGetErrorName(int code, const char** name) { (void)code; *name = "CUDA_ERROR_STANDIN"; return 0; }
"""


def libcuda_dir() -> Path:
    """A directory holding the stand-in ``libcuda.so.1`` (built once per user with the C compiler)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in CUDA driver library")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    out = Path(tempfile.gettempdir()) / f"selfattn-standin-libcuda-{uid}"
    lib = out / "libcuda.so.1"
    if not lib.exists():
        out.mkdir(parents=True, exist_ok=True)
        src = out / f"libcuda.{os.getpid()}.c"
        src.write_text(_LIBCUDA)
        tmp = out / f"libcuda.{os.getpid()}.so"
        subprocess.run([cc, "-shared", "-fPIC", "-O1", str(src), "-o", str(tmp)], check=True)
        src.unlink()
        os.replace(tmp, lib)
    return out


def standin_env(devices: int = 1, base=None) -> dict:
    """Environment for a subprocess that should see the stand-in GPU."""
    env = dict(os.environ if base is None else base)

    def prepend(var, path):
        env[var] = os.pathsep.join([str(path)] + ([env[var]] if env.get(var) else []))

    prepend("PATH", STANDIN / "bin")
    prepend("PYTHONPATH", STANDIN)
    prepend("LD_LIBRARY_PATH", libcuda_dir())
    env["CUPY_STANDIN_DEVICES"] = str(devices)
    env.pop("PYTEST_ADDOPTS", None)
    return env


def use_standin_cupy(monkeypatch):
    """Generator for a fixture: the stand-in CuPy as ``cupy`` in this process, the CuPy backend available on it.

    A test module declares ``@pytest.fixture def standin_cupy(monkeypatch): yield from use_standin_cupy(monkeypatch)``.
    """
    from selfattn import _dispatch
    from selfattn.backends import cupy_

    monkeypatch.syspath_prepend(str(STANDIN))
    for name in [m for m in sys.modules if m == "cupy" or m.startswith("cupy.")]:
        monkeypatch.delitem(sys.modules, name)
    import cupy

    assert cupy.__version__.endswith("+standin")
    monkeypatch.setattr(cupy_, "_driver_probe", lambda: (True, ""))
    monkeypatch.setattr(cupy_.backend, "_modules", {})  # no stand-in kernels left in the real instance
    _dispatch.registry.reset()
    yield cupy
    for name in [m for m in sys.modules if m == "cupy" or m.startswith("cupy.")]:
        sys.modules.pop(name)
    _dispatch.registry.reset()
