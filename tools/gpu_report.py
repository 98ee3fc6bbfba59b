#!/usr/bin/env python3
"""Run every GPU check of the CuPy backend within a time budget, and keep every result.

On the GPU machine, from a checkout (nothing to install: it runs from the
checkout on ``PYTHONPATH``; an installed selfattn works too)::

    python tools/gpu_report.py run --out "$OUT" [--budget 480] [--commit SHA] [--steps a,b] [--quick]

Afterwards, on any machine, fold the fetched results into the report::

    python tools/gpu_report.py doc OUT/results.json [--doc docs/gpu-validation.md]

``run`` executes the steps below in this order, each in its own process with a
timeout, within ``--budget`` seconds in all (a step that would start with less
than 15 s left is not started). The order puts what decides the rest first:
the device and a trivial kernel compile, a smoke test of every kernel, the
memory/race/barrier checkers on those tiny cases (what the CPU emulator cannot
see: its collectives are full barriers, shared memory is zero-filled, blocks run
one at a time), the benchmark, then the GPU tests, the conformance suite and
``python -m selfattn check``. CPU-only work (the emulator, NVRTC compiles)
never runs here.

Everything is written under ``--out``, at most 4 files (a GPU lease returns 8):
``report.md`` and ``results.json`` are rewritten before and after every step
(so a run cut short still says which step was running and what each finished
step gave); ``logs.tar.gz`` holds each finished step's full log, the pytest
JUnit XML files and the benchmark rows; ``current.log`` is the running step's
log, so even a step cut off by an outer timeout leaves its output. Pytest runs
keep full tracebacks (``--tb=long``), list every test (``-v``) and name the
failures (``-ra``, JUnit XML).

``--quick`` is for dry runs (``tests/test_gpu_tools.py`` runs the whole script
on a CPU with a stand-in CuPy): tiny benchmark shapes, one smoke case under
each sanitizer, pytest collection instead of test runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
MIN_STEP_S = 15
DEFAULT_BUDGET_S = 480

__all__ = ["Step", "steps", "find_sanitizer", "run_steps", "render", "update_doc", "main"]


@dataclass
class Step:
    """One step: ``commands`` run in order into one log; the step fails at the first non-zero exit."""

    name: str
    title: str
    commands: list
    timeout_s: int
    kind: str = "plain"  # "pytest", "sanitizer", "smoke", "bench", "check"
    skip: str = ""  # a reason not to run it here
    result: dict = field(default_factory=dict)


def find_sanitizer() -> str | None:
    """Path of ``compute-sanitizer`` (PATH, then the usual CUDA install folders), or None."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for pattern in (
        "/usr/local/cuda/bin/compute-sanitizer",
        "/usr/local/cuda/compute-sanitizer/compute-sanitizer",
        "/usr/local/cuda-*/bin/compute-sanitizer",
        "/opt/nvidia/*/compute-sanitizer",
        "/opt/nvidia/**/compute-sanitizer",
    ):
        for path in sorted(glob.glob(pattern, recursive=True)):
            if os.access(path, os.X_OK):
                return path
    return None


def steps(work: Path, quick: bool = False, python: str = sys.executable) -> list:
    """The steps of a run, in order (``work`` holds the JUnit XML files and the benchmark rows)."""
    py, smoke = python, str(TOOLS / "gpu_smoke.py")
    pytest_opts = ["-v", "-ra", "--tb=long", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        pytest_opts.append("--timeout=120")  # one hung test must not take the step's whole budget
    if quick:
        pytest_opts.append("--collect-only")
    sanitizer = find_sanitizer()
    sanitized = [smoke, "--no-pool"] + (["-k", "tc-d64-mask"] if quick else [])
    out = [
        Step(
            "nvidia-smi",
            "nvidia-smi",
            [
                ["nvidia-smi"],
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,pstate",
                    "--format=csv,noheader",
                ],
            ],
            30,
        ),
        Step("facts", "device and versions", [[py, smoke, "--facts", str(work / "facts.json")]], 60),
        Step("rawmodule", "trivial RawModule compile and launch", [[py, smoke, "--rawmodule"]], 90),
        Step("smoke", "every kernel against the float64 oracle", [[py, smoke]], 180, kind="smoke"),
    ]
    for tool in ("memcheck", "racecheck", "synccheck"):
        cmd = [sanitizer or "compute-sanitizer", "--tool", tool, "--error-exitcode", "1", py] + sanitized
        out.append(
            Step(
                tool,
                f"compute-sanitizer {tool} on the smoke cases",
                [cmd],
                150,
                kind="sanitizer",
                skip="" if sanitizer else "compute-sanitizer not found on PATH or under /usr/local/cuda*",
            )
        )
    bench = [py, str(TOOLS / "gpu_bench.py"), "--jsonl", str(work / "bench.jsonl")] + (["--quick"] if quick else [])
    out += [
        Step("bench", "benchmark beside PyTorch", [bench], 240, kind="bench"),
        # Only the tests that need the device: the CPU tests of the backend (stand-in CuPy, emulator) ran in CI.
        Step(
            "gpu-tests",
            "GPU tests (tests/test_cupy_gpu.py)",
            [[py, "-m", "pytest", *pytest_opts, "--junitxml", str(work / "gpu-tests.xml"), "tests/test_cupy_gpu.py"]],
            240,
            kind="pytest",
        ),
        Step(
            "conformance",
            "conformance suite on cupy",
            [
                [
                    py,
                    "-m",
                    "pytest",
                    "-p",
                    "pytest_selfattn",
                    *pytest_opts,
                    "--junitxml",
                    str(work / "conformance.xml"),
                    "--pyargs",
                    "selfattn.testing",
                    "--selfattn-backend=cupy",
                ]
            ],
            240,
            kind="pytest",
        ),
        Step(
            "check",
            "python -m selfattn check --backend cupy",
            [[py, "-m", "selfattn", "check", "--backend", "cupy", "-v"]],
            150,
            kind="check",
        ),
    ]
    return out


