"""Planted bugs: deliberately wrong backends that the conformance suite must reject.

A conformance suite is only as good as the bugs it catches. Each :class:`Mutant`
here wraps a *working* backend object (by default the NumPy backend) and
plants one realistic bug -- an lse rounded to the input dtype, a causal band off
by one, a dropout pattern shifted by one key, float64 silently computed in
float32, ... -- using nothing but the public backend contract: it changes the
:class:`~selfattn._problem.Problem` handed to ``forward``/``backward``
(``dataclasses.replace``) or post-processes their results. So the same mutants
can be built from any NumPy-array backend, ours or a third party's::

    python -m selfattn.testing.mutants                  # mutants of the numpy backend
    python -m selfattn.testing.mutants --base mybackend # ... of an installed plugin
    python -m selfattn.testing.mutants --all-tests      # the whole suite per mutant, not a targeted subset

runs ``selfattn/testing/test_conformance.py`` in-process against every mutant
(each registered under its own name for the duration, see :func:`registered`)
and prints which test kills each one; a mutant that no test kills is a hole in
the suite. An unmodified wrapper (``control``) runs alongside and must pass
every selected test, so a kill is never an artefact of the harness.

Each mutant names the part of the suite that is meant to catch it
(:attr:`Mutant.targets`), which keeps the run short (about ten seconds for all of
them on the NumPy backend); ``--all-tests`` shows that the whole suite rejects
them as well.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from .. import Backend, Capabilities
from .._dropout import keep_mask

__all__ = ["Mutant", "MutantBackend", "MUTANTS", "CONTROL", "build", "registered", "Kill", "run", "main"]

#: Automatic selection never picks a mutant: it sorts after every real backend.
_PRIORITY = 10**6


class MutantBackend(Backend):
    """A backend that delegates to ``base`` through the hooks of one :class:`Mutant`."""

    def __init__(self, base, mutant: Mutant, name: str | None = None):
        self.base = base
        self.mutant = mutant
        self.name = name or mutant.name
        self.version = f"{mutant.name} of {getattr(base, 'name', '?')} {getattr(base, 'version', '')}".strip()
        self.priority = _PRIORITY
        caps: Capabilities = base.capabilities
        self.capabilities = caps

    def availability(self) -> tuple[bool, str]:
        return self.base.availability() if hasattr(self.base, "availability") else (True, "")

    def forward(self, problem):
        if self.mutant.forward is None:
            return self.base.forward(problem)
        return self.mutant.forward(self.base, problem)

    def backward(self, problem, out, lse, grad_out):
        if self.mutant.backward is None:
            return self.base.backward(problem, out, lse, grad_out)
        return self.mutant.backward(self.base, problem, out, lse, grad_out)


@dataclass(frozen=True)
class Mutant:
    """One planted bug.

    ``forward(base, problem)`` / ``backward(base, problem, out, lse, grad_out)``
    replace the base backend's methods (None: delegate unchanged).
    ``targets(test_name, case)`` says which conformance tests are meant to kill
    it (``case`` is the :class:`~selfattn.testing.cases.Case` of case-driven
    tests, else None): the planted-bug run executes only those.
    """

    name: str
    description: str
    targets: Callable[[str, object], bool]
    forward: Callable | None = None
    backward: Callable | None = None


# -- selection helpers -----------------------------------------------------------
def _cases(
    pred: Callable,
    tests: tuple = ("test_forward_matches_oracle", "test_lse_and_weights_match_oracle", "test_vjp_matches_oracle"),
) -> Callable[[str, object], bool]:
    return lambda name, case: case is not None and name in tests and bool(pred(case))


def _tests(*names: str) -> Callable[[str, object], bool]:
    return lambda name, case: name in names


def _either(*selectors: Callable) -> Callable[[str, object], bool]:
    return lambda name, case: any(s(name, case) for s in selectors)


def _has_mask(kind: str | None = None) -> Callable:
    return lambda case: case.mask is not None and (kind is None or case.mask[0] == kind)


# -- problem rewriting helpers ----------------------------------------------------
def _band_window(pb, lower, upper):
    """``pb`` with its causal/window band replaced by an explicit window (None = unbounded side)."""
    cap = pb.n + pb.m + 1
    return replace(pb, causal=False, window=(cap if lower is None else lower, cap if upper is None else upper))


def _full_mask(pb):
    """The problem's mask broadcast to ``(B, Hq, N, M)`` (a materialised copy; None without a mask)."""
    if pb.mask is None:
        return None
    mk = pb.mask[np.asarray(pb.mask_index)]
    return np.broadcast_to(mk, (pb.batch, pb.q_heads, pb.n, pb.m)).copy()


