"""The conformance case generator.

:func:`generate_cases` returns a list of :class:`Case` objects covering the
edges of the API: sizes that are not multiples of any block size, N or M equal
to 0 or 1, D = 1, Dv != D, grouped-query ratios 1/2/4/8, boolean and additive
masks of every broadcast shape, causal with N < M, N = M and N > M, windows,
dropout, large-magnitude logits, fully masked rows, 2-D and batch-less inputs,
several batch axes, non-contiguous and read-only inputs, in float16, float32
and float64.

A case knows how to build its arrays (:meth:`Case.arrays`), which capability
features it needs (:meth:`Case.features`) and its score magnitude
(:meth:`Case.score_max`), from which, with :func:`tolerance`, the allowed
error of each output follows (:data:`TOLERANCES` documents the rule and the
measured errors behind each number). It does not know about backends: the
suite decides from a backend's declared capabilities whether the case must
match the oracle or must raise :class:`selfattn.UnsupportedFeatureError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = [
    "Case",
    "generate_cases",
    "tolerance",
    "output_dtype",
    "logit_headroom",
    "Tolerance",
    "TOLERANCES",
    "OUTPUTS",
    "SCORE_REF",
]

#: The compared outputs: the forward's ``out``, ``lse`` and ``weights`` and the VJP's ``dq``, ``dk``, ``dv``.
OUTPUTS = ("out", "lse", "weights", "dq", "dk", "dv")


class Tolerance(NamedTuple):
    """``|actual - oracle| <= atol * h * A + rtol * |oracle|`` per element (see :data:`TOLERANCES`)."""

    atol: float
    rtol: float


#: The per-element rule, for an array of dtype ``dt`` (the array's own dtype:
#: the lse of float16 inputs is float32 and is held to float32's numbers)::
#:
#:     |actual - oracle| <= atol * h * A + rtol * |oracle| + bound
#:
#: * ``rtol`` is one unit in the last place (``finfo(dt).eps``): the result's
#:   own rounding, which dominates for float16 outputs (computed in float32,
#:   rounded once).
#: * ``A = max(1, max|oracle|)`` over the compared array for out, weights and
#:   the gradients (their errors are sums of terms of that size); ``A = 1`` for
#:   lse, whose error is absolute (in the units of the scores) -- its
#:   magnitude is already covered by ``rtol * |lse|``.
#: * ``h = logit_headroom(S) = max(1, S / SCORE_REF)``, ``S`` the call's
#:   largest ``|scale * q_i . k_j + mask_ij|`` (:func:`selfattn.testing.reference.score_max`).
#:   A computed score carries an absolute error of about ``eps * S``; ``exp``
#:   turns it into the same relative error in every weight, and from there into
#:   out, lse and the gradients, so every backend's error grows linearly with
#:   ``S``. ``SCORE_REF = 5`` is the largest ``S`` of the standard-normal cases
#:   (4.2 - 5.4), so ``h = 1`` there and ``h ~ 60`` on the large-logit cases.
#:   Measured (tools/conformance_errors.py): float32 dk of the large-logit case
#:   is 1.2e-3 off where max|dk| = 100 and S = 298 (2e-7 after h * A), against
#:   1.75e-6 where max|dk| = 4.9 and S = 5.3 (3.6e-7): the error grows with
#:   both, and after dividing by both no large-logit case needs more than the
#:   standard ones.
#: * ``bound`` (:func:`selfattn.testing.reference.rounding_bounds`) allows two
#:   roundings to the input dtype that standard algorithms make: the weights
#:   before ``P @ V`` on tensor cores (out), and the rounded output in the
#:   backward's ``delta_i = sum(dO_i * O_i)`` (dq, dk). It is negligible in
#:   float32/float64; in float16 it is the error of a correct tensor-core
#:   forward (``eps16 * sum_j P_ij |V_jd|``, 10x above ``rtol * |out|`` for an
#:   output near 0) and of a correct backward.
#:
#: ``atol`` is at least 5x the worst error (after ``h * A`` and ``bound``, with
#: ``rtol`` as above) measured over every conformance case and 400 property-test
#: draws on numpy, numba (fused and BLAS-tile kernels), cupy-emulated and
#: loopback (the worst is beside each number; the tables are in
#: docs/conformance.md); 10000 (numpy) and 6000 (numba, fused) further draws
#: used at most 0.49 of the tolerance.
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "float64": {
        "out": Tolerance(1e-14, 2.2e-16),  # worst 1.0e-15
        "lse": Tolerance(1e-14, 2.2e-16),  # worst 1.7e-15
        "weights": Tolerance(1e-14, 2.2e-16),  # worst 1.6e-15
        "dq": Tolerance(1e-14, 2.2e-16),  # worst 1.2e-15
        "dk": Tolerance(1e-14, 2.2e-16),  # worst 1.3e-15
        "dv": Tolerance(1e-14, 2.2e-16),  # worst 1.4e-15
    },
    "float32": {
        "out": Tolerance(4e-6, 1.2e-7),  # worst 7.1e-7
        "lse": Tolerance(4e-6, 1.2e-7),  # worst 6.4e-7 (float16 inputs), 5.2e-7 (float32)
        "weights": Tolerance(4e-6, 1.2e-7),  # worst 7.8e-7 (numba's BLAS-tile kernels)
        "dq": Tolerance(4e-6, 1.2e-7),  # worst 4.2e-7
        "dk": Tolerance(4e-6, 1.2e-7),  # worst 4.6e-7
        "dv": Tolerance(4e-6, 1.2e-7),  # worst 6.4e-7
    },
    # float16 inputs are computed in float32 and rounded once: rtol covers the
    # rounding, bound the two documented roundings, atol float32's arithmetic.
    "float16": {
        "out": Tolerance(4e-6, 9.8e-4),  # worst 2.0e-9
        "weights": Tolerance(4e-6, 9.8e-4),  # worst 1.6e-8
        "dq": Tolerance(4e-6, 9.8e-4),  # worst 4.1e-9
        "dk": Tolerance(4e-6, 9.8e-4),  # worst 1.5e-8
        "dv": Tolerance(4e-6, 9.8e-4),  # worst 7.9e-8
    },
}


#: Score magnitude up to which no headroom is given (see :data:`TOLERANCES`).
SCORE_REF = 5.0


def output_dtype(what: str, dtype) -> np.dtype:
    """The dtype output ``what`` must have for inputs of ``dtype`` (lse of float16 inputs: float32)."""
    dt = np.dtype(dtype)
    if what == "lse" and dt == np.float16:
        return np.dtype(np.float32)
    return dt


def tolerance(what: str, dtype) -> Tolerance:
    """``(atol, rtol)`` for output ``what`` (one of :data:`OUTPUTS`) of inputs of ``dtype``."""
    if what not in OUTPUTS:
        raise ValueError(f"unknown output {what!r}; expected one of {OUTPUTS}")
    return TOLERANCES[output_dtype(what, dtype).name][what]


def logit_headroom(score_max: float) -> float:
    """``h = max(1, S / SCORE_REF)``: rounding errors grow linearly with the score magnitude ``S``."""
    return max(1.0, float(score_max) / SCORE_REF)


@dataclass(frozen=True)
class Case:
    """One conformance case.

    ``q_shape``/``k_shape``/``v_shape`` are the caller-facing shapes;
    ``mask`` is None, or ``(kind, shape)`` with kind ``"bool"``/``"float"``;
    ``options`` are keyword arguments of the public API (causal, window,
    scale, softcap, alibi_slopes (a NumPy array), dropout_p, dropout_seed); ``layout`` is ``"contiguous"``,
    ``"noncontiguous"`` or ``"readonly"``; ``logit_scale`` multiplies the
    query (large values stress the softmax); ``mask_rows_off`` lists query rows
    whose boolean mask is all False (fully masked).
    """

    name: str
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    dtype: str = "float32"
    mask: tuple | None = None
    options: dict = field(default_factory=dict)
    layout: str = "contiguous"
    logit_scale: float = 1.0
    mask_rows_off: tuple = ()
    seed: int = 0

    @property
    def id(self) -> str:
        """A readable pytest id."""
        return f"{self.name}-{self.dtype}"

    def arrays(self):
        """Build ``(query, key, value, mask)`` deterministically from ``seed``."""
        rng = np.random.default_rng(self.seed)
        dt = np.dtype(self.dtype)

        def make(shape, scale=1.0):
            x = (rng.standard_normal(shape) * scale).astype(dt)
            if self.layout == "noncontiguous" and len(shape) >= 2:
                # A view with a transposed layout and a stride-2 last axis: the
                # values are the same, the memory layout is not C-contiguous.
                big = np.zeros(shape[:-2] + (shape[-1] * 2, shape[-2]), dtype=dt)
                big[..., ::2, :] = np.swapaxes(x, -1, -2)
                x = np.swapaxes(big[..., ::2, :], -1, -2)
                assert not x.flags.c_contiguous or x.size <= 1
            if self.layout == "readonly":
                x.setflags(write=False)
            return x

        q = make(self.q_shape, self.logit_scale)
        k = make(self.k_shape)
        v = make(self.v_shape)
        mask = None
        if self.mask is not None:
            kind, shape = self.mask
            if kind == "bool":
                mask = rng.random(shape) > 0.3
                if self.mask_rows_off:
                    mask = np.broadcast_to(mask, np.broadcast_shapes(shape, shape)).copy()
                    mask[..., list(self.mask_rows_off), :] = False
            else:
                mask = rng.standard_normal(shape).astype(np.float32 if dt == np.float16 else dt)
                mask[rng.random(shape) < 0.2] = -np.inf
            if self.layout == "readonly":
                mask.setflags(write=False)
        return q, k, v, mask

    def score_max(self) -> float:
        """The case's largest score magnitude (:func:`selfattn.testing.reference.score_max`)."""
        from .reference import score_max

        q, k, _, mask = self.arrays()
        o = self.options
        return score_max(
            q, k, mask=mask, scale=o.get("scale"), softcap=o.get("softcap"), alibi_slopes=o.get("alibi_slopes")
        )

    def features(self) -> frozenset:
        """The capability features this case needs (the forward, without lse/weights/vjp)."""
        from .._capabilities import required_features
        from .._problem import normalize

        q, k, v, mask = self.arrays()
        return required_features(normalize(q, k, v, mask=mask, **self.options))


