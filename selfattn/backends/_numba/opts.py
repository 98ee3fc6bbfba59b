"""Compile options shared by every Numba kernel (a module of its own so that every kernel module can import it)."""

from __future__ import annotations

__all__ = ["FASTMATH", "OPTS", "INLINE"]

#: Reassociation lets LLVM vectorise the reductions; no nnan/ninf: -inf and NaN
#: carry meaning here (masked scores, NaN propagation).
FASTMATH = {"contract", "reassoc"}
#: Options of every kernel: serial (the host runs task ranges on its own
#: threads), GIL released, cached on disk.
OPTS = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False)
#: Options of helpers inlined into the kernels that call them.
INLINE = dict(OPTS, inline="always")