def _with_mask(pb, mask):
    """``pb`` with a full ``(B, Hq, N, M)`` mask (or None)."""
    index = None if mask is None else np.arange(pb.batch, dtype=np.int64)
    return replace(pb, mask=mask, mask_index=index)


def _per_batch(pb, call):
    """Run ``call(sub_problem, b)`` for each flat batch entry alone; return the list of results."""
    results = []
    for b in range(pb.batch):
        index = None if pb.mask_index is None else pb.mask_index[b : b + 1]
        sub = replace(
            pb,
            query=pb.query[b : b + 1],
            key=pb.key[b : b + 1],
            value=pb.value[b : b + 1],
            mask_index=index,
            batch_shape=(1,),
        )
        results.append(call(sub, b))
    return results


def _concat(parts, axis=0):
    if any(p is None for p in parts):
        return None
    return np.concatenate(parts, axis=axis)


def _finite_map(x, f):
    """Apply ``f`` to the finite entries of ``x`` (a new array; None stays None)."""
    if x is None:
        return None
    return np.where(np.isfinite(x), f(x), x).astype(x.dtype, copy=False)


def _keep(pb):
    bh = pb.batch * pb.q_heads
    keep = keep_mask(pb.dropout_seed, np.arange(bh), np.arange(pb.n), np.arange(pb.m), pb.dropout_p)
    return keep.reshape(pb.batch, pb.q_heads, pb.n, pb.m)


# -- the mutants -------------------------------------------------------------------
def _lse_rounded(base, pb):
    out, lse, w = base.forward(pb)
    return out, None if lse is None else lse.astype(pb.dtype).astype(lse.dtype), w


def _causal_off_by_one(pb):
    if not pb.causal:
        return pb
    return _band_window(pb, pb.lower, pb.upper + 1)  # query i also sees key i + (M - N) + 1


def _window_off_by_one(pb):
    if pb.window is None:
        return pb
    return replace(pb, window=(pb.window[0] + 1, pb.window[1]))


def _causal_top_left(pb):
    """Causal aligned top-left (``j <= i``, PyTorch's ``is_causal``) instead of bottom-right."""
    if not pb.causal:
        return pb
    tril = np.tril(np.ones((pb.n, pb.m), dtype=bool))
    mask = _full_mask(pb)
    if mask is None:
        mask = np.broadcast_to(tril, (pb.batch, pb.q_heads, pb.n, pb.m)).copy()
    elif mask.dtype == bool:
        mask &= tril
    else:
        mask = np.where(tril, mask, -np.inf).astype(mask.dtype)
    window = pb.window
    pb = _with_mask(replace(pb, causal=False), mask)
    return pb if window is None else replace(pb, window=window)


def _no_rescale_forward(base, pb):
    out, lse, w = base.forward(pb)
    return (out * pb.dtype.type(1.0 - pb.dropout_p)).astype(pb.dtype), lse, w


def _no_rescale_backward(base, pb, out, lse, grad_out):
    keep = 1.0 - pb.dropout_p
    grads = base.backward(pb, (out / out.dtype.type(keep)).astype(out.dtype), lse, grad_out)
    return tuple((g * g.dtype.type(keep)).astype(g.dtype) for g in grads)


def _gqa_one_group(base, pb, out, lse, grad_out):
    dq, _, _ = base.backward(pb, out, lse, grad_out)
    g = np.array(grad_out, copy=True)
    heads = np.arange(pb.q_heads)
    g[:, heads % pb.group != 0] = 0  # only the first query head of each group reaches dK/dV
    _, dk, dv = base.backward(pb, out, lse, g)
    return dq, dk, dv


def _mask_batch_ignored(pb):
    if pb.mask is None or pb.mask.shape[0] == 1:
        return pb
    return replace(pb, mask_index=np.zeros_like(pb.mask_index))


def _mask_heads_ignored(pb):
    if pb.mask is None or pb.mask.shape[1] == 1:
        return pb
    return replace(pb, mask=pb.mask[:, :1])


def _lse_sign(base, pb):
    out, lse, w = base.forward(pb)
    return out, _finite_map(lse, np.negative), w