# -- running --------------------------------------------------------------------------


def _env() -> dict:
    """The steps' environment: this checkout first on PYTHONPATH (selfattn, tools/), unbuffered output."""
    env = dict(os.environ)
    paths = [str(ROOT), str(TOOLS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """The child gets SIGKILL if this driver dies (Linux), so no step outlives a killed run."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_running: list = []


def _run_command(cmd, log, timeout_s: float) -> tuple:
    """``(exit status, timed out)`` of ``cmd`` with stdout+stderr into ``log``, its process group killed on timeout."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            process_group=0,
            preexec_fn=_die_with_parent,
        )
    except OSError as exc:
        log.write(f"could not start: {exc}\n")
        return 127, False
    _running.append(proc)
    try:
        return proc.wait(timeout=max(1.0, timeout_s)), False
    except subprocess.TimeoutExpired:
        _kill(proc)
        log.write(f"\n*** timed out after {timeout_s:.0f} s: process group killed ***\n")
        return 124, True
    finally:
        _running.remove(proc)


def _kill(proc) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _junit_failures(path: Path) -> list:
    """``"classname::name: first line of the message"`` for each failed or erroring test of a JUnit XML file."""
    if not path.exists():
        return []
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        for tag in ("failure", "error"):
            for el in case.findall(tag):
                msg = (el.get("message") or el.text or "").strip().splitlines()
                out.append(f"{case.get('classname')}::{case.get('name')} ({tag}): {msg[0][:300] if msg else ''}")
    return out


_PYTEST_SUMMARY = re.compile(
    r"\b\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed|tests? collected)\b"
    r"|no tests ran"
)


def summarize(step: Step, text: str, work: Path) -> tuple:
    """``(summary line, failure list)`` of a finished step from its log."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("$ ")]
    failures: list = []
    summary = lines[-1] if lines else "(no output)"
    if step.kind == "pytest":
        found = [ln.strip("= ") for ln in lines if _PYTEST_SUMMARY.search(ln)]
        summary = found[-1] if found else summary
        failures = _junit_failures(work / f"{step.name}.xml")
    elif step.kind in ("smoke", "sanitizer"):
        smoke = [ln for ln in lines if ln.startswith("smoke:")]
        sums = [ln.lstrip("= ") for ln in lines if "SUMMARY" in ln]
        summary = " / ".join(s for s in (sums[-1] if sums else "", smoke[-1] if smoke else "") if s) or summary
        failures = [ln for ln in lines if ln.startswith("FAIL ")]
        if step.kind == "sanitizer":
            failures += [
                ln
                for ln in lines
                if ln.startswith("=========") and ("Invalid" in ln or "Race" in ln or "Barrier" in ln or "hazard" in ln)
            ][:50]
    elif step.kind == "bench":
        found = [ln for ln in lines if ln.startswith(("float16 forward", "No PyTorch timing"))]
        summary = found[-1] if found else summary
    elif step.kind == "check":
        failures = [ln for ln in lines if "FAIL" in ln][:50]
    elif step.name == "facts":
        facts = _read_json(work / "facts.json")
        if facts:
            summary = ", ".join(str(facts.get(k, "?")) for k in ("device", "cupy", "CUDA runtime", "torch"))
    elif step.name == "nvidia-smi" and len(lines) >= 1:
        summary = lines[-1]
    return summary, failures


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _bench_rows(work: Path) -> list:
    path = work / "bench.jsonl"
    if not path.exists():
        return []
    rows = []
    for ln in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(ln))
    return rows


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _tar_logs(work: Path, out: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(work.iterdir()):
            tar.add(path, arcname=path.name)
    _write_atomic(out / "logs.tar.gz", buf.getvalue())


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout here: pass --commit)"


def source_hash(root: Path = ROOT) -> str:
    """sha256 of the package's and the tools' sources (what ran), comparable with a checkout's."""
    h = hashlib.sha256()
    files = sorted(
        p
        for d in ("selfattn", "tools", "benchmarks")
        for p in (root / d).rglob("*")
        if p.is_file() and p.suffix in (".py", ".cu", ".cuh", ".sh")
    )
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def run_steps(
    out: Path, budget_s: float = DEFAULT_BUDGET_S, quick: bool = False, commit: str | None = None, only=None, plan=None
) -> dict:
    """Run the steps within ``budget_s``; results (and ``report.md``) under ``out``. Returns the results.

    ``plan`` replaces :func:`steps` (a function of the work folder returning steps), for tests.
    """
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="selfattn-gpu-"))
    start = time.monotonic()
    results = {
        "started (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": commit or _git_commit(),
        "source sha256": source_hash(),
        "budget_s": budget_s,
        "quick": quick,
        "state": "running",
        "steps": [],
        "facts": {},
        "bench": [],
    }
    plan = [s for s in (plan or steps)(work, quick) if only is None or s.name in only]

    def save(state=None):
        if state:
            results["state"] = state
        results["steps"] = [dict(name=s.name, title=s.title, **s.result) for s in plan]
        results["facts"] = _read_json(work / "facts.json") or {}
        results["bench"] = _bench_rows(work)
        _write_atomic(out / "results.json", json.dumps(results, indent=2).encode())
        _write_atomic(out / "report.md", render(results).encode())

    def on_signal(signum, frame):  # an outer timeout: stop the step, keep what came before
        for proc in list(_running):
            _kill(proc)
        save(f"stopped by signal {signum} during a step")
        _tar_logs(work, out)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    for s in plan:
        s.result = {"status": "pending", "command": " && ".join(" ".join(c) for c in s.commands)}
    save()
    for i, s in enumerate(plan):
        left = budget_s - (time.monotonic() - start)
        if s.skip:
            s.result.update(status="skipped", summary=s.skip)
            save()
            continue
        if left < MIN_STEP_S:
            s.result.update(status="not run", summary=f"budget spent ({left:.0f} s left)")
            save()
            continue
        timeout = min(s.timeout_s, left)
        s.result.update(status="running", timeout_s=round(timeout))
        save()
        current = out / "current.log"
        t0 = time.monotonic()
        rc, timed_out = 0, False
        with open(current, "w") as log:
            log.write(f"# step {s.name}: {s.title} (timeout {timeout:.0f} s)\n")
            for cmd in s.commands:
                rc, timed_out = _run_command(cmd, log, timeout - (time.monotonic() - t0))
                if rc != 0:
                    break
        seconds = time.monotonic() - t0
        text = current.read_text(errors="replace")
        log_name = f"{i:02d}-{s.name}.log"
        os.replace(current, work / log_name)
        summary, failures = summarize(s, text, work)
        status = "timeout" if timed_out else "passed" if rc == 0 else "failed"
        s.result.update(
            status=status, rc=rc, seconds=round(seconds, 1), summary=summary, failures=failures, log=log_name
        )
        save()
        _tar_logs(work, out)
        print(f"[{time.monotonic() - start:5.0f} s] {s.name:<12} {status:<8} {seconds:6.1f} s  {summary}", flush=True)
    save("finished")
    _tar_logs(work, out)
    shutil.rmtree(work, ignore_errors=True)
    return results


