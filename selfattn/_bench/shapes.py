"""Standard attention shapes shared by ``python -m selfattn bench`` and the asv suite.

Defined once here. The asv suite in ``benchmarks/`` imports this module from
the installed ``selfattn`` and, when benchmarking an older commit that lacks
it, loads this very file from the checkout instead; so keep it free of
imports from the rest of ``selfattn`` (standard library and NumPy only).

Layout is ``(batch, heads, N, D)`` for queries and ``(batch, kv_heads, M, D)``
for keys and values, as in :func:`selfattn.scaled_dot_product_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Shape", "TINY", "PREFILL", "DECODE", "GQA", "LONG", "ASV_SHAPES", "BENCH_QUICK", "BENCH_STANDARD",
    "BENCH_TINY", "SEQLEN_SWEEP", "BY_NAME", "get", "make_inputs",
]


@dataclass(frozen=True)
class Shape:
    """One attention problem size.

    ``kind`` is one of ``"dispatch"`` (tiny, measures overhead), ``"prefill"``
    (N = M), ``"decode"`` (one query against a long key/value cache), ``"gqa"``
    (grouped-query: ``kv_heads < heads``) and ``"long"`` (long sequences).
    """

    name: str
    kind: str
    batch: int
    heads: int
    n: int
    m: int
    d: int
    kv_heads: int | None = None

    @property
    def hkv(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def q_shape(self) -> tuple:
        return (self.batch, self.heads, self.n, self.d)

    @property
    def kv_shape(self) -> tuple:
        return (self.batch, self.hkv, self.m, self.d)

    def flops(self, causal: bool = False) -> float:
        """Forward FLOPs ``4·B·H·N·M·D`` (halved for causal), like ``timing.attention_flops``."""
        f = 4.0 * self.batch * self.heads * self.n * self.m * self.d
        return f / 2.0 if causal else f

    def nbytes(self, itemsize: int) -> int:
        """Bytes of q, k and v together."""
        q = self.batch * self.heads * self.n * self.d
        kv = 2 * self.batch * self.hkv * self.m * self.d
        return (q + kv) * itemsize

    @property
    def label(self) -> str:
        kv = f"/{self.hkv}" if self.hkv != self.heads else ""
        return f"{self.name}(B{self.batch},H{self.heads}{kv},N{self.n},M{self.m},D{self.d})"

    def __str__(self) -> str:  # asv shows str(param) in its tables
        return self.label


def make_inputs(shape: Shape, dtype="float32", seed: int = 0):
    """Deterministic ``(q, k, v)`` NumPy arrays for ``shape`` (standard normal, cast to ``dtype``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    q = rng.standard_normal(shape.q_shape, dtype=np.float32).astype(dtype)
    k = rng.standard_normal(shape.kv_shape, dtype=np.float32).astype(dtype)
    v = rng.standard_normal(shape.kv_shape, dtype=np.float32).astype(dtype)
    return q, k, v


#: Dispatch-overhead probe: the work is negligible, so the time is the API's cost.
TINY = Shape("tiny", "dispatch", 1, 1, 4, 4, 8)

PREFILL = Shape("prefill", "prefill", 1, 4, 512, 512, 64)
DECODE = Shape("decode", "decode", 1, 8, 1, 4096, 64)
GQA = Shape("gqa", "gqa", 1, 8, 512, 512, 64, kv_heads=2)
LONG = Shape("long", "long", 1, 2, 2048, 2048, 64)

#: The asv grid (kept small: it runs on a 2-core shared machine).
ASV_SHAPES = (PREFILL, DECODE, GQA, LONG)

#: ``bench --quick`` (the README's main job; well under a minute).
BENCH_QUICK = (
    Shape("prefill-256", "prefill", 1, 4, 256, 256, 64),
    Shape("decode-2k", "decode", 1, 8, 1, 2048, 64),
    Shape("gqa-256", "gqa", 1, 8, 256, 256, 64, kv_heads=2),
)

#: ``bench`` default.
BENCH_STANDARD = (PREFILL, DECODE, GQA, LONG, Shape("prefill-b4", "prefill", 4, 8, 1024, 1024, 64))

#: ``bench --tiny`` (tests: milliseconds per call).
BENCH_TINY = (
    Shape("tiny-prefill", "prefill", 1, 2, 16, 16, 8),
    Shape("tiny-decode", "decode", 1, 2, 1, 32, 8),
    Shape("tiny-gqa", "gqa", 1, 4, 16, 16, 8, kv_heads=2),
)

#: Sequence-length sweep (prefill, N = M) for the GFLOP/s-vs-length plot.
SEQLEN_SWEEP = tuple(Shape(f"prefill-{n}", "prefill", 1, 4, n, n, 64) for n in (128, 256, 512, 1024, 2048))

BY_NAME = {s.name: s for s in (TINY, *ASV_SHAPES, *BENCH_QUICK, *BENCH_STANDARD, *BENCH_TINY, *SEQLEN_SWEEP)}


def get(name: str) -> Shape:
    """Look a standard shape up by name (``KeyError`` lists the known names)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown shape {name!r}; known: {sorted(BY_NAME)}") from None
