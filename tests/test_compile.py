"""No silent compiles: toy calls never wait for a kernel, first compiles say so, ``compile`` caches ahead.

Each test runs in a fresh process with an empty ``NUMBA_CACHE_DIR`` (a cold
machine). Nothing here is timed (the bench command and the closing notes
measure times); the tests check *whether* a kernel compiled, from Numba's own
cache statistics and from the announcement on the ``selfattn`` logger.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba", reason="numba is not installed (pip install 'selfattn[numba]')")

_PROBE = r"""
import json, logging, sys, io
import numpy as np
import selfattn
from selfattn.backends import numba_

log = io.StringIO()
handler = logging.StreamHandler(log)
logging.getLogger("selfattn").addHandler(handler)
logging.getLogger("selfattn").setLevel(logging.INFO)
kind = sys.argv[1]
rng = np.random.default_rng(0)
if kind == "toy":
    q = rng.standard_normal((2, 10, 64)).astype(np.float32)
    out = selfattn.scaled_dot_product_attention(q, q, q)
    chosen = selfattn.explain(q, q, q).backend
else:
    q = rng.standard_normal((1, 8, 512, 64)).astype(np.float32)
    out = selfattn.scaled_dot_product_attention(q, q, q, backend="numba")
    chosen = "numba"
misses = {}
if "numba" in sys.modules:
    from selfattn.backends._numba import fused, simd
    for name in ("forward", "merge_splits"):
        misses[f"fused.{name}"] = sum(getattr(fused, name).stats.cache_misses.values())
    for name in ("forward", "prepare_keys"):
        misses[f"simd.{name}"] = sum(getattr(simd, name).stats.cache_misses.values())
print(json.dumps({"chosen": chosen, "numba_imported": "numba" in sys.modules, "log": log.getvalue(),
                  "misses": misses}))
"""


def _run(args, cache_dir, timeout=600):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _probe(kind, cache_dir):
    res = _run(["-c", _PROBE, kind], cache_dir)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_toy_call_needs_no_compiled_kernel(tmp_path):
    got = _probe("toy", tmp_path)
    assert got["chosen"] == "numpy"  # below numba's declared work range
    assert not got["numba_imported"] and "compiling" not in got["log"]


def test_first_compile_is_announced_then_compile_command_caches(tmp_path):
    first = _probe("prefill", tmp_path / "cold")
    assert "compiling the Numba" in first["log"] and sum(first["misses"].values()) > 0

    res = _run(["-m", "selfattn", "compile", "--dtype", "float32"], tmp_path / "warm", timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fused-forward" in res.stdout and "compiled and cached" in res.stdout
    later = _probe("prefill", tmp_path / "warm")
    assert "compiling" not in later["log"], later["log"]
    assert sum(later["misses"].values()) == 0, later["misses"]  # every kernel came from the disk cache

    info = _run(["-m", "selfattn", "info", "--json"], tmp_path / "warm")
    numba_row = next(r for r in json.loads(info.stdout)["backends"] if r["name"] == "numba")
    status = numba_row["info"]["compiled_kernels"]
    assert status["fused-forward float32"] == "cached" and status["fused-forward float64"] == "not cached"
