"""Attention benchmarks: backend x shape x dtype x causal, forward and backward.

Design notes (asv 0.6 / asv_runner 0.3):

* asv_runner 0.3 re-runs ``setup`` before *every* timed call whenever a
  benchmark has a setup hook (asv#966). So ``setup`` here only looks inputs up
  in module-level caches (``_INPUTS``, ``_WARM``, ``_VJP``): the first call per
  process builds the arrays and runs the warm-up (which is where a JIT
  backend compiles); every later call is a dictionary lookup. Nothing that
  setup does is ever inside the timed region.
* An unavailable backend, dtype or feature raises ``NotImplementedError`` in
  setup, which asv reports as ``n/a`` (e.g. numba not installed, or an older
  commit that predates the numba backend).
* Backends are always selected strictly (``backend=`` explicit), so a missing
  backend can never silently fall back to numpy and pollute the numbers.
* Every backend is a value of the ``backend`` parameter, so one dashboard
  graph compares them; every ``track_*`` benchmark declares its ``unit`` and
  returns its value rounded to 3 significant digits (``sig``).
"""

from __future__ import annotations

from ._compat import backend_names, median_time, peak_rss_delta, require_backend, shapes, sig

_SHAPES = {s.name: s for s in shapes.ASV_SHAPES}
_INPUTS: dict = {}
_WARM: set = set()
_VJP: dict = {}
_CHECKED: dict = {}

PARAMS = [backend_names(), list(_SHAPES), ["float32", "float64"], [False, True]]
PARAM_NAMES = ["backend", "shape", "dtype", "causal"]


def _check(backend, dtype, features=()):
    key = (backend, dtype, tuple(features))
    if key not in _CHECKED:
        try:
            _CHECKED[key] = (require_backend(backend, dtype, features), None)
        except NotImplementedError as exc:
            _CHECKED[key] = (None, exc)
    sa, exc = _CHECKED[key]
    if exc is not None:
        raise exc
    return sa


def _inputs(shape, dtype):
    key = (shape, dtype)
    if key not in _INPUTS:
        _INPUTS[key] = shapes.make_inputs(_SHAPES[shape], dtype)
    return _INPUTS[key]


def _features(shape, causal):
    f = ["causal"] if causal else []
    if _SHAPES[shape].kv_heads not in (None, _SHAPES[shape].heads):
        f.append("gqa")
    return f


class AttentionForward:
    params = PARAMS
    param_names = PARAM_NAMES
    rounds = 1
    repeat = (1, 5, 4.0)
    timeout = 300

    def setup(self, backend, shape, dtype, causal):
        self.sa = _check(backend, dtype, _features(shape, causal))
        self.q, self.k, self.v = _inputs(shape, dtype)
        key = (backend, shape, dtype, causal)
        if key not in _WARM:  # JIT compile / first-touch, never timed
            self._call(backend, causal)
            _WARM.add(key)

    def _call(self, backend, causal):
        return self.sa.scaled_dot_product_attention(self.q, self.k, self.v, causal=causal, backend=backend)

    def time_forward(self, backend, shape, dtype, causal):
        self._call(backend, causal)

    def peakmem_forward(self, backend, shape, dtype, causal):
        self._call(backend, causal)

    def track_gflops(self, backend, shape, dtype, causal):
        t = median_time(lambda: self._call(backend, causal), repeat=5, warmup=0)
        return sig(_SHAPES[shape].flops(causal) / t / 1e9)

    track_gflops.unit = "GFLOP/s"

    def track_peak_extra_mib(self, backend, shape, dtype, causal):
        """Resident memory the call adds above its inputs (Linux VmHWM; includes compiled-code allocations)."""
        extra = peak_rss_delta(lambda: self._call(backend, causal))
        if extra is None:
            raise NotImplementedError("peak RSS not measurable on this platform")
        return sig(extra / 2**20)

    track_peak_extra_mib.unit = "MiB"


class AttentionBackward:
    params = PARAMS
    param_names = PARAM_NAMES
    rounds = 1
    repeat = (1, 5, 4.0)
    timeout = 300

    def setup(self, backend, shape, dtype, causal):
        sa = _check(backend, dtype, _features(shape, causal) + ["vjp"])
        if not hasattr(sa, "scaled_dot_product_attention_vjp"):
            raise NotImplementedError("this selfattn has no scaled_dot_product_attention_vjp")
        key = (backend, shape, dtype, causal)
        if key not in _VJP:
            import numpy as np

            q, k, v = _inputs(shape, dtype)
            out, bwd = sa.scaled_dot_product_attention_vjp(q, k, v, causal=causal, backend=backend)
            grad = np.random.default_rng(1).standard_normal(out.shape).astype(out.dtype)
            bwd(grad)  # warm-up / JIT compile of the backward kernels
            _VJP[key] = (bwd, grad)
        self.bwd, self.grad = _VJP[key]

    def time_backward(self, backend, shape, dtype, causal):
        self.bwd(self.grad)

    def peakmem_backward(self, backend, shape, dtype, causal):
        self.bwd(self.grad)

    def track_backward_gflops(self, backend, shape, dtype, causal):
        # backward ~ 2.5x the forward FLOPs (recompute P, dV, dP, dS->dQ, dK)
        t = median_time(lambda: self.bwd(self.grad), repeat=3, warmup=0)
        return sig(2.5 * _SHAPES[shape].flops(causal) / t / 1e9)

    track_backward_gflops.unit = "GFLOP/s"
