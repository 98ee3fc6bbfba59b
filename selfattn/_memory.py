"""Fail fast on results that cannot be allocated.

Before any computation the public functions compare the bytes of what the
call returns (output, lse, weights) with the memory the inputs' device can
give: host memory for NumPy arrays (``MemAvailable`` + free swap on Linux,
else physical memory), the device's free memory for CuPy arrays. A result
that cannot fit raises :class:`MemoryError` naming its size and what to do,
instead of computing for minutes and failing in an allocation at the end.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["available_bytes", "require", "format_bytes"]


def format_bytes(n: float) -> str:
    """``n`` bytes in a readable unit (``"298.0 GiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _host_bytes() -> int | None:
    try:
        fields = {}
        with open("/proc/meminfo") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
        if "MemAvailable" in fields:
            return fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(array_type: str, like: Any = None) -> int | None:
    """Bytes the inputs' device can still allocate (None when it cannot be told)."""
    if array_type == "dask":
        return None  # lazy results, held in pieces by the workers: no one machine must hold them
    if array_type == "cupy":
        cupy = sys.modules.get("cupy")
        if cupy is None:
            return None
        try:
            with cupy.cuda.Device(like.device.id if like is not None else None):
                free, _total = cupy.cuda.runtime.memGetInfo()
            # CuPy's pool may hold freed blocks that it can hand out again.
            return int(free + cupy.get_default_memory_pool().free_bytes())
        except Exception:
            return None
    return _host_bytes()


#: Results below this size are never checked: the check reads /proc/meminfo (or asks
#: the GPU), which costs more than a small call's whole computation.
CHECK_FROM_BYTES = 64 * 2**20


def require(nbytes: int, array_type: str, what: str, hint: str, like: Any = None) -> None:
    """Raise :class:`MemoryError` when ``nbytes`` cannot be allocated on the inputs' device.

    ``what`` describes the result (with its shape); ``hint`` says what to do
    instead. Called before any computation; results under
    :data:`CHECK_FROM_BYTES` are not checked.
    """
    if nbytes < CHECK_FROM_BYTES:
        return
    avail = available_bytes(array_type, like)
    if avail is not None and nbytes > avail:
        where = "GPU" if array_type == "cupy" else "machine"
        raise MemoryError(
            f"{what}: {format_bytes(nbytes)} needed, more than this {where} can allocate now "
            f"({format_bytes(avail)} available); {hint}"
        )
