"""The user's default path: layers at tutorial sizes and the automatic choice against each backend.

* ``PipelineForward``: ``shapes.PIPELINE`` (MultiHeadAttention and
  TransformerEncoderLayer forwards on (4, 32, 128) and (8, 128, 256), a toy
  attention call), per backend and with no ``backend=`` (``"auto"``), timed as
  a user's loop runs them (the layer's NumPy products, then attention).
* ``AutoChoice``: attention on the asv shapes with no ``backend=``; compare it
  with ``AttentionForward`` of the backend it picks (``selfattn.explain``) --
  the issue's target is within 5 % of the fastest backend on every shape.

Backends that cannot run a row raise NotImplementedError in setup (asv: n/a).
"""

from __future__ import annotations

import numpy as np

from ._compat import backend_names, require_backend, selfattn_or_skip, shapes

_AUTO = "auto"
_LAYERS: dict = {}


def _pipeline_steps():
    return {p.name: p for p in getattr(shapes, "PIPELINE", ())}


def _check(backend: str):
    if backend == _AUTO:
        return selfattn_or_skip()
    return require_backend(backend, "float32")


class PipelineForward:
    params = [[*backend_names(), _AUTO], list(_pipeline_steps()) or ["n/a"]]
    param_names = ["backend", "step"]
    rounds = 1
    repeat = (3, 10, 4.0)
    number = 5
    timeout = 300

    def setup(self, backend, step):
        steps = _pipeline_steps()
        if step not in steps:
            raise NotImplementedError("selfattn._bench.shapes.PIPELINE is not defined at this commit")
        self.sa = _check(backend)
        p = steps[step]
        key = step
        if key not in _LAYERS:
            rng = np.random.default_rng(0)
            x = rng.standard_normal(p.input_shape, dtype=np.float32)
            try:
                from selfattn.nn import MultiHeadAttention, TransformerEncoderLayer
            except ImportError as exc:  # an older commit
                raise NotImplementedError(f"selfattn.nn lacks a layer: {exc}") from exc
            if p.layer == "mha":
                layer = MultiHeadAttention(p.embed, p.heads, seed=0)
            elif p.layer == "encoder":
                layer = TransformerEncoderLayer(p.embed, p.heads, p.ff, seed=0)
            else:
                layer = None
            _LAYERS[key] = (layer, x)
        self.layer, self.x = _LAYERS[key]
        self.name = None if backend == _AUTO else backend
        self._call()  # compile / warm up, never timed

    def _call(self):
        if self.layer is None:
            return self.sa.scaled_dot_product_attention(self.x, self.x, self.x, backend=self.name)
        return self.layer(self.x, backend=self.name)

    def time_forward(self, backend, step):
        self._call()


class AutoChoice:
    params = [[s.name for s in shapes.ASV_SHAPES]]
    param_names = ["shape"]
    rounds = 1
    repeat = (1, 5, 4.0)
    timeout = 300

    def setup(self, shape):
        self.sa = selfattn_or_skip()
        s = {x.name: x for x in shapes.ASV_SHAPES}[shape]
        self.q, self.k, self.v = shapes.make_inputs(s, "float32")
        self.sa.scaled_dot_product_attention(self.q, self.k, self.v)  # compile / warm up

    def time_forward_auto(self, shape):
        self.sa.scaled_dot_product_attention(self.q, self.k, self.v)
