"""pytest plugin: ``--selfattn-backend`` and the ``selfattn_backend`` parametrization.

Registered through the ``pytest11`` entry point, so it is active whenever
selfattn is installed. Any test that takes a ``selfattn_backend`` argument is
run once per backend:

* with ``--selfattn-backend NAME`` (repeatable, or comma-separated), once per
  named backend. A named backend that is not registered, or not available
  here, stops the run with a usage error that gives the reason (pytest exits
  with status 4): a CI job asked to test the CuPy backend must not turn green
  by skipping every test because CuPy failed to install.
* without it, once per registered backend, where an unavailable one is a skip
  that states its reason (an automatic run tests what this machine has).

Importing this module imports only pytest; selfattn is imported when a run
needs the backend list.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("selfattn")
    group.addoption(
        "--selfattn-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="run the selfattn conformance tests against this backend (repeatable or comma-separated; default: "
        "every registered backend, skipping unavailable ones). A named backend that cannot run here is an error.",
    )


def chosen_backends(config) -> list[str]:
    """The backend names given with ``--selfattn-backend`` (empty: automatic)."""
    given = config.getoption("selfattn_backend", default=[]) or []
    return [n.strip() for opt in given for n in opt.split(",") if n.strip()]


def pytest_sessionstart(session):
    """Refuse the run when an explicitly requested backend is unknown or unavailable, with the reason."""
    chosen = chosen_backends(session.config)
    if not chosen:
        return
    import selfattn

    records = {r.name: r for r in selfattn.list_backends()}
    problems = []
    for name in chosen:
        rec = records.get(name)
        if rec is None:
            problems.append(
                f"--selfattn-backend={name}: no backend of that name is registered "
                f"(registered: {', '.join(records) or 'none'})"
            )
        elif not rec.available:
            problems.append(f"--selfattn-backend={name}: backend {name!r} is not available here: {rec.reason}")
    if problems:
        raise pytest.UsageError(
            "\n".join(problems) + "\nA backend named with --selfattn-backend must run; without the option "
            "every registered backend is tested and unavailable ones are skipped with the reason."
        )


def backend_params(config):
    """``pytest.param`` objects for the backends selected by the command line."""
    import selfattn

    chosen = chosen_backends(config)
    records = {r.name: r for r in selfattn.list_backends()}
    params = []
    for name in chosen or list(records):
        rec = records.get(name)
        if rec is not None and not rec.available and not chosen:
            reason = f"backend {name!r} unavailable: {rec.reason}"
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=reason)))
        else:
            # Named explicitly: pytest_sessionstart has already refused an unknown or unavailable name.
            params.append(pytest.param(name, id=name))
    return params


def pytest_generate_tests(metafunc):
    if "selfattn_backend" in metafunc.fixturenames:
        metafunc.parametrize("selfattn_backend", backend_params(metafunc.config), scope="module")