def _lse_base2(base, pb):
    out, lse, w = base.forward(pb)
    return out, _finite_map(lse, lambda x: x / math.log(2.0)), w


def _shift_keys(pb):
    """``pb`` with one fully masked key prepended: every real key's dropout counter j becomes j + 1.

    The causal/window band is unchanged (the offset M - N grows by one along with j).
    """
    if pb.dropout_p == 0.0:
        return pb, False

    def pad(x):
        return np.concatenate([np.zeros_like(x[:, :, :1]), x], axis=2)

    mask = _full_mask(pb)
    if mask is None:
        mask = np.ones((pb.batch, pb.q_heads, pb.n, pb.m), dtype=bool)
    fill = False if mask.dtype == bool else -np.inf
    mask = np.concatenate([np.full(mask.shape[:3] + (1,), fill, dtype=mask.dtype), mask], axis=3)
    shifted = replace(pb, key=pad(pb.key), value=pad(pb.value))
    return _with_mask(shifted, mask), True


def _dropout_shift_forward(base, pb):
    sp, shifted = _shift_keys(pb)
    out, lse, w = base.forward(sp)
    return out, lse, (w[..., 1:] if shifted and w is not None else w)


def _dropout_shift_backward(base, pb, out, lse, grad_out):
    sp, shifted = _shift_keys(pb)
    dq, dk, dv = base.backward(sp, out, lse, grad_out)
    return (dq, dk[:, :, 1:], dv[:, :, 1:]) if shifted else (dq, dk, dv)


def _seed_low_word(pb):
    if pb.dropout_p == 0.0:
        return pb
    return replace(pb, dropout_seed=pb.dropout_seed & 0xFFFFFFFF)


def _batch_counter_forward(base, pb):
    if pb.dropout_p == 0.0:
        return base.forward(pb)
    parts = _per_batch(pb, lambda sub, b: base.forward(sub))  # each batch entry's bh counter restarts at 0
    return tuple(_concat([p[i] for p in parts]) for i in range(3))


def _batch_counter_backward(base, pb, out, lse, grad_out):
    if pb.dropout_p == 0.0:
        return base.backward(pb, out, lse, grad_out)
    parts = _per_batch(pb, lambda sub, b: base.backward(sub, out[b : b + 1], lse[b : b + 1], grad_out[b : b + 1]))
    return tuple(_concat([p[i] for p in parts]) for i in range(3))


def _as_float32(pb):
    if pb.dtype != np.float64:
        return pb
    mask = pb.mask
    if mask is not None and mask.dtype != bool:
        mask = mask.astype(np.float32)
    return replace(
        pb,
        query=pb.query.astype(np.float32),
        key=pb.key.astype(np.float32),
        value=pb.value.astype(np.float32),
        mask=mask,
    )


def _f32_forward(base, pb):
    if pb.dtype != np.float64:
        return base.forward(pb)
    out, lse, w = base.forward(_as_float32(pb))
    return tuple(None if x is None else x.astype(np.float64) for x in (out, lse, w))


def _f32_backward(base, pb, out, lse, grad_out):
    if pb.dtype != np.float64:
        return base.backward(pb, out, lse, grad_out)
    grads = base.backward(_as_float32(pb), out.astype(np.float32), lse.astype(np.float32), grad_out.astype(np.float32))
    return tuple(g.astype(np.float64) for g in grads)


def _empty_rows_nan(base, pb):
    want = pb.want_lse
    out, lse, w = base.forward(replace(pb, return_lse=True) if not want else pb)
    empty = np.isneginf(lse)
    out = np.where(empty[..., None], np.nan, out).astype(out.dtype)  # 0/0 left as is
    if w is not None:
        w = np.where(empty[..., None], np.nan, w).astype(w.dtype)
    return out, lse if want else None, w


def _weights_after_dropout(base, pb):
    out, lse, w = base.forward(pb)
    if w is not None and pb.dropout_p > 0.0:
        w = (w * _keep(pb) / (1.0 - pb.dropout_p)).astype(w.dtype)
    return out, lse, w


def _dk_unscaled(base, pb, out, lse, grad_out):
    dq, dk, dv = base.backward(pb, out, lse, grad_out)
    return dq, (dk / dk.dtype.type(pb.scale)).astype(dk.dtype), dv


def _backward_without(**fields):
    def backward(base, pb, out, lse, grad_out):
        return base.backward(replace(pb, **fields), out, lse, grad_out)

    return backward


