"""Import time, dispatch overhead and cold Numba compile time."""

from __future__ import annotations

from ._compat import backend_names, require_backend, shapes

_TINY: dict = {}
_OK: dict = {}


class Dispatch:
    """Per-call API overhead on a (1, 1, 4, 8) problem, where the arithmetic is negligible."""

    params = [backend_names()]
    param_names = ["backend"]
    # setup is a dict lookup; with number > 1 asv_runner 0.3 re-runs it between
    # individually timed calls (the timed calls themselves stay tight).
    number = 200
    repeat = (3, 10, 5.0)

    def setup(self, backend):
        if backend not in _OK:
            try:
                _OK[backend] = (require_backend(backend, "float32"), None)
            except NotImplementedError as exc:
                _OK[backend] = (None, exc)
        self.sa, exc = _OK[backend]
        if exc is not None:
            raise exc
        if backend not in _TINY:
            _TINY[backend] = shapes.make_inputs(shapes.TINY, "float32")
            q, k, v = _TINY[backend]
            self.sa.scaled_dot_product_attention(q, k, v, backend=backend)  # warm-up / JIT
        self.q, self.k, self.v = _TINY[backend]

    def time_dispatch_tiny(self, backend):
        self.sa.scaled_dot_product_attention(self.q, self.k, self.v, backend=backend)

    def time_dispatch_tiny_causal(self, backend):
        self.sa.scaled_dot_product_attention(self.q, self.k, self.v, causal=True, backend=backend)


class Import:
    """``import selfattn`` in a fresh interpreter (NumPy pre-imported, so only selfattn's own cost counts)."""

    repeat = (3, 7, 20.0)

    def timeraw_import_selfattn(self):
        return "import selfattn", "import numpy"


_COMPILE_SETUP = """
import os, tempfile
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="selfattn-asv-numba-")
import numpy as np
import numba
import selfattn
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 2, 64, 32)).astype("float32")
k = rng.standard_normal((1, 2, 64, 32)).astype("float32")
v = rng.standard_normal((1, 2, 64, 32)).astype("float32")
g = np.ones_like(q)
"""


class NumbaCompile:
    """Cold first call of the numba backend: fresh interpreter and a fresh, empty NUMBA_CACHE_DIR.

    Includes importing the backend module and JIT-compiling; ``import numba``
    itself is in the (untimed) setup code.
    """

    repeat = (1, 3, 120.0)
    timeout = 600

    def setup(self):
        require_backend("numba", "float32")

    def timeraw_numba_compile_forward(self):
        return "selfattn.scaled_dot_product_attention(q, k, v, backend='numba')", _COMPILE_SETUP

    def timeraw_numba_compile_forward_backward(self):
        return (
            "out, bwd = selfattn.scaled_dot_product_attention_vjp(q, k, v, backend='numba'); bwd(g)",
            _COMPILE_SETUP,
        )
