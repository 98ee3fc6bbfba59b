"""A stand-in for CuPy on a machine without a GPU: NumPy memory, emulated kernels.

For the tests and the dry run of the GPU script (``tests/test_gpu_tools.py``)
only. It covers the part of CuPy's API that selfattn's CuPy backend, the
conformance helpers and ``tools/gpu_*.py`` use, so their code runs unchanged
on a CPU:

* :class:`ndarray` is a ``numpy.ndarray`` subclass (module ``cupy``, as
  CuPy's) that records the stand-in device it was made on (``.device.id``),
  exposes ``.data.ptr`` and ``.get()``, and computes like NumPy without
  floating-point warnings (CuPy never warns);
* module functions are NumPy's, returning :class:`ndarray`;
* :class:`RawModule` compiles the CUDA source it is given with the SIMT
  emulator (``tests/plugins/good/selfattn_cuda_emulated``): the kernels run,
  slowly, with their real semantics;
* ``cuda`` has devices (``CUPY_STANDIN_DEVICES``, default 1, compute capability
  ``CUPY_STANDIN_CC``, default 90), events timed with ``perf_counter``,
  streams, a memory pool that counts nothing and a no-op allocator switch.

It says nothing about speed, and it is not CuPy: a result that passes here
still needs the GPU run. The CUDA driver probe of ``selfattn.backends.cupy_``
needs a ``libcuda.so.1`` as well: ``tests/_standin.py`` builds a stand-in one.
"""

from __future__ import annotations

import os
import re
import sys
import time
import types
from pathlib import Path

import numpy as _np

__version__ = "0.0.0+standin"
_GOOD = Path(__file__).resolve().parents[2] / "plugins" / "good"


def _device_count() -> int:
    return int(os.environ.get("CUPY_STANDIN_DEVICES", "1"))


# -- devices, streams, events -------------------------------------------------------

_current = [0]


class Device:
    """A stand-in CUDA device; a context manager that makes it current, like ``cupy.cuda.Device``."""

    def __init__(self, device=None):
        self.id = _current[-1] if device is None else int(device)
        if not 0 <= self.id < _device_count():
            raise RuntimeError(f"cudaErrorInvalidDevice: stand-in device {self.id} of {_device_count()}")

    @property
    def compute_capability(self) -> str:
        return os.environ.get("CUPY_STANDIN_CC", "90")

    def __enter__(self):
        _current.append(self.id)
        return self

    def __exit__(self, *exc):
        _current.pop()

    def synchronize(self) -> None:
        pass

    def __repr__(self):
        return f"<CUDA Device {self.id} (stand-in)>"


class Stream:
    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.non_blocking = non_blocking

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def synchronize(self) -> None:
        pass


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.t = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass


def _get_elapsed_time(start: Event, end: Event) -> float:
    return (end.t - start.t) * 1e3


class _Runtime:
    @staticmethod
    def getDeviceCount() -> int:  # noqa: N802 - CuPy's name
        return _device_count()

    @staticmethod
    def getDeviceProperties(device: int) -> dict:  # noqa: N802
        cc = int(os.environ.get("CUPY_STANDIN_CC", "90"))
        return {
            "name": b"Stand-in GPU (SIMT emulator on the CPU)",
            "major": cc // 10,
            "minor": cc % 10,
            "totalGlobalMem": 2**30,
            "multiProcessorCount": 1,
        }

    @staticmethod
    def driverGetVersion() -> int:  # noqa: N802
        return 13000

    @staticmethod
    def runtimeGetVersion() -> int:  # noqa: N802
        return 13000


class _Pool:
    def free_all_blocks(self) -> None:
        pass

    def used_bytes(self) -> int:
        return 0

    def total_bytes(self) -> int:
        return 0


_POOL = _Pool()
_allocator = ["pool"]


def _set_allocator(allocator=None) -> None:
    _allocator[0] = allocator


cuda = types.ModuleType("cupy.cuda")
cuda.Device = Device
cuda.Stream = Stream
cuda.Event = Event
cuda.get_elapsed_time = _get_elapsed_time
cuda.runtime = _Runtime()
cuda.set_allocator = _set_allocator
cuda.MemoryPool = _Pool
sys.modules["cupy.cuda"] = cuda


# -- arrays ------------------------------------------------------------------------------


class _Pointer:
    def __init__(self, ptr: int):
        self.ptr = ptr


