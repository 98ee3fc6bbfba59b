"""The README's Python code blocks run as written (what a new user copies first).

Every fenced ``python`` block of README.md is executed in a fresh namespace,
in a temporary working directory. A block that needs an optional library that
is not installed (CuPy, Dask, distributed) is skipped with that reason; every
other block must run without error.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_OPTIONAL = {"cupy": "cupy", "dask": "dask", "distributed": "distributed", "torch": "torch"}


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in _BLOCK.finditer(text)]


BLOCKS = _blocks()


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    for needle, module in _OPTIONAL.items():
        if re.search(rf"^\s*(import|from)\s+{needle}\b", code, re.M) and importlib.util.find_spec(module) is None:
            pytest.skip(f"README.md:{line} needs {module}, which is not installed")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
