"""The CuPy backend run on the CPU, registered as the ``cupy-emulated`` test backend.

A test-only distribution: ``tests/plugins/good`` stands in for a site-packages
directory (``tests/conftest.py`` puts it on ``sys.path``), and
``selfattn_cuda_emulated-1.0.dist-info`` registers :func:`make_backend` in the
``selfattn.backends`` entry-point group, so the conformance suite runs the CuPy
backend's host code and its CUDA kernels (``emulate``: ``attn.cu`` built with
g++ under ``simt.hpp``) on every CI run. Nothing here ships in the wheel.
"""

from __future__ import annotations

import numpy as np

from selfattn._capabilities import Capabilities
from selfattn.backends.cupy_ import CupyBackend

from .emulate import EmulatorUnavailable, check_toolchain, compiler, load

__all__ = ["EmulatedCupyBackend", "make_backend"]


class EmulatedCupyBackend(CupyBackend):
    """The CuPy backend with its CUDA kernels run on the CPU: NumPy arrays in and out.

    For testing only (slow: a launch takes milliseconds to seconds). Every
    method is the CuPy backend's own host code with NumPy passed where CuPy
    would be and :func:`load`'s kernels in place of the NVRTC-compiled ones,
    for a device of compute capability ``compute_capability`` (90 = H100:
    float16 takes the tensor-core kernel where it applies; below 80 it
    does not). ``copies`` is passed to every launch (see
    :meth:`EmulatedKernel.__call__`). The test suite registers it as the
    ``cupy-emulated`` backend (tests/plugins), so the conformance suite runs
    the CuPy backend's code paths on every CI run.
    """

    name = "cupy-emulated"
    priority = 1000  # never chosen automatically
    capabilities = Capabilities(
        array_type="numpy",
        features=CupyBackend.capabilities.features,
        notes={"float16": "as the cupy backend: tensor cores when compute_capability >= 80 and D, Dv "
                          "are multiples of 8 up to 128 (emulated)"},
    )

    def __init__(self, compute_capability: int = 90, copies: str = "late", block_bytes: int = 2**20):
        super().__init__(block_bytes=block_bytes)
        self.compute_capability = int(compute_capability)
        self.copies = copies

    @property
    def version(self) -> str:
        return f"emulated sm_{self.compute_capability}"

    def availability(self):
        try:
            check_toolchain()
        except EmulatorUnavailable as exc:
            return False, str(exc)
        return True, ""

    def info(self):
        ok, reason = self.availability()
        if not ok:
            return {"available": False, "reason": reason}
        return {"compiler": compiler(), "compute_capability": self.compute_capability, "copies": self.copies}

    def _kernel(self, xp, name):
        kern = load(name)
        return lambda grid, block, args: kern(grid, block, args, copies=self.copies)

    def _compute_capability(self, xp):
        return self.compute_capability

    # CuPy never warns about floating-point exceptions (log(0) for an empty row is
    # expected); NumPy standing in for it is kept as quiet.
    def forward(self, pb):
        with np.errstate(all="ignore"):
            return self._forward(np, pb)

    def backward(self, pb, out, lse, grad_out):
        with np.errstate(all="ignore"):
            return self._backward(np, pb, out, lse, grad_out)


def make_backend() -> EmulatedCupyBackend:
    """Entry-point factory of the ``cupy-emulated`` test backend (sm_90, late copies)."""
    return EmulatedCupyBackend()