def _float_mask_scaled(pb):
    if pb.mask is None or pb.mask.dtype == bool:
        return pb
    return replace(pb, mask=(pb.mask * pb.mask.dtype.type(pb.scale)).astype(pb.mask.dtype))


def _bool_mask_inverted(pb):
    if pb.mask is None or pb.mask.dtype != bool:
        return pb
    return replace(pb, mask=~pb.mask)


def _scratch_in_query(base, pb):
    q = pb.query
    if q.flags.writeable and q.size:
        q *= q.dtype.type(2)  # "free" scratch space: the caller's array, scaled in place
        return base.forward(replace(pb, scale=pb.scale / 2))
    return base.forward(pb)


def _nan_to_zero(base, pb):
    out, lse, w = base.forward(pb)
    return np.nan_to_num(out, nan=0.0), lse, w


def _problem_mutant(rewrite: Callable) -> dict:
    """forward/backward hooks that run the base on ``rewrite(problem)``."""
    return dict(
        forward=lambda base, pb: base.forward(rewrite(pb)),
        backward=lambda base, pb, out, lse, g: base.backward(rewrite(pb), out, lse, g),
    )


_DROPOUT = lambda case: case.options.get("dropout_p", 0.0) > 0.0  # noqa: E731
_DROPOUT_TESTS = ("test_dropout_pattern_is_the_documented_hash", "test_dropout_known_answer_vectors")

_LIST = [
    Mutant(
        "lse-rounded-to-input-dtype",
        "the forward rounds lse to the input dtype (float16) before returning it as float32",
        _cases(lambda c: c.dtype == "float16"),
        forward=_lse_rounded,
    ),
    Mutant(
        "causal-band-off-by-one",
        "causal lets query i see one key past the bottom-right diagonal",
        _cases(lambda c: c.options.get("causal")),
        **_problem_mutant(_causal_off_by_one),
    ),
    Mutant(
        "causal-top-left",
        "causal aligned top-left (j <= i) instead of bottom-right (j <= i + M - N)",
        _cases(lambda c: c.options.get("causal")),
        **_problem_mutant(_causal_top_left),
    ),
    Mutant(
        "window-left-off-by-one",
        "a window reaches one key further to the left than asked",
        _cases(lambda c: "window" in c.options),
        **_problem_mutant(_window_off_by_one),
    ),
    Mutant(
        "dropout-no-rescale",
        "kept weights are not multiplied by 1 / (1 - p)",
        _cases(_DROPOUT),
        forward=_no_rescale_forward,
        backward=_no_rescale_backward,
    ),
    Mutant(
        "dropout-pattern-shifted",
        "the dropout counter of key j is j + 1 (pattern shifted by one key)",
        _either(_cases(_DROPOUT), _tests(*_DROPOUT_TESTS)),
        forward=_dropout_shift_forward,
        backward=_dropout_shift_backward,
    ),
    Mutant(
        "dropout-seed-high-word-ignored",
        "only the low 32 bits of the dropout seed are used",
        _either(_cases(_DROPOUT), _tests(*_DROPOUT_TESTS)),
        **_problem_mutant(_seed_low_word),
    ),
    Mutant(
        "dropout-batch-counter-restarts",
        "the batch·head counter restarts at 0 for every batch entry",
        _either(_cases(_DROPOUT), _tests(*_DROPOUT_TESTS)),
        forward=_batch_counter_forward,
        backward=_batch_counter_backward,
    ),
    Mutant(
        "backward-ignores-dropout",
        "the backward recomputes probabilities without the dropout pattern",
        _cases(_DROPOUT, ("test_vjp_matches_oracle",)),
        backward=_backward_without(dropout_p=0.0),
    ),
    Mutant(
        "weights-after-dropout",
        "return_weights gives the dropped, rescaled weights instead of the probabilities",
        _cases(_DROPOUT, ("test_lse_and_weights_match_oracle",)),
        forward=_weights_after_dropout,
    ),
    Mutant(
        "gqa-dkdv-one-group",
        "dK/dV summed over the first query head of each group only",
        _cases(lambda c: c.q_shape[-3] != c.k_shape[-3] if len(c.q_shape) > 2 else False, ("test_vjp_matches_oracle",)),
        backward=_gqa_one_group,
    ),
    Mutant(
        "mask-batch-broadcast",
        "every batch entry uses the mask of batch entry 0",
        _cases(_has_mask()),
        **_problem_mutant(_mask_batch_ignored),
    ),
    Mutant(
        "mask-head-broadcast",
        "every head uses the mask of head 0",
        _cases(_has_mask()),
        **_problem_mutant(_mask_heads_ignored),
    ),
    Mutant(
        "float-mask-scaled",
        "an additive mask is multiplied by the score scale",
        _cases(_has_mask("float")),
        **_problem_mutant(_float_mask_scaled),
    ),
    Mutant(
        "bool-mask-inverted",
        "a boolean mask is read as True = masked (PyTorch's key_padding_mask sense)",
        _cases(_has_mask("bool")),
        **_problem_mutant(_bool_mask_inverted),
    ),
    Mutant(
        "backward-ignores-mask",
        "the backward recomputes probabilities without the mask",
        _cases(_has_mask(), ("test_vjp_matches_oracle",)),
        backward=_backward_without(mask=None, mask_index=None),
    ),
    Mutant(
        "lse-sign",
        "lse returned with the wrong sign",
        _cases(lambda c: True, ("test_lse_and_weights_match_oracle",)),
        forward=_lse_sign,
    ),
    Mutant(
        "lse-base-2",
        "lse returned in base 2 (log2-sum-exp2), as a kernel computes it internally",
        _cases(lambda c: True, ("test_lse_and_weights_match_oracle",)),
        forward=_lse_base2,
    ),
    Mutant(
        "dk-unscaled",
        "dK misses the score scale factor",
        _cases(lambda c: True, ("test_vjp_matches_oracle",)),
        backward=_dk_unscaled,
    ),
    Mutant(
        "float64-computed-in-float32",
        "float64 inputs silently computed in float32",
        _cases(lambda c: c.dtype == "float64"),
        forward=_f32_forward,
        backward=_f32_backward,
    ),
    Mutant(
        "empty-rows-nan",
        "rows with nothing to attend give NaN (0/0) instead of 0",
        _either(
            _cases(lambda c: c.mask_rows_off or "empty" in c.name or c.name in ("m0", "window-zero")),
            _tests("test_fully_masked_rows_are_exact_zeros"),
        ),
        forward=_empty_rows_nan,
    ),
    Mutant(
        "nan-not-propagated",
        "NaN in the output replaced by 0",
        _tests(
            "test_nan_in_a_query_row_propagates_only_to_that_row",
            "test_nan_in_an_attended_value_row_reaches_its_queries",
        ),
        forward=_nan_to_zero,
    ),
    Mutant(
        "query-used-as-scratch",
        "the caller's query array is scaled in place",
        _cases(lambda c: c.layout == "contiguous" and c.name == "odd-sizes", ("test_forward_matches_oracle",)),
        forward=_scratch_in_query,
    ),
]

