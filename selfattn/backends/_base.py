"""The interface every backend implements.

A backend is an object with a ``name``, a ``version``, declared
``capabilities`` (:class:`selfattn.Capabilities`) and two methods that take a
validated :class:`selfattn._problem.Problem`:

``forward(problem) -> (out, lse, weights)``
    ``out`` ``(B, Hq, N, Dv)`` in ``problem.dtype``; ``lse`` ``(B, Hq, N)`` in
    ``problem.lse_dtype`` when ``problem.want_lse`` else None; ``weights``
    ``(B, Hq, N, M)`` in ``problem.dtype`` when ``problem.return_weights`` else
    None. Arrays of the problem's array library.

``backward(problem, out, lse, grad_out) -> (dq, dk, dv)``
    Gradients in the layouts of ``problem.query``/``key``/``value`` and
    ``problem.dtype``, given the forward's ``out`` and ``lse`` and a validated
    ``grad_out`` ``(B, Hq, N, Dv)``. Only needed with the ``"vjp"`` capability.

Backends never validate user input (the core did) and never write to the
problem's arrays. Third-party backends subclass :class:`Backend` (or provide the
same attributes) and register through the ``selfattn.backends`` entry point
group; see the README.
"""

from __future__ import annotations

from .._capabilities import Capabilities

__all__ = ["Backend"]


class Backend:
    """Base class for attention backends (see the module docstring for the contract)."""

    #: Registered name, e.g. ``"numpy"``.
    name: str = ""
    #: Version string reported by ``list_backends``.
    version: str = ""
    #: What the backend can do; drives selection, errors, tests and docs.
    capabilities: Capabilities
    #: Automatic-selection priority: lower runs first. Built-ins use 10-100;
    #: plugins default to 200 so installing one never changes the default choice.
    priority: int = 200

    def availability(self) -> tuple[bool, str]:
        """Return ``(True, "")`` if the backend can run here, else ``(False, reason)``."""
        return True, ""

    def info(self) -> dict:
        """Extra facts for ``python -m selfattn info`` (threads, devices...)."""
        return {}

    def forward(self, problem):  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, problem, out, lse, grad_out):  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self):
        return f"<selfattn backend {self.name!r} {self.version}>"
