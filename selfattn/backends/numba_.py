"""The Numba backend: FlashAttention kernels compiled for the CPU.

Every feature of the public API, forward and VJP, for float16 (computed in
float32, returned float16; lse float32), float32 and float64. Kernel
families (:mod:`selfattn.backends._numba`) share one algorithm -- online
softmax over key blocks, no N x M scores stored (only ``return_weights=True``
materialises N x M):

* **SIMD** (:mod:`~selfattn.backends._numba.simd`, every call but the tiny
  and decode-like ones): tile products on our own register-blocked vector
  micro-kernels (:mod:`~selfattn.backends._numba.microkernel`, LLVM vector
  FMAs at the host CPU's width), ``P`` read in place for ``P @ V``, no BLAS;
* **fused** (:mod:`~selfattn.backends._numba.fused`, tiny problems,
  decode-like shapes, packed variable-length batches): small tiles and a
  register-blocked scalar dot product; decode-like shapes split the keys and
  merge by log-sum-exp (flash-decoding);
* **BLAS-tile** (:mod:`~selfattn.backends._numba.blas`, only with
  ``kernels="blas"``): tile products handed to single-threaded sgemm/dgemm
  (SciPy's BLAS, limited to one thread with threadpoolctl while they run).

Threads: the kernels are serial and release the GIL; this module runs task
ranges on its own sleeping worker threads (:mod:`~selfattn.backends._numba.pool`)
instead of ``numba.prange``, whose OpenMP workers spin after every call and
collided with NumPy's OpenBLAS workers (a 12x stall in layer pipelines).
Small calls run inline on the calling thread. The thread count is Numba's
(``NUMBA_NUM_THREADS`` / ``numba.set_num_threads``), further limited for the
calls inside :func:`thread_budget` (the Dask backend uses it so a chunk task
uses its worker's share). Calls from several Python threads run concurrently.

Compilation: kernels compile on the first call that needs them and are
cached on disk (``cache=True``; ``NUMBA_CACHE_DIR``), two specialisations
(float32/float64) each; sizes are run-time arguments, so shapes never trigger
a compile. The first compile of a kernel family in a process is announced
once on the ``selfattn`` logger (INFO) and, when stderr is a terminal, as one
line on stderr. ``python -m selfattn compile`` compiles and caches every
family ahead of time; ``python -m selfattn info`` shows what is cached.
Importing this module does not import Numba.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .._capabilities import FEATURES, Capabilities, WorkRange
from .._problem import Problem, normalize, normalize_varlen
from ._base import Backend
from ._numba.args import KernelParams, as3, kernel_params
from ._numba.pool import OncePer, run_tasks
from ._numba.scratch import scratch

__all__ = ["NumbaBackend", "backend", "thread_budget", "FAMILIES", "MIN_FLOPS", "WORK_RANGE"]

_log = logging.getLogger("selfattn")

#: The work range where this backend pays off (``Capabilities.work_range``), measured side by
#: side against the NumPy backend on a 2-core x86 VM (``tools/crossover.py``, plain and
#: ``--layer``; the README's Performance section has the table). Outside it automatic selection
#: runs NumPy, which needs no compiled kernel and no thread hand-off and whose batched BLAS
#: products are as fast or faster: prefill-like calls below ~1e7 FLOPs (unless spread over 32+
#: heads), and decode-like calls below 16k keys (NumPy's matrix-vector products stream K/V at
#: full memory bandwidth). With the SIMD kernels Numba wins from there up (numba / numpy
#: 0.60-0.97 between 1e7 and 1e9 FLOPs; with the BLAS-tile kernels it lost below ~1e9, which was
#: the threshold until they were replaced).
MIN_FLOPS = 1.0e7
WORK_RANGE = WorkRange(min_flops=MIN_FLOPS, min_flops_many_heads=2.0e6, many_heads=32, min_keys_decode=16384)
#: Default thread thresholds (instance attributes ``flops_per_thread`` / ``bytes_per_thread``):
#: one more thread per this much work. Measured: below ~5 ms of single-thread work a second
#: thread did not pay for waking it (and the BLAS-tile kernels scale poorly on small tiles).
FLOPS_PER_THREAD = 2.5e8
#: Decode-like calls (memory-bound) get one more thread per this many bytes of K and V.
BYTES_PER_THREAD = 32 * 2**20
#: ``kernels="auto"`` runs the SIMD kernels from this much work (B*Hq*N*M*D) and this many
#: query rows, the fused ones below (and for decode-like calls, whose keys they split).
#: Measured side by side (2-core Xeon, AVX-512, float32): SIMD 0.125 vs fused 0.22 ms at
#: (1,8,16,64), 0.25 vs 0.31 ms at (1,2,128,32) (causal 0.18 vs 0.62); fused ahead from
#: (2,8,8,64) (0.13 vs 0.15 ms) down; even at (1,1,64,64) (work 2**18).
SIMD_MIN_WORK = 1 << 18
SIMD_MIN_ROWS = 16

#: Values of ``NumbaBackend(kernels=...)``.
KERNEL_CHOICES = ("auto", "simd", "fused", "blas")

_budget: contextvars.ContextVar[int | None] = contextvars.ContextVar("selfattn_numba_threads", default=None)


@contextlib.contextmanager
def thread_budget(threads: int | None) -> Iterator[None]:
    """Limit the Numba backend's calls inside the block to ``threads`` threads (None: no limit).

    Scoped with a context variable (per thread and asyncio task). The Dask
    backend runs each chunk task inside it, so a worker's threads are not
    oversubscribed.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    token = _budget.set(threads)
    try:
        yield
    finally:
        _budget.reset(token)