#: Every planted bug, by name.
MUTANTS: dict[str, Mutant] = {m.name: m for m in _LIST}

#: The unmodified wrapper: must pass whatever the mutants are run against.
CONTROL = Mutant(
    "control",
    "no bug: the base backend unchanged, through the same wrapper",
    lambda name, case: any(m.targets(name, case) for m in _LIST),
)


def build(base=None, names=None, prefix: str = "mutant-") -> dict[str, MutantBackend]:
    """Mutant backends of ``base`` (default: the NumPy backend), keyed by registered name.

    ``names`` picks mutants (default: all); the :data:`CONTROL` wrapper is
    always included, as ``prefix + "control"``. ``base`` must consume NumPy
    arrays (the mutants post-process NumPy results).
    """
    if base is None:
        from ..backends.numpy_ import backend as base
    if base.capabilities.array_type != "numpy":
        raise ValueError(f"mutants wrap NumPy-array backends; {base!r} consumes {base.capabilities.array_type} arrays")
    chosen = [MUTANTS[n] for n in (names if names is not None else MUTANTS)] + [CONTROL]
    return {prefix + m.name: MutantBackend(base, m, prefix + m.name) for m in chosen}


@contextlib.contextmanager
def registered(backends: dict) -> Iterator[list[str]]:
    """Register backend objects under the given names for the duration of the block.

    They are listed by :func:`selfattn.list_backends` and reachable with
    ``backend=NAME`` (automatic selection never picks them: priority 10**6).
    Names already registered are refused with ``ValueError``.
    """
    from .._dispatch import _Entry, registry

    entries = registry.entries()
    taken = sorted(set(backends) & set(entries))
    if taken:
        raise ValueError(f"backend name(s) already registered: {', '.join(taken)}")
    for name, backend in backends.items():
        entries[name] = _Entry(
            name=name,
            source="selfattn.testing.mutants",
            priority=_PRIORITY,
            array_type=backend.capabilities.array_type,
            backend=backend,
            availability=(True, ""),
        )
    try:
        yield list(backends)
    finally:
        for name in backends:
            entries.pop(name, None)


