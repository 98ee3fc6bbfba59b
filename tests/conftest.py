"""Test configuration: make the entry-point ``loopback`` backend discoverable.

``tests/plugins/good`` holds a ``*.dist-info`` directory with a real
``selfattn.backends`` entry point, so putting it on ``sys.path`` is exactly how
an installed third-party distribution is seen by ``importlib.metadata``.
"""

import pathlib
import sys

PLUGINS = pathlib.Path(__file__).parent / "plugins"
sys.path.insert(0, str(PLUGINS / "good"))

import selfattn._dispatch  # noqa: E402

selfattn._dispatch.registry.reset()