class ndarray(_np.ndarray):  # noqa: N801 - CuPy's name
    """NumPy memory standing in for device memory on stand-in device ``device.id``."""

    def __array_finalize__(self, obj):
        self._device_id = getattr(obj, "_device_id", _current[-1])

    @property
    def device(self) -> Device:
        return Device(self._device_id)

    @property
    def data(self) -> _Pointer:  # CuPy: a MemoryPointer with .ptr
        return _Pointer(self.ctypes.data)

    def get(self, stream=None) -> _np.ndarray:
        return _np.array(self.view(_np.ndarray))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        dev = self._device_id
        plain = tuple(x.view(_np.ndarray) if isinstance(x, ndarray) else x for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(_np.ndarray) if isinstance(o, ndarray) else o for o in kwargs["out"])
        with _np.errstate(all="ignore"):
            result = getattr(ufunc, method)(*plain, **kwargs)
        return _wrap(result, dev)


ndarray.__module__ = "cupy"


def _wrap(result, device=None):
    if isinstance(result, tuple):
        return tuple(_wrap(r, device) for r in result)
    if type(result) is _np.ndarray:
        out = result.view(ndarray)
        out._device_id = _current[-1] if device is None else device
        return out
    return result


def asarray(a, dtype=None, order=None):
    """The array on the current device: ``a`` itself when it is already there with that dtype."""
    if isinstance(a, ndarray) and a._device_id == _current[-1] and (dtype is None or _np.dtype(dtype) == a.dtype):
        return a
    return _wrap(_np.array(a.view(_np.ndarray) if isinstance(a, ndarray) else a, dtype=dtype, order=order or "K"))


def array(a, dtype=None, copy=True, order="K"):
    return _wrap(_np.array(a.view(_np.ndarray) if isinstance(a, ndarray) else a, dtype=dtype, copy=copy, order=order))


def asnumpy(a, stream=None):
    return a.get() if isinstance(a, ndarray) else _np.asarray(a)


def get_default_memory_pool() -> _Pool:
    return _POOL


def get_default_pinned_memory_pool() -> _Pool:
    return _POOL


class _Generator:
    def __init__(self, seed=None):
        self._g = _np.random.default_rng(seed)

    def standard_normal(self, size=None, dtype=_np.float64):
        return _wrap(self._g.standard_normal(size, dtype=dtype))

    def random(self, size=None, dtype=_np.float64):
        return _wrap(self._g.random(size, dtype=dtype))


random = types.ModuleType("cupy.random")
random.default_rng = _Generator
sys.modules["cupy.random"] = random


# -- kernels --------------------------------------------------------------------------

_PARAM = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)')
_SCALARS = {"int": "int", "long long": "long long", "double": "double", "sa_u32": "sa_u32", "unsigned int": "sa_u32"}


def _signature(code: str, name: str):
    """``((parameter, C type), ...)`` of kernel ``name`` in ``code``: pointers, int, long long, double, unsigned."""
    for m in _PARAM.finditer(code):
        if m.group(1) != name:
            continue
        sig = []
        for part in (p.strip() for p in m.group(2).split(",") if p.strip()):
            ctype, pname = part.replace("*", " * ").rsplit(None, 1)
            ctype = " ".join(w for w in ctype.split() if w not in ("const", "__restrict__"))
            if "*" in ctype:
                sig.append((pname, "ptr"))
            elif ctype in _SCALARS:
                sig.append((pname, _SCALARS[ctype]))
            else:
                raise TypeError(f"stand-in RawModule: parameter type {ctype!r} of {name} is not supported")
        return tuple(sig)
    return None


class RawModule:
    """``cupy.RawModule(code=...)``: the source built by the SIMT emulator (g++), kernels looked up by name."""

    def __init__(self, code=None, path=None, options=(), backend="nvrtc", name_expressions=None, **kwargs):
        if code is None:
            raise NotImplementedError("the stand-in RawModule takes code=, not path=")
        self.code = code

    def get_function(self, name: str):
        if str(_GOOD) not in sys.path:
            sys.path.append(str(_GOOD))
        from selfattn_cuda_emulated import emulate

        from selfattn.backends._cuda import launch

        if name in launch.kernel_names():
            return emulate.load(name, source=self.code)
        sig = _signature(self.code, name)
        if sig is None:
            raise AttributeError(f"no kernel {name!r} in the module's source")
        return emulate.load(name, source=self.code, signature=sig)


# -- everything else is NumPy's, returning stand-in arrays ----------------------------


def __getattr__(name: str):
    attr = getattr(_np, name)  # AttributeError for what NumPy lacks too
    if isinstance(attr, type) or not callable(attr):
        return attr

    def wrapped(*args, **kwargs):
        with _np.errstate(all="ignore"):
            return _wrap(attr(*args, **kwargs))

    wrapped.__name__ = name
    return wrapped
