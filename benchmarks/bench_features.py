"""Packed variable-length batches against padding, and the cost of soft-capping and ALiBi.

* ``Varlen``: ``selfattn._bench.shapes.VARLEN`` -- 32 sequences with lengths drawn once from a skewed
  (log-normal) distribution clipped to 64-4096 tokens, 4 heads, D = 64, float32, causal (the same set as
  ``python -m selfattn bench --features``):
  the packed call (``scaled_dot_product_attention_varlen``) against the
  padded call (B = 32, N = M = the longest, key-padding mask). Time and peak
  memory. The padded call does ``32·max N²`` work, the packed one ``Σ Nᵦ²``.
* ``LogitOptions``: plain attention against ``softcap``, ALiBi and both, at
  (1, 8, 4096, 64) float32.

Backends, n/a handling and warm-up follow ``bench_attention`` (setup raises
NotImplementedError where a backend or feature is missing; compile in setup).
"""

from __future__ import annotations

import numpy as np

from ._compat import backend_names, require_backend, shapes

_VARLEN: dict = {}
_WARM: set = set()


def _varlen_inputs():
    """Packed ``(q, k, v, cu)`` and padded ``(qp, kp, vp, key_mask)`` of ``shapes.VARLEN`` (built once)."""
    if "inputs" not in _VARLEN:
        vs = getattr(shapes, "VARLEN", None)
        if vs is None:  # a commit whose shapes module predates the varlen set
            raise NotImplementedError("shapes.VARLEN is not defined at this commit")
        _VARLEN["inputs"] = vs.inputs("float32")
    return _VARLEN["inputs"]


class Varlen:
    params = [backend_names(), ["packed", "padded"]]
    param_names = ["backend", "layout"]
    rounds = 1
    repeat = (1, 3, 60.0)
    number = 1
    timeout = 900

    def setup(self, backend, layout):
        feats = ["varlen", "causal"] if layout == "packed" else ["bool_mask", "causal"]
        self.sa = require_backend(backend, "float32", feats)
        self.args = _varlen_inputs()
        key = ("varlen", backend, layout)
        if key not in _WARM:
            self._call(backend, layout)
            _WARM.add(key)

    def _call(self, backend, layout):
        q, k, v, cu, qp, kp, vp, key_mask = self.args
        if layout == "packed":
            return self.sa.scaled_dot_product_attention_varlen(q, k, v, cu, cu, causal=True, backend=backend)
        return self.sa.scaled_dot_product_attention(qp, kp, vp, mask=key_mask, causal=True, backend=backend)

    def time_call(self, backend, layout):
        self._call(backend, layout)

    def peakmem_call(self, backend, layout):
        self._call(backend, layout)


_OPTS_INPUTS: dict = {}


class LogitOptions:
    params = [backend_names(), ["plain", "softcap", "alibi", "softcap+alibi"]]
    param_names = ["backend", "variant"]
    rounds = 1
    repeat = (1, 5, 20.0)
    timeout = 600

    def setup(self, backend, variant):
        feats = [f for f in ("softcap", "alibi") if f in variant]
        self.sa = require_backend(backend, "float32", feats)
        if "qkv" not in _OPTS_INPUTS:
            rng = np.random.default_rng(2)
            _OPTS_INPUTS["qkv"] = tuple(rng.standard_normal((1, 8, 4096, 64), dtype=np.float32) for _ in range(3))
            _OPTS_INPUTS["slopes"] = (2.0 ** (-np.arange(1, 9))).astype(np.float32)
        self.q, self.k, self.v = _OPTS_INPUTS["qkv"]
        self.kw = {}
        if "softcap" in variant:
            self.kw["softcap"] = 30.0
        if "alibi" in variant:
            self.kw["alibi_slopes"] = _OPTS_INPUTS["slopes"]
        key = ("opts", backend, variant)
        if key not in _WARM:
            self._call(backend)
            _WARM.add(key)

    def _call(self, backend):
        return self.sa.scaled_dot_product_attention(self.q, self.k, self.v, backend=backend, **self.kw)

    def time_forward(self, backend, variant):
        self._call(backend)
