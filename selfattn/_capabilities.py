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

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._problem import Problem

__all__ = ["FEATURES", "DTYPES", "Capabilities", "WorkRange", "required_features"]

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
class WorkRange:
    """Where a backend pays off, as data: automatic selection passes it over for calls outside.

    A call is inside when any one of the rules holds (each rule left at its
    default never holds, except ``min_flops = 0``, which takes everything):

    * ``min_flops``: at least this many forward FLOPs (``Problem.flops``);
    * ``min_flops_many_heads``: at least this many FLOPs when the call has at
      least ``many_heads`` (batch x query head) problems of more than
      ``decode_rows`` query rows each (many small heads, where a backend that
      works head by head pays per head);
    * ``min_keys_decode``: decode-like calls (at most ``decode_rows`` query rows)
      with at least this many keys.

    The numbers are measurements of one kind of machine, not laws: the Numba
    backend's come from ``tools/crossover.py`` (see the README's Performance
    section). An explicit choice (``backend=``, ``use_backend``,
    ``set_backend``) ignores the work range.
    """

    min_flops: float = 0.0
    min_flops_many_heads: float = math.inf
    many_heads: int = 0
    min_keys_decode: float = math.inf
    decode_rows: int = 16

    def __post_init__(self) -> None:
        for name in ("min_flops", "min_flops_many_heads", "min_keys_decode"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"WorkRange.{name} must be a number >= 0 (math.inf: never), got {value!r}")
        for name in ("many_heads", "decode_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"WorkRange.{name} must be an int >= 0, got {value!r}")

    def covers(self, problem: Problem) -> bool:
        """Whether ``problem`` is inside the range (cheap: it runs on every automatic call)."""
        if self.min_flops <= 0.0:  # everything (the common case: no declared range)
            return True
        flops = problem.flops
        if flops >= self.min_flops:
            return True
        if self.decode_like(problem):
            return problem.key.shape[2] >= self.min_keys_decode
        qs = problem.query.shape  # (B, Hq, N, D)
        return flops >= self.min_flops_many_heads and qs[0] * qs[1] >= self.many_heads

    def decode_like(self, problem: Problem) -> bool:
        """At most ``decode_rows`` query rows (a packed varlen batch never is: its N is the total)."""
        return problem.query.shape[2] <= self.decode_rows and problem.cu_seqlens_q is None

    def outside(self, problem: Problem) -> str | None:
        """Why ``problem`` is outside the range (``"small problem (...)"``), or None when it is inside."""
        if self.covers(problem):
            return None
        flops = problem.flops
        decode = self.decode_like(problem)
        why = f"{flops:.3g} FLOP < {self.min_flops:.3g}"
        if not decode and math.isfinite(self.min_flops_many_heads):
            why += f", and not {self.many_heads}+ heads with {self.min_flops_many_heads:.3g}+ FLOP"
        if decode and math.isfinite(self.min_keys_decode):
            why += f", and a decode-like call with {problem.m} < {self.min_keys_decode:.0f} keys"
        return f"small problem ({why}: the work range it declares, below which a later backend is faster)"

    def as_dict(self) -> dict[str, float]:
        return {
            "min_flops": self.min_flops,
            "min_flops_many_heads": self.min_flops_many_heads,
            "many_heads": self.many_heads,
            "min_keys_decode": self.min_keys_decode,
            "decode_rows": self.decode_rows,
        }


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
        The simplest work range: automatic selection passes the backend over
        for calls of fewer forward FLOPs (``Problem.flops``) when a later
        backend can run the call (e.g. a JIT backend whose thread hand-off
        costs more than a tiny call). 0 means always. An explicit choice
        (``backend=``, ``use_backend``, ``set_backend``) ignores it.
    work_range:
        A richer :class:`WorkRange` (several rules); when given, it replaces
        ``min_flops``.
    """

    array_type: str
    dtypes: frozenset[str] = frozenset(DTYPES)
    features: frozenset[str] = frozenset(FEATURES)
    notes: Mapping[str, str] = field(default_factory=dict)
    min_flops: float = 0.0
    work_range: WorkRange | None = None

    @property
    def pays_off(self) -> WorkRange:
        """The work range automatic selection applies: ``work_range``, else ``WorkRange(min_flops)``."""
        rng: WorkRange = self.__dict__["_pays_off"]
        return rng

    def __post_init__(self) -> None:
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown capability feature(s) {sorted(unknown)}; known: {sorted(FEATURES)}")
        unknown = set(self.dtypes) - set(DTYPES)
        if unknown:
            raise ValueError(f"unknown capability dtype(s) {sorted(unknown)}; known: {list(DTYPES)}")
        object.__setattr__(self, "features", frozenset(self.features))
        object.__setattr__(self, "dtypes", frozenset(self.dtypes))
        # Built once: automatic selection asks for it on every call.
        rng = self.work_range if self.work_range is not None else WorkRange(min_flops=self.min_flops)
        object.__setattr__(self, "_pays_off", rng)

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
            "work_range": self.pays_off.as_dict(),
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
