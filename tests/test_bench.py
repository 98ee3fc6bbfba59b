"""Tests of the benchmark infrastructure: shapes, the bench runner, the asv suite's importability."""

from __future__ import annotations

import importlib
import importlib.util
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
    for s in (
        *shapes.ASV_SHAPES,
        *shapes.BENCH_QUICK,
        *shapes.BENCH_STANDARD,
        *shapes.BENCH_TINY,
        *shapes.PIPELINE,
        *shapes.PIPELINE_TINY,
    ):
        assert seen.setdefault(s.name, s) == s, f"two different shapes named {s.name}"
    assert len({s.name for s in shapes.ASV_SHAPES}) == len(shapes.ASV_SHAPES)
    assert "N512" in str(shapes.PREFILL)


def test_pipeline_steps_and_flops():
    by_layer = {p.layer for p in shapes.PIPELINE}
    assert by_layer == {"mha", "encoder", "attention"}
    sizes = {(p.batch, p.n, p.embed) for p in shapes.PIPELINE if p.layer != "attention"}
    assert {(4, 32, 128), (8, 128, 256)} <= sizes  # the tutorial sizes of issue 12
    toy = shapes.get("toy")
    assert toy.input_shape == (2, 8, 10, 8)
    assert toy.flops() == 4.0 * 2 * 8 * 10 * 10 * 8
    mha = shapes.get("mha-small")
    b, n, e = 4, 32, 128
    # four E x E projections (2 FLOPs per multiply-add) + QK^T and PV over all heads
    assert mha.flops() == 4 * 2 * b * n * e * e + 2 * 2 * b * n * n * e
    enc = shapes.get("encoder-small")
    assert enc.flops() == mha.flops() + 2 * 2 * b * n * e * enc.ff
    assert mha.flops(causal=True) == mha.flops() - 2 * b * n * n * e
    with pytest.raises(ValueError, match="divisible"):
        shapes.Pipeline("x", "mha", 1, 4, 10, 3)
    with pytest.raises(ValueError, match="ff"):
        shapes.Pipeline("x", "encoder", 1, 4, 8, 2)
    with pytest.raises(ValueError, match="layer"):
        shapes.Pipeline("x", "conv", 1, 4, 8, 2)


# --- timing -----------------------------------------------------------------


def test_interleaved_samples_pause_and_wake(monkeypatch):
    from selfattn._bench import timing

    events = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: events.append(("sleep", s)))
    fns = [lambda: events.append("a"), lambda: events.append("b")]
    rounds = []
    samples = timing.interleaved_samples(fns, rounds=2, warmup=1, pause=0.15, wake=True, after_round=rounds.append)
    per_round = [("sleep", 0.15), "a", "a", ("sleep", 0.15), "b", "b"]  # pause, wake-up call, timed call
    assert events == ["a", "b"] + per_round * 2
    assert rounds == [0, 1] and [len(t) for t in samples] == [2, 2]
    events.clear()
    timing.interleaved_samples(fns, rounds=2, warmup=0, pause=0.0)
    assert events == ["a", "b", "a", "b"]  # back to back: no sleep, no wake-up call


def test_block_samples_pause_wake_and_blocks(monkeypatch):
    from selfattn._bench import timing

    events = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: events.append(("sleep", s)))
    fns = [lambda: events.append("a"), lambda: events.append("b")]
    samples = timing.block_samples(fns, blocks=2, calls=3, pause=0.3, warmup=1)
    block = [("sleep", 0.3), "a", "a", "a", "a", ("sleep", 0.3), "b", "b", "b", "b"]  # pause, wake, 3 timed
    assert events == ["a", "b"] + block * 2
    assert [len(t) for t in samples] == [2, 2]  # one median per block

    # min_time keeps a block going: a "call" that advances a fake clock by 0.1 s runs 3 times for 0.25 s
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def slow():
        clock[0] += 0.1

    calls = []
    timing.block_samples([lambda: (slow(), calls.append(1))], blocks=1, calls=1, pause=0, warmup=0, min_time=0.25)
    assert len(calls) == 1 + 3  # the wake-up call, then until 0.25 s had passed
    out = timing.block_samples([slow], blocks=2, calls=2, pause=0, warmup=0)
    assert out == [[pytest.approx(0.1), pytest.approx(0.1)]]


