"""Import the developer tools of ``tools/`` and the asv suite (beside the package, not part of it) in tests."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def tool(name: str):
    """The module ``tools/<name>.py`` (``tools/`` goes on ``sys.path``, as when a tool runs as a script)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


def benchmark(name: str):
    """The module ``benchmarks/<name>.py`` of this checkout (the asv suite is a package beside selfattn)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")
