"""The NumPy backend: the readable, memory-bounded baseline.

Every feature of the public API, forward and VJP, for float16 (computed in
float32), float32 and float64. It runs the blockwise algorithm of
:mod:`selfattn.backends._blockwise` (shared with the CuPy backend) with
NumPy's CPU shortcuts switched on: temporary memory stays below
``block_bytes`` (32 MiB by default) whatever N and M are, unless the caller
asks for the full weights, and blocks aim at ``cache_bytes`` (2 MiB) so the
softmax between the two products runs from cache; all query heads of a block run as one batched
matmul, grouped-query heads share their key/value head without copying K or
V; keys that causal/window masking excludes for a whole row block are sliced
away before the matmul. Dropout multipliers come from
:func:`selfattn._dropout.keep_mask`, hashed on the host.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._capabilities import FEATURES, Capabilities
from .._problem import Problem
from . import _blockwise
from ._base import Backend

__all__ = ["NumpyBackend", "backend", "dropout_multipliers"]


def dropout_multipliers(pb: Problem, b0: int, b1: int, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
    """Dropout multipliers (0 or ``1/(1-p)``) of a block, ``(b1-b0, Hq, i1-i0, j1-j0)`` in the compute dtype.

    Counters are the problem's global ones (:meth:`Problem.dropout_keep`),
    so a chunk of a larger call draws exactly its piece of the whole pattern.
    """
    cdt = pb.compute_dtype
    return pb.dropout_keep(b0, b1, i0, i1, j0, j1).astype(cdt) * cdt.type(1.0 / (1.0 - pb.dropout_p))


#: Score blocks of at least this many entries (N·M) use the CPU shortcuts of the blockwise algorithm.
SHORTCUTS_FROM = 128 * 128


class NumpyBackend(Backend):
    """Blocked exact attention in NumPy (see the module docstring)."""

    name = "numpy"
    priority = 100
    capabilities = Capabilities(array_type="numpy", features=frozenset(FEATURES))

    def __init__(self, block_bytes: int = 32 * 2**20, cache_bytes: int | None = 2 * 2**20) -> None:
        #: Most bytes one block's score tile may take (the backward uses a third of it per block).
        self.block_bytes = int(block_bytes)
        #: Tile size to aim for so the softmax between the products runs from cache (None: fill
        #: ``block_bytes``); blocks keep at least 256 query rows. See ``_blockwise.row_block``.
        self.cache_bytes = None if cache_bytes is None else int(cache_bytes)
        self.version = np.__version__

    def info(self) -> dict[str, Any]:
        return {"numpy": np.__version__}

    def forward(self, problem: Problem) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        run = _blockwise.forward_varlen if problem.is_varlen else _blockwise.forward
        # The shortcuts save passes over large score blocks; on small ones their own
        # cost (norms, a copy of V with a column of ones) is larger than what they save.
        big = problem.n * problem.m >= SHORTCUTS_FROM
        return run(
            problem,
            np,
            block_bytes=self.block_bytes,
            cache_bytes=self.cache_bytes,
            dropout=dropout_multipliers,
            shift_free_ok=big,
            ones_column=big,
            reuse_buffer=big,
        )

    def backward(
        self, problem: Problem, out: np.ndarray, lse: np.ndarray, grad_out: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        run = _blockwise.backward_varlen if problem.is_varlen else _blockwise.backward
        return run(
            problem,
            np,
            out,
            lse,
            grad_out,
            block_bytes=self.block_bytes,
            cache_bytes=self.cache_bytes,
            dropout=dropout_multipliers,
        )


#: The instance the dispatcher registers.
backend = NumpyBackend()
