"""The Dask backend: scaling over workers, overhead against the inner backend, worker memory.

asv benchmarks (``n/a`` where dask/distributed or the Dask backend is missing):

* ``DaskWorkers.time_forward``: (1, 8, 16384, 64) float32, non-causal, chunks of
  4096, on a ``LocalCluster`` of 1 or 2 single-threaded worker processes;
  ``DaskWorkerScaling.track_speedup_2_workers`` times both clusters in
  alternation (one run, side by side) and returns t(1 worker) / t(2 workers).
  Target >= 1.6.
* ``DaskThreads.time_forward``: (1, 8, 8192, 64) float32 on the threaded
  scheduler against the same inner backend (Numba) called directly on the
  NumPy arrays; ``DaskThreadsRatio.track_overhead_ratio`` alternates them and
  returns t(dask) / t(direct). Target <= 1.3.
* ``DaskMemory.track_peak_worker_mib``: (1, 8, 65536, 64) float32 causal in
  chunks of 8192 on a ``LocalCluster`` of 2 single-threaded workers; the
  largest peak resident memory of a worker process (Linux ``VmHWM``, reset
  before the run). Target < 1024 MiB (a materialised score matrix: 128 GiB).

Clusters and inputs are built once per process and cached (asv re-runs
``setup`` before every timed call); inputs are generated and persisted on the
workers, so a timed run is the attention graph alone; results are persisted
on the workers (``wait(persist(...))``), not gathered.

``python benchmarks/bench_dask.py [--quick]`` runs the three measurements
side by side and prints every sample, medians, spread and the load average:
the numbers for docs/distributed.md.
"""

from __future__ import annotations

import atexit
import os
import statistics
import sys
import time

_CLUSTERS: dict = {}
_ARRAYS: dict = {}
_WARM: set = set()

SCALING_SHAPE, SCALING_CHUNK = (1, 8, 16384, 64), 4096
THREADS_SHAPE, THREADS_CHUNK = (1, 8, 8192, 64), 4096
MEMORY_SHAPE, MEMORY_CHUNK = (1, 8, 65536, 64), 8192


def _require():
    """selfattn with its Dask backend, dask.array and distributed, or NotImplementedError (asv: n/a)."""
    try:
        import dask.array  # noqa: F401
        import distributed  # noqa: F401

        import selfattn
    except Exception as exc:
        raise NotImplementedError(f"dask, distributed or selfattn missing: {exc!r}") from exc
    recs = {r.name: r for r in selfattn.list_backends()}
    if "dask" not in recs or not recs["dask"].available:
        raise NotImplementedError("this selfattn has no available Dask backend")
    return selfattn


def cluster(workers: int, key: str = "shared"):
    """A cached ``(LocalCluster, Client)`` of ``workers`` single-threaded worker processes."""
    import logging

    import distributed

    if (workers, key) not in _CLUSTERS:
        import cloudpickle

        # The workers cannot import this file (asv loads it as benchmarks.bench_dask): ship its functions by value.
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        logging.getLogger("distributed").setLevel(logging.ERROR)  # the scheduler runs in this process
        lc = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        )
        _CLUSTERS[(workers, key)] = (lc, distributed.Client(lc, set_as_default=False))
    return _CLUSTERS[(workers, key)]


@atexit.register
def _close() -> None:
    for lc, client in _CLUSTERS.values():
        client.close()
        lc.close()
    _CLUSTERS.clear()


def inputs(shape, chunk, client=None, seed=0):
    """Dask ``(q, k, v)`` float32 of ``shape`` in chunks of ``chunk`` rows, persisted on ``client``'s workers."""
    import dask.array as da

    key = (shape, chunk, id(client), seed)
    if key not in _ARRAYS:
        rng = da.random.default_rng(seed)
        qkv = [rng.standard_normal(shape, chunks=(1, shape[1], chunk, shape[3]), dtype="float32") for _ in range(3)]
        if client is not None:
            import distributed

            qkv = client.persist(qkv)
            with client.as_current():
                distributed.wait(qkv)
        _ARRAYS[key] = qkv
    return _ARRAYS[key]


def run_on(client, qkv, causal=False):
    """One forward on the cluster: persist the output on the workers, wait, release. Returns seconds."""
    import distributed

    import selfattn

    t0 = time.perf_counter()
    out = selfattn.scaled_dot_product_attention(*qkv, causal=causal)
    held = client.persist(out)
    with client.as_current():  # the benchmark's clients are not the default client
        distributed.wait(held)
    dt = time.perf_counter() - t0
    del held
    return dt


