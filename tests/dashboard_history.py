"""A throw-away two-commit git history and the asv results recorded for it: the dashboard test's fixture.

:func:`make_history` builds, in any folder, a git repository with two commits
whose hashes never change (fixed author, committer, dates and contents), so
asv results recorded once for those commits stay valid wherever the test runs.
The results live in ``tests/fixtures/dashboard/results`` in asv's own format,
exactly as ``asv run`` wrote them; record them again with::

    python tests/dashboard_history.py --record      # a few minutes on 2 cores

which runs the benchmarks named in :data:`BENCHMARKS` of this checkout's
suite, with the selfattn installed in this Python (``asv run --python=same
--set-commit-hash``), once for each of the two commits. Both commits time the
same code: the history is synthetic, the numbers are real measurements.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "dashboard")
MACHINE = "selfattn-fixture"

#: asv -b regexes recorded: a one-parameter benchmark with every backend (Dispatch), a tracked
#: GFLOP/s per backend and shape, and an unparameterized one.
BENCHMARKS = (r"Dispatch\.time_dispatch_tiny\(", r"AttentionForward\.track_gflops", r"Import\.")

_ENV = {
    "GIT_AUTHOR_NAME": "selfattn fixture",
    "GIT_AUTHOR_EMAIL": "fixture@example.invalid",
    "GIT_COMMITTER_NAME": "selfattn fixture",
    "GIT_COMMITTER_EMAIL": "fixture@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}
_COMMITS = (("2026-01-05T10:00:00+00:00", "first commit"), ("2026-01-06T10:00:00+00:00", "second commit"))


def _git(repo: str, *argv: str, date: str | None = None) -> str:
    env = dict(os.environ, **_ENV)
    if date:
        env.update(GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date)
    res = subprocess.run(["git", "-C", repo, *argv], env=env, capture_output=True, text=True, check=True)
    return res.stdout.strip()


def make_history(path: str) -> list[str]:
    """Create the two-commit repository at ``path`` (branch ``main``); return the hashes, oldest first."""
    os.makedirs(path, exist_ok=True)
    _git(path, "init", "-q", "-b", "main")
    hashes = []
    for i, (date, message) in enumerate(_COMMITS):
        with open(os.path.join(path, "history.txt"), "a") as fh:
            fh.write(f"{message}\n")
        _git(path, "add", "history.txt")
        _git(path, "commit", "-q", "-m", message, date=date)
        hashes.append(_git(path, "rev-parse", "HEAD"))
        assert len(hashes) == i + 1
    return hashes


def write_config(repo: str, results_dir: str, html_dir: str) -> str:
    """An ``asv.conf.json`` in ``repo`` for this checkout's suite, with the given results and HTML folders."""
    with open(os.path.join(ROOT, "asv.conf.json")) as fh:
        text = "\n".join(line for line in fh if not line.lstrip().startswith("//"))
    conf = json.loads(text)
    conf.update(
        repo=".",
        results_dir=results_dir,
        html_dir=html_dir,
        env_dir=os.path.join(repo, ".asv", "env"),
        benchmark_dir=os.path.join(ROOT, "benchmarks"),
        project_url="",
        show_commit_url="",
    )
    path = os.path.join(repo, "asv.conf.json")
    with open(path, "w") as fh:
        json.dump(conf, fh, indent=2)
    return path


def expected_hashes() -> list[str]:
    """The commit hashes the recorded results belong to (from the fixture's result files)."""
    with open(os.path.join(FIXTURE, "commits.json")) as fh:
        return json.load(fh)


def record() -> int:
    """Run the benchmarks for both commits and store asv's results as the fixture."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = os.path.join(tmp, "history")
        hashes = make_history(repo)
        results = os.path.join(tmp, "results")
        config = write_config(repo, results, os.path.join(tmp, "html"))
        # asv keeps machine descriptions in ~/.asv-machine.json: use a private home for this one
        env = dict(os.environ, HOME=tmp)
        asv = [sys.executable, "-m", "asv"]
        subprocess.run(
            [*asv, "machine", "--yes", "--machine", MACHINE, "--config", config], env=env, cwd=repo, check=True
        )
        for commit in hashes:
            cmd = [
                *asv,
                "run",
                "--python=same",
                "--set-commit-hash",
                commit,
                "--machine",
                MACHINE,
                "--show-stderr",
                "--config",
                config,
            ]
            for regex in BENCHMARKS:
                cmd += ["-b", regex]
            subprocess.run(cmd, env=env, cwd=repo, check=True)
        shutil.rmtree(os.path.join(FIXTURE, "results"), ignore_errors=True)
        shutil.copytree(results, os.path.join(FIXTURE, "results"))
        with open(os.path.join(FIXTURE, "commits.json"), "w") as fh:
            json.dump(hashes, fh, indent=2)
            fh.write("\n")
    print(f"recorded asv results for {hashes} into {os.path.relpath(FIXTURE, ROOT)}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(f"usage: python {os.path.relpath(__file__)} --record")
    sys.exit(record())
