"""Tests of the benchmark infrastructure: shapes, the bench runner, the asv suite's importability."""

from __future__ import annotations

import importlib
import json
import os
import sys

import numpy as np
import pytest

from selfattn._bench import runner, shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- shapes -----------------------------------------------------------------

def test_shape_kinds_cover_spec():
    kinds = {s.kind for s in shapes.ASV_SHAPES}
    assert {"prefill", "decode", "gqa", "long"} <= kinds
    assert shapes.TINY.q_shape == (1, 1, 4, 8)
    assert shapes.DECODE.n == 1 and shapes.DECODE.m > 1000
    assert shapes.PREFILL.n == shapes.PREFILL.m
    assert shapes.GQA.hkv < shapes.GQA.heads and shapes.GQA.heads % shapes.GQA.hkv == 0


def test_shape_flops_match_timing_helper():
    from selfattn._bench.timing import attention_flops

    for s in (*shapes.ASV_SHAPES, *shapes.BENCH_QUICK):
        for causal in (False, True):
            assert s.flops(causal) == attention_flops(s.batch, s.heads, s.n, s.m, s.d, causal=causal)


def test_make_inputs_deterministic_and_shaped():
    q, k, v = shapes.make_inputs(shapes.GQA, "float64")
    assert q.shape == shapes.GQA.q_shape and k.shape == v.shape == shapes.GQA.kv_shape
    assert q.dtype == np.float64
    q2, _, _ = shapes.make_inputs(shapes.GQA, "float64")
    np.testing.assert_array_equal(q, q2)
    assert shapes.GQA.nbytes(8) == q.nbytes + k.nbytes + v.nbytes


def test_get_and_names_unique():
    assert shapes.get("decode") is shapes.DECODE
    with pytest.raises(KeyError, match="known"):
        shapes.get("nope")
    seen = {}
    for s in (*shapes.ASV_SHAPES, *shapes.BENCH_QUICK, *shapes.BENCH_STANDARD, *shapes.SEQLEN_SWEEP):
        assert seen.setdefault(s.name, s) == s, f"two different shapes named {s.name}"
    assert len({s.name for s in shapes.ASV_SHAPES}) == len(shapes.ASV_SHAPES)
    assert "N512" in str(shapes.PREFILL)


def test_sweep_is_prefill_increasing():
    ns = [s.n for s in shapes.SEQLEN_SWEEP]
    assert ns == sorted(ns) and all(s.n == s.m for s in shapes.SEQLEN_SWEEP)


# --- runner -----------------------------------------------------------------

