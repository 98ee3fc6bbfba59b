"""The Numba backend's worker pool helpers (pure Python: no Numba needed)."""

from __future__ import annotations

import threading
import time

import pytest

from selfattn.backends._numba.pool import OncePer, run_tasks


def test_once_per_runs_each_index_once_and_waits_for_the_others():
    # Eight threads ask for overlapping ranges of 40 items at once; every item is prepared
    # exactly once, and no ensure() returns before every item of its range is done, even
    # those another thread is still working on (the slow item below makes that race likely).
    done = [False] * 40
    calls = []
    lock = threading.Lock()

    def prep(i0, i1):
        with lock:
            calls.append((i0, i1))
        for i in range(i0, i1):
            time.sleep(0.02 if i == 17 else 0.001)
            done[i] = True

    once = OncePer(40, prep)
    seen_missing = []
    start = threading.Barrier(8)

    def worker(w):
        lo, hi = 5 * w, min(40, 5 * w + 12)
        start.wait()
        once.ensure(lo, hi)
        if not all(done[lo:hi]):
            seen_missing.append(w)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not seen_missing
    counted = sorted(i for i0, i1 in calls for i in range(i0, i1))
    assert counted == list(range(40))
    once.ensure(0, 40)  # nothing left to do: no further calls
    assert sum(i1 - i0 for i0, i1 in calls) == 40


def test_once_per_groups_contiguous_claims():
    calls = []
    once = OncePer(10, lambda i0, i1: calls.append((i0, i1)))
    once.ensure(3, 5)
    once.ensure(0, 10)
    assert calls == [(3, 5), (0, 3), (5, 10)]


def test_once_per_error_reaches_the_owner_and_the_waiters():
    release = threading.Event()

    def prep(i0, i1):
        release.wait(5)
        raise ValueError(f"bad head {i0}")

    once = OncePer(2, prep)
    errors = []

    def owner():
        try:
            once.ensure(0, 2)
        except ValueError as exc:
            errors.append(("owner", str(exc)))

    def waiter():
        while True:  # wait until the owner has claimed the items
            with once._cond:
                if once._state[0]:
                    break
            time.sleep(0.001)
        release.set()
        try:
            once.ensure(0, 2)
        except ValueError as exc:
            errors.append(("waiter", str(exc)))

    threads = [threading.Thread(target=owner), threading.Thread(target=waiter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(errors) == [("owner", "bad head 0"), ("waiter", "bad head 0")]


def test_run_tasks_with_a_once_per_pass_reraises_on_the_caller():
    once = OncePer(4, lambda i0, i1: (_ for _ in ()).throw(RuntimeError("prep failed")))

    def tasks(t0, t1):
        once.ensure(t0 // 4, (t1 - 1) // 4 + 1)

    with pytest.raises(RuntimeError, match="prep failed"):
        run_tasks(tasks, 16, 2)