def test_rounds_fit_the_budget():
    assert runner._rounds_for(None, 0.5, (3, 9)) == 9
    assert runner._rounds_for(1.5, 0.01, (3, 9)) == 9  # cheap calls: the most rounds
    assert runner._rounds_for(1.5, 0.3, (3, 9)) == 5
    assert runner._rounds_for(1.5, 2.0, (3, 9)) == 3  # a slow layer still gets the fewest


def test_spread_quartiles():
    from selfattn._bench.timing import spread

    st = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert st == {"median": 3.0, "p25": 2.0, "p75": 4.0, "min": 1.0, "max": 5.0}
    assert spread([0.5])["p25"] == spread([0.5])["p75"] == 0.5
    with pytest.raises(ValueError):
        spread([])


# --- runner -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One ``bench --tiny --json`` run shared by the tests that read its report and its text."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = runner.main(["--tiny", "--repeat", "2", "--pause", "0.01", "--no-progress", "--json", str(out)])
    return rc, json.loads(out.read_text()), buf.getvalue()


def test_runner_tiny_rows(tiny_report):
    import selfattn

    rc, data, _ = tiny_report
    assert rc == 0 and data["agreement_ok"] is True
    assert data["machine"]["matmul_gflops"] > 0 and data["machine"]["cpu"]
    assert data["method"] == {
        "rounds": 2,
        "pipeline_rounds": [3, 6],
        "pipeline_budget_s": 1.5,
        "pause_s": 0.01,
        "order": data["backends"] + ["auto"],
    }
    rows = data["results"]
    att = [r for r in rows if r["section"] == "attention"]
    pipe = [r for r in rows if r["section"] == "pipeline"]
    assert {r["shape"] for r in att} == {s.name for s in shapes.BENCH_TINY}
    assert {r["shape"] for r in pipe} == {s.name for s in shapes.PIPELINE_TINY}
    # the layers take NumPy arrays: backends of other array types (dask, cupy) sit the pipeline section out
    not_layers = {s["backend"] for s in data["skipped"] if s["reason"].startswith("pipeline section skipped")}
    for shape in {r["shape"] for r in rows}:
        group = [r for r in rows if r["shape"] == shape]
        # every backend once, then the automatic choice, in the timing order
        expect = [b for b in data["backends"] if group[0]["section"] == "attention" or b not in not_layers]
        assert [r["backend"] for r in group] == expect + ["auto"]
        auto = group[-1]
        assert auto["picks"] in data["backends"]
        marked = [r["backend"] for r in group[:-1] if r["auto_choice"]]
        assert marked == [auto["picks"]]
        named = [r["median_s"] for r in group[:-1]]
        assert min(r["vs_best"] for r in group[:-1]) == 1.0
        assert auto["vs_best"] == pytest.approx(auto["median_s"] / min(named))
        for r in group:
            if r["section"] == "attention":
                assert r["samples"] == 2
            else:  # as many rounds as fit in the budget, within [max(3, repeat/3), 3 x repeat], alike in a group
                assert 3 <= r["samples"] == group[0]["samples"] <= 6
            assert 0 < r["p25_s"] <= r["median_s"] <= r["p75_s"]
            assert r["iqr_rel"] == pytest.approx((r["p75_s"] - r["p25_s"]) / r["median_s"])
            assert r["gflops"] > 0 and r["first_call_s"] > 0
            if r["backend"] != "numpy":
                assert r["max_abs_diff"] <= runner.TOLERANCE["float32"]
    # the automatic pick is what selfattn.explain names for the same inputs
    q, k, v = shapes.make_inputs(shapes.get("tiny-gqa"), "float32")
    gqa_auto = next(r for r in att if r["shape"] == "tiny-gqa" and r["backend"] == "auto")
    assert gqa_auto["picks"] == selfattn.explain(q, k, v).backend


