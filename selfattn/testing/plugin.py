"""pytest plugin: ``--selfattn-backend`` and the ``selfattn_backend`` parametrization.

Registered through the ``pytest11`` entry point, so it is active whenever
selfattn is installed. Any test that takes a ``selfattn_backend`` argument is
run once per backend: the names given with ``--selfattn-backend`` (repeatable,
or comma-separated), else every registered backend, where an unavailable one
is a skip that states its reason. Importing this module imports only pytest.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("selfattn")
    group.addoption(
        "--selfattn-backend", action="append", default=[], metavar="NAME",
        help="run the selfattn conformance tests against this backend (repeatable; default: all registered)",
    )


def backend_params(config):
    """``pytest.param`` objects for the backends selected by the command line."""
    import selfattn

    chosen = [n.strip() for opt in config.getoption("selfattn_backend", default=[]) or [] for n in opt.split(",") if n.strip()]
    records = {r.name: r for r in selfattn.list_backends()}
    names = chosen or list(records)
    params = []
    for name in names:
        rec = records.get(name)
        if rec is None:
            # Let the test fail loudly with BackendNotFoundError rather than skip.
            params.append(pytest.param(name, id=name))
        elif not rec.available:
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=f"backend {name!r} unavailable: {rec.reason}")))
        else:
            params.append(pytest.param(name, id=name))
    return params


def pytest_generate_tests(metafunc):
    if "selfattn_backend" in metafunc.fixturenames:
        metafunc.parametrize("selfattn_backend", backend_params(metafunc.config), scope="module")
