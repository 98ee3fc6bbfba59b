"""The interface every backend implements: :class:`Backend`, on a validated :class:`~selfattn.backends.Problem`.

A backend is an object with a ``name``, a ``version``, declared
``capabilities`` (:class:`selfattn.Capabilities`) and two methods that take a
validated :class:`selfattn.backends.Problem`:

``forward(problem) -> (out, lse, weights)``
    ``out`` ``(B, Hq, N, Dv)`` in ``problem.dtype``; ``lse`` ``(B, Hq, N)`` in
    ``problem.lse_dtype`` when ``problem.want_lse`` else None; ``weights``
    ``(B, Hq, N, M)`` in ``problem.dtype`` when ``problem.return_weights`` else
    None. Arrays of the problem's array library. Rows with nothing to attend
    get output 0, lse ``-inf`` and weights 0. Allocate the outputs before
    computing, so a result that cannot be allocated fails at once.

``backward(problem, out, lse, grad_out) -> (dq, dk, dv)``
    Gradients in the layouts of ``problem.query``/``key``/``value`` and
    ``problem.dtype``, given the forward's ``out`` and ``lse`` and a validated
    ``grad_out`` ``(B, Hq, N, Dv)``. Only needed with the ``"vjp"`` capability.

Backends never validate user input (the core did: the problem's invariants
hold) and never write to the problem's arrays. The dispatcher only hands a
backend calls inside its declared capabilities. A backend declaring
``"chunks"`` honours ``problem.offset`` and ``problem.coords`` (a chunk of a
larger call, as the Dask backend makes them). Third-party backends subclass
:class:`Backend` and register a zero-argument factory (or the object) in the
``selfattn.backends`` entry-point group; see the README and
``examples/plugin_backend``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from .._capabilities import Capabilities
from .._problem import Array, Problem

__all__ = ["Backend"]


class Backend(ABC):
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

    def info(self) -> dict[str, Any]:
        """Extra facts for ``python -m selfattn info`` (threads, devices...)."""
        return {}

    def plan(self, problem: Problem) -> str:
        """One line on how the backend would run ``problem`` (kernels, threads...), for ``explain``; "" if none."""
        return ""

    @abstractmethod
    def forward(self, problem: Problem) -> tuple[Array, Array | None, Array | None]:
        """``(out, lse, weights)`` for ``problem`` (see the module docstring)."""

    def backward(self, problem: Problem, out: Array, lse: Array, grad_out: Array) -> tuple[Array, Array, Array]:
        """``(dq, dk, dv)``; backends that declare the ``"vjp"`` capability override this."""
        raise NotImplementedError(f"backend {self.name!r} does not implement the backward pass")

    def __repr__(self) -> str:
        return f"<selfattn backend {self.name!r} {self.version}>"