@dataclass
class Kill:
    """The first conformance test that failed for a mutant (``test`` is its pytest node id)."""

    test: str
    message: str


class _Harness:
    """pytest plugin for the in-process run: keeps each mutant's targets, records the first failure."""

    def __init__(self, backends: dict[str, MutantBackend], targeted: bool):
        self.backends, self.targeted = backends, targeted
        self.kills: dict[str, Kill] = {}
        self.ran: dict[str, int] = dict.fromkeys(backends, 0)
        self.items: dict[str, str] = {}

    def pytest_collection_modifyitems(self, session, config, items):
        keep, drop = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            name = str(params.get("selfattn_backend"))
            be = self.backends.get(name)
            if be is None:
                drop.append(item)
                continue
            test = getattr(item, "originalname", None) or item.name.split("[")[0]
            if self.targeted and not be.mutant.targets(test, params.get("case")):
                drop.append(item)
                continue
            self.items[item.nodeid] = name
            keep.append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep

    def pytest_runtest_setup(self, item):
        # One kill is enough: the rest of a killed mutant's tests are skipped to keep the run short.
        name = self.items.get(item.nodeid)
        if name in self.kills:
            import pytest

            pytest.skip(f"{name} already killed by {self.kills[name].test}")

    def pytest_runtest_logreport(self, report):
        name = self.items.get(report.nodeid)
        if name is None:
            return
        if report.when == "call":
            self.ran[name] += 1
        if report.failed and name not in self.kills:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
            self.kills[name] = Kill(report.nodeid, message.splitlines()[0][:200])


def run(base=None, names=None, *, targeted: bool = True, pytest_args: tuple = ()) -> dict[str, Kill | None]:
    """Run the conformance suite in-process against mutants of ``base``.

    Returns ``{mutant name: Kill or None}`` (None: the mutant survived), with
    the :data:`CONTROL` wrapper under ``"control"`` (it must map to None).
    ``targeted`` runs only each mutant's :attr:`Mutant.targets`; False runs the
    whole suite against every mutant. Raises ``RuntimeError`` if pytest could
    not run the suite at all, or if a mutant ran no test.
    """
    import pytest

    backends = build(base, names)
    harness = _Harness(backends, targeted)
    with registered(backends):
        # --noconftest: a conftest.py near the working directory (this project's tests/ has one) must not
        # reset the registry under the mutants; the suite itself needs none.
        args = [
            "--pyargs",
            "selfattn.testing",
            "--noconftest",
            "-qq",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "--tb=no",
            "-rN",
            "--no-summary",
            "-W",
            "ignore::pytest.PytestAssertRewriteWarning",
            f"--selfattn-backend={','.join(backends)}",
            *pytest_args,
        ]
        code = pytest.main(args, plugins=[harness])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        raise RuntimeError(f"pytest could not run the conformance suite (exit code {code!s})")
    idle = [n for n, count in harness.ran.items() if count == 0]
    if idle:
        raise RuntimeError(f"no conformance test ran against {', '.join(idle)}")
    return {be.mutant.name: harness.kills.get(name) for name, be in backends.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m selfattn.testing.mutants``: print which test kills each mutant; exit 1 if any survives."""
    import argparse

    import selfattn

    parser = argparse.ArgumentParser(prog="python -m selfattn.testing.mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="numpy", help="registered backend to plant the bugs in (default: numpy)")
    parser.add_argument("--mutant", action="append", help="only this mutant (repeatable)")
    parser.add_argument("--all-tests", action="store_true", help="run the whole suite per mutant, not its targets")
    args = parser.parse_args(argv)
    kills = run(selfattn.get_backend(args.base), args.mutant, targeted=not args.all_tests)
    width = max(map(len, kills))
    survivors = 0
    for name, kill in kills.items():
        if name == CONTROL.name:
            status = "FAILED " + kill.test if kill else "passes (as it must)"
        else:
            status = f"killed by {kill.test}\n{'':{width + 2}}{kill.message}" if kill else "SURVIVED"
        survivors += (kill is None) != (name == CONTROL.name)
        print(f"{name:<{width}}  {status}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
