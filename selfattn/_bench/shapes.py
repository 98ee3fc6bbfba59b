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
    "Shape",
    "Pipeline",
    "TINY",
    "PREFILL",
    "DECODE",
    "GQA",
    "LONG",
    "ASV_SHAPES",
    "BENCH_QUICK",
    "BENCH_STANDARD",
    "BENCH_TINY",
    "PIPELINE",
    "PIPELINE_TINY",
    "Varlen",
    "VARLEN",
    "VARLEN_QUICK",
    "VARLEN_TINY",
    "LOGITS",
    "LOGITS_QUICK",
    "LOGITS_TINY",
    "BY_NAME",
    "get",
    "make_inputs",
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


@dataclass(frozen=True)
class Pipeline:
    """One step of a user's pipeline, timed as a whole: a layer forward or a bare attention call.

    ``layer`` is ``"mha"`` (:class:`selfattn.nn.MultiHeadAttention` self-attention
    on ``(batch, n, embed)``), ``"encoder"`` (:class:`selfattn.nn.TransformerEncoderLayer`
    with feed-forward width ``ff``) or ``"attention"`` (a bare
    :func:`selfattn.scaled_dot_product_attention` call on ``(batch, heads, n, embed)``
    queries, keys and values: ``embed`` is then the head dimension).
    """

    name: str
    layer: str
    batch: int
    n: int
    embed: int
    heads: int
    ff: int | None = None

    kind = "pipeline"

    def __post_init__(self) -> None:
        if self.layer not in ("mha", "encoder", "attention"):
            raise ValueError(f"layer must be 'mha', 'encoder' or 'attention', got {self.layer!r}")
        if self.layer != "attention" and self.embed % self.heads:
            raise ValueError(f"embed ({self.embed}) must be divisible by heads ({self.heads})")
        if (self.layer == "encoder") != (self.ff is not None):
            raise ValueError("ff (the feed-forward width) is required for 'encoder' and only for it")

    @property
    def input_shape(self) -> tuple:
        """The input array's shape: ``(B, N, E)`` for layers, ``(B, H, N, D)`` for a bare attention call."""
        if self.layer == "attention":
            return (self.batch, self.heads, self.n, self.embed)
        return (self.batch, self.n, self.embed)

    def flops(self, causal: bool = False) -> float:
        """Forward FLOPs: projections ``8·B·N·E²`` + attention ``4·B·N²·E`` (+ feed-forward ``4·B·N·E·ff``).

        Causal halves only the attention term. Layer norms, biases and the
        softmax are left out (they are O(B·N·E), negligible next to the products).
        """
        b, n, e = self.batch, self.n, self.embed
        heads = self.heads if self.layer == "attention" else 1  # layers: E = heads * head_dim already
        attn = 4.0 * b * heads * n * n * e / (2.0 if causal else 1.0)
        if self.layer == "attention":
            return attn
        total = 8.0 * b * n * e * e + attn
        if self.ff is not None:  # the encoder's feed-forward block
            total += 4.0 * b * n * e * self.ff
        return total

    @property
    def label(self) -> str:
        if self.layer == "attention":
            return f"{self.name}: attention{self.input_shape}"
        cls = "MultiHeadAttention" if self.layer == "mha" else "TransformerEncoderLayer"
        extra = f",ff{self.ff}" if self.ff else ""
        return f"{self.name}: {cls}{self.input_shape} h{self.heads}{extra}"

    def __str__(self) -> str:
        return self.label


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
BENCH_STANDARD = (BENCH_QUICK[0], PREFILL, Shape("prefill-b4", "prefill", 4, 8, 1024, 1024, 64), DECODE, GQA, LONG)

#: ``bench --tiny`` (tests: milliseconds per call).
BENCH_TINY = (
    Shape("tiny-prefill", "prefill", 1, 2, 16, 16, 8),
    Shape("tiny-decode", "decode", 1, 2, 1, 32, 8),
    Shape("tiny-gqa", "gqa", 1, 4, 16, 16, 8, kv_heads=2),
)

#: The "pipeline" section of ``bench`` (every mode but ``--tiny``): layers at tutorial sizes, as users call them
#: (the layer's own NumPy matrix products, then attention), and a toy attention call.
PIPELINE = (
    Pipeline("mha-small", "mha", 4, 32, 128, 8),
    Pipeline("mha-large", "mha", 8, 128, 256, 8),
    Pipeline("encoder-small", "encoder", 4, 32, 128, 8, ff=512),
    Pipeline("encoder-large", "encoder", 8, 128, 256, 8, ff=1024),
    Pipeline("toy", "attention", 2, 10, 8, 8),
)

