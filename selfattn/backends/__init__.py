"""Built-in backends, one module each (``numpy_``, ``numba_``, ``cupy_``, ``dask_``), and the backend contract.

The contract third-party backends implement is public here: :class:`Backend`
(the abstract base class), :class:`Problem` (the validated call every backend
receives) and :class:`Coordinates` (where a chunk of a larger call sits).

Module names end in an underscore so that ``selfattn.backends.numba_`` never
shadows the ``numba`` package it wraps. :data:`BUILTIN` is the one table the
dispatcher reads: it lets availability be checked with
``importlib.util.find_spec`` and array-type filtering happen without importing
a backend module (and so without importing numba or cupy).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._problem import Coordinates, Problem
from ._base import Backend

__all__ = ["Backend", "Problem", "Coordinates", "BuiltinSpec", "BUILTIN"]


@dataclass(frozen=True)
class BuiltinSpec:
    """Static facts about a built-in backend, known without importing it.

    ``module`` holds a module-level ``backend`` object; ``requires`` are the
    importable packages it needs; ``extra`` is the pip extra that installs them;
    ``array_type`` is the array library it consumes; lower ``priority`` is tried
    first by automatic selection.
    """

    name: str
    module: str
    requires: tuple[str, ...]
    extra: str | None
    array_type: str
    priority: int


#: Built-in backends in automatic-selection priority order.
BUILTIN = {
    spec.name: spec
    for spec in (
        BuiltinSpec("cupy", "selfattn.backends.cupy_", ("cupy",), "cuda12", "cupy", 10),
        BuiltinSpec("numba", "selfattn.backends.numba_", ("numba",), "numba", "numpy", 20),
        BuiltinSpec("dask", "selfattn.backends.dask_", ("dask",), "dask", "dask", 30),
        BuiltinSpec("numpy", "selfattn.backends.numpy_", (), None, "numpy", 100),
    )
}
