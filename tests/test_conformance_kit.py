"""The conformance kit's own behaviour: backend selection on the command line, and ``check``'s verdicts.

An explicitly requested backend that cannot run must fail the run with the
reason (a GPU CI job with a broken CuPy install must not go green on skips);
an automatic run skips unavailable backends with the reason.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tempfile

import pytest

import selfattn
from selfattn.testing.check import run_check

UNAVAILABLE = [r for r in selfattn.list_backends() if not r.available]


def _pytest(*args: str) -> subprocess.CompletedProcess:
    # From a scratch directory: no conftest.py of this project is picked up, as for a third party.
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    with tempfile.TemporaryDirectory() as scratch:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "--pyargs", "selfattn.testing", "-p", "no:cacheprovider", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=scratch,
        )


@pytest.mark.skipif(not UNAVAILABLE, reason="every registered backend is available here")
def test_explicit_unavailable_backend_is_an_error_with_the_reason():
    rec = UNAVAILABLE[0]
    proc = _pytest(f"--selfattn-backend={rec.name}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert f"backend {rec.name!r} is not available here: {rec.reason}" in out
    assert not re.search(r"\d+ (passed|skipped|failed)", out), out  # nothing ran


def test_explicit_unknown_backend_is_an_error_listing_the_registered_ones():
    proc = _pytest("--selfattn-backend=numpy,no-such-backend")
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert "--selfattn-backend=no-such-backend: no backend of that name is registered (registered: " in out
    assert "numpy" in out.split("registered: ")[-1]


@pytest.mark.skipif(not UNAVAILABLE, reason="every registered backend is available here")
def test_automatic_run_skips_unavailable_backends_with_the_reason():
    rec = UNAVAILABLE[0]
    proc = _pytest("-k", "test_does_not_import_other_array_libraries", "-rs")
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.OK, out
    assert f"backend {rec.name!r} unavailable: {rec.reason}" in out
    assert re.search(r"\b\d+ passed", out), out  # the available backends ran


def test_explicit_available_backend_runs():
    proc = _pytest("--selfattn-backend=numpy", "-k", "test_dropout_known_answer_vectors or test_does_not_import")
    assert proc.returncode == pytest.ExitCode.OK, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout


@pytest.mark.skipif(not UNAVAILABLE, reason="every registered backend is available here")
def test_check_fails_for_a_named_unavailable_or_unknown_backend():
    rec = UNAVAILABLE[0]
    buf = io.StringIO()
    assert run_check([rec.name, "no-such-backend"], out=buf) == 2
    text = buf.getvalue()
    assert f"{rec.name}: FAIL (unavailable: {rec.reason})" in text
    assert "no-such-backend: FAIL (not a registered backend" in text


def test_error_table_tool_prints_the_tables():
    """tools/conformance_errors.py (the numbers behind cases.TOLERANCES) runs and reports every output."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "tools", "conformance_errors.py"), "--backend", "numpy", "--per-case"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for row in ("| float16 | out |", "| float32 (float16 in) | lse |", "| float64 | dk |", "| odd-sizes-float32 |"):
        assert row in proc.stdout, row