#: ``bench --tiny`` pipeline (tests).
PIPELINE_TINY = (
    Pipeline("tiny-mha", "mha", 2, 8, 16, 2),
    Pipeline("tiny-encoder", "encoder", 2, 8, 16, 2, ff=32),
    Pipeline("toy", "attention", 2, 10, 8, 8),
)


@dataclass(frozen=True)
class Varlen:
    """A packed variable-length batch: ``count`` sequences of skewed lengths in ``[lo, hi]``, causal self-attention.

    Lengths are log-normal (median ``median`` tokens, sigma 1), clipped to
    ``[lo, hi]``, drawn once from ``seed``; the longest is set to ``hi`` so the
    padded layout is always ``count x hi`` -- the usual serving/training mix of
    many short sequences and a few long ones. Queries, keys and values use
    ``heads`` heads of width ``d``, heads first (``(heads, total, d)``), as
    :func:`selfattn.scaled_dot_product_attention_varlen` takes them.
    """

    name: str
    count: int
    lo: int
    hi: int
    heads: int = 4
    d: int = 64
    median: float = 500.0
    seed: int = 0

    kind = "varlen"

    def lengths(self):
        """The sequence lengths, an int64 NumPy array of ``count`` entries."""
        import numpy as np

        rng = np.random.default_rng(self.seed)
        lens = np.clip(rng.lognormal(np.log(self.median), 1.0, size=self.count), self.lo, self.hi).astype(np.int64)
        lens[int(np.argmax(lens))] = self.hi
        return lens

    def cu_seqlens(self):
        """``[0, cumsum(lengths)]`` (int64), the ``cu_seqlens`` of the packed call."""
        import numpy as np

        return np.concatenate([[0], np.cumsum(self.lengths())]).astype(np.int64)

    def inputs(self, dtype="float32", seed: int = 1):
        """``(q, k, v, cu, q_pad, k_pad, v_pad, key_mask)``: the packed arrays and the same batch padded.

        Packed: ``(heads, total, d)`` standard normal; padded: ``(count, heads, hi, d)`` with zeros
        past each sequence and ``key_mask`` ``(count, 1, 1, hi)`` True on real keys.
        """
        import numpy as np

        lens, cu = self.lengths(), self.cu_seqlens()
        total, longest = int(cu[-1]), int(lens.max())
        rng = np.random.default_rng(seed)
        packed = [rng.standard_normal((self.heads, total, self.d), dtype=np.float32).astype(dtype) for _ in range(3)]
        padded = [np.zeros((len(lens), self.heads, longest, self.d), dtype) for _ in range(3)]
        for b in range(len(lens)):
            for dst, src in zip(padded, packed, strict=True):
                dst[b, :, : lens[b]] = src[:, cu[b] : cu[b + 1]]
        key_mask = (np.arange(longest)[None, :] < lens[:, None])[:, None, None, :]
        return (*packed, cu, *padded, key_mask)

    def flops(self, causal: bool = True) -> float:
        """Useful forward FLOPs ``4·H·D·Σ Nᵦ²`` (halved for causal): the same for the packed and the padded call."""
        f = 4.0 * self.heads * self.d * float((self.lengths().astype(float) ** 2).sum())
        return f / 2.0 if causal else f

    @property
    def label(self) -> str:
        total = int(self.lengths().sum())
        return f"{self.name}({self.count} seqs {self.lo}-{self.hi}, total {total}, H{self.heads},D{self.d})"

    def __str__(self) -> str:
        return self.label


#: ``bench --features``: packed against padded (32 skewed sequences up to 4096 tokens, as in the asv suite) ...
VARLEN = Varlen("varlen-skewed", 32, 64, 4096)
#: ... and under ``--quick`` (up to 1024 tokens).
VARLEN_QUICK = Varlen("varlen-quick", 32, 32, 1024, median=250.0)
#: ... and under ``--tiny`` (tests).
VARLEN_TINY = Varlen("varlen-tiny", 6, 4, 48, heads=2, d=8, median=12.0)
#: ``bench --features``: plain attention against softcap / ALiBi / both (the overhead target's shape) ...
LOGITS = Shape("logits-4k", "prefill", 1, 8, 4096, 4096, 64)
#: ... under ``--quick`` ...
LOGITS_QUICK = Shape("logits-1k", "prefill", 1, 8, 1024, 1024, 64)
#: ... and under ``--tiny``.
LOGITS_TINY = Shape("logits-tiny", "prefill", 1, 2, 40, 40, 8)

BY_NAME = {
    s.name: s for s in (TINY, *ASV_SHAPES, *BENCH_QUICK, *BENCH_STANDARD, *BENCH_TINY, *PIPELINE, *PIPELINE_TINY)
}


def get(name: str) -> Shape | Pipeline:
    """Look a standard shape or pipeline step up by name (``KeyError`` lists the known names)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown shape {name!r}; known: {sorted(BY_NAME)}") from None
