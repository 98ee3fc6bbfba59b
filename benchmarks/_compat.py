"""Import helpers that keep the suite importable against older selfattn commits.

asv runs the benchmark code of the *current* checkout against whatever commit
is installed. ``selfattn._bench`` (shapes, timing helpers) did not exist in the
earliest commits, so each helper is taken from the installed package when
present, else loaded straight from this checkout's source file (the same
definitions, never a second copy to keep in sync), else from a minimal inline
fallback.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(modname: str, relpath: str):
    try:
        return importlib.import_module(modname)
    except Exception:  # ImportError, or an old package that breaks on import
        pass
    path = os.path.join(_ROOT, *relpath.split("/"))
    if not os.path.exists(path):
        return None
    alias = "_selfattn_bench_fallback_" + modname.rsplit(".", 1)[-1]
    if alias in sys.modules:
        return sys.modules[alias]
    spec = importlib.util.spec_from_file_location(alias, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


shapes = _load("selfattn._bench.shapes", "selfattn/_bench/shapes.py")
timing = _load("selfattn._bench.timing", "selfattn/_bench/timing.py")

if shapes is None:  # pragma: no cover - only when the checkout itself lacks the file
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class _Shape:
        name: str
        kind: str
        batch: int
        heads: int
        n: int
        m: int
        d: int
        kv_heads: int | None = None

        def flops(self, causal=False):
            f = 4.0 * self.batch * self.heads * self.n * self.m * self.d
            return f / 2.0 if causal else f

    class shapes:  # noqa: N801 - module stand-in
        Shape = _Shape
        TINY = _Shape("tiny", "dispatch", 1, 1, 4, 4, 8)
        ASV_SHAPES = (
            _Shape("prefill", "prefill", 1, 4, 512, 512, 64),
            _Shape("decode", "decode", 1, 8, 1, 4096, 64),
            _Shape("gqa", "gqa", 1, 8, 512, 512, 64, kv_heads=2),
            _Shape("long", "long", 1, 2, 2048, 2048, 64),
        )

        @staticmethod
        def make_inputs(shape, dtype="float32", seed=0):
            import numpy as np

            rng = np.random.default_rng(seed)
            hkv = shape.heads if shape.kv_heads is None else shape.kv_heads
            q = rng.standard_normal((shape.batch, shape.heads, shape.n, shape.d), dtype=np.float32).astype(dtype)
            k = rng.standard_normal((shape.batch, hkv, shape.m, shape.d), dtype=np.float32).astype(dtype)
            v = rng.standard_normal((shape.batch, hkv, shape.m, shape.d), dtype=np.float32).astype(dtype)
            return q, k, v


def median_time(fn, repeat=5, warmup=1):
    if timing is not None and hasattr(timing, "median_time"):
        return timing.median_time(fn, repeat=repeat, warmup=warmup)
    for _ in range(warmup):  # pragma: no cover - fallback
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def peak_rss_delta(fn):
    if timing is not None and hasattr(timing, "peak_rss_delta"):
        return timing.peak_rss_delta(fn)
    return None  # pragma: no cover


def sig(x: float, digits: int = 3) -> float:
    """``x`` rounded to ``digits`` significant digits: what a tracked value can honestly claim.

    asv stores and shows a ``track_*`` value as returned, so an unrounded
    GFLOP/s appeared as a 17-digit float in the dashboard and ``asv compare``.
    """
    if x == 0 or x != x or x in (float("inf"), float("-inf")):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def selfattn_or_skip():
    """Import selfattn or raise NotImplementedError (asv then reports n/a)."""
    try:
        import selfattn
    except Exception as exc:  # pragma: no cover
        raise NotImplementedError(f"selfattn not importable: {exc!r}") from exc
    return selfattn


def require_backend(name: str, dtype: str | None = None, features=()):
    """Raise NotImplementedError unless backend ``name`` is available (and supports dtype/features)."""
    sa = selfattn_or_skip()
    if not hasattr(sa, "list_backends"):
        raise NotImplementedError("this selfattn has no list_backends()")
    recs = {r.name: r for r in sa.list_backends()}
    rec = recs.get(name)
    if rec is None:
        raise NotImplementedError(f"backend {name!r} not registered in this selfattn")
    if not rec.available:
        raise NotImplementedError(f"backend {name!r} unavailable: {rec.reason}")
    caps = rec.capabilities
    if caps is not None:
        if getattr(caps, "array_type", "numpy") != "numpy":
            raise NotImplementedError(f"backend {name!r} consumes {caps.array_type} arrays; suite feeds numpy")
        if dtype is not None and dtype not in caps.dtypes:
            raise NotImplementedError(f"backend {name!r} lacks dtype {dtype}")
        missing = set(features) - set(caps.features)
        if missing:
            raise NotImplementedError(f"backend {name!r} lacks {sorted(missing)}")
    return sa


def backend_names():
    """Backends the suite parametrizes over (fixed list, so result keys are stable across commits)."""
    return ["numpy", "numba"]
