"""``python -m selfattn bench``: every available backend side by side, plus the automatic choice.

Two sections:

* **attention** -- :func:`selfattn.scaled_dot_product_attention` on the
  standard shapes (:mod:`selfattn._bench.shapes`: prefill, decode, GQA, ...),
  once per backend with ``backend=NAME`` and once with no ``backend=`` (the
  row ``auto``). Each round calls every backend once, in order, after a short
  pause (``--pause``, 0.15 s) so that OpenBLAS's worker threads, which keep
  spinning for about 0.1 s after a call, do not tax the backend timed next.
* **pipeline** -- :class:`selfattn.nn.MultiHeadAttention` and
  :class:`selfattn.nn.TransformerEncoderLayer` forwards at tutorial sizes and a
  toy attention call, timed back to back with no pause, as a user's loop runs
  them (the layer's own NumPy matrix products, then attention).
* **features** (``--features``) -- a packed variable-length batch
  (:func:`selfattn.scaled_dot_product_attention_varlen`, 32 skewed sequences)
  against the same batch padded with a key mask, and plain attention against
  ``softcap``, ALiBi and both, per backend that declares them. Rows are
  ``BACKEND VARIANT``; "vs best" is relative to the group's reference row
  (``padded``, ``plain``) instead of the fastest one.

Every row reports the median and the interquartile range of its timed calls,
GFLOP/s and the ratio to this machine's ``numpy.matmul`` (measured at the
start), the ratio to the fastest backend for the same problem, the first call
in this process (including any JIT compile or compiled-cache load), the peak
extra resident memory of one call and the largest difference to the NumPy
backend's result. ``*`` marks the backend that :func:`selfattn.explain` names
for the call (for layers: for the layer's attention call).

Tables and the progress bar use ``rich`` (``pip install 'selfattn[bench]'``);
output that is not a terminal, and any run with ``--json``, gets a plain
layout (no box, no colour) that is easy to read in a log or to grep.

Exit status: 0 on success, 1 if some backend disagrees with NumPy beyond the
tolerance, 2 on a usage error (an unknown backend, ``--plot`` without
matplotlib, ``rich`` missing).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from . import shapes as _shapes
from .timing import interleaved_samples, matmul_gflops, peak_rss_delta, spread

__all__ = ["main", "run", "render", "plot", "TOLERANCE", "PAUSE_S"]

#: Max abs difference to the NumPy backend accepted per dtype (outputs are O(1)).
TOLERANCE = {"float16": 2e-2, "float32": 2e-4, "float64": 1e-10}

#: Seconds of sleep before each timed attention call (longer than OpenBLAS's ~0.1 s spin after a call).
PAUSE_S = 0.15

#: A row whose automatic choice is at most this factor slower than the fastest backend counts as "matched".
AUTO_SLACK = 1.05

_AUTO = "auto"


# --------------------------------------------------------------------------------------------- environment facts


def _cpu_model() -> str:
    """The processor's marketing name (Linux ``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str | None:
    """Short hash of the git checkout selfattn is imported from (``+dirty`` with local edits), or None."""
    import selfattn

    src = os.path.dirname(os.path.abspath(selfattn.__file__))
    try:
        head = subprocess.run(
            ["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _release_heap() -> None:
    """Give freed heap back to the OS so a later peak-RSS reading sees a call's real footprint.

    glibc keeps freed blocks (its mmap threshold grows after large frees), so
    without this a repeated call reuses resident pages and shows ~0 extra.
    """
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _backend_io(record) -> tuple[Callable, Callable, Callable[[Any], Any]]:
    """``(to_backend, to_numpy, finish)`` for a backend's array library; ``finish(result)`` ends a timed call."""
    array_type = getattr(record.capabilities, "array_type", "numpy")
    if array_type == "numpy":
        return (lambda a: a), (lambda a: a), (lambda r: r)
    if array_type == "cupy":
        import cupy

        def sync(result: Any) -> Any:
            cupy.cuda.Device().synchronize()
            return result

        return cupy.asarray, cupy.asnumpy, sync
    if array_type == "dask":
        import dask.array as da

        # Dask results are lazy: the timed call computes them (default scheduler), as a CuPy call synchronises.
        return da.from_array, (lambda a: a), (lambda r: r.compute())
    raise NotImplementedError(f"unknown array type {array_type!r}")


# --------------------------------------------------------------------------------------------------- the plan


def _select(args) -> tuple[list, list]:
    """``(attention shapes, pipeline steps)`` to run for parsed ``args``."""
    if args.shapes:
        names = [n.strip() for n in args.shapes.split(",") if n.strip()]
        unknown = [n for n in names if n not in _shapes.BY_NAME]
        if unknown:
            raise SystemExit(f"unknown shape(s) {unknown}; known: {sorted(_shapes.BY_NAME)}")
        chosen = [_shapes.BY_NAME[n] for n in names]
        return (
            [s for s in chosen if isinstance(s, _shapes.Shape)],
            [s for s in chosen if isinstance(s, _shapes.Pipeline)],
        )
    if args.tiny:
        attention, pipeline = list(_shapes.BENCH_TINY), list(_shapes.PIPELINE_TINY)
    elif args.quick:
        attention, pipeline = list(_shapes.BENCH_QUICK), list(_shapes.PIPELINE)
    else:
        attention, pipeline = list(_shapes.BENCH_STANDARD), list(_shapes.PIPELINE)
    return attention, ([] if args.no_pipeline else pipeline)


class _NoPick:
    """Stands in for an :class:`~selfattn.Explanation` where a group compares variants, not backends."""

    backend = None
    error = None


def _feature_groups(backends, args) -> list[tuple[dict, list, float, str]]:
    """``(base row, candidates, flops, reference label)`` per feature group: varlen vs padded, logit options.

    One group per backend (NumPy-array backends; the packed call takes NumPy
    arrays) and feature, so the reference row is that backend's own plain call.
    """
    import selfattn

    groups: list[tuple[dict, list, float, str]] = []
    vs = _shapes.VARLEN_TINY if args.tiny else (_shapes.VARLEN_QUICK if args.quick else _shapes.VARLEN)
    q, k, v, cu, *padded, key_mask = vs.inputs(args.dtype)
    logits = _shapes.LOGITS_TINY if args.tiny else (_shapes.LOGITS_QUICK if args.quick else _shapes.LOGITS)
    lq, lk, lv = _shapes.make_inputs(logits, args.dtype)
    slopes = (2.0 ** -np.arange(1, logits.heads + 1)).astype(np.float32)  # ALiBi's geometric slopes
    variants: dict[str, dict[str, Any]] = {"plain": {}, "softcap": {"softcap": 30.0}, "alibi": {"alibi_slopes": slopes}}
    variants["softcap+alibi"] = {**variants["softcap"], **variants["alibi"]}
    for rec in backends:
        caps = rec.capabilities
        if getattr(caps, "array_type", "numpy") != "numpy":
            continue
        name = rec.name
        if {"varlen", "bool_mask", "causal"} <= set(caps.features):

            def packed(name=name):
                return selfattn.scaled_dot_product_attention_varlen(q, k, v, cu, cu, causal=True, backend=name)

            def pad(name=name):
                qp, kp, vp = padded
                return selfattn.scaled_dot_product_attention(qp, kp, vp, mask=key_mask, causal=True, backend=name)

            cands = [_Candidate(f"{name} packed", packed, np.asarray, True)]
            cands.append(_Candidate(f"{name} padded", pad, np.asarray, True))
            base = {"section": "features", "shape": f"{vs.name} {name}", "kind": "varlen", "dims": vs.label}
            groups.append((base, cands, vs.flops(causal=True), f"{name} padded"))
        usable = [lab for lab in variants if all(f in caps.features for f in lab.split("+") if f != "plain")]
        if len(usable) > 1:
            cands = []
            for lab in usable:

                def call(name=name, kw=variants[lab]):
                    return selfattn.scaled_dot_product_attention(lq, lk, lv, backend=name, **kw)

                cands.append(_Candidate(f"{name} {lab}", call, np.asarray, True))
            base = {"section": "features", "shape": f"{logits.name} {name}", "kind": "logits", "dims": logits.label}
            groups.append((base, cands, logits.flops(), f"{name} plain"))
    return groups


@dataclass
class _Candidate:
    """One row of a group: a backend (or the automatic choice) and its zero-argument call."""

    label: str
    call: Callable[[], Any]
    to_numpy: Callable[[Any], np.ndarray]
    numpy_arrays: bool


def _attention_group(shape, backends, args):
    """Inputs, candidates and the automatic pick for one attention shape."""
    import selfattn

    q, k, v = _shapes.make_inputs(shape, args.dtype)
    cands = []
    for rec in backends:
        to_b, to_np, finish = _backend_io(rec)
        qb, kb, vb = to_b(q), to_b(k), to_b(v)

        def call(qb=qb, kb=kb, vb=vb, name=rec.name, finish=finish):
            return finish(selfattn.scaled_dot_product_attention(qb, kb, vb, causal=args.causal, backend=name))

        cands.append(_Candidate(rec.name, call, to_np, getattr(rec.capabilities, "array_type", "numpy") == "numpy"))
    cands.append(
        _Candidate(_AUTO, lambda: selfattn.scaled_dot_product_attention(q, k, v, causal=args.causal), np.asarray, True)
    )
    return cands, selfattn.explain(q, k, v, causal=args.causal)


def _layer_attention_inputs(mha, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``(q, k, v)`` a :class:`~selfattn.nn.MultiHeadAttention` self-attention call passes to attention.

    Follows the computation its docstring documents (``x @ W.T + b``, split
    into heads as a transposed view), so :func:`selfattn.explain` sees the
    same shapes, dtype and strides as the layer's own call.
    """
    p = mha.params
    b, n, _ = x.shape

    def proj(name: str, heads: int) -> np.ndarray:
        y = x @ p[f"{name}_weight"].T
        if f"{name}_bias" in p:
            y = y + p[f"{name}_bias"]
        return y.reshape(b, n, heads, mha.head_dim).transpose(0, 2, 1, 3)

    return proj("q", mha.num_heads), proj("k", mha.kv_heads), proj("v", mha.kv_heads)


def _pipeline_group(step, backends, args):
    """Candidates and the automatic pick for one pipeline step (NumPy-array backends only)."""
    import selfattn
    from selfattn.nn import MultiHeadAttention, TransformerEncoderLayer

    rng = np.random.default_rng(0)
    x = rng.standard_normal(step.input_shape, dtype=np.float32).astype(args.dtype)
    causal = args.causal
    if step.layer == "attention":

        def make(name):
            return lambda: selfattn.scaled_dot_product_attention(x, x, x, causal=causal, backend=name)

        explanation = selfattn.explain(x, x, x, causal=causal)
    else:
        layer: MultiHeadAttention | TransformerEncoderLayer
        if step.layer == "mha":
            mha = layer = MultiHeadAttention(step.embed, step.heads, dtype=args.dtype, seed=0)
        else:
            enc = layer = TransformerEncoderLayer(step.embed, step.heads, step.ff, dtype=args.dtype, seed=0)
            mha = enc.self_attn  # post-norm (the default): attention sees x itself

        def make(name):
            return lambda: layer(x, causal=causal, backend=name)

        explanation = selfattn.explain(*_layer_attention_inputs(mha, x), causal=causal)
    cands = [_Candidate(rec.name, make(rec.name), np.asarray, True) for rec in backends]
    cands.append(_Candidate(_AUTO, make(None), np.asarray, True))
    return cands, explanation


def _rounds_for(budget: float | None, round_s: float, rounds: tuple[int, int]) -> int:
    """How many rounds fit in ``budget`` seconds when one round takes ``round_s`` (within ``rounds = (lo, hi)``)."""
    lo, hi = rounds
    if budget is None or round_s <= 0:
        return hi
    return max(lo, min(hi, int(budget / round_s)))


def _measure_group(cands, explanation, base_row, flops, rounds, pause, ceiling, tol, tick, budget=None, reference=None):
    """First calls, agreement with numpy, interleaved timing and peak memory of one group; returns its rows.

    ``rounds`` is ``(fewest, most)``; with ``budget`` (seconds) the group gets as
    many rounds as fit in it, judged from one warm-up call of each candidate,
    else the most. ``tick(n)`` advances the progress bar (``most + 1`` per candidate).
    ``reference`` (a candidate label): "vs best" is relative to that row instead
    of the fastest, and results are not compared with a ``numpy`` row.
    """
    most = rounds[1]
    pick = explanation.backend
    rows, ok, ref = [], [], None
    for cand in cands:
        row = dict(
            base_row,
            backend=cand.label,
            auto_choice=(cand.label == pick) if cand.label != _AUTO else None,
            picks=pick if cand.label == _AUTO else None,
        )
        if cand.label == _AUTO and pick is None:
            row["picks_error"] = explanation.error
        try:
            t0 = time.perf_counter()
            result = np.asarray(cand.to_numpy(cand.call()))
            row["first_call_s"] = time.perf_counter() - t0  # includes any JIT compile or cache load
        except Exception as exc:  # keep going; the row reports the failure
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["agrees"] = False
            rows.append(row)
            tick(most + 1)
            continue
        if cand.label == "numpy" and reference is None:
            ref = result
        if ref is None or cand.label == "numpy":
            row["max_abs_diff"], row["agrees"] = None, None
        else:
            diff = float(np.max(np.abs(result.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
            row["max_abs_diff"], row["agrees"] = diff, bool(diff <= tol)
        rows.append(row)
        ok.append((cand, row))
        tick(1)
    if ok:
        round_s = 0.0
        for cand, row in ok:  # the warm-up call: also measures peak memory, and is timed to size the rounds
            _release_heap()
            t0 = time.perf_counter()
            if cand.numpy_arrays:
                row["peak_extra_bytes"] = peak_rss_delta(cand.call)
            else:  # device memory is not resident memory: not measured
                cand.call()
                row["peak_extra_bytes"] = None
            dt = time.perf_counter() - t0
            round_s += pause + 2 * dt if pause > 0 else dt  # with a pause: the pause, a wake-up and the timed call
        n_rounds = _rounds_for(budget, round_s, rounds)
        tick((most - n_rounds) * len(ok))
        samples = interleaved_samples(
            [c.call for c, _ in ok],
            rounds=n_rounds,
            warmup=0,
            pause=pause,
            wake=pause > 0,
            after_round=lambda _: tick(len(ok)),
        )
        for (_, row), ts in zip(ok, samples, strict=True):
            st = spread(ts)
            row.update(
                median_s=st["median"],
                p25_s=st["p25"],
                p75_s=st["p75"],
                samples=len(ts),
                iqr_rel=(st["p75"] - st["p25"]) / st["median"] if st["median"] > 0 else 0.0,
            )
            row["gflops"] = flops / st["median"] / 1e9 if st["median"] > 0 else float("inf")
            row["ratio_to_matmul"] = row["gflops"] / ceiling
        named = [r["median_s"] for c, r in ok if c.label != _AUTO]
        best = min(named) if named else None
        if reference is not None:
            best = next((r["median_s"] for c, r in ok if c.label == reference), None)
        for _, row in ok:
            row["vs_best"] = row["median_s"] / best if best else None
    return rows


def run(args, out: TextIO | None = None) -> dict:
    """Run the comparison described by parsed ``args``; return the JSON-able report dict."""
    import selfattn

    records = selfattn.list_backends()
    wanted = None
    if args.backends:
        wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
        known = {r.name for r in records}
        unknown = [b for b in wanted if b not in known]
        if unknown:
            raise SystemExit(f"unknown backend(s) {unknown}; known: {sorted(known)}")
    backends, skipped = [], []
    for r in records:
        if wanted is not None and r.name not in wanted:
            continue
        if not r.available:
            skipped.append({"backend": r.name, "reason": r.reason})
        elif r.capabilities is None:
            skipped.append({"backend": r.name, "reason": "declares no capabilities"})
        elif args.dtype not in r.capabilities.dtypes:
            skipped.append({"backend": r.name, "reason": f"no {args.dtype} support"})
        else:
            backends.append(r)
    # numpy first: it is the reference every other backend is compared with
    backends.sort(key=lambda r: (r.name != "numpy", r.priority))
    layer_backends = [r for r in backends if getattr(r.capabilities, "array_type", "numpy") == "numpy"]

    attention, pipeline = _select(args)
    if pipeline:
        for r in backends:
            if r not in layer_backends:
                array_type = getattr(r.capabilities, "array_type", "?")
                skipped.append(
                    {
                        "backend": r.name,
                        "reason": "pipeline section skipped: the layers take NumPy "
                        f"arrays and {r.name} consumes {array_type} arrays",
                    }
                )
    n_mm = 256 if args.tiny else (1024 if args.quick else 2048)
    mm_dtype = np.dtype(args.dtype) if args.dtype != "float16" else np.dtype(np.float32)
    ceiling = matmul_gflops(n=n_mm, dtype=mm_dtype, repeat=3 if (args.tiny or args.quick) else 7)
    # back-to-back calls are short: up to 3x the rounds, as many as fit in the budget (a large layer on a busy
    # machine would otherwise take minutes)
    pipe_rounds = (max(3, args.repeat // 3), 3 * args.repeat)
    pipe_budget = 1.5 if (args.quick or args.tiny) else 4.0
    features = _feature_groups(backends, args) if args.features else []
    total = len(attention) * (len(backends) + 1) * (args.repeat + 1) + len(pipeline) * (len(layer_backends) + 1) * (
        pipe_rounds[1] + 1
    )
    total += sum(len(cands) for _, cands, _, _ in features) * (args.repeat + 1)
    tol = TOLERANCE[args.dtype]

    rows = []
    with _progress(args.progress, total) as advance:
        for shape in attention:
            cands, expl = _attention_group(shape, backends, args)
            base = {
                "section": "attention",
                "shape": shape.name,
                "kind": shape.kind,
                "dims": shape.label,
                "batch": shape.batch,
                "heads": shape.heads,
                "kv_heads": shape.hkv,
                "n": shape.n,
                "m": shape.m,
                "d": shape.d,
                "dtype": args.dtype,
                "causal": args.causal,
            }
            advance(0, f"attention {shape.name}")
            rows += _measure_group(
                cands,
                expl,
                base,
                shape.flops(args.causal),
                (args.repeat, args.repeat),
                args.pause,
                ceiling,
                tol,
                advance,
            )
        for step in pipeline:
            cands, expl = _pipeline_group(step, layer_backends, args)
            base = {
                "section": "pipeline",
                "shape": step.name,
                "kind": "pipeline",
                "dims": step.label,
                "layer": step.layer,
                "batch": step.batch,
                "n": step.n,
                "embed": step.embed,
                "heads": step.heads,
                "ff": step.ff,
                "dtype": args.dtype,
                "causal": args.causal,
            }
            advance(0, f"pipeline {step.name}")
            rows += _measure_group(
                cands, expl, base, step.flops(args.causal), pipe_rounds, 0.0, ceiling, tol, advance, budget=pipe_budget
            )
        for base, cands, flops, reference in features:
            advance(0, f"features {base['shape']}")
            base = dict(base, dtype=args.dtype, causal=base["kind"] == "varlen")
            rows += _measure_group(
                cands,
                _NoPick(),
                base,
                flops,
                (args.repeat, args.repeat),
                args.pause,
                ceiling,
                tol,
                advance,
                reference=reference,
            )

    timed = [r for r in rows if r["backend"] == _AUTO and r.get("vs_best") is not None]
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
            "matmul_gflops": ceiling,
            "matmul_n": n_mm,
            "matmul_dtype": str(mm_dtype),
        },
        "selfattn": getattr(selfattn, "__version__", "?"),
        "commit": _commit(),
        "dtype": args.dtype,
        "causal": args.causal,
        "tolerance": tol,
        "method": {
            "rounds": args.repeat,
            "pipeline_rounds": list(pipe_rounds),
            "pipeline_budget_s": pipe_budget,
            "pause_s": args.pause,
            "order": [r.name for r in backends] + [_AUTO],
        },
        "backends": [r.name for r in backends],
        "skipped": skipped,
        "results": rows,
        "agreement_ok": all(r.get("agrees") is not False for r in rows),
        "auto_within_slack": sum(r["vs_best"] <= AUTO_SLACK for r in timed),
        "auto_rows": len(timed),
    }


# ------------------------------------------------------------------------------------------------- progress bar


class _progress:
    """Context manager yielding ``advance(steps, description=None)``: a rich bar on stderr, or nothing.

    ``enabled=None`` draws it when stderr is a terminal; ``True`` always draws it
    (``--progress``: also into a pipe or a log), ``False`` never.
    """

    def __init__(self, enabled: bool | None, total: int):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.force = enabled is True
        self.total = total
        self._bar: Any = None  # a rich.progress.Progress while drawing

    def __enter__(self):
        if not self.enabled:
            return lambda steps=1, description=None: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True, force_terminal=self.force or None),
            transient=True,
        )
        self._bar.start()
        task = self._bar.add_task("bench", total=self.total)

        def advance(steps: int = 1, description: str | None = None) -> None:
            kw = {"description": description} if description else {}
            self._bar.update(task, advance=steps, **kw)

        return advance

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


# ------------------------------------------------------------------------------------------------------ output


def _fmt_s(s: float | None) -> str:
    """Seconds with three significant digits in the unit that suits them."""
    if s is None:
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1.0:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def _fmt_bytes(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


_COLUMNS = (
    "backend",
    "shape",
    "median",
    "IQR",
    "GFLOP/s",
    "x matmul",
    "vs best",
    "1st call",
    "peak extra",
    "max|diff|",
    "auto",
)


def _cells(r: dict) -> tuple[str, ...]:
    auto = ("-> " + (r["picks"] or "error")) if r["backend"] == _AUTO else ("*" if r.get("auto_choice") else "")
    if "error" in r:
        return (r["backend"], r["dims"], "ERROR", "", "", "", "", "", "", r["error"][:70], auto)
    if r["backend"] == "numpy":
        diff = "ref"
    elif r["max_abs_diff"] is None:
        diff = "n/a"
    else:
        diff = f"{r['max_abs_diff']:.1e}" + ("" if r["agrees"] else " FAIL")
    vs = "" if r.get("vs_best") is None else f"{r['vs_best']:.2f}"
    return (
        r["backend"],
        r["dims"],
        _fmt_s(r["median_s"]),
        f"{100 * r['iqr_rel']:.0f}%",
        f"{r['gflops']:.3g}",
        f"{r['ratio_to_matmul']:.3f}",
        vs,
        _fmt_s(r["first_call_s"]),
        _fmt_bytes(r["peak_extra_bytes"]),
        diff,
        auto,
    )


def _legend(report: dict) -> list[str]:
    m = report["method"]
    order = ", ".join(m["order"])
    return [
        "Columns: median = median wall time of the timed calls; IQR = interquartile range (p75 - p25) of those "
        "calls as a share of the median;",
        "  GFLOP/s = forward FLOPs / median; x matmul = that over numpy.matmul's GFLOP/s above; vs best = median / "
        "the fastest backend's median on the same row group;",
        "  1st call = the first call of that row in this process, including any JIT compile or compiled-cache load "
        "it triggers (later rows reuse compiled kernels);",
        "  peak extra = resident memory one call adds; max|diff| = largest difference to the numpy backend's result;",
        "  auto: the row 'auto' is the call with no backend= argument ('-> NAME' = what it runs); '*' marks the "
        "backend selfattn.explain() names for the call (layers: for their attention call).",
        f"Method: each round calls every backend once, in order ({order}). Attention rows: {m['rounds']} round(s), "
        + (f"a {m['pause_s']:g} s pause before each timed call" if m["pause_s"] > 0 else "NO pause (--pause 0)"),
        (
            "  so OpenBLAS's spinning worker threads (about 0.1 s after each call) do not tax the next backend, "
            "then one untimed call of the same backend so its own threads are awake, as in a loop."
            if m["pause_s"] > 0
            else "  so a backend may run while the previous one's threads still spin (OpenBLAS: ~0.1 s after a call)."
        ),
        f"  Pipeline rows: {m['pipeline_rounds'][0]}-{m['pipeline_rounds'][1]} rounds (as many as fit in about "
        f"{m['pipeline_budget_s']:g} s per row group), back to back, no pause, as a user's loop runs them (the "
        "layer's own NumPy matrix products, then attention).",
    ] + (
        [
            "  Feature rows (--features): timed like attention rows; 'vs best' is relative to the group's reference "
            "row (BACKEND padded, BACKEND plain); GFLOP/s counts useful work only (varlen: 4·H·D·sum(N_b^2)/2, "
            "causal) for both layouts."
        ]
        if any(r["section"] == "features" for r in report["results"])
        else []
    )


def _summary(report: dict) -> list[str]:
    lines = [f"skipped {s['backend']}: {s['reason']}" for s in report["skipped"]]
    if report["auto_rows"]:
        slow = [
            f"{r['shape']} ({r['vs_best']:.2f}x)"
            for r in report["results"]
            if r["backend"] == _AUTO and r.get("vs_best") is not None and r["vs_best"] > AUTO_SLACK
        ]
        lines.append(
            f"automatic choice within {AUTO_SLACK:.2f}x of the fastest backend on "
            f"{report['auto_within_slack']} of {report['auto_rows']} row groups"
            + (f"; slower on {', '.join(slow)}" if slow else "")
        )
    verdict = "all backends agree with numpy" if report["agreement_ok"] else "DISAGREEMENT with numpy"
    lines.append(f"{verdict} (tolerance max|diff| <= {report['tolerance']:g} for {report['dtype']})")
    return lines


def _header(report: dict) -> str:
    m = report["machine"]
    commit = f" @ {report['commit']}" if report.get("commit") else ""
    return (
        f"selfattn {report['selfattn']}{commit} bench: dtype={report['dtype']} causal={report['causal']}; "
        f"{m['cpu']}, {m['cpus']} CPU(s); numpy.matmul ({m['matmul_n']}^2 {m['matmul_dtype']}) = "
        f"{m['matmul_gflops']:.1f} GFLOP/s"
    )


def render(report: dict, out: TextIO | None = None, fancy: bool | None = None) -> None:
    """Print the report's tables, legend and verdict to ``out`` (default: stdout).

    ``fancy`` (default: ``out`` is a terminal) draws boxed, coloured rich tables;
    otherwise the layout is plain: aligned columns, no box characters, no colour.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    out = sys.stdout if out is None else out
    fancy = out.isatty() if fancy is None else fancy
    buf = None if fancy else io.StringIO()
    if fancy:
        console = Console(file=out, highlight=False, soft_wrap=False)
    else:  # wide enough that no cell wraps; rendered into buf, trailing padding stripped below
        console = Console(
            file=buf, highlight=False, soft_wrap=False, width=400, no_color=True, force_terminal=False, emoji=False
        )
    console.print(_header(report), markup=False)
    for section in ("attention", "pipeline", "features"):
        rows = [r for r in report["results"] if r["section"] == section]
        if not rows:
            continue
        table = Table(
            title=f"{section}" if fancy else None,
            box=box.SIMPLE_HEAD if fancy else None,
            show_edge=fancy,
            pad_edge=False,
            header_style="bold" if fancy else "",
        )
        for i, col in enumerate(_COLUMNS):
            table.add_column(col, justify="left" if i < 2 or col == "auto" else "right", no_wrap=True)
        prev = None
        for r in rows:
            if fancy and prev is not None and r["shape"] != prev:
                table.add_section()
            prev = r["shape"]
            style = "bold" if fancy and (r["backend"] == _AUTO) else None
            table.add_row(*_cells(r), style=style)
        if not fancy:
            console.print(f"\n[{section}]", markup=False)
        console.print(table)
    for line in _legend(report) + _summary(report):
        console.print(line, markup=False)
    if buf is not None:  # plain: no trailing padding on any line
        out.write("\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n")


# ---------------------------------------------------------------------------------------------------------- plot

_FAMILY_TITLES = {
    "dispatch": "dispatch",
    "prefill": "prefill (N = M)",
    "decode": "decode (N = 1)",
    "gqa": "GQA (grouped K/V heads)",
    "long": "long sequences",
    "pipeline": "pipeline (layers, toy)",
    "varlen": "packed variable-length batch vs padded (useful GFLOP/s)",
    "logits": "softcap / ALiBi vs plain",
}


def plot(report: dict, path: str) -> list[str]:
    """One panel per shape family that ran: GFLOP/s (median bar, IQR whiskers) per backend and the auto row.

    Every timed row of the report appears; the figure is titled with the
    machine, the commit and the ``numpy.matmul`` reference (the dashed line in
    every panel). Each row group's label says which backend the automatic
    choice ran. Returns the families drawn, one per panel, top to bottom.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    timed = [r for r in report["results"] if "median_s" in r]
    families = [k for k in _FAMILY_TITLES if any(r["kind"] == k for r in timed)]
    families += sorted({r["kind"] for r in timed} - set(families))
    if not families:
        raise ValueError("nothing was timed: no panel to draw")

    def series(row: dict) -> str:
        """The bar's legend entry: the backend, or for feature rows ('numba packed') the variant."""
        return row["backend"].split(" ", 1)[1] if row.get("section") == "features" else row["backend"]

    labels = list(dict.fromkeys([*report["backends"], _AUTO, *(series(r) for r in timed)]))
    colors = {name: f"C{i % 10}" for i, name in enumerate(labels)}
    groups_of = {fam: list(dict.fromkeys(r["shape"] for r in timed if r["kind"] == fam)) for fam in families}
    heights = [0.6 + 0.25 * sum(r["kind"] == fam for r in timed) for fam in families]  # rows (bars) per panel
    fig, axes = plt.subplots(
        len(families),
        1,
        figsize=(10, 1.6 + sum(heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
        layout="constrained",
    )
    mm = report["machine"]["matmul_gflops"]
    for ax, fam in zip(axes[:, 0], families, strict=True):
        rows = [r for r in timed if r["kind"] == fam]
        groups = groups_of[fam]
        ticks = []
        for g, shape in enumerate(groups):
            members = sorted((r for r in rows if r["shape"] == shape), key=lambda r: labels.index(series(r)))
            bar_h = 0.8 / len(members)
            for j, row in enumerate(members):
                name = series(row)
                gflop = row["gflops"] * row["median_s"]
                # the slower quartile gives the lower rate; max() absorbs rounding when a quartile is the median
                lo = max(0.0, row["gflops"] - gflop / row["p75_s"])
                hi = max(0.0, gflop / row["p25_s"] - row["gflops"])
                ax.barh(
                    [g + (j - (len(members) - 1) / 2) * bar_h],
                    [row["gflops"]],
                    bar_h,
                    xerr=[[lo], [hi]],
                    capsize=2,
                    color=colors[name],
                    label=name,
                    hatch="//" if name == _AUTO else None,
                    edgecolor="black" if name == _AUTO else None,
                )
            first = members[0]
            auto = next((r for r in members if r["backend"] == _AUTO), None)
            pick = f"\n(auto -> {auto['picks']})" if auto is not None and auto.get("picks") else ""
            owner = f"\n{first['backend'].split(' ', 1)[0]}" if first.get("section") == "features" else ""
            ticks.append(first["dims"].replace(": ", ":\n", 1) + owner + pick)
        ax.set_yticks(range(len(groups)))
        ax.set_yticklabels(ticks, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(mm, color="gray", ls="--", lw=1, label="numpy.matmul")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("GFLOP/s (forward; bar = median, whiskers = IQR)", fontsize=8)
        ax.set_title(_FAMILY_TITLES.get(fam, fam), fontsize=10, loc="left")
        ax.grid(True, axis="x", alpha=0.3)
    handles: list = []
    names: list[str] = []
    for ax in axes[:, 0]:  # one entry per series, whichever panel draws it first
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    m = report["machine"]
    fig.suptitle(
        f"selfattn {report['selfattn']} @ {report.get('commit') or 'unknown commit'}: forward, "
        f"{report['dtype']}, causal={report['causal']}; {m['cpu']}, {m['cpus']} CPU(s)\n"
        f"reference (dashed): numpy.matmul {m['matmul_n']}² {m['matmul_dtype']} = {mm:.1f} GFLOP/s",
        fontsize=9,
    )
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 6), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return families


# ----------------------------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m selfattn bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, fewer rounds (under a minute)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for tests (a few seconds)")
    p.add_argument("--backends", help="comma-separated backend names (default: all available)")
    p.add_argument("--shapes", help="comma-separated shape or pipeline-step names (see selfattn._bench.shapes)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the pipeline section")
    p.add_argument(
        "--features",
        action="store_true",
        help="add the features section: packed varlen vs padded, softcap/ALiBi vs plain (slow without --quick)",
    )
    p.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    p.add_argument("--causal", action="store_true", help="causal attention")
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="rounds (timed calls per backend) for attention rows; pipeline rows get 3x as many",
    )
    p.add_argument(
        "--pause",
        type=float,
        default=PAUSE_S,
        help=f"seconds to sleep before each timed attention call (default {PAUSE_S})",
    )
    p.add_argument("--json", metavar="FILE", help="write machine-readable results here (the table stays plain)")
    p.add_argument("--plot", metavar="FILE.png", help="one panel per shape family that ran (needs matplotlib)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="always draw the bar")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="never draw the bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeat is None:
        args.repeat = 3 if args.tiny else (9 if args.quick else 15)
    if args.repeat < 1:
        print(f"error: --repeat must be at least 1, got {args.repeat}", file=sys.stderr)
        return 2
    if args.pause < 0:
        print(f"error: --pause must be >= 0 seconds, got {args.pause}", file=sys.stderr)
        return 2
    try:
        import rich  # noqa: F401
    except ImportError:
        print(
            "error: the bench command draws its tables with rich; install it with: pip install 'selfattn[bench]' "
            "(or pip install rich)",
            file=sys.stderr,
        )
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "error: --plot needs matplotlib; install it with: pip install 'selfattn[bench]' "
                "(or pip install matplotlib)",
                file=sys.stderr,
            )
            return 2
    try:
        report = run(args)
    except SystemExit as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    render(report, sys.stdout, fancy=sys.stdout.isatty() and not args.json)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0 if report["agreement_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
