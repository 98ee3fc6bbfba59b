"""A third-party-style test backend, registered through a real entry point.

``selfattn_loopback-1.0.dist-info/entry_points.txt`` beside this file puts it in
the ``selfattn.backends`` group, exactly as an installed distribution would
(the test suite adds this folder to ``sys.path``). It runs the NumPy backend's
code, but declares fewer capabilities -- no float16, no dropout -- and refuses
at run time anything outside them, which proves that the dispatcher never
hands a backend a call outside its declaration and that the conformance suite
expects ``UnsupportedFeatureError`` there.
"""

import selfattn
from selfattn.backends.numpy_ import NumpyBackend

_FEATURES = frozenset(selfattn.FEATURES) - {"dropout"}


class LoopbackBackend(NumpyBackend):
    """NumPy arithmetic behind a narrower capability declaration."""

    name = "loopback"
    version = "1.0"
    priority = 200
    capabilities = selfattn.Capabilities(
        array_type="numpy", dtypes={"float32", "float64"}, features=_FEATURES,
        notes={"dropout": "loopback test backend omits dropout on purpose", "float16": "not implemented on purpose"},
    )

    def __init__(self):
        super().__init__(block_bytes=1 << 16)  # tiny blocks: many block boundaries even on small inputs
        self.calls = 0

    def forward(self, problem):
        assert problem.dropout_p == 0.0 and problem.dtype.name in ("float32", "float64"), "dispatcher leaked a call"
        self.calls += 1
        return super().forward(problem)


def make_backend():
    """Entry-point target: a zero-argument factory returning the backend."""
    return LoopbackBackend()