def warm(client, causal=False):
    """Load the Numba kernels in every worker process once (a small run), never timed."""
    if (id(client), causal) not in _WARM:
        run_on(client, inputs((1, 8, 1024, 64), 512, client), causal=causal)
        _WARM.add((id(client), causal))


def _cpu_seconds():
    return time.process_time()


def run_with_cores(client, qkv, causal=False):
    """``run_on``, plus the cores the workers actually got: their CPU seconds over the run / wall seconds."""
    before = client.run(_cpu_seconds)
    t = run_on(client, qkv, causal)
    after = client.run(_cpu_seconds)
    return t, sum(after[w] - before[w] for w in after) / t


def _alternate(calls, rounds, pause=1.0):
    """Every sample of each call, timed in alternation (a slow spell on a shared machine hits all alike)."""
    samples = [[] for _ in calls]
    for _ in range(rounds):
        for call, ts in zip(calls, samples, strict=True):
            time.sleep(pause)
            ts.append(call())
    return samples


def _timed(fn):
    def call():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return call


# -- scaling over workers -------------------------------------------------------------------------------------------
class DaskWorkers:
    params = [[1, 2]]
    param_names = ["workers"]
    number = 1
    repeat = (1, 3, 600.0)
    rounds = 1
    timeout = 1800

    def setup(self, workers):
        _require()
        self.client = cluster(workers)[1]
        self.qkv = inputs(SCALING_SHAPE, SCALING_CHUNK, self.client)
        warm(self.client)

    def time_forward(self, workers):
        run_on(self.client, self.qkv)


class DaskWorkerScaling:
    """Speed-up of 2 single-threaded workers over 1, timed in alternation on two live clusters."""

    number = 1
    repeat = 1
    rounds = 1
    timeout = 3600

    def setup(self):
        _require()
        self.one, self.two = cluster(1)[1], cluster(2)[1]
        warm(self.one)
        warm(self.two)
        self.qkv1 = inputs(SCALING_SHAPE, SCALING_CHUNK, self.one)
        self.qkv2 = inputs(SCALING_SHAPE, SCALING_CHUNK, self.two)

    def track_speedup_2_workers(self):
        t1, t2 = _alternate([lambda: run_on(self.one, self.qkv1), lambda: run_on(self.two, self.qkv2)], rounds=3)
        return statistics.median(t1) / statistics.median(t2)

    track_speedup_2_workers.unit = "x"


# -- threaded scheduler against the inner backend ------------------------------------------------------------------
def _threads_calls():
    import dask
    import numpy as np

    import selfattn

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(THREADS_SHAPE, dtype=np.float32) for _ in range(3))
    import dask.array as da

    dq, dk, dv = (da.from_array(x, chunks=(1, 8, THREADS_CHUNK, 64)) for x in (q, k, v))

    def on_dask():
        return dask.compute(selfattn.scaled_dot_product_attention(dq, dk, dv), scheduler="threads")[0]

    def direct():
        return selfattn.scaled_dot_product_attention(q, k, v, backend="numba")

    return on_dask, direct


def _threads_ready():
    """The two warmed calls of the threads comparison (cached), or NotImplementedError without Numba."""
    selfattn = _require()
    if not any(r.name == "numba" and r.available for r in selfattn.list_backends()):
        raise NotImplementedError("numba backend unavailable")
    if "threads" not in _ARRAYS:
        _ARRAYS["threads"] = _threads_calls()
        for call in _ARRAYS["threads"]:
            call()  # compile / warm
    return _ARRAYS["threads"]


class DaskThreads:
    params = [["dask-threads", "numba-direct"]]
    param_names = ["mode"]
    number = 1
    repeat = (1, 5, 300.0)
    rounds = 1
    timeout = 900

    def setup(self, mode):
        self.calls = dict(zip(self.params[0], _threads_ready(), strict=True))

    def time_forward(self, mode):
        self.calls[mode]()


class DaskThreadsRatio:
    """t(Dask backend, threaded scheduler) / t(Numba directly), timed in alternation."""

    number = 1
    repeat = 1
    rounds = 1
    timeout = 900

    def setup(self):
        self.calls = _threads_ready()

    def track_overhead_ratio(self):
        t_dask, t_direct = _alternate([_timed(c) for c in self.calls], rounds=5)
        return statistics.median(t_dask) / statistics.median(t_direct)

    track_overhead_ratio.unit = "x"