def _numba_threads() -> int:
    import numba

    n = int(numba.get_num_threads())
    limit = _budget.get()
    return n if limit is None else max(1, min(n, limit))


# -- BLAS for the BLAS-tile kernels ------------------------------------------------------------------------------
class _BlasLimit:
    """Keeps SciPy's BLAS single-threaded while BLAS-tile kernels run, and restores it after.

    Only the BLAS library that Numba's ``np.dot`` calls (SciPy's) is limited;
    where NumPy shares it (one system BLAS), NumPy's products in other Python
    threads also run single-threaded for that window. Reference-counted, so
    concurrent calls from several Python threads limit once and restore once.
    """

    def __init__(self) -> None:
        self._state: tuple[Any, str] | None = None  # (controllers or None, reason)
        self._lock = threading.Lock()
        self._depth = 0
        self._ctx: Any = None

    def probe(self) -> tuple[Any, str]:
        """``(controllers, "")`` when the BLAS-tile kernels can run, else ``(None, why not)``."""
        if self._state is None:
            missing = [m for m in ("scipy", "threadpoolctl") if importlib.util.find_spec(m) is None]
            if missing:
                self._state = (None, f"{' and '.join(missing)} not installed: pip install 'selfattn[numba]'")
            else:
                import scipy.linalg.cython_blas  # noqa: F401 - load the BLAS that Numba will call
                from threadpoolctl import ThreadpoolController

                ctl = ThreadpoolController().select(user_api="blas")
                # SciPy's wheels carry their own OpenBLAS (scipy.libs); limit just that one,
                # so NumPy's products elsewhere keep their threads. Where no such copy is
                # found (one system BLAS), limit whatever BLAS there is.
                own = [c for c in ctl.lib_controllers if "scipy.libs" in c.filepath or "/scipy/" in c.filepath]
                libs = own or ctl.lib_controllers
                if libs:
                    self._state = (libs, "")
                else:
                    self._state = (None, "threadpoolctl finds no BLAS it can limit to one thread here")
        return self._state

    @contextlib.contextmanager
    def single_threaded(self) -> Iterator[None]:
        libs, _ = self.probe()
        assert libs is not None
        with self._lock:
            if self._depth == 0:
                self._saved = [(c, c.num_threads) for c in libs]
                for c, _n in self._saved:
                    c.set_num_threads(1)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    for c, n in self._saved:
                        c.set_num_threads(n)


_blas = _BlasLimit()


def _shift_free_allowed(pb: Problem, P: KernelParams) -> bool:
    """Whether the shift-free shortcut may apply at all: not with additive masks or ALiBi biases that break it."""
    return not (P.mask_kind == 2 or not _alibi_keeps_bound(pb))


def _run_after_head_pass(
    prep: Callable[[int, int], None],
    fwd: Callable[[int, int], None],
    nkv: int,
    nqb: int,
    P: KernelParams,
    nthreads: int,
) -> None:
    """``fwd(t0, t1)`` over a forward's ``nkv * G * nqb`` tasks (flat batch·head, query tile; ``nqb`` tiles
    per head), each range once ``prep(h0, h1)`` (a pass over key/value heads ``[h0, h1)``: transposed
    keys, norms, shift-free bounds) has run for the ``nkv`` key/value heads its tasks read.

    The heads' pass runs inside the tasks (:class:`~selfattn.backends._numba.pool.OncePer`),
    by the first thread whose tasks need a head, rather than as a parallel pass of its
    own: one hand-off to the pool per call instead of two (each wakes the helpers and waits
    for the slowest: ~0.1 + 0.15 ms on a 2-core VM, more with more threads), and a head's
    keys are prepared by the thread about to read them. Measured against the two passes
    (same kernels, 2 threads, 15-21 alternating blocks, float32): causal (1,8,1024,64)
    0.979 and 0.988x the time, (1,8,2048,64) 0.984x, non-causal 0.985-0.998x; (1,8,512,64)
    causal 1.03x [IQR 1.01-1.27] and (4,8,256,64) 1.005x -- at most a percent or two, within
    the spread at some shapes. It is kept for the barrier it removes.
    """
    G = P.Hq // P.Hkv

    def kv_head(t: int) -> int:  # non-decreasing in t: a range of tasks reads a range of heads
        bh = t // nqb
        return (bh // P.Hq) * P.Hkv + (bh % P.Hq) // G

    heads = OncePer(nkv, prep)

    def tasks(t0: int, t1: int) -> None:
        heads.ensure(kv_head(t0), kv_head(t1 - 1) + 1)
        fwd(t0, t1)

    run_tasks(tasks, nkv * G * nqb, nthreads)


def _alibi_keeps_bound(pb: Problem) -> bool:
    """Whether the forward's shift-free shortcut stays exact with this call's ALiBi biases (True without ALiBi).

    The shortcut needs every score below the bound (biases ``-slope * |distance|``
    are <= 0 for slopes >= 0) and each row's sum of ``exp`` away from 0: a whole
    call with N <= M gives every query its zero-distance key ``j = i + M - N``
    inside the band (causal and windows keep it), whose bias is 0. A chunk of a
    larger call (Dask, split-KV) may hold only distant keys, so it takes the
    general path, as do negative slopes.
    """
    if pb.alibi is None:
        return True
    return pb.n <= pb.m and not pb.is_chunk and bool(np.all(np.asarray(pb.alibi) >= 0))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _query_tile(bh: int, n: int, nthreads: int, largest: int, multiple: int = 8, smallest: int = 32) -> int:
    """Query rows per BLAS-tile or SIMD task: ``largest``, or fewer so every thread gets two tasks.

    Never below ``smallest`` rows (smaller tiles make BLAS inefficient) and a
    multiple of ``multiple`` (the SIMD kernels need whole micro-kernel row blocks).
    """
    per_bh = -(-2 * nthreads // max(bh, 1))  # tiles each batch·head must give
    rows = -(-n // per_bh)
    return int(_round_up(min(largest, max(smallest, _round_up(rows, multiple))), multiple))


# -- compile announcements and the kernel families ---------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A kernel family: kernels compiled together on first use (per dtype)."""

    name: str
    description: str
    kernels: tuple[str, ...]  # "module.function" under selfattn.backends._numba


#: Every kernel family, in the order ``python -m selfattn compile`` builds them.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "fused-forward",
            "fused loop forward + key-split merge (small, thin and decode-like calls)",
            ("fused.forward", "fused.merge_splits"),
        ),
        Family("fused-backward", "fused loop backward", ("fused.backward",)),
        Family(
            "simd-forward",
            "SIMD forward: own vector micro-kernels, no BLAS (prefill-like calls)",
            ("simd.forward", "simd.prepare_keys"),
        ),
        Family("simd-backward", "SIMD backward", ("simd.backward",)),
        Family("blas-forward", "BLAS-tile forward (prefill-like calls)", ("blas.forward_gemm", "blas.head_bounds")),
        Family("blas-backward", "BLAS-tile backward", ("blas.backward_gemm",)),
        Family("weights", "attention weights (return_weights=True)", ("fused.weights",)),
        Family(
            "varlen",
            "packed variable-length batches, forward and backward",
            ("fused.forward_varlen", "fused.backward_varlen"),
        ),
    )
}