def alibi_slopes(shape, dtype) -> np.ndarray:
    """Deterministic ALiBi slopes of ``shape`` (last axis = query heads): 2**-1, 2**-2, ... varied per batch entry.

    float64 for float64 inputs, else float32 (the API takes float32 or float64 slopes).
    """
    heads = shape[-1]
    base = 2.0 ** -np.arange(1, heads + 1)
    scale = 1.0 + 0.25 * np.arange(int(np.prod(shape[:-1], dtype=np.int64))).reshape(shape[:-1] + (1,))
    return (base * scale).astype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def _qkv(batch, hq, hkv, n, m, d, dv=None):
    dv = d if dv is None else dv
    return tuple(batch) + (hq, n, d), tuple(batch) + (hkv, m, d), tuple(batch) + (hkv, m, dv)


def generate_cases(dtypes=("float32", "float64"), float16=True) -> list[Case]:
    """All conformance cases, each in every dtype of ``dtypes`` (plus a float16 subset)."""
    base = []

    def add(name, shapes, **kw):
        base.append((name, shapes, kw))

    odd = _qkv((2,), 4, 2, 37, 53, 24, 17)
    add("odd-sizes", odd)
    add("n1-decode", _qkv((1,), 2, 2, 1, 65, 16))
    add("m1", _qkv((1,), 2, 1, 5, 1, 8))
    add("n0", _qkv((2,), 2, 2, 0, 7, 8))
    add("m0", _qkv((2,), 2, 2, 6, 0, 8, 5))
    add("d1", _qkv((1,), 1, 1, 9, 11, 1, 3))
    add("dv-ne-d", _qkv((1,), 3, 3, 12, 20, 8, 32))
    add("two-d", ((19, 8), (23, 8), (23, 6)))
    add("batchless-3d", ((3, 10, 8), (3, 14, 8), (3, 14, 8)))
    add("two-batch-axes", _qkv((2, 3), 2, 1, 9, 13, 8))
    for ratio in (1, 2, 4, 8):
        add(f"gqa-{ratio}", _qkv((2,), 8, 8 // ratio, 21, 30, 16))
    add("gqa-8-causal", _qkv((1,), 8, 1, 33, 40, 16), causal=True)
    # Masks of every broadcast shape against scores (2, 4, 37, 53).
    for kind in ("bool", "float"):
        for mname, mshape in (
            ("full", (2, 4, 37, 53)),
            ("nm", (37, 53)),
            ("keys", (2, 1, 1, 53)),
            ("rows", (37, 1)),
            ("heads", (4, 1, 1)),
            ("per-head", (1, 4, 37, 53)),
            ("scalar", (1,)),
            ("batch-only", (2, 1, 1, 1)),
        ):
            add(f"mask-{kind}-{mname}", odd, mask=(kind, mshape))
    add("mask-partial-batch", _qkv((2, 3), 2, 2, 7, 9, 8), mask=("bool", (2, 1, 1, 7, 9)))
    add("mask-2d-input", ((19, 8), (23, 8), (23, 8)), mask=("float", (23,)))
    add("mask-float-causal", odd, mask=("float", (37, 53)), causal=True)
    for cname, n, m in (("n<m", 13, 40), ("n=m", 40, 40), ("n>m", 40, 13)):
        add(f"causal-{cname}", _qkv((2,), 2, 2, n, m, 16), causal=True)
    add("window-int", _qkv((1,), 2, 2, 50, 50, 16), window=4)
    add("window-asym-n<m", _qkv((1,), 2, 2, 20, 57, 16), window=(7, 2))
    add("window-causal", _qkv((1,), 2, 1, 50, 60, 16), window=(5, 9), causal=True)
    add("window-zero", _qkv((1,), 2, 2, 30, 30, 8), window=(0, 0))
    add("window-huge", _qkv((1,), 2, 2, 10, 30, 8), window=(10**12, 3))
    add("window-empty-rows", _qkv((1,), 1, 1, 30, 10, 8), window=(0, 0))
    add("fully-masked-rows", odd, mask=("bool", (2, 4, 37, 53)), mask_rows=(0, 5, 36))
    add("mask-bool-window", odd, mask=("bool", (37, 53)), window=(6, 6))
    add("scale", odd, scale=0.05)
    add("large-logits", odd, logit_scale=60.0)
    add("large-logits-causal", _qkv((1,), 2, 2, 33, 33, 16), logit_scale=60.0, causal=True)
    add("dropout", odd, dropout_p=0.3, dropout_seed=12345)
    add("dropout-gqa-causal", _qkv((2,), 4, 1, 25, 31, 8), dropout_p=0.5, dropout_seed=2**63 + 7, causal=True)
    add("dropout-mask", odd, dropout_p=0.1, dropout_seed=99, mask=("float", (2, 1, 1, 53)))
    add("noncontiguous", odd, layout="noncontiguous", mask=("bool", (37, 53)))
    add("noncontiguous-gqa", _qkv((2,), 4, 1, 17, 29, 8), layout="noncontiguous", causal=True)
    add("readonly", odd, layout="readonly", mask=("float", (2, 4, 37, 53)))
    add("long-m", _qkv((1,), 2, 2, 3, 700, 32))
    add("block-edges", _qkv((1,), 2, 2, 129, 257, 64), causal=True)
    # Soft-capping and ALiBi (FlashAttention 2's definitions), alone and with everything else.
    add("softcap", odd, softcap=2.0, logit_scale=3.0)
    add("softcap-large-logits", odd, softcap=30.0, logit_scale=60.0)
    add("alibi", odd, alibi=(4,))
    add("alibi-causal-n<m", _qkv((2,), 2, 2, 13, 40, 16), alibi=(2,), causal=True)
    add("alibi-window-n>m", _qkv((1,), 2, 2, 40, 13, 16), alibi=(2,), window=(5, 3))
    add("alibi-batch-slopes", _qkv((2, 3), 2, 1, 9, 13, 8), alibi=(2, 1, 2))
    add(
        "softcap-alibi-mask-dropout",
        odd,
        softcap=5.0,
        alibi=(2, 4),
        mask=("float", (2, 1, 1, 53)),
        causal=True,
        dropout_p=0.2,
        dropout_seed=7,
    )

    f16_names = {
        "odd-sizes",
        "gqa-4",
        "causal-n<m",
        "mask-float-keys",
        "mask-bool-full",
        "dropout",
        "large-logits",
        "window-causal",
        "fully-masked-rows",
        "n0",
        "m0",
        "block-edges",
        "softcap",
        "alibi-causal-n<m",
        "softcap-alibi-mask-dropout",
    }
    cases = []
    for i, (name, (qs, ks, vs), kw) in enumerate(base):
        mask = kw.pop("mask", None)
        layout = kw.pop("layout", "contiguous")
        logit = kw.pop("logit_scale", 1.0)
        rows_off = kw.pop("mask_rows", ())
        alibi = kw.pop("alibi", None)
        want = list(dtypes) + (["float16"] if float16 and name in f16_names else [])
        for dt in want:
            opts = dict(kw)
            if alibi is not None:
                opts["alibi_slopes"] = alibi_slopes(alibi, dt)
            cases.append(Case(name, qs, ks, vs, dt, mask, opts, layout, logit, rows_off, seed=1000 + i))
    return cases