def test_runner_text_explains_itself(tiny_report):
    _, data, text = tiny_report
    assert "[attention]" in text and "[pipeline]" in text
    header = next(line for line in text.splitlines() if line.startswith("backend"))
    for col in ("median", "IQR", "GFLOP/s", "x matmul", "vs best", "1st call", "peak extra", "max|diff|", "auto"):
        assert col in header, col
    assert "1st call = the first call of that row in this process, including any JIT compile" in text
    assert "0.01 s pause before each timed call" in text and "OpenBLAS" in text
    assert "3-6 rounds (as many as fit in about 1.5 s per row group), back to back, no pause" in text
    assert "-> " + data["results"][-1]["picks"] in text
    assert "all backends agree with numpy" in text
    assert "MultiHeadAttention(2, 8, 16)" in text and "TransformerEncoderLayer(2, 8, 16)" in text
    # plain layout: no box drawing, no colour codes, no trailing padding
    assert not any(ch in text for ch in "─│┃━\x1b")
    assert all(line == line.rstrip() for line in text.splitlines())


def test_runner_fancy_render_uses_rich_tables(tiny_report):
    import io

    _, data, _ = tiny_report
    buf = io.StringIO()
    runner.render(data, buf, fancy=True)
    text = buf.getvalue()
    assert "─" in text and "attention" in text and "pipeline" in text  # rich's boxed tables with titles


def test_runner_pauses_attention_not_pipeline(monkeypatch):
    """Attention rows pause (and wake the backend) before each timed call; pipeline rows run back to back."""
    seen = []
    real = runner.interleaved_samples

    def spy(fns, **kw):
        seen.append((len(fns), kw["pause"], kw["wake"]))
        return real(fns, **{**kw, "pause": 0.0})

    monkeypatch.setattr(runner, "interleaved_samples", spy)
    assert (
        runner.main(["--tiny", "--repeat", "1", "--no-progress", "--backends", "numpy", "--shapes", "tiny-decode,toy"])
        == 0
    )
    assert seen == [(2, runner.PAUSE_S, True), (2, 0.0, False)]  # numpy + auto in each group


def test_runner_marks_forced_choice(capsys):
    """With use_backend('numpy') in force, the automatic row runs numpy and the numpy row carries the mark."""
    import selfattn

    with selfattn.use_backend("numpy"):
        rc = runner.main(["--tiny", "--repeat", "1", "--pause", "0", "--no-progress", "--shapes", "tiny-prefill"])
    assert rc == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "tiny-prefill(" in line]
    assert rows[0][0] == "numpy" and rows[0][-1] == "*"
    assert rows[-1][0] == "auto" and rows[-1][-2:] == ["->", "numpy"]
    assert all(r[-1] != "*" for r in rows[1:-1])