_announced: set[tuple[str, np.dtype]] = set()
_announce_lock = threading.Lock()


_kernels: dict[str, Any] = {}


def _kernel(path: str) -> Any:
    """Kernel ``"module.function"`` of :mod:`selfattn.backends._numba` (module and Numba imported on first use)."""
    k = _kernels.get(path)
    if k is None:  # import_module costs ~10 us a call once a large kernel has left the caches cold
        import importlib

        mod, fn = path.split(".")
        k = _kernels[path] = getattr(importlib.import_module(f"selfattn.backends._numba.{mod}"), fn)
    return k


def _signature_cached(dispatcher: Any, args: tuple[Any, ...]) -> bool | None:
    """Whether ``dispatcher`` has machine code for ``args``' types, in this process or on disk (None: unknown)."""
    try:
        import numba

        sig = tuple(numba.typeof(a) for a in args)
        if sig in dispatcher.overloads:
            return True
        cache = dispatcher._cache
        index = cache._cache_file._load_index()
        magic = dispatcher.targetctx.codegen().magic_tuple()
        return any(key[0] == sig and key[1] == magic for key in index)
    except Exception:  # numba internals changed: say "unknown" rather than guess
        return None


def _announce(family: str, dtype: np.dtype, calls: list[tuple[Any, tuple[Any, ...]]]) -> None:
    """Announce, once per process, that a family's kernels are about to compile (if they are not cached)."""
    key = (family, np.dtype(dtype))  # the dtype itself: its .name is slow Python (~30 us, caches cold)
    if key in _announced:
        return
    with _announce_lock:
        if key in _announced:
            return
        _announced.add(key)
        if all(_signature_cached(k, a) is not False for k, a in calls):
            return
        msg = (
            f"selfattn: compiling the Numba {family} kernels for {key[1].name} (first use on this machine; "
            "cached on disk afterwards -- `python -m selfattn compile` does it ahead of time)"
        )
        _log.info(msg)
        if getattr(sys.stderr, "isatty", lambda: False)():
            print(msg, file=sys.stderr, flush=True)


def _simd_isa() -> str:
    """The vector instruction set the SIMD kernels are built for here (e.g. "avx512f, 16 float32 lanes")."""
    from ._numba.microkernel import ISA  # chosen once, at import: what the kernels were built for

    name, n = ISA
    return f"{name}, {n} float32 lanes"


