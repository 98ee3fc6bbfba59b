"""The GPU tooling on a CPU: the one-command GPU check, its report, the benchmark, the conformance plugin shim.

A GPU lease is short (15 device-minutes, machine start included), so nothing
here may first fail on the GPU: the whole device script runs on this machine
with stand-ins (``_standin.py``: a CuPy on NumPy whose kernels run in the SIMT
emulator, a CUDA driver library, ``nvidia-smi`` and ``compute-sanitizer``), in a
copy of the checkout like the one the GPU machine receives; the step runner's
timeouts and partial results, the report and the conformance suite's plugin
loading (installed, and a clean copy that is not) are checked directly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import pytest
from _standin import standin_env, use_standin_cupy
from _tools import ROOT, benchmark, tool

gpu_report = tool("gpu_report")
gpu_bench = tool("gpu_bench")


@pytest.fixture
def standin_cupy(monkeypatch):
    """The stand-in CuPy as ``cupy`` (``_standin.py``), the CuPy backend available on it; undone afterwards."""
    yield from use_standin_cupy(monkeypatch)


def _checkout_copy(dest: Path) -> Path:
    """What a GPU machine receives: tracked and untracked-but-not-ignored files (no .git, no *.egg-info)."""
    files = (
        subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


# -- the device script, end to end, on the CPU ------------------------------------------


def test_device_script_dry_run(tmp_path):
    """``bash tools/gpu_run.sh OUT --quick`` in a clean copy, every step on stand-ins: all pass, all kept."""
    copy = _checkout_copy(tmp_path / "checkout")
    assert not list(copy.glob("*.egg-info")) and not (copy / ".git").exists()
    out = tmp_path / "OUT"
    env = standin_env(base=dict(os.environ, PYTHON=sys.executable))
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", str(copy / "tools" / "gpu_run.sh"), str(out), "--quick", "--commit", "test"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    # What comes back from a GPU lease: at most 8 files, flat.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["logs.tar.gz", "report.md", "results.json"], files
    results = json.loads((out / "results.json").read_text())
    assert results["state"] == "finished" and results["commit"] == "test"
    names = [s["name"] for s in results["steps"]]
    assert names == [
        "nvidia-smi",
        "facts",
        "rawmodule",
        "smoke",
        "memcheck",
        "racecheck",
        "synccheck",
        "bench",
        "gpu-tests",
        "conformance",
        "check",
    ]
    assert all(s["status"] == "passed" for s in results["steps"]), [(s["name"], s["status"]) for s in results["steps"]]
    steps = {s["name"]: s for s in results["steps"]}
    assert steps["smoke"]["summary"].startswith("smoke: 17 passed, 0 failed, 1 skipped")  # one device: no mismatch
    assert "ERROR SUMMARY: 0 errors" in steps["memcheck"]["summary"]
    assert "--no-pool" in steps["racecheck"]["command"] and "--tool racecheck" in steps["racecheck"]["command"]
    assert "collected" in steps["gpu-tests"]["summary"] and "collected" in steps["conformance"]["summary"]
    assert "-p pytest_selfattn" in steps["conformance"]["command"]
    assert steps["check"]["summary"] == "all backends conform"
    assert results["facts"]["selfattn source"] == str((copy / "selfattn").resolve())
    assert results["bench"] and {r["pass_"] for r in results["bench"]} >= {
        "fwd",
        "fwd+bwd",
        "fwd (CUDA cores)",
        "fwd (fused kernel)",
    }
    with tarfile.open(out / "logs.tar.gz") as tar:
        members = set(tar.getnames())
    assert {f"{i:02d}-{n}.log" for i, n in enumerate(names)} <= members
    assert {"gpu-tests.xml", "conformance.xml", "bench.jsonl", "facts.json"} <= members
    report = (out / "report.md").read_text()
    assert "State: **finished**" in report and "## Benchmark" in report and "| check | passed |" in report
    print(f"dry run of the device script: {time.monotonic() - t0:.0f} s")


def test_cheap_gpu_tests_run_on_the_stand_in():
    """The GPU tests' own code, where the emulator is fast enough (the dry run only collects them)."""
    select = "backend_is_available or fully_masked or two_devices or (forward_and_vjp and shape0 and float32)"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cupy_gpu.py", "-k", select],
        cwd=ROOT,
        env=standin_env(devices=2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0 and "skipped" not in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]
    # 3 single tests + forward_and_vjp over the GPU cases (tests/_cuda_cases.py), one shape, float32.
    from _cuda_cases import GPU_CASES

    assert f"{3 + len(GPU_CASES)} passed" in res.stdout, res.stdout[-2000:]


