"""Backend capabilities, declared as data.

A backend states once, in a :class:`Capabilities` value, which array library it
accepts, which dtypes and which optional features it implements. That one
declaration drives

* automatic backend selection (a backend that lacks a feature a call needs is
  skipped, with the reason logged),
* the typed :class:`~selfattn.UnsupportedFeatureError` raised when a backend is
  asked explicitly for something outside it,
* the conformance suite's expectations (cases outside a backend's capabilities
  must raise that error), and
* the support table in the README (``python -m selfattn info --table``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._problem import Problem

__all__ = ["FEATURES", "DTYPES", "Capabilities", "required_features"]

#: Every optional feature of the public API, with what it means.
FEATURES: Mapping[str, str] = {
    "bool_mask": "boolean mask, True = attend",
    "float_mask": "additive floating-point mask",
    "causal": "bottom-right aligned causal masking",
    "window": "sliding-window (local) attention",
    "gqa": "grouped-query / multi-query attention (Hkv < Hq)",
    "dropout": "dropout on the attention weights (counter-based pattern)",
    "lse": "return the log-sum-exp of the scores",
    "weights": "return the attention probabilities",
    "vjp": "gradients through scaled_dot_product_attention_vjp",
    "softcap": "logit soft-capping (softcap * tanh(s / softcap))",
    "alibi": "ALiBi linear position biases (per-head slopes)",
    "varlen": "packed variable-length batches (scaled_dot_product_attention_varlen)",
    "chunks": "a chunk of a larger call: global offsets for the band and dropout (Dask, split-KV)",
}

#: The dtypes the public API accepts, by name.
DTYPES = ("float16", "float32", "float64")


@dataclass(frozen=True)
class Capabilities:
    """What one backend can do.

    Attributes
    ----------
    array_type:
        Name of the array library whose arrays the backend consumes and returns
        (``"numpy"`` or ``"cupy"``). Selection never converts between libraries.
    dtypes:
        Subset of :data:`DTYPES` the backend computes.
    features:
        Subset of :data:`FEATURES` the backend implements.
    notes:
        Optional reason for each missing feature or dtype, shown in errors and in
        the support table.
    min_flops:
        The work range where the backend pays off, as data: automatic selection
        passes it over for calls of fewer forward FLOPs (``Problem.flops``)
        when a later backend can run the call (e.g. a JIT backend whose thread
        hand-off costs more than a tiny call). 0 means always. An explicit
        choice (``backend=``, ``use_backend``, ``set_backend``) ignores it.
    """

    array_type: str
    dtypes: frozenset[str] = frozenset(DTYPES)
    features: frozenset[str] = frozenset(FEATURES)
    notes: Mapping[str, str] = field(default_factory=dict)
    min_flops: float = 0.0

    def __post_init__(self) -> None:
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown capability feature(s) {sorted(unknown)}; known: {sorted(FEATURES)}")
        unknown = set(self.dtypes) - set(DTYPES)
        if unknown:
            raise ValueError(f"unknown capability dtype(s) {sorted(unknown)}; known: {list(DTYPES)}")
        object.__setattr__(self, "features", frozenset(self.features))
        object.__setattr__(self, "dtypes", frozenset(self.dtypes))

    def missing(self, array_type: str, dtype: str, features: Iterable[str]) -> list[str]:
        """Return human-readable reasons why a call needing these cannot run (empty if it can)."""
        reasons = []
        if array_type != self.array_type:
            reasons.append(f"accepts {self.array_type} arrays, not {array_type} arrays")
        if dtype not in self.dtypes:
            note = self.notes.get(dtype)
            reasons.append(f"does not support dtype {dtype}" + (f" ({note})" if note else ""))
        for feat in sorted(set(features) - self.features):
            note = self.notes.get(feat)
            reasons.append(f"does not support {feat!r} ({FEATURES[feat]})" + (f": {note}" if note else ""))
        return reasons

    def as_dict(self) -> dict[str, object]:
        """A JSON-friendly view, used by ``list_backends`` consumers and the CLI."""
        return {
            "array_type": self.array_type,
            "dtypes": sorted(self.dtypes, key=DTYPES.index),
            "features": sorted(self.features, key=list(FEATURES).index),
            "notes": dict(self.notes),
            "min_flops": self.min_flops,
        }


def required_features(problem: Problem) -> frozenset[str]:
    """The capability features a normalized problem needs (see :mod:`selfattn._problem`)."""
    need = set()
    if problem.mask is not None:
        need.add("bool_mask" if problem.mask.dtype.kind == "b" else "float_mask")
    if problem.causal:
        need.add("causal")
    if problem.window is not None:
        need.add("window")
    if problem.kv_heads != problem.q_heads:
        need.add("gqa")
    if problem.dropout_p > 0.0:
        need.add("dropout")
    if problem.return_lse:
        need.add("lse")
    if problem.return_weights:
        need.add("weights")
    if problem.needs_vjp:
        need.add("vjp")
    if problem.softcap is not None:
        need.add("softcap")
    if problem.alibi is not None:
        need.add("alibi")
    if problem.is_chunk:
        need.add("chunks")
    if problem.is_varlen:
        need.add("varlen")
    return frozenset(need)
