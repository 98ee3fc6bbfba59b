"""pytest plugin shim: ``-p pytest_selfattn`` gives ``--selfattn-backend`` with or without an install.

selfattn's pytest plugin (``selfattn.testing.plugin``) reaches pytest through the
``pytest11`` entry point of an installed distribution. A checkout that is only on
``PYTHONPATH`` (a clean copy: no ``*.egg-info``, as on a GPU machine) has no entry
point, so ``--selfattn-backend`` is "unrecognized"; and naming the plugin with
``-p selfattn.testing.plugin`` where it *is* installed registers the module a
second time, which pytest refuses ("Plugin already registered under a different
name"). This shim registers the plugin only when the entry point has not, after
pytest has loaded its entry points and before it parses the command line, so
one command works in both cases::

    PYTHONPATH=.:tools python -m pytest -p pytest_selfattn --pyargs selfattn.testing --selfattn-backend=cupy
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args) -> None:
    """Register ``selfattn.testing.plugin`` unless it is registered already (under any name)."""
    from selfattn.testing import plugin

    manager = early_config.pluginmanager
    if not manager.is_registered(plugin):
        # pytest_addoption is a historic hook: registering now still adds the option.
        manager.register(plugin, "selfattn.testing.plugin")