def test_runner_tiny_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = runner.main(["--tiny", "--repeat", "1", "--no-progress", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "GFLOP/s" in text and "x matmul" in text and "numpy" in text
    assert "all backends agree with numpy" in text
    data = json.loads(out.read_text())
    assert data["agreement_ok"] is True
    assert data["machine"]["matmul_gflops"] > 0
    rows = data["results"]
    assert {r["shape"] for r in rows} == {s.name for s in shapes.BENCH_TINY}
    for r in rows:
        assert r["median_s"] > 0 and r["gflops"] > 0 and "ratio_to_matmul" in r
        if r["backend"] != "numpy":
            assert r["max_abs_diff"] <= runner.TOLERANCE["float32"]


def test_runner_backend_filter_and_causal(capsys):
    rc = runner.main(["--tiny", "--repeat", "1", "--no-progress", "--backends", "numpy", "--causal",
                      "--dtype", "float64", "--shapes", "tiny-decode"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "causal=True" in out and "tiny-decode" in out
    assert "numba " not in out.split("skipped")[0].split("\n", 3)[-1]


def test_runner_unknown_backend_is_usage_error(capsys):
    assert runner.main(["--tiny", "--backends", "nosuch", "--no-progress"]) == 2
    assert "unknown backend" in capsys.readouterr().err


def test_runner_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    assert runner.main(["--tiny", "--repeat", "1", "--no-progress", "--backends", "numpy", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runner_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert runner.main(["--tiny", "--plot", str(tmp_path / "p.png")]) == 2
    assert "matplotlib" in capsys.readouterr().err


def test_progress_bar_writes_stderr(capsys):
    bar = runner._progress(True)
    bar(1, 2, "x")
    bar(2, 2, "done", done=True)
    err = capsys.readouterr().err
    assert "[" in err and "2/2" in err


# --- asv suite ----------------------------------------------------------------

@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    return ROOT


@pytest.mark.parametrize("mod", ["benchmarks.bench_attention", "benchmarks.bench_overhead"])
def test_benchmark_modules_import(bench_path, mod):
    m = importlib.import_module(mod)
    assert m is not None


def test_asv_conf_is_valid_json5ish():
    with open(os.path.join(ROOT, "asv.conf.json")) as fh:
        text = "\n".join(line for line in fh if not line.strip().startswith("//"))
    conf = json.loads(text)
    assert conf["environment_type"] == "virtualenv" and conf["branches"] == ["main"]
    assert conf["launch_method"] == "spawn" and "numba" in conf["matrix"]["req"]
    assert conf["results_dir"].startswith(".asv") and conf["html_dir"].startswith(".asv")


def test_benchmark_setup_runs_and_skips(bench_path):
    ba = importlib.import_module("benchmarks.bench_attention")
    bo = importlib.import_module("benchmarks.bench_overhead")
    d = bo.Dispatch()
    d.setup("numpy")
    d.time_dispatch_tiny("numpy")
    with pytest.raises(NotImplementedError):
        d.setup("definitely-not-a-backend")
    # track_* works on the smallest grid point
    f = ba.AttentionForward()
    f.setup("numpy", "decode", "float32", False)
    assert f.track_gflops("numpy", "decode", "float32", False) > 0


def test_compat_fallback_loads_shapes_from_checkout(bench_path, monkeypatch):
    """Against an older selfattn without selfattn._bench, the suite loads shapes from the checkout."""
    import benchmarks._compat as compat

    monkeypatch.setitem(sys.modules, "selfattn._bench.shapes", None)  # simulate "not installed"
    mod = compat._load("selfattn._bench.shapes", "selfattn/_bench/shapes.py")
    assert mod is not None and mod.__name__.startswith("_selfattn_bench_fallback_")
    assert [s.name for s in mod.ASV_SHAPES] == [s.name for s in shapes.ASV_SHAPES]


def test_interleaved_medians_alternate_and_take_medians():
    from selfattn._bench.timing import interleaved_medians

    calls = []
    fast = lambda: calls.append("a")  # noqa: E731

    def slow():
        calls.append("b")
        import time

        time.sleep(0.01)

    ta, tb = interleaved_medians([fast, slow], rounds=3, warmup=1, pause=0.0)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then strict alternation
    assert 0 <= ta < 0.005 <= 0.01 <= tb


# --- tools/ scripts ------------------------------------------------------------

def _tool(*argv, timeout=600):
    import subprocess

    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", argv[0]), *argv[1:]], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_numba_targets_table_and_exit_status():
    """``python tools/numba_targets.py``: every target has a row, and the exit status is 1 exactly when one FAILs."""
    pytest.importorskip("numba", reason="numba is not installed (pip install 'selfattn[numba]')")
    res = _tool("numba_targets.py", "--quick", "--no-compile")
    out = res.stdout
    assert "numpy.matmul 1024² float32" in out, res.stderr
    rows = [line for line in out.splitlines() if line.rstrip().endswith(("PASS", "FAIL"))]
    for name in ("GFLOP/s vs matmul", "speed-up vs numpy backend", "time / non-causal", "decode 1x8x1x64",
                 "backward 1x8x1024x64 time / forward", "peak memory"):
        assert any(name in row for row in rows), name
    failed = any(row.rstrip().endswith("FAIL") for row in rows)
    assert res.returncode == (1 if failed else 0), out


def test_numpy_baseline_prints_the_ratio():
    import re

    res = _tool("numpy_baseline.py", "--n", "128", "--heads", "2", "--d", "16", "--repeat", "1")
    assert res.returncode == 0, res.stderr
    m = re.search(r"numpy backend ([\d.]+) ms, QK\^T \+ PV alone ([\d.]+) ms, ratio ([\d.]+)", res.stdout)
    assert m, res.stdout
    t_be, t_mm, ratio = (float(x) for x in m.groups())
    assert ratio == pytest.approx(t_be / t_mm, rel=0.05, abs=0.01)