class NumbaBackend(Backend):
    """FlashAttention-style CPU kernels compiled with Numba (see the module docstring).

    ``kernels`` picks the kernel family: ``"auto"`` (by shape, see
    :meth:`plan`), ``"fused"`` or ``"blas"``. ``fused_tiles`` (query rows,
    keys) and ``blas_tiles`` (forward rows, forward keys, backward rows,
    backward keys) are the tile sizes, run-time arguments of the kernels
    (tests shrink them so small inputs cross many tiles). ``flops_per_thread``
    and ``bytes_per_thread`` set how much work (FLOPs; K/V bytes for decode-like
    calls) earns one more thread (tests lower them to exercise the pool).
    """

    name = "numba"
    priority = 20
    capabilities = Capabilities(array_type="numpy", features=frozenset(FEATURES), work_range=WORK_RANGE)

    def __init__(
        self,
        kernels: str = "auto",
        fused_tiles: tuple[int, int] = (64, 64),
        blas_tiles: tuple[int, int, int, int] = (256, 512, 512, 256),
        simd_tiles: tuple[int, int, int, int] = (256, 128, 64, 128),
    ) -> None:
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {', '.join(map(repr, KERNEL_CHOICES))}, got {kernels!r}")
        self.kernels = kernels
        self.fused_tiles = tuple(int(x) for x in fused_tiles)
        self.blas_tiles = tuple(int(x) for x in blas_tiles)
        self.simd_tiles = tuple(int(x) for x in simd_tiles)
        self.flops_per_thread = FLOPS_PER_THREAD
        self.bytes_per_thread = BYTES_PER_THREAD
        self._version: str | None = None

    @property
    def version(self) -> str:  # type: ignore[override]
        if self._version is None:
            try:
                from importlib.metadata import version

                self._version = version("numba")
            except Exception:  # pragma: no cover - metadata missing
                self._version = "unknown"
        return self._version

    def availability(self) -> tuple[bool, str]:
        if importlib.util.find_spec("numba") is None:
            return False, "numba is not installed; pip install 'selfattn[numba]'"
        return True, ""

    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "numba": self.version,
            "threads": _numba_threads(),
            "threading": "own sleeping worker threads (no numba.prange / OpenMP)",
        }
        d["simd_kernels"] = _simd_isa()
        libs, why = _blas.probe()
        d["blas_tile_kernels"] = (
            "yes (kernels='blas')" if libs is not None else f"no ({why}; kernels='blas' runs the fused kernels)"
        )
        d["compiled_kernels"] = cache_status()
        return d

    # -- planning --------------------------------------------------------------------------------------------------
    def _family(self, pb: Problem, nsplit: int = 1) -> str:
        """The kernel family of this call: ``"fused"``, ``"blas"`` or ``"simd"``.

        ``kernels="auto"``: the SIMD kernels for calls with at least
        ``SIMD_MIN_ROWS`` query rows and ``SIMD_MIN_WORK``, the fused ones
        otherwise (tiny and decode-like calls, whose keys they split). The
        BLAS-tile kernels run only when asked for (``kernels="blas"``): side by
        side the SIMD kernels matched or beat them on every measured shape
        (README, Performance), without limiting any BLAS's threads. ``"blas"``
        falls back to the fused kernels where no limitable BLAS is installed.
        """
        if self.kernels == "fused":
            return "fused"
        if self.kernels == "simd":
            return "simd"
        if self.kernels == "blas":
            return "blas" if _blas.probe()[0] is not None else "fused"
        work = pb.batch * pb.q_heads * pb.n * pb.m * pb.d
        return "simd" if nsplit == 1 and pb.n >= SIMD_MIN_ROWS and work >= SIMD_MIN_WORK else "fused"

    def _nsplit(self, pb: Problem, nthreads: int) -> int:
        """Key splits per query tile: enough tasks for every thread on decode-like shapes."""
        br, bc = self.fused_tiles
        tiles = pb.batch * pb.q_heads * ((pb.n + br - 1) // br)
        if tiles == 0 or pb.m <= 4 * bc or tiles >= 2 * nthreads:
            return 1
        want = (4 * nthreads + tiles - 1) // tiles
        return int(max(1, min(want, pb.m // (2 * bc), 64)))

    def _threads_for(self, pb: Problem, work: float = 1.0) -> int:
        """Threads for this call: Numba's count, the budget, and one per unit of work.

        ``work`` scales the FLOPs (the backward does about 3x the forward's).
        Decode-like calls (at most ``WORK_RANGE.decode_rows`` query rows) are
        memory-bound: one thread per ``bytes_per_thread`` of K and V instead.
        """
        if WORK_RANGE.decode_like(pb):
            kv = pb.batch * pb.kv_heads * pb.m * (pb.d + pb.dv) * pb.compute_dtype.itemsize
            want = work * kv / self.bytes_per_thread
        else:
            want = work * pb.flops / self.flops_per_thread
        return max(1, min(_numba_threads(), int(want)))

    def plan(self, pb: Problem) -> str:
        """One line: which kernel family and how many threads this call would use (for ``explain``)."""
        nthreads = self._threads_for(pb)
        if pb.is_varlen:
            where = "inline on the calling thread" if nthreads == 1 else f"{nthreads} threads"
            return f"fused varlen kernels over {pb.num_sequences} packed sequences, {where}"
        nsplit = self._nsplit(pb, nthreads)
        fam = self._family(pb, nsplit)
        if fam == "simd":
            fam = f"simd ({_simd_isa()})"
        extra = f", keys split {nsplit} ways (flash-decoding)" if nsplit > 1 and fam == "fused" else ""
        where = "inline on the calling thread" if nthreads == 1 else f"{nthreads} threads"
        return f"{fam} kernels, {where}{extra}"

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, pb: Problem) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        B, Hq, N, M, Dv = pb.batch, pb.q_heads, pb.n, pb.m, pb.dv
        cdt = pb.compute_dtype
        BH = B * Hq
        if BH == 0 or N == 0 or M == 0:
            out = np.zeros((B, Hq, N, Dv), pb.dtype)
            lse = np.full((B, Hq, N), -np.inf, pb.lse_dtype) if pb.want_lse else None
            w = np.zeros((B, Hq, N, M), pb.dtype) if pb.return_weights else None
            return out, lse, w
        if pb.is_varlen:
            return self._forward_varlen(pb)
        # Outputs first: a result that cannot be allocated fails before any work.
        out3 = np.empty((BH, N, Dv), cdt)
        lse3 = np.empty((BH, N), cdt)
        w3 = np.zeros((BH, N, M), cdt) if pb.return_weights else None
        q3, k3, v3 = as3(pb.query, cdt), as3(pb.key, cdt), as3(pb.value, cdt)
        P = kernel_params(pb)
        nthreads = self._threads_for(pb)
        nsplit = self._nsplit(pb, nthreads)
        fam = self._family(pb, nsplit)
        if fam == "blas":
            self._forward_blas(pb, q3, k3, v3, P, nthreads, out3, lse3)
        elif fam == "simd":
            self._forward_simd(pb, q3, k3, v3, P, nthreads, out3, lse3)
        else:
            self._forward_fused(pb, q3, k3, v3, P, nthreads, nsplit, out3, lse3)
        w = None
        if w3 is not None:
            br, bc = self.fused_tiles
            kern = _kernel("fused.weights")
            args = (q3, k3, P, br, bc, lse3, w3)
            _announce("weights", cdt, [(kern, (0, 0) + args)])
            run_tasks(lambda t0, t1: kern(t0, t1, *args), BH * ((N + br - 1) // br), nthreads)
            w = w3.reshape(B, Hq, N, M).astype(pb.dtype, copy=False)
        out = out3.reshape(B, Hq, N, Dv).astype(pb.dtype, copy=False)
        lse = lse3.reshape(B, Hq, N).astype(pb.lse_dtype, copy=False) if pb.want_lse else None
        return out, lse, w

    def _forward_fused(
        self,
        pb: Problem,
        q3: np.ndarray,
        k3: np.ndarray,
        v3: np.ndarray,
        P: KernelParams,
        nthreads: int,
        nsplit: int,
        out3: np.ndarray,
        lse3: np.ndarray,
    ) -> None:
        br, bc = self.fused_tiles
        BH, N, Dv = q3.shape[0], q3.shape[1], v3.shape[2]
        cdt = q3.dtype
        fwd, merge = _kernel("fused.forward"), _kernel("fused.merge_splits")
        ntask = BH * ((N + br - 1) // br) * nsplit
        if nsplit == 1:
            args = (q3, k3, v3, P, br, bc, 1, out3[None], lse3[None], lse3[None])
            _announce("fused-forward", cdt, [(fwd, (0, 0) + args)])
            run_tasks(lambda t0, t1: fwd(t0, t1, *args), ntask, nthreads)
            return
        o_acc = np.empty((nsplit, BH, N, Dv), cdt)
        m_acc = np.empty((nsplit, BH, N), cdt)
        l_acc = np.empty((nsplit, BH, N), cdt)
        args = (q3, k3, v3, P, br, bc, nsplit, o_acc, m_acc, l_acc)
        margs = (o_acc, m_acc, l_acc, float(P.dscale), out3, lse3)
        _announce("fused-forward", cdt, [(fwd, (0, 0) + args), (merge, (0, 0) + margs)])
        run_tasks(lambda t0, t1: fwd(t0, t1, *args), ntask, nthreads)
        run_tasks(lambda t0, t1: merge(t0, t1, *margs), BH * N, nthreads)

    def _forward_blas(
        self,
        pb: Problem,
        q3: np.ndarray,
        k3: np.ndarray,
        v3: np.ndarray,
        P: KernelParams,
        nthreads: int,
        out3: np.ndarray,
        lse3: np.ndarray,
    ) -> None:
        gq, gk, _, _ = self.blas_tiles
        BH, N = q3.shape[0], q3.shape[1]
        cdt = q3.dtype
        fwd, bounds = _kernel("blas.forward_gemm"), _kernel("blas.head_bounds")
        BKV = k3.shape[0]
        kmax = np.empty(BKV, cdt)
        safe = np.empty(BKV, np.float64)
        bargs = (k3, v3, kmax, safe, _shift_free_allowed(pb, P))
        rows = _query_tile(BH, N, nthreads, gq)
        args = (q3, k3, v3, P, kmax, safe, rows, gk, out3, lse3)
        _announce("blas-forward", cdt, [(bounds, (0, 0) + bargs), (fwd, (0, 0) + args)])
        with _blas.single_threaded():
            _run_after_head_pass(
                lambda h0, h1: bounds(h0, h1, *bargs),
                lambda t0, t1: fwd(t0, t1, *args),
                BKV,
                (N + rows - 1) // rows,
                P,
                nthreads,
            )

    def _forward_simd(
        self,
        pb: Problem,
        q3: np.ndarray,
        k3: np.ndarray,
        v3: np.ndarray,
        P: KernelParams,
        nthreads: int,
        out3: np.ndarray,
        lse3: np.ndarray,
    ) -> None:
        from ._numba.microkernel import ROWS, lanes
        from ._numba.simd import BR_BAND, key_block, key_columns

        br, bc, _, _ = self.simd_tiles
        if pb.lower is not None or pb.upper is not None:  # causal or a window: short tasks waste less
            br = min(br, BR_BAND)
        BH, N = q3.shape[0], q3.shape[1]
        cdt = q3.dtype
        W = lanes(cdt.itemsize)
        fwd, prep = _kernel("simd.forward"), _kernel("simd.prepare_keys")
        BKV = k3.shape[0]
        kmax = np.empty(BKV, cdt)
        safe = np.empty(BKV, np.float64)
        kt = scratch("simd.forward.kt", (BKV, k3.shape[2], key_columns(k3.shape[1], W)), cdt)
        pargs = (k3, v3, kt, kmax, safe, _shift_free_allowed(pb, P))
        rows = _query_tile(BH, N, nthreads, br, multiple=ROWS, smallest=ROWS)
        nqb = (N + rows - 1) // rows
        args = (q3, kt, v3, P, kmax, safe, rows, _round_up(key_block(bc, k3.shape[2], cdt.itemsize), W), W, out3, lse3)
        _announce("simd-forward", cdt, [(prep, (0, 0) + pargs), (fwd, (0, 0) + args)])
        # No BLAS runs here, so no BLAS thread limit is needed (unlike _forward_blas).
        _run_after_head_pass(
            lambda h0, h1: prep(h0, h1, *pargs), lambda t0, t1: fwd(t0, t1, *args), BKV, nqb, P, nthreads
        )

    def _varlen_tiles(self, cu: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """``(sequence, first local row)`` of every tile of ``rows`` rows, sequence by sequence."""
        lens = np.diff(cu)
        counts = -(-lens // rows)
        seq = np.repeat(np.arange(len(lens), dtype=np.int64), counts)
        starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
        first = (np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)) * rows
        return seq, first

    def _forward_varlen(self, pb: Problem) -> tuple[np.ndarray, np.ndarray | None, None]:
        assert pb.cu_seqlens_q is not None and pb.cu_seqlens_k is not None
        cdt = pb.compute_dtype
        Hq, N, Dv = pb.q_heads, pb.n, pb.dv
        out3 = np.empty((Hq, N, Dv), cdt)
        lse3 = np.empty((Hq, N), cdt)
        q3, k3, v3 = as3(pb.query, cdt), as3(pb.key, cdt), as3(pb.value, cdt)
        P = kernel_params(pb)
        br, bc = self.fused_tiles
        seq, first = self._varlen_tiles(pb.cu_seqlens_q, br)
        kern = _kernel("fused.forward_varlen")
        args = (q3, k3, v3, P, br, bc, pb.cu_seqlens_q, pb.cu_seqlens_k, seq, first, out3, lse3)
        _announce("varlen", cdt, [(kern, (0, 0) + args)])
        run_tasks(lambda t0, t1: kern(t0, t1, *args), Hq * len(seq), self._threads_for(pb))
        out = out3.reshape(1, Hq, N, Dv).astype(pb.dtype, copy=False)
        lse = lse3.reshape(1, Hq, N).astype(pb.lse_dtype, copy=False) if pb.want_lse else None
        return out, lse, None

    def _backward_varlen(
        self, pb: Problem, out: np.ndarray, lse: np.ndarray, grad_out: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert pb.cu_seqlens_q is not None and pb.cu_seqlens_k is not None
        cdt = pb.compute_dtype
        Hq, Hkv, N, D = pb.q_heads, pb.kv_heads, pb.n, pb.d
        q3, k3, v3 = as3(pb.query, cdt), as3(pb.key, cdt), as3(pb.value, cdt)
        do3, o3 = as3(grad_out, cdt), as3(out, cdt)
        delta = np.einsum("bnd,bnd->bn", do3, o3)
        lse3 = np.asarray(lse, dtype=cdt).reshape(Hq, N)
        lse3 = np.where(lse3 == -np.inf, np.inf, lse3).astype(cdt)
        P = kernel_params(pb)
        br, bc = self.fused_tiles
        seq, first = self._varlen_tiles(pb.cu_seqlens_k, bc)
        nthreads = self._threads_for(pb, work=3.0)
        nchunk = 1 if Hkv >= 2 * nthreads else max(1, min(len(seq), (2 * nthreads + Hkv - 1) // Hkv))
        dq_acc = np.zeros((nchunk, Hq, N, D), cdt)
        dk3 = np.zeros_like(k3)
        dv3 = np.zeros_like(v3)
        kern = _kernel("fused.backward_varlen")
        args = (
            q3,
            k3,
            v3,
            do3,
            lse3,
            delta,
            P,
            br,
            bc,
            pb.cu_seqlens_q,
            pb.cu_seqlens_k,
            seq,
            first,
            nchunk,
            dq_acc,
            dk3,
            dv3,
        )
        _announce("varlen", cdt, [(kern, (0, 0) + args)])
        run_tasks(lambda t0, t1: kern(t0, t1, *args), Hkv * nchunk, nthreads, chunks_per_thread=1)
        dq3 = dq_acc[0] if nchunk == 1 else dq_acc.sum(axis=0)
        return (
            dq3.reshape(pb.query.shape).astype(pb.dtype, copy=False),
            dk3.reshape(pb.key.shape).astype(pb.dtype, copy=False),
            dv3.reshape(pb.value.shape).astype(pb.dtype, copy=False),
        )

    # -- backward --------------------------------------------------------------------------------------------------
    def backward(
        self, pb: Problem, out: np.ndarray, lse: np.ndarray, grad_out: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        B, Hq, Hkv, N, M, D, Dv = pb.batch, pb.q_heads, pb.kv_heads, pb.n, pb.m, pb.d, pb.dv
        cdt = pb.compute_dtype
        if B * Hq == 0 or N == 0 or M == 0:
            return (
                np.zeros((B, Hq, N, D), pb.dtype),
                np.zeros((B, Hkv, M, D), pb.dtype),
                np.zeros((B, Hkv, M, Dv), pb.dtype),
            )
        if pb.is_varlen:
            return self._backward_varlen(pb, out, lse, grad_out)
        q3, k3, v3 = as3(pb.query, cdt), as3(pb.key, cdt), as3(pb.value, cdt)
        do3 = as3(grad_out, cdt)
        o3 = as3(out, cdt)
        delta = np.einsum("bnd,bnd->bn", do3, o3)
        lse3 = np.asarray(lse, dtype=cdt).reshape(B * Hq, N)
        lse3 = np.where(lse3 == -np.inf, np.inf, lse3).astype(cdt)
        P = kernel_params(pb)
        nthreads = self._threads_for(pb, work=3.0)
        fam = self._family(pb)
        W = 1
        if fam == "blas":
            _, _, rows, block = self.blas_tiles
        elif fam == "simd":
            from ._numba.microkernel import B_IN_L1, ROWS, lanes
            from ._numba.simd import key_block

            W = lanes(cdt.itemsize)
            _, _, rows, block = self.simd_tiles
            # The forward's shorter key block where its K^T fits L1 (float32 D = 128: 48 keys,
            # 0.93-1.02x the time over four runs; float64 D = 64: 64 keys, 0.98-1.00x); where
            # no block of 64 or more keys fits (float64 D = 128) the default measured better
            # (64 keys: 1.07x).
            short = key_block(block, D, cdt.itemsize)
            if short * D * cdt.itemsize <= B_IN_L1:
                block = short
            rows, block = _round_up(rows, ROWS), _round_up(block, W)
        else:
            rows, block = self.fused_tiles
        nkb = (M + block - 1) // block
        tasks = B * Hkv
        nchunk = 1 if tasks >= 2 * nthreads else max(1, min(nkb, (2 * nthreads + tasks - 1) // tasks))
        dk3 = np.empty((B * Hkv, M, D), cdt)
        dv3 = np.empty((B * Hkv, M, Dv), cdt)
        if fam == "simd":
            from ._numba.simd import backward_operands

            # q*scale and dO read in place by every tile; dQ accumulated by the product itself.
            qs, dop = backward_operands(q3, do3, float(P.scale), W)
            dq_pad = np.zeros((nchunk, qs.shape[0], qs.shape[1]), cdt)
            kern = _kernel("simd.backward")
            sargs = (qs, k3, v3, dop, lse3, delta, P, rows, block, W, nchunk, dq_pad, dk3, dv3)
            _announce("simd-backward", cdt, [(kern, (0, 0) + sargs)])
            run_tasks(lambda t0, t1: kern(t0, t1, *sargs), tasks * nchunk, nthreads, chunks_per_thread=1)
            dqp = dq_pad[0] if nchunk == 1 else dq_pad.sum(axis=0)
            dq3 = dqp[: B * Hq * N, :D]
        else:
            dq_acc = np.zeros((nchunk, B * Hq, N, D), cdt)
            args = (q3, k3, v3, do3, lse3, delta, P, rows, block, nchunk, dq_acc, dk3, dv3)
            if fam == "blas":
                kern = _kernel("blas.backward_gemm")
                _announce("blas-backward", cdt, [(kern, (0, 0) + args)])
                with _blas.single_threaded():
                    run_tasks(lambda t0, t1: kern(t0, t1, *args), tasks * nchunk, nthreads, chunks_per_thread=1)
            else:
                kern = _kernel("fused.backward")
                _announce("fused-backward", cdt, [(kern, (0, 0) + args)])
                run_tasks(lambda t0, t1: kern(t0, t1, *args), tasks * nchunk, nthreads, chunks_per_thread=1)
            dq3 = dq_acc[0] if nchunk == 1 else dq_acc.sum(axis=0)
        return (
            dq3.reshape(B, Hq, N, D).astype(pb.dtype, copy=False),
            dk3.reshape(B, Hkv, M, D).astype(pb.dtype, copy=False),
            dv3.reshape(B, Hkv, M, Dv).astype(pb.dtype, copy=False),
        )


#: The instance the dispatcher registers.
backend = NumbaBackend()


# -- ahead-of-time compilation and cache status ----------------------------------------------------------------------
def _family_problem(family: str, dtype: str) -> tuple[NumbaBackend, Problem, str]:
    """A small problem, and a backend configured so that it runs ``family``'s kernels."""
    rng = np.random.default_rng(0)
    n = 70
    q = rng.standard_normal((1, 2, n, 16)).astype(dtype)
    k = rng.standard_normal((1, 2, n, 16)).astype(dtype)
    kernels = family.split("-")[0] if family.startswith(("blas", "simd")) else "fused"
    be = NumbaBackend(kernels=kernels)
    if family == "varlen":
        cu = np.array([0, 30, n], np.int64)
        pb = normalize_varlen(q[0], k[0], k[0], cu, cu, needs_vjp=True)
        return be, pb, "backward"
    pb = normalize(q, k, k, return_weights=family == "weights", needs_vjp=family.endswith("backward"))
    return be, pb, "backward" if family.endswith("backward") else "forward"


def compile_family(family: str, dtype: str) -> float:
    """Compile (or load from the disk cache) the kernels of ``family`` for ``dtype``; returns seconds taken.

    Runs a small problem through the backend's own host code, so exactly the
    signatures real calls use are compiled and cached, then touches every
    kernel of the family with an empty task range (the paths the small problem
    did not take, e.g. the key-split merge).
    """
    if family.startswith("blas") and _blas.probe()[0] is None:
        raise RuntimeError(f"the BLAS-tile kernels cannot run here: {_blas.probe()[1]}")
    be, pb, which = _family_problem(family, dtype)
    t0 = time.perf_counter()
    out, lse, _ = be.forward(pb)
    if which == "backward":
        assert lse is not None
        be.backward(pb, out, lse, np.ones_like(out))
    for kern, args in _family_calls(family, dtype):
        kern(*args)  # (0, 0, ...): no task runs, the signature compiles
    return time.perf_counter() - t0


def cache_status() -> dict[str, str]:
    """``{"family dtype": "cached" | "not cached" | "unknown"}`` for every kernel family, without compiling.

    "cached" means machine code for the exact signatures real calls use is
    in this process or in Numba's on-disk cache.
    """
    status: dict[str, str] = {}
    for fam in FAMILIES.values():
        if fam.name.startswith("blas") and _blas.probe()[0] is None:
            for dt in ("float32", "float64"):
                status[f"{fam.name} {dt}"] = "n/a (no limitable BLAS)"
            continue
        for dt in ("float32", "float64"):
            calls = _family_calls(fam.name, dt)
            states = [_signature_cached(k, a) for k, a in calls]
            status[f"{fam.name} {dt}"] = "unknown" if None in states else "cached" if all(states) else "not cached"
    return status


def _family_calls(family: str, dtype: str) -> list[tuple[Any, tuple[Any, ...]]]:
    """The (kernel, arguments) pairs a small problem of ``family`` would launch, built but not run."""
    be, pb, which = _family_problem(family, dtype)
    cdt = pb.compute_dtype
    q3, k3, v3 = as3(pb.query, cdt), as3(pb.key, cdt), as3(pb.value, cdt)
    P = kernel_params(pb)
    BH, N, Dv = q3.shape[0], q3.shape[1], v3.shape[2]
    out3, lse3 = np.empty((BH, N, Dv), cdt), np.empty((BH, N), cdt)
    br, bc = be.fused_tiles
    if family == "fused-forward":
        acc = (np.empty((2, BH, N, Dv), cdt), np.empty((2, BH, N), cdt), np.empty((2, BH, N), cdt))
        return [
            (_kernel("fused.forward"), (0, 0, q3, k3, v3, P, br, bc, 1, out3[None], lse3[None], lse3[None])),
            (_kernel("fused.merge_splits"), (0, 0) + acc + (1.0, out3, lse3)),
        ]
    if family == "weights":
        return [(_kernel("fused.weights"), (0, 0, q3, k3, P, br, bc, lse3, np.empty((BH, N, N), cdt)))]
    if family == "varlen":
        cu = np.array([0, N], np.int64)
        vp = replace(pb, cu_seqlens_q=cu, cu_seqlens_k=cu, batch_shape=(), needs_vjp=True)
        Pv = kernel_params(vp)
        tiles = (np.zeros(1, np.int64), np.zeros(1, np.int64))
        dq = np.empty((1, BH, N, q3.shape[2]), cdt)
        return [
            (_kernel("fused.forward_varlen"), (0, 0, q3, k3, v3, Pv, br, bc, cu, cu) + tiles + (out3, lse3)),
            (
                _kernel("fused.backward_varlen"),
                (0, 0, q3, k3, v3, out3, lse3, lse3, Pv, br, bc, cu, cu)
                + tiles
                + (1, dq, np.empty_like(k3), np.empty_like(v3)),
            ),
        ]
    if family == "blas-forward":
        kmax = np.empty(k3.shape[0], cdt)
        safe = np.empty(k3.shape[0], np.float64)
        return [
            (_kernel("blas.head_bounds"), (0, 0, k3, v3, kmax, safe, True)),
            (_kernel("blas.forward_gemm"), (0, 0, q3, k3, v3, P, kmax, safe, 64, 64, out3, lse3)),
        ]
    if family == "simd-forward":
        from ._numba.microkernel import lanes
        from ._numba.simd import key_columns

        kmax = np.empty(k3.shape[0], cdt)
        W = lanes(cdt.itemsize)
        kt = np.empty((k3.shape[0], k3.shape[2], key_columns(k3.shape[1], W)), cdt)
        safe = np.empty(k3.shape[0], np.float64)
        return [
            (_kernel("simd.prepare_keys"), (0, 0, k3, v3, kt, kmax, safe, True)),
            (_kernel("simd.forward"), (0, 0, q3, kt, v3, P, kmax, safe, 64, 64, W, out3, lse3)),
        ]
    dq = np.empty((1, BH, N, q3.shape[2]), cdt)
    dk, dv = np.empty_like(k3), np.empty_like(v3)
    if family == "simd-backward":
        from ._numba.microkernel import lanes
        from ._numba.simd import backward_operands

        W = lanes(cdt.itemsize)
        qs, dop = backward_operands(q3, out3, 1.0, W)
        dqp = np.empty((1,) + qs.shape, cdt)
        sargs = (0, 0, qs, k3, v3, dop, lse3, lse3, P, 64, 64, W, 1, dqp, dk, dv)
        return [(_kernel("simd.backward"), sargs)]
    args = (0, 0, q3, k3, v3, out3, lse3, lse3, P, 64, 64, 1, dq, dk, dv)
    return [(_kernel("blas.backward_gemm" if family == "blas-backward" else "fused.backward"), args)]