# -- memory ---------------------------------------------------------------------------------------------------------
def _reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _status_mib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def memory_run(client):
    """Peak and baseline resident MiB of each worker over one causal (1, 8, 65536, 64) forward, and seconds."""
    qkv = inputs(MEMORY_SHAPE, MEMORY_CHUNK, client=None)  # generated inside the graph, on the workers
    client.run(_reset_peak)
    base = client.run(_status_mib, "VmRSS")
    t = run_on(client, qkv, causal=True)
    peak = client.run(_status_mib, "VmHWM")
    return {w: (base[w], peak[w]) for w in peak}, t


class DaskMemory:
    number = 1
    repeat = 1
    rounds = 1
    timeout = 3600

    def setup(self):
        _require()
        if not os.path.exists("/proc/self/clear_refs"):
            raise NotImplementedError("peak RSS needs Linux /proc/self/clear_refs")
        self.client = cluster(2, key="memory")[1]
        warm(self.client, causal=True)

    def track_peak_worker_mib(self):
        peaks, _ = memory_run(self.client)
        return max(p for _, p in peaks.values())

    track_peak_worker_mib.unit = "MiB"


# -- the closing-note measurement -------------------------------------------------------------------------------------
def _spread(ts):
    return f"median {statistics.median(ts):7.2f} s  (min {min(ts):.2f}, max {max(ts):.2f}; n={len(ts)})"


def main(argv=None) -> int:
    """``[--quick] [--rounds R] [--no-scaling] [--no-threads] [--no-memory]``: print the side-by-side measurements."""
    args = sys.argv[1:] if argv is None else list(argv)
    rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else 2 if "--quick" in args else 3
    _require()
    print(f"load average before: {os.getloadavg()}  ({os.cpu_count()} cores)", flush=True)

    if "--no-scaling" not in args:
        print(
            f"\n1. {SCALING_SHAPE} float32 non-causal, chunks of {SCALING_CHUNK}: LocalCluster 1 vs 2 "
            "single-threaded workers"
        )
        one, two = cluster(1)[1], cluster(2)[1]
        q1, q2 = inputs(SCALING_SHAPE, SCALING_CHUNK, one), inputs(SCALING_SHAPE, SCALING_CHUNK, two)
        warm(one)
        warm(two)
        r1, r2 = _alternate([lambda: run_with_cores(one, q1), lambda: run_with_cores(two, q2)], rounds=rounds)
        t1, t2 = [t for t, _ in r1], [t for t, _ in r2]
        for label, runs, ts in (("1 worker ", r1, t1), ("2 workers", r2, t2)):
            print(
                f"   {label}: {_spread(ts)}  {[round(t, 2) for t in ts]}; cores obtained "
                f"{[round(c, 2) for _, c in runs]}, worker CPU-s {[round(t * c, 1) for t, c in runs]}"
            )
        ratios = [a / b for a, b in zip(t1, t2, strict=True)]
        print(
            f"   speed-up (ratio of medians): {statistics.median(t1) / statistics.median(t2):.2f}x; "
            f"per round {[round(r, 2) for r in ratios]}  (target >= 1.6)",
            flush=True,
        )
        print(f"   load average: {os.getloadavg()}")

    if "--no-threads" not in args:
        print(f"\n2. {THREADS_SHAPE} float32: Dask backend on the threaded scheduler vs Numba directly on NumPy arrays")
        calls = _threads_calls()
        for c in calls:
            c()
        td, tn = _alternate([_timed(c) for c in calls], rounds=rounds + 2)
        print(f"   dask threads : {_spread(td)}  {[round(t, 2) for t in td]}")
        print(f"   numba direct : {_spread(tn)}  {[round(t, 2) for t in tn]}")
        print(
            f"   ratio: {statistics.median(td) / statistics.median(tn):.2f}x; per round "
            f"{[round(a / b, 2) for a, b in zip(td, tn, strict=True)]}  (target <= 1.3)",
            flush=True,
        )
        print(f"   load average: {os.getloadavg()}")

    if "--no-memory" not in args:
        print(
            f"\n3. {MEMORY_SHAPE} float32 causal, chunks of {MEMORY_CHUNK}: LocalCluster of 2 single-threaded workers"
        )
        _close()  # free the other clusters' memory first
        _ARRAYS.clear()
        c = cluster(2, key="memory")[1]
        warm(c, causal=True)
        peaks, t = memory_run(c)
        for w, (base, peak) in sorted(peaks.items()):
            print(f"   worker {w}: baseline {base:7.1f} MiB, peak {peak:7.1f} MiB")
        n = MEMORY_SHAPE[2]
        print(
            f"   largest worker peak: {max(p for _, p in peaks.values()):.1f} MiB (target < 1024); "
            f"time {t:.1f} s; a materialised float32 score matrix: {MEMORY_SHAPE[1] * n * n * 4 / 2**30:.0f} GiB"
        )
    print(f"\nload average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