def test_run_script_is_one_short_command():
    script = ROOT / "tools" / "gpu_run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)
    assert len("bash tools/gpu_run.sh --commit " + "0" * 40) < 2000


def test_plan_keeps_cpu_work_off_the_device(tmp_path):
    plan = gpu_report.steps(tmp_path)
    text = " ".join(" ".join(c) for s in plan for c in s.commands)
    for cpu_only in (
        "test_cuda_emulation",
        "test_cuda_nvrtc",
        "nvrtc_check",
        "selfattn_cuda_emulated",
        "test_cuda_replay",
        "test_cuda_launch",
        "test_cupy_backend",
        "standin",
    ):
        assert cpu_only not in text
    assert sum(s.timeout_s for s in plan) > gpu_report.DEFAULT_BUDGET_S  # the budget, not the sum, bounds a run
    for s in plan:
        if s.kind == "pytest":
            cmd = s.commands[0]
            assert {"-v", "-ra", "--tb=long", "--junitxml"} <= set(cmd) and "--collect-only" not in cmd
        if s.kind == "sanitizer":
            assert "--no-pool" in s.commands[0] and s.commands[0][1:5] == ["--tool", s.name, "--error-exitcode", "1"]


# -- the step runner: timeouts, budget, partial results ----------------------------------


def _py(code: str) -> list:
    return [sys.executable, "-c", code]


def _plan(timeout_s=60):
    def plan(work, quick):
        return [
            gpu_report.Step("first", "prints", [_py("print('first step ran')")], timeout_s),
            gpu_report.Step(
                "hangs", "hangs", [_py("print('before the hang', flush=True); import time; time.sleep(60)")], 2
            ),
            gpu_report.Step("fails", "fails", [_py("import sys; print('oops'); sys.exit(3)")], timeout_s),
            gpu_report.Step("later", "later", [_py("print('still ran')")], timeout_s),
            gpu_report.Step("absent", "absent", [["no-such-program-xyz"]], timeout_s),
            gpu_report.Step("skipped", "skipped", [_py("pass")], timeout_s, skip="not on this machine"),
        ]

    return plan


def test_runner_timeouts_failures_and_logs(tmp_path):
    out = tmp_path / "OUT"
    results = gpu_report.run_steps(out, budget_s=120, commit="c0ffee", plan=_plan())
    st = {s["name"]: s for s in results["steps"]}
    assert st["first"]["status"] == "passed" and st["first"]["summary"] == "first step ran"
    assert st["hangs"]["status"] == "timeout" and st["hangs"]["rc"] == 124 and st["hangs"]["seconds"] < 20
    assert st["fails"]["status"] == "failed" and st["fails"]["rc"] == 3
    assert st["later"]["status"] == "passed"  # a failure or timeout does not stop the run
    assert st["absent"]["status"] == "failed" and st["absent"]["rc"] == 127
    assert st["skipped"]["status"] == "skipped" and st["skipped"]["summary"] == "not on this machine"
    with tarfile.open(out / "logs.tar.gz") as tar:
        hang_log = tar.extractfile("01-hangs.log").read().decode()
    assert "before the hang" in hang_log and "timed out after 2 s" in hang_log
    assert not (out / "current.log").exists()
    report = (out / "report.md").read_text()
    assert "| hangs | timeout |" in report and "| fails | failed |" in report


def test_runner_budget(tmp_path):
    results = gpu_report.run_steps(tmp_path / "OUT", budget_s=gpu_report.MIN_STEP_S + 1.5, plan=_plan())
    st = {s["name"]: s["status"] for s in results["steps"]}
    # "first" runs, then "hangs" (2 s, more than the 1.5 s over the minimum a step needs); then nothing starts
    assert st["first"] == "passed" and st["later"] == "not run" and st["fails"] == "not run"


def test_killed_run_keeps_what_it_had(tmp_path):
    """An outer timeout (SIGTERM to the driver) mid-step: finished steps, the running step's log, the state."""
    out = tmp_path / "OUT"
    driver = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from _tools import tool; "
        "import test_gpu_tools as t; g = tool('gpu_report'); from pathlib import Path; "
        f"g.run_steps(Path({str(out)!r}), budget_s=300, plan=t._sleep_plan)"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT / "tests")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (out / "current.log").exists() and "sleeping now" in (out / "current.log").read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    results = json.loads((out / "results.json").read_text())
    assert results["state"].startswith("stopped by signal 15")
    st = {s["name"]: s for s in results["steps"]}
    assert st["done"]["status"] == "passed" and st["sleeps"]["status"] == "running"
    assert "sleeping now" in (out / "current.log").read_text()
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "00-done.log" in tar.getnames()


