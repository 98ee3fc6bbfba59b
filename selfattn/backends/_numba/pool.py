"""The Numba backend's own worker threads: task ranges on Python threads, no spinning.

Why not ``numba.prange``: Numba's default OpenMP threading layer keeps its
workers busy-waiting (``GOMP_SPINCOUNT``) for milliseconds after every
parallel region, and NumPy's OpenBLAS workers do the same after every matrix
product. On a machine with few cores a NumPy matmul followed by attention
(every layer, every training step) made the two runtimes' spinning threads
steal each other's cores: a ``MultiHeadAttention`` call took 8 ms instead of
0.7 ms. The kernels are therefore serial, GIL-releasing functions over a
range of tasks, and this pool runs ranges on plain Python threads that
*sleep* (block on a queue) when idle: nothing spins after a call, so the
next NumPy product runs at full speed; and because chunks are handed out
dynamically, a core briefly taken by OpenBLAS's spinning worker slows one
thread down instead of stalling a barrier.

Small calls run inline on the calling thread (no hand-off at all). The pool
is process-wide, grows to the largest thread count asked for, and is
rebuilt in a child process after ``fork``.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable

__all__ = ["run_tasks", "TaskPool", "OncePer"]


class _Call:
    """One parallel call: chunks handed out by a shared counter, completion counted under a lock."""

    __slots__ = ("fn", "bounds", "counter", "remaining", "lock", "done", "error")

    def __init__(self, fn: Callable[[int, int], None], bounds: list[int]) -> None:
        self.fn = fn
        self.bounds = bounds
        self.counter = itertools.count()  # next() is atomic under the GIL
        self.remaining = len(bounds) - 1
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def work(self) -> None:
        """Run chunks until none are left (called by the caller and by helpers)."""
        nchunks = len(self.bounds) - 1
        while True:
            i = next(self.counter)
            if i >= nchunks:
                return
            try:
                if self.error is None:
                    self.fn(self.bounds[i], self.bounds[i + 1])
            except BaseException as exc:  # re-raised on the calling thread
                self.error = exc
            finally:
                with self.lock:
                    self.remaining -= 1
                    if self.remaining == 0:
                        self.done.set()


class TaskPool:
    """Sleeping worker threads that help a calling thread through chunks of a task range."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _grow(self, helpers: int) -> None:
        with self._lock:
            while len(self._workers) < helpers:
                t = threading.Thread(target=self._serve, name=f"selfattn-numba-{len(self._workers) + 1}", daemon=True)
                t.start()
                self._workers.append(t)

    def _serve(self) -> None:
        while True:
            call = self._queue.get()  # blocks: an idle worker sleeps, it never spins
            if call is None:
                return
            call.work()

    def run(self, fn: Callable[[int, int], None], ntask: int, nthreads: int, chunks_per_thread: int = 4) -> None:
        """Call ``fn(t0, t1)`` over chunks covering ``range(ntask)``, on up to ``nthreads`` threads.

        The calling thread works too; with one thread (or one task) everything
        runs inline. Chunks are contiguous and handed out in order, so
        neighbouring tasks (which share K/V tiles) tend to run on one thread.
        The first exception raised by ``fn`` is re-raised here.
        """
        if ntask <= 0:
            return
        nthreads = max(1, min(int(nthreads), ntask))
        if nthreads == 1:
            fn(0, ntask)
            return
        nchunks = min(ntask, nthreads * chunks_per_thread)
        bounds = [ntask * i // nchunks for i in range(nchunks + 1)]
        call = _Call(fn, bounds)
        self._grow(nthreads - 1)
        for _ in range(nthreads - 1):
            self._queue.put(call)
        call.work()
        call.done.wait()
        if call.error is not None:
            raise call.error


class OncePer:
    """``fn(i0, i1)`` run at most once for each index of ``range(n)``, by whichever thread needs it first.

    Work that a parallel call needs per item before its tasks can use it
    (the SIMD forward's transposed keys, per key/value head) goes through
    :meth:`ensure` inside the tasks instead of a parallel pass of its own: no
    second hand-off to the pool threads (each costs a wake-up and a wait
    for the slowest thread), and a head's keys are prepared by the thread
    that is about to read them. A thread claims the indices nobody has
    claimed, runs them (contiguous runs in one call each) and then waits for
    the ones other threads are running; a claim is always run before its
    owner waits, so no thread waits on work that has not started. An
    exception in ``fn`` is raised in its thread and in every thread waiting
    on it.
    """

    __slots__ = ("_fn", "_state", "_cond", "_error")

    def __init__(self, n: int, fn: Callable[[int, int], None]) -> None:
        self._fn = fn
        self._state = bytearray(n)  # 0: unclaimed, 1: running, 2: done
        self._cond = threading.Condition()
        self._error: BaseException | None = None

    def ensure(self, lo: int, hi: int) -> None:
        """Return once ``fn`` has run for every index in ``[lo, hi)`` (running the unclaimed ones here)."""
        state = self._state
        mine: list[int] = []
        error: BaseException | None = None
        try:  # the claim too: an exception at any point still publishes (and reports) what was claimed
            with self._cond:
                for i in range(lo, hi):
                    if state[i] == 0:
                        mine.append(i)  # before the claim: nothing is ever claimed and left out of `mine`
                        state[i] = 1
            start = 0
            for j in range(1, len(mine) + 1):
                if j == len(mine) or mine[j] != mine[j - 1] + 1:
                    self._fn(mine[start], mine[j - 1] + 1)
                    start = j
        except BaseException as exc:
            error = exc
        with self._cond:
            for i in mine:
                state[i] = 2
            if error is not None and self._error is None:
                self._error = error
            self._cond.notify_all()
            while self._error is None and any(state[i] != 2 for i in range(lo, hi)):
                self._cond.wait()
            if self._error is not None:
                raise self._error


_pool = TaskPool()


def _after_fork() -> None:
    global _pool
    _pool = TaskPool()  # the parent's threads do not exist in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def run_tasks(fn: Callable[[int, int], None], ntask: int, nthreads: int, chunks_per_thread: int = 4) -> None:
    """:meth:`TaskPool.run` on the process-wide pool."""
    _pool.run(fn, ntask, nthreads, chunks_per_thread)