def test_runner_backend_filter_and_causal(capsys):
    rc = runner.main(
        [
            "--tiny",
            "--repeat",
            "1",
            "--pause",
            "0",
            "--no-progress",
            "--backends",
            "numpy",
            "--causal",
            "--dtype",
            "float64",
            "--shapes",
            "tiny-decode",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "causal=True" in out and "tiny-decode" in out
    table = [line.split()[0] for line in out.splitlines() if "tiny-decode(" in line]
    assert table == ["numpy", "auto"]
    assert "[pipeline]" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backends", "nosuch"], "unknown backend"),
        (["--shapes", "nosuch"], "unknown shape"),
        (["--repeat", "0"], "--repeat"),
        (["--pause", "-1"], "--pause"),
    ],
)
def test_runner_usage_errors(capsys, argv, message):
    assert runner.main(["--tiny", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


def test_runner_plot_draws_every_family(tmp_path, tiny_report):
    pytest.importorskip("matplotlib")
    _, data, _ = tiny_report
    png = tmp_path / "p.png"
    families = runner.plot(data, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(families) == {r["kind"] for r in data["results"]} == {"prefill", "decode", "gqa", "pipeline"}


def test_runner_plot_option_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    assert (
        runner.main(
            [
                "--tiny",
                "--repeat",
                "1",
                "--pause",
                "0",
                "--no-progress",
                "--backends",
                "numpy",
                "--no-pipeline",
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out


def test_runner_features_section(tmp_path, capsys):
    """--features: per backend, packed varlen vs padded and softcap/ALiBi vs plain, relative to the reference row."""
    out = tmp_path / "f.json"
    argv = ["--tiny", "--repeat", "2", "--pause", "0", "--no-progress", "--backends", "numpy", "--no-pipeline"]
    argv += ["--shapes", "tiny-prefill", "--features", "--json", str(out)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(tmp_path / "f.png")]
    assert runner.main(argv) == 0
    text = capsys.readouterr().out
    assert "[features]" in text and "Feature rows (--features)" in text
    data = json.loads(out.read_text())
    feats = [r for r in data["results"] if r["section"] == "features"]
    assert [r["backend"] for r in feats] == [
        "numpy packed",
        "numpy padded",
        "numpy plain",
        "numpy softcap",
        "numpy alibi",
        "numpy softcap+alibi",
    ]
    by = {r["backend"]: r for r in feats}
    # "vs best" is relative to the group's reference row, which is therefore exactly 1
    assert by["numpy padded"]["vs_best"] == by["numpy plain"]["vs_best"] == 1.0
    assert by["numpy packed"]["vs_best"] == pytest.approx(
        by["numpy packed"]["median_s"] / by["numpy padded"]["median_s"]
    )
    vs = shapes.VARLEN_TINY
    assert by["numpy packed"]["kind"] == "varlen" and by["numpy packed"]["causal"] is True
    assert by["numpy packed"]["gflops"] == pytest.approx(vs.flops() / by["numpy packed"]["median_s"] / 1e9)
    assert by["numpy softcap"]["kind"] == "logits" and "max_abs_diff" in by["numpy softcap"]
    assert all(r["agrees"] is None for r in feats)  # variants compute different things: not compared
    if "--plot" in argv:
        assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_varlen_set_lengths_are_skewed_and_deterministic():
    vs = shapes.VARLEN
    lens = vs.lengths()
    assert len(lens) == 32 and lens.min() >= 64 and lens.max() == 4096
    assert np.array_equal(lens, vs.lengths())
    assert np.median(lens) < 1024  # most sequences are short: padding to the longest wastes most of the work
    cu = vs.cu_seqlens()
    assert cu[0] == 0 and cu[-1] == lens.sum() and np.all(np.diff(cu) == lens)
    assert vs.flops(causal=False) == 2 * vs.flops() == 4.0 * vs.heads * vs.d * float((lens.astype(float) ** 2).sum())


def test_runner_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert runner.main(["--tiny", "--plot", str(tmp_path / "p.png")]) == 2
    assert "matplotlib" in capsys.readouterr().err


def test_runner_without_rich(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich", None)
    assert runner.main(["--tiny"]) == 2
    assert "pip install 'selfattn[bench]'" in capsys.readouterr().err


def test_progress_bar_draws_on_request(capsys):
    with runner._progress(True, 3) as advance:
        advance(0, "step")
        advance(3)
    assert "3/3" in capsys.readouterr().err
    with runner._progress(False, 3) as advance:
        advance(3)
    assert capsys.readouterr().err == ""


# --- asv suite ----------------------------------------------------------------


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    return ROOT


_SUITE = sorted(
    f"benchmarks.{f[:-3]}"
    for f in os.listdir(os.path.join(ROOT, "benchmarks"))
    if f.startswith("bench_") and f.endswith(".py")
)


@pytest.mark.parametrize("mod", _SUITE)
def test_benchmark_modules_import(bench_path, mod):
    m = importlib.import_module(mod)
    # asv finds benchmarks as classes with time_/track_/peakmem_ methods; each declares matching params.
    classes = [
        c
        for c in vars(m).values()
        if isinstance(c, type)
        and c.__module__ == m.__name__
        and any(a.startswith(("time_", "timeraw_", "track_", "peakmem_", "mem_")) for a in vars(c))
    ]
    assert classes, f"{mod} defines no asv benchmark"
    for c in classes:
        if hasattr(c, "params"):
            assert len(c.param_names) == len(c.params), c.__name__


@pytest.mark.parametrize("mod", _SUITE)
def test_every_tracked_benchmark_has_a_unit(bench_path, mod):
    """The dashboard labels a track_* value with its ``unit``; time_/timeraw_ (seconds) and peakmem_ (bytes)
    get theirs from asv. A benchmark taking a backend has it as its first parameter, so one graph compares them."""
    m = importlib.import_module(mod)
    for cls in [v for v in vars(m).values() if isinstance(v, type) and v.__module__ == m.__name__]:
        for name in dir(cls):
            if name.startswith("track_"):
                assert getattr(getattr(cls, name), "unit", None), f"{cls.__name__}.{name} has no unit"
        names = getattr(cls, "param_names", [])
        if "backend" in names:
            assert names[0] == "backend", f"{cls.__name__}: backend should be the first parameter"


def test_sig_rounds_to_significant_digits(bench_path):
    from benchmarks._compat import sig

    assert sig(16.41234567) == 16.4 and sig(0.000123456) == 0.000123 and sig(98765.4) == 98800.0
    assert sig(0.0) == 0.0 and sig(-2.34567) == -2.35
    assert sig(float("inf")) == float("inf") and sig(float("nan")) != sig(float("nan"))


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

    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_numba_targets_table_and_exit_status():
    """``python tools/numba_targets.py``: every target has a row, and the exit status is 1 exactly when one FAILs."""
    pytest.importorskip("numba", reason="numba is not installed (pip install 'selfattn[numba]')")
    res = _tool("numba_targets.py", "--quick", "--no-compile")
    out = res.stdout
    assert "numpy.matmul 1024² float32" in out, res.stderr
    rows = [line for line in out.splitlines() if line.rstrip().endswith(("PASS", "FAIL"))]
    for name in (
        "GFLOP/s vs matmul",
        "speed-up vs numpy backend",
        "time / non-causal",
        "decode 1x8x1x64",
        "backward 1x8x1024x64 time / forward",
        "GFLOP/s vs f64 matmul",
        "peak memory",
    ):
        assert any(name in row for row in rows), name
    has_torch = importlib.util.find_spec("torch") is not None
    assert any("time / torch" in row for row in rows) == has_torch, out
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


def test_crossover_quick_rows():
    """``python tools/crossover.py --quick``: one row per shape with the automatic pick, in both timing modes."""
    pytest.importorskip("numba", reason="numba is not installed (pip install 'selfattn[numba]')")
    for extra in ((), ("--layer",)):
        res = _tool("crossover.py", "--quick", *extra)
        assert res.returncode == 0, res.stderr
        rows = [line for line in res.stdout.splitlines() if line.startswith("(") and not line.startswith("(B")]
        assert len(rows) == 4, res.stdout
        for row in rows:
            assert row.split()[-1] in ("numpy", "numba"), row


def test_pipeline_benchmark_runs_auto_and_each_backend(bench_path):
    bp = importlib.import_module("benchmarks.bench_pipeline")
    assert "auto" in bp.PipelineForward.params[0]
    assert bp.PipelineForward.params[1] == [p.name for p in shapes.PIPELINE]
    for backend in ("numpy", "auto"):
        b = bp.PipelineForward()
        b.setup(backend, "mha-small")
        b.time_forward(backend, "mha-small")
        b.setup(backend, "toy")
        b.time_forward(backend, "toy")
    a = bp.AutoChoice()
    a.setup("decode")
    a.time_forward_auto("decode")