def _sleep_plan(work, quick):
    return [
        gpu_report.Step("done", "done", [_py("print('done')")], 30),
        gpu_report.Step(
            "sleeps", "sleeps", [_py("print('sleeping now', flush=True); import time; time.sleep(120)")], 200
        ),
    ]


# -- summaries, report and doc ------------------------------------------------------------


def test_summaries_of_logs(tmp_path):
    junit = tmp_path / "gpu-tests.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_cupy_gpu" name="test_a"/>'
        '<testcase classname="tests.test_cupy_gpu" name="test_b[plain]"><failure message="assert 1 == 2'
        '&#10;more">trace</failure></testcase></testsuite></testsuites>'
    )
    step = gpu_report.Step("gpu-tests", "t", [], 1, kind="pytest")
    summary, failures = gpu_report.summarize(
        step, "$ python -m pytest\n.F\n==== 1 failed, 1 passed in 2.00s ====\n", tmp_path
    )
    assert summary == "1 failed, 1 passed in 2.00s"
    assert failures == ["tests.test_cupy_gpu::test_b[plain] (failure): assert 1 == 2"]
    san = gpu_report.Step("memcheck", "m", [], 1, kind="sanitizer")
    log = (
        "========= Invalid __global__ read of size 16 bytes\n=========     at attn_fwd_tc_float16_64+0x1a0\n"
        "PASS tc-d64 (0.1 s): ok\nsmoke: 16 passed, 0 failed, 0 skipped\n========= ERROR SUMMARY: 1 error\n"
    )
    summary, failures = gpu_report.summarize(san, log, tmp_path)
    assert summary == "ERROR SUMMARY: 1 error / smoke: 16 passed, 0 failed, 0 skipped"
    assert failures == ["========= Invalid __global__ read of size 16 bytes"]


def _made_up_results():
    """A run's results with made-up numbers (only a GPU run produces real ones)."""
    rows = [
        dict(
            shape="4x16x4096x64",
            dtype="float16",
            causal=c,
            pass_="fwd",
            backend="cupy",
            ms=1.0,
            ms_min=0.9,
            ms_max=1.1,
            rounds=5,
            calls=10,
            tflops=1.0,
            torch_ms=1.0,
            torch_tflops=1.0,
            ratio=r,
            mib=0.0,
        )
        for c, r in ((False, 0.61), (True, 0.42))
    ]
    return {
        "started (UTC)": "2026-01-01 00:00",
        "commit": "abc123",
        "source sha256": "0" * 16,
        "budget_s": 480,
        "quick": False,
        "state": "finished",
        "facts": {"device": "Test GPU", "torch": "9.9"},
        "bench": rows,
        "steps": [
            dict(
                name="conformance",
                title="t",
                status="failed",
                seconds=80.0,
                summary="1 failed, 390 passed",
                failures=["selfattn.testing.test_conformance::test_x[cupy] (failure): boom"],
            )
        ],
    }


def test_bench_summary_against_the_target():
    rows = _made_up_results()["bench"]
    summary = gpu_bench.summarize(rows)
    assert "0.42-0.61x" in summary and "not met by 1 of 2" in summary
    assert gpu_bench.summarize([dict(rows[0], ratio=0.9)]).endswith("met (stretch goal too).")
    assert gpu_bench.summarize([dict(rows[0], ratio=None)]).startswith("No PyTorch timing")
    md = gpu_bench.markdown(rows, "Test GPU")
    assert "| 4x16x4096x64 | float16 | False | fwd | 1.000 (0.900-1.100) | 1.0 | 1.000 | 1.0 | 0.61 | 0.0 |" in md


def test_report_and_doc_from_results():
    results = _made_up_results()
    report = gpu_report.render(results)
    assert "| conformance | failed | 80.0 | 1 failed, 390 passed |" in report
    assert "- selfattn.testing.test_conformance::test_x[cupy] (failure): boom" in report
    doc = (ROOT / "docs" / "gpu-validation.md").read_text()
    assert "**Status: not yet run on a GPU.**" in doc and "gpu_report:placeholder begin" in doc
    status, res, bench = gpu_report.doc_sections(results)
    text = gpu_report.update_doc(gpu_report.update_doc(doc, "tests", res, status), "bench", bench, status)
    assert "**Status: run on Test GPU at commit abc123 (2026-01-01 00:00 UTC).**" in text
    assert "not yet run on a GPU" not in text and "placeholder" not in text
    assert text.index("gpu_report:tests begin") < text.index("gpu_report:bench begin")
    assert "0.42-0.61x" in text and "Failures in conformance:" in text
    again = gpu_report.update_doc(
        text, "bench", "<!-- gpu_report:bench begin -->\nnew\n<!-- gpu_report:bench end -->", "x."
    )
    assert again.count("gpu_report:bench begin") == 1 and "\nnew\n" in again and "0.42-0.61x" not in again
    assert "## What has been checked without a GPU" in again


