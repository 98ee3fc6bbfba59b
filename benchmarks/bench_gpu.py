"""GPU benchmarks: the CuPy backend beside PyTorch's SDPA on one CUDA device.

``backend`` is ``cupy`` (the public API), a ``cupy-*`` variant (a second
``CupyBackend`` instance: ``cupy-cuda-cores`` keeps float16 off the tensor
cores, ``cupy-fused`` runs decode on the fused kernel) or ``torch``
(``torch.nn.functional.scaled_dot_product_attention``); ``_gpu.py`` defines the
cases, shared with ``tools/gpu_bench.py``. Without CuPy, a CUDA device or
PyTorch, ``setup`` raises ``NotImplementedError`` and asv shows n/a; discovery
imports neither library. The calls are asynchronous, so every timed function
ends with a device synchronize. Compilation (NVRTC) and the warm-up happen in
``setup``, cached per process (asv_runner re-runs ``setup`` before each
sample). On a GPU machine, in an environment with CuPy (and PyTorch)::

    asv run --python=same -b 'Gpu' --set-commit-hash $(git rev-parse HEAD)
"""

from __future__ import annotations

import statistics
import time

from ._gpu import BACKENDS, DECODE, DECODE_BACKENDS, DTYPES, PREFILL, extra_mib, make_case

_CASES: dict = {}


def _case(backend, shapes, shape, dtype, causal):
    """The warmed-up case for one point (built once per process), or its NotImplementedError again."""
    key = (backend, shape, dtype, causal)
    if key not in _CASES:
        try:
            case = make_case(backend, shapes[shape], dtype, causal)
            case.forward()  # compile and warm up, never timed
            if case.forward_backward is not None:
                case.forward_backward()
            case.sync()
        except NotImplementedError as exc:
            case = exc
        _CASES[key] = case
    case = _CASES[key]
    if isinstance(case, NotImplementedError):
        raise case
    return case


def _tflops(case, fn, backward, calls=5):
    """TFLOP/s of ``fn`` from the median of ``calls`` synchronized calls."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        case.sync()
        times.append(time.perf_counter() - t0)
    return case.flops(backward) / statistics.median(times) / 1e12


class GpuForward:
    params = [list(BACKENDS), list(PREFILL), list(DTYPES), [False, True]]
    param_names = ["backend", "shape", "dtype", "causal"]
    repeat = (3, 10, 20.0)
    timeout = 300

    def setup(self, backend, shape, dtype, causal):
        self.case = _case(backend, PREFILL, shape, dtype, causal)

    def time_forward(self, backend, shape, dtype, causal):
        self.case.forward()
        self.case.sync()

    def track_tflops(self, backend, shape, dtype, causal):
        return _tflops(self.case, self.case.forward, False)

    track_tflops.unit = "TFLOP/s"

    def track_extra_mib(self, backend, shape, dtype, causal):
        """Device memory one forward takes beyond its output (CuPy's pool; O(N) keeps it small)."""
        if not backend.startswith("cupy"):
            raise NotImplementedError("measured through CuPy's memory pool")
        return extra_mib(self.case)

    track_extra_mib.unit = "MiB"


class GpuForwardBackward:
    params = [["cupy", "torch"], list(PREFILL), list(DTYPES), [False, True]]
    param_names = ["backend", "shape", "dtype", "causal"]
    repeat = (3, 10, 30.0)
    timeout = 300

    def setup(self, backend, shape, dtype, causal):
        self.case = _case(backend, PREFILL, shape, dtype, causal)

    def time_forward_backward(self, backend, shape, dtype, causal):
        self.case.forward_backward()
        self.case.sync()

    def track_tflops(self, backend, shape, dtype, causal):
        return _tflops(self.case, self.case.forward_backward, True)

    track_tflops.unit = "TFLOP/s"


class GpuDecode:
    params = [list(DECODE_BACKENDS), list(DECODE), ["float16"]]
    param_names = ["backend", "shape", "dtype"]
    repeat = (3, 20, 10.0)
    timeout = 120

    def setup(self, backend, shape, dtype):
        self.case = _case(backend, DECODE, shape, dtype, False)

    def time_decode(self, backend, shape, dtype):
        self.case.forward()
        self.case.sync()
