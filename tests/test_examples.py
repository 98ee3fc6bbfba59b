"""Run every example as a subprocess (small settings) and check what it prints."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import selfattn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# Built-in backends only: ones registered by the test session itself (conftest) do not exist in a subprocess.
BACKENDS = [
    r.name
    for r in selfattn.list_backends()
    if r.available and r.source == "builtin" and r.capabilities is not None and r.capabilities.array_type == "numpy"
]


def run(script, *args, timeout=240):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def number(pattern, text):
    m = re.search(pattern, text)
    assert m, f"pattern {pattern!r} not found in output:\n{text}"
    return float(m.group(1))


def test_quickstart():
    out = run("quickstart.py")
    for name in BACKENDS:
        assert re.search(rf"^{name}\s*: out \(2, 4, 6, 8\).*rows sum to 1: True.*itself: True", out, re.M), out
    assert "quickstart OK" in out


def test_numpy_walkthrough():
    out = run("numpy_walkthrough.py")
    assert "walkthrough OK" in out
    assert number(r"6\. max \|by hand - selfattn\| output: (\S+)", out) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_attention(backend):
    out = run("train_attention.py", "--steps", "120", "--backend", backend)
    first, last = (number(p, out) for p in (r"loss: first (\S+)", r"loss: first \S+ -> last (\S+)"))
    assert last < 0.2 * first
    acc = number(r"SUMMARY attention accuracy (\S+)", out)
    base = number(r"vs no-attention baseline (\S+)", out)
    assert acc > 0.9 and base < 0.3, out


def test_text_classification():
    out = run("text_classification.py", "--train", "3000", "--test", "1000", "--epochs", "8", "--lr", "5e-3")
    first = number(r"attention train loss: first epoch (\S+)", out)
    last = number(r"-> last epoch (\S+)", out)
    att = number(r"held-out accuracy: attention (\S+)", out)
    bow = number(r"bag-of-words baseline (\S+)", out)
    assert last < 0.5 * first, out
    assert att > 0.85 and att > bow + 0.08, out
    assert bow < 0.8, out