# -- the asv GPU classes --------------------------------------------------------------


def test_asv_gpu_classes_are_na_without_a_gpu():
    bench_gpu = benchmark("bench_gpu")
    for cls, args in (
        (bench_gpu.GpuForward, ("cupy", "4x16x4096x64", "float16", False)),
        (bench_gpu.GpuForwardBackward, ("torch", "4x16x4096x128", "float32", True)),
        (bench_gpu.GpuDecode, ("cupy-fused", "decode-1x32x32768x128", "float16")),
    ):
        assert [len(p) for p in cls.params] == [len(n) for n in cls.params] and len(cls.params) == len(args)
        with pytest.raises(NotImplementedError, match="cupy"):
            cls().setup(*args)


def test_asv_gpu_classes_run_on_the_stand_in(standin_cupy, monkeypatch):
    """The timed functions on the stand-in GPU (tiny shapes under the real names): they run and synchronize."""
    bench_gpu, gpu = benchmark("bench_gpu"), benchmark("_gpu")
    monkeypatch.setattr(bench_gpu, "PREFILL", {"4x16x4096x64": gpu.Shape("tiny", 1, 1, 16, 16, 64)})
    monkeypatch.setattr(bench_gpu, "_CASES", {})
    fwd = bench_gpu.GpuForward()
    fwd.setup("cupy", "4x16x4096x64", "float16", True)
    fwd.time_forward("cupy", "4x16x4096x64", "float16", True)
    assert fwd.track_tflops("cupy", "4x16x4096x64", "float16", True) > 0
    with pytest.raises(NotImplementedError, match="float16 only"):
        fwd.setup("cupy-cuda-cores", "4x16x4096x64", "float32", False)
    with pytest.raises(NotImplementedError, match="torch"):
        fwd.setup("torch", "4x16x4096x64", "float32", False)
    both = bench_gpu.GpuForwardBackward()
    both.setup("cupy", "4x16x4096x64", "float32", False)
    both.time_forward_backward("cupy", "4x16x4096x64", "float32", False)


# -- the conformance suite's pytest plugin, installed or not --------------------------------


def _uninstalled_site(dest: Path) -> Path:
    """This environment's packages without selfattn's distribution (so no pytest11 entry point)."""
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("selfattn", "__editable__", "_selfattn")) or name.endswith(".pth") or name == "__pycache__":
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


CONFORMANCE = ["--pyargs", "selfattn.testing", "--selfattn-backend=numpy", "-k", "nan_in_an_attended_value_row"]


def test_conformance_plugin_from_a_clean_copy(tmp_path):
    """A copy that is not installed (the GPU machine's): ``-p pytest_selfattn`` brings the option in."""
    copy = _checkout_copy(tmp_path / "checkout")
    site = _uninstalled_site(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, (copy, copy / "tools", site))))
    env.pop("PYTEST_ADDOPTS", None)

    def pytest_in_copy(*args):  # -S: no site-packages, so this environment's selfattn install is not seen
        return subprocess.run(
            [sys.executable, "-S", "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    bare = pytest_in_copy(*CONFORMANCE)
    assert bare.returncode != 0 and "unrecognized arguments: --selfattn-backend" in bare.stderr  # the old failure
    shim = pytest_in_copy("-p", "pytest_selfattn", *CONFORMANCE)
    assert shim.returncode == 0, shim.stdout[-3000:] + shim.stderr[-3000:]
    assert (
        "1 passed" in shim.stdout
        and str(copy)
        in subprocess.run(
            [sys.executable, "-S", "-c", "import selfattn; print(selfattn.__file__)"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


@pytest.mark.parametrize("autoload", [True, False])
def test_conformance_plugin_when_installed(autoload):
    """Installed (the pytest11 entry point loads the plugin): the shim adds nothing and breaks nothing."""
    from importlib.metadata import entry_points

    if not any(ep.value == "selfattn.testing.plugin" for ep in entry_points(group="pytest11")):
        pytest.skip("selfattn is not installed in this environment")
    env = {} if autoload else {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", *CONFORMANCE]
    run_env = dict(os.environ, PYTHONPATH=str(ROOT / "tools"), **env)
    shim = subprocess.run(
        [sys.executable, *args, "-p", "pytest_selfattn"],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shim.returncode == 0 and "1 passed" in shim.stdout, shim.stdout[-3000:] + shim.stderr[-3000:]
    if autoload:  # the old way crashed here: the same module registered under two names
        direct = subprocess.run(
            [sys.executable, *args, "-p", "selfattn.testing.plugin"],
            cwd=ROOT,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert direct.returncode != 0 and "already registered" in direct.stdout + direct.stderr
