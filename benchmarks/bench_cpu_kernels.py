"""The Numba backend's kernel families against the machine's own matrix product.

* ``NumbaKernelFamilies.time_forward`` / ``time_backward``: each family
  (``simd``: own vector micro-kernels; ``blas``: tile products through
  SciPy's BLAS; ``fused``: scalar register-blocked loops) on prefill shapes,
  float32, chosen explicitly (``NumbaBackend(kernels=...)``), so a regression
  in one family cannot hide behind the automatic choice.
* ``track_fraction_of_matmul``: forward GFLOP/s divided by ``numpy.matmul``
  2048² GFLOP/s measured in the same process, in blocks of calls with a
  pause between blocks (``selfattn._bench.timing.block_samples``), so the
  number is comparable across machines and commits. The SIMD family's target
  is >= 0.85 (README, Performance).

A commit without the family (or without numba) raises NotImplementedError in
setup (asv: n/a).
"""

from __future__ import annotations

import numpy as np

from ._compat import require_backend, sig

_SHAPES = {"1x8x1024x64": (1, 8, 1024, 64), "1x8x4096x64": (1, 8, 4096, 64), "4x8x1024x128": (4, 8, 1024, 128)}
_STATE: dict = {}


def _state(kernels: str, shape: str):
    key = (kernels, shape)
    if key not in _STATE:
        require_backend("numba", "float32")
        try:
            from selfattn._problem import normalize
            from selfattn.backends import numba_
        except ImportError as exc:  # an older layout
            raise NotImplementedError(str(exc)) from exc
        if kernels not in getattr(numba_, "KERNEL_CHOICES", ("auto", "fused", "blas")):
            raise NotImplementedError(f"no {kernels!r} kernel family at this commit")
        be = numba_.NumbaBackend(kernels=kernels)
        q, k, v = _inputs(shape)
        pb = normalize(q, k, v, needs_vjp=True)
        out, lse, _ = be.forward(pb)  # compile / first touch, never timed
        grad = np.ones_like(out)
        be.backward(pb, out, lse, grad)
        _STATE[key] = (be, pb, out, lse, grad)
    return _STATE[key]


def _inputs(shape: str):
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal(_SHAPES[shape]).astype(np.float32) for _ in range(3))


class NumbaKernelFamilies:
    params = [["simd", "blas", "fused"], list(_SHAPES)]
    param_names = ["kernels", "shape"]
    rounds = 1
    repeat = (1, 5, 6.0)
    timeout = 600

    def setup(self, kernels, shape):
        self.be, self.pb, self.out, self.lse, self.grad = _state(kernels, shape)

    def time_forward(self, kernels, shape):
        self.be.forward(self.pb)

    def time_backward(self, kernels, shape):
        self.be.backward(self.pb, self.out, self.lse, self.grad)

    def track_fraction_of_matmul(self, kernels, shape):
        try:
            from selfattn._bench.timing import attention_flops, block_samples, matmul_call
        except ImportError as exc:  # older commits: no block timing
            raise NotImplementedError(str(exc)) from exc

        mm_call, mm_flops = matmul_call(2048)
        tm, t = block_samples([mm_call, lambda: self.be.forward(self.pb)], blocks=3, calls=2)
        b, h, n, d = _SHAPES[shape]
        ratios = (attention_flops(b, h, n, n, d) / np.asarray(t)) / (mm_flops / np.asarray(tm))
        return sig(float(np.median(ratios)))

    track_fraction_of_matmul.unit = "x matmul"