# -- reporting ------------------------------------------------------------------------


def _bench_markdown(rows) -> tuple:
    import gpu_bench

    return gpu_bench.markdown(rows), gpu_bench.summarize(rows)


def render(results: dict) -> str:
    """``report.md`` of a run (complete or not)."""
    facts = results.get("facts") or {}
    lines = [
        "# selfattn GPU check",
        "",
        f"State: **{results.get('state')}**; commit {results.get('commit')}; source sha256 "
        f"{results.get('source sha256')}; started {results.get('started (UTC)')} UTC; budget "
        f"{results.get('budget_s')} s" + ("; QUICK (dry run: nothing measured)" if results.get("quick") else ""),
        "",
    ]
    if facts:
        lines += ["| fact | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts.items()] + [""]
    lines += ["| step | status | seconds | summary |", "|---|---|---:|---|"]
    for s in results.get("steps", []):
        summary = str(s.get("summary", "")).replace("|", "/")
        lines.append(f"| {s['name']} | {s.get('status')} | {s.get('seconds', '')} | {summary} |")
    failed = [s for s in results.get("steps", []) if s.get("failures")]
    if failed:
        lines += ["", "## Failures", ""]
        for s in failed:
            lines += [f"### {s['name']}", ""] + [f"- {f}" for f in s["failures"]] + [""]
    if results.get("bench"):
        table, summary = _bench_markdown(results["bench"])
        lines += ["", "## Benchmark", "", summary, "", table]
    lines += [
        "",
        "Full logs: logs.tar.gz (one log per finished step, JUnit XML, benchmark rows); current.log: "
        "the step that was running when the run stopped, if any.",
    ]
    return "\n".join(lines) + "\n"


_BEGIN = "<!-- gpu_report:{part} begin -->"
_END = "<!-- gpu_report:{part} end -->"


def doc_sections(results: dict) -> tuple:
    """``(status line, results section, benchmark section)`` for docs/gpu-validation.md."""
    facts = results.get("facts") or {}
    device = facts.get("device", "an unknown device")
    status = f"run on {device} at commit {results.get('commit')} ({results.get('started (UTC)')} UTC)."
    res = [_BEGIN.format(part="tests"), "## Results", "", "| fact | value |", "|---|---|"]
    res += [f"| {k} | {v} |" for k, v in facts.items()]
    res += ["", "| step | status | seconds | summary |", "|---|---|---:|---|"]
    for s in results.get("steps", []):
        res.append(
            f"| {s['name']} | {s.get('status')} | {s.get('seconds', '')} | "
            f"{str(s.get('summary', '')).replace('|', '/')} |"
        )
    for s in results.get("steps", []):
        if s.get("failures"):
            res += ["", f"Failures in {s['name']}:", ""] + [f"- {f}" for f in s["failures"]]
    res.append(_END.format(part="tests"))
    bench = [_BEGIN.format(part="bench"), "### Benchmark", ""]
    if results.get("bench"):
        table, summary = _bench_markdown(results["bench"])
        bench += [
            f"Measured at commit {results.get('commit')} on {device} (torch {facts.get('torch', '?')}), "
            f"{results.get('started (UTC)')} UTC.",
            "",
            summary,
            "",
            table.strip(),
        ]
    else:
        bench.append("No benchmark rows in this run.")
    bench.append(_END.format(part="bench"))
    return status, "\n".join(res) + "\n", "\n".join(bench) + "\n"


def update_doc(text: str, part: str, section: str, status: str) -> str:
    """``text`` with ``part``'s marked section replaced (or appended) and the status line set."""
    # The un-run report's placeholder (expectations, "not yet run") goes with the first real result.
    pb, pe = _BEGIN.format(part="placeholder"), _END.format(part="placeholder")
    if pb in text and pe in text:
        text = text[: text.index(pb)] + text[text.index(pe) + len(pe) :].lstrip("\n")
    begin, end = _BEGIN.format(part=part), _END.format(part=part)
    if begin in text and end in text:
        i, j = text.index(begin), text.index(end) + len(end)
        text = text[:i] + section.rstrip("\n") + text[j:]
    elif part == "tests" and _BEGIN.format(part="bench") in text:  # keep results before the benchmark
        i = text.index(_BEGIN.format(part="bench"))
        text = text[:i] + section + "\n" + text[i:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    return re.sub(r"^\*\*Status:.*?\*\*", f"**Status: {status}**", text, count=1, flags=re.M | re.S)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the GPU checks; results under --out")
    run.add_argument("--out", required=True, help="folder for report.md, results.json, logs.tar.gz ($OUT)")
    run.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all steps together")
    run.add_argument("--commit", help="the commit being run (the GPU machine's copy may have no .git)")
    run.add_argument("--steps", help="comma-separated step names (default: all, in order)")
    run.add_argument("--quick", action="store_true", help="dry run: tiny shapes, pytest collection only")
    doc = sub.add_parser("doc", help="fold a run's results.json into docs/gpu-validation.md")
    doc.add_argument("results", help="results.json of a run")
    doc.add_argument("--doc", default=str(ROOT / "docs" / "gpu-validation.md"))
    args = ap.parse_args(argv)
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    if args.cmd == "doc":
        results = json.loads(Path(args.results).read_text())
        status, res, bench = doc_sections(results)
        path = Path(args.doc)
        text = update_doc(path.read_text(), "tests", res, status)
        path.write_text(update_doc(text, "bench", bench, status))
        print(f"updated {path}")
        return 0
    only = None
    if args.steps:
        only = {s.strip() for s in args.steps.split(",") if s.strip()}
        unknown = only - {s.name for s in steps(Path("."), args.quick)}
        if unknown:
            ap.error(f"unknown steps {sorted(unknown)}; known: {[s.name for s in steps(Path('.'))]}")
    results = run_steps(Path(args.out), args.budget, args.quick, args.commit, only)
    print((Path(args.out) / "report.md").read_text())
    bad = [s["name"] for s in results["steps"] if s.get("status") in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
