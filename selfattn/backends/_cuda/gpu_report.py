"""Run every GPU check of the CuPy backend and write the results into docs/gpu-validation.md.

Usage (on a machine with an NVIDIA GPU, from a checkout, after
``pip install -e '.[cuda12,test]' torch``)::

    python -m selfattn.backends._cuda.gpu_report                 # tests + check + benchmark
    python -m selfattn.backends._cuda.gpu_report --part tests    # only the correctness part
    python -m selfattn.backends._cuda.gpu_report --part bench    # only the benchmark

What it records, each from a run it makes itself (nothing is typed in): the
device, driver, CUDA runtime, CuPy/PyTorch versions and the commit; the summary
line of ``pytest tests/test_cupy_backend.py tests/test_cuda_emulation.py``, of
the conformance suite on ``cupy`` and the tail of ``python -m selfattn check``;
and :mod:`bench_gpu`'s table with the float16 forward's ratio to PyTorch set
against the issue's target (>= 0.5x, stretch 0.8x). ``--part`` splits the work
across calls (a GPU lease limits one command's time); each part replaces only
its own section of the report, so the parts can come from separate runs on the
same commit.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
from pathlib import Path

__all__ = ["device_facts", "run_tests", "summarize_bench", "render", "update_report", "main"]

_BEGIN = "<!-- gpu_report:{part} begin -->"
_END = "<!-- gpu_report:{part} end -->"
TARGET, STRETCH = 0.5, 0.8


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def device_facts(root: Path) -> dict:
    """Device and software facts, read from CuPy/PyTorch/git on this machine."""
    import cupy

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])

    def ver(v):
        return f"{v // 1000}.{(v % 1000) // 10}"

    facts = {
        "device": name,
        "compute capability": f"{props['major']}.{props['minor']}",
        "memory": f"{props['totalGlobalMem'] / 2**30:.0f} GiB",
        "driver (CUDA version it supports)": ver(cupy.cuda.runtime.driverGetVersion()),
        "CUDA runtime": ver(cupy.cuda.runtime.runtimeGetVersion()),
        "cupy": cupy.__version__,
        "commit": _git_commit(root),
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if smi.returncode == 0 and smi.stdout.strip():
            facts["driver"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import torch

        facts["torch"] = torch.__version__
    except ImportError:
        facts["torch"] = "not installed"
    return facts


def _summary_line(output: str) -> str:
    """pytest's final summary line (``N passed, M skipped in Xs``), or the last line."""
    lines = [ln.strip("= ").strip() for ln in output.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", ln):
            return ln
    return lines[-1] if lines else "(no output)"


def run_tests(root: Path) -> list:
    """``[(what, command, exit status, summary)]`` of the correctness runs."""
    py = sys.executable
    runs = [
        ("CuPy backend tests (GPU ones included)",
         [py, "-m", "pytest", "-q", "-p", "no:randomly", "tests/test_cupy_backend.py", "tests/test_cuda_emulation.py"]),
        ("conformance suite on `cupy`",
         [py, "-m", "pytest", "-q", "-p", "no:randomly", "--pyargs", "selfattn.testing", "--selfattn-backend=cupy"]),
        ("`python -m selfattn check`", [py, "-m", "selfattn", "check"]),
    ]
    results = []
    for what, cmd in runs:
        res = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        out = res.stdout + res.stderr
        if cmd[2] == "selfattn":
            summary = " / ".join(ln.strip() for ln in out.strip().splitlines()[-4:])
        else:
            summary = _summary_line(out)
        results.append((what, " ".join(["python"] + cmd[1:]), res.returncode, summary))
    return results


def summarize_bench(rows) -> str:
    """The float16 forward's speed against PyTorch, set against the target."""
    ratios = [r["ratio"] for r in rows if r["dtype"] == "float16" and r["pass_"] == "fwd" and r["ratio"] is not None]
    if not ratios:
        return "No PyTorch timing: the float16 forward could not be compared with the target."
    lo, hi = min(ratios), max(ratios)
    verdict = ("met (stretch goal too)" if lo >= STRETCH else "met" if lo >= TARGET
               else f"not met by {sum(r < TARGET for r in ratios)} of {len(ratios)} configurations")
    return (f"float16 forward / PyTorch SDPA throughput: {lo:.2f}-{hi:.2f}x over {len(ratios)} configurations; "
            f"target >= {TARGET}x (stretch {STRETCH}x): {verdict}.")


def render(part: str, facts: dict, tests=None, bench_md: str | None = None, bench_summary: str | None = None) -> str:
    """Markdown of one report section (``part`` is "tests" or "bench")."""
    out = [_BEGIN.format(part=part)]
    if part == "tests":
        out += ["## Results", "", "| fact | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in facts.items()]
        out += ["", "| check | command | exit | summary |", "|---|---|---:|---|"]
        out += [f"| {w} | `{c}` | {rc} | {s.replace('|', '/')} |" for w, c, rc, s in tests]
    else:
        out += ["### Benchmark", "", f"Measured at commit {facts['commit']} on {facts['device']} "
                f"(torch {facts.get('torch', '?')}), {facts['date (UTC)']}.", "", bench_summary or "", "",
                (bench_md or "").strip()]
    out.append(_END.format(part=part))
    return "\n".join(out) + "\n"


def update_report(text: str, part: str, section: str, status: str) -> str:
    """``text`` with ``part``'s section replaced (or appended) and the status line set."""
    # The un-run report's placeholder (expectations, "not yet run") goes with the first real result.
    pb, pe = _BEGIN.format(part="placeholder"), _END.format(part="placeholder")
    if pb in text and pe in text:
        text = text[:text.index(pb)] + text[text.index(pe) + len(pe):].lstrip("\n")
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
    """Command line; exit status 0, 1 if a correctness run failed, 2 without a usable CuPy backend."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "tests", "bench"), default="all")
    ap.add_argument("--out", default="docs/gpu-validation.md")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--root", default=".", help="the checkout (for git and the tests)")
    args = ap.parse_args(argv)
    import selfattn

    try:
        selfattn.get_backend("cupy")
        ok, reason = selfattn.get_backend("cupy").availability()
    except Exception as exc:
        ok, reason = False, str(exc)
    if not ok:
        print(f"cupy backend unavailable: {reason}", file=sys.stderr)
        return 2
    root = Path(args.root).resolve()
    facts = device_facts(root)
    path = Path(args.out)
    text = path.read_text() if path.exists() else "# GPU validation of the CuPy backend\n\n**Status: -**\n"
    status = f"run on {facts['device']} at commit {facts['commit']} ({facts['date (UTC)']} UTC)."
    rc = 0
    if args.part in ("all", "tests"):
        tests = run_tests(root)
        if any(r != 0 for _, _, r, _ in tests):
            rc = 1
        text = update_report(text, "tests", render("tests", facts, tests=tests), status)
        path.write_text(text)
    if args.part in ("all", "bench"):
        import cupy

        from . import bench_gpu

        rows = bench_gpu.run([(4, 16, 4096, 64), (4, 16, 4096, 128)], [cupy.float16, cupy.float32], args.repeat)
        rows += bench_gpu.run_decode([(8, 32, 32768, 128)], args.repeat)
        section = render("bench", facts, bench_md=bench_gpu.markdown(rows, facts["device"]),
                         bench_summary=summarize_bench(rows))
        text = update_report(text, "bench", section, status)
        path.write_text(text)
    print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
