#!/usr/bin/env python3
"""Smoke test of every CUDA kernel of the CuPy backend on this GPU, against selfattn's float64 oracle.

Usage, from a checkout (installed or only on ``PYTHONPATH``), with CuPy and a CUDA GPU::

    python tools/gpu_smoke.py                   # every case; exit status 1 if one fails
    python tools/gpu_smoke.py --no-pool         # the same with CuPy's memory pool off (compute-sanitizer)
    python tools/gpu_smoke.py --rawmodule       # compile and run a trivial RawModule kernel, nothing else
    python tools/gpu_smoke.py --facts out.json  # device and software facts as JSON, nothing else

Each case runs a ``CupyBackend`` of its own (the settings it needs, never the
dispatcher's instance changed), records the kernels it launches and checks
them against the ones the case must reach: the tensor-core forward for D = 64
and 128 (plain, causal, mask + dropout, dropout close to 1, a misaligned
C-contiguous view), the CUDA-core forwards in float16/32/64, the dropout-tile
kernels of the blockwise paths (weights, backward) and the decode path; with
two or more devices, arrays on another device must be refused. Results are
compared with ``selfattn.testing.reference`` (float64) at the conformance
suite's tolerances. Shapes are small (they cross row blocks and key tiles)
so that ``compute-sanitizer`` can run the whole file: with ``--no-pool`` every
array is its own allocation and an access past its end is visible to memcheck.
Prints one line per case and a summary line ``smoke: N passed, M failed, S skipped``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Run from a checkout: import selfattn from it, installed or not.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import selfattn  # noqa: E402
from selfattn._dropout import keep_mask  # noqa: E402
from selfattn._problem import normalize  # noqa: E402
from selfattn.backends._cuda import launch  # noqa: E402
from selfattn.backends.cupy_ import CupyBackend  # noqa: E402
from selfattn.testing import reference  # noqa: E402
from selfattn.testing.compare import assert_close  # noqa: E402

TC, CORE = launch.tc_kernel_name, launch.fwd_kernel_name
DROP32, DROP64 = launch.dropout_kernel_name("float32"), launch.dropout_kernel_name("float64")
NEAR_ONE = 1 - 1 / 70000  # 1/(1 - p) > 65504, the largest float16


@dataclass
class Case:
    """One smoke case: ``shape = (B, Hq, Hkv, N, M, D, Dv)``; ``kernels`` the launches it must make, in order."""

    name: str
    dtype: str
    shape: tuple
    kernels: tuple
    options: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    mask: str | None = None  # "bool" (B, 1, N, M) or "float" (N, M)
    layout: str = "contiguous"  # or "strided", "misaligned"
    what: str = "forward"  # or "weights", "vjp", "devices"
    zero_query: bool = False
    alibi: bool = False  # ALiBi slopes 2^-1 .. 2^-Hq (numpy for the oracle, cupy for the backend)


def _seed_keeping(p: float, rows: int, cols: int, at_least: int = 2) -> int:
    """A dropout seed that keeps at least ``at_least`` weights of head 0's first ``rows`` x ``cols``."""
    for seed in range(100000):
        if keep_mask(seed, np.arange(1), np.arange(rows), np.arange(cols), p).sum() >= at_least:
            return seed
    raise RuntimeError(f"no dropout seed keeps {at_least} weights at p = {p}")


CASES = [
    Case("tc-d64", "float16", (1, 2, 1, 70, 150, 64, 64), (TC(64),)),
    Case("tc-d128", "float16", (1, 1, 1, 70, 150, 128, 128), (TC(128),)),
    Case("tc-d64-causal", "float16", (1, 1, 1, 130, 70, 64, 64), (TC(64),), dict(causal=True)),
    Case("tc-d128-causal", "float16", (1, 1, 1, 70, 150, 128, 128), (TC(128),), dict(causal=True)),
    Case(
        "tc-d64-mask-dropout",
        "float16",
        (2, 1, 1, 70, 90, 64, 64),
        (TC(64),),
        dict(dropout_p=0.3, dropout_seed=123, window=(40, 5)),
        mask="bool",
    ),
    Case(
        "tc-d128-dropout-near-1",
        "float16",
        (1, 1, 1, 64, 256, 128, 128),
        (TC(128),),
        dict(dropout_p=NEAR_ONE, dropout_seed=_seed_keeping(NEAR_ONE, 64, 256)),
        zero_query=True,
    ),
    Case(
        "tc-d64-misaligned-view",
        "float16",
        (1, 1, 1, 70, 90, 64, 64),
        (TC(64),),
        dict(causal=True),
        layout="misaligned",
    ),
    Case(
        "cuda-core-f16",
        "float16",
        (1, 2, 1, 70, 90, 64, 64),
        (CORE("float16", 64),),
        dict(causal=True),
        settings=dict(tensor_cores=False),
        mask="float",
    ),
    Case("cuda-core-f16-d36", "float16", (1, 2, 2, 70, 40, 36, 36), (CORE("float16", 64),)),
    Case(
        "cuda-core-f32",
        "float32",
        (1, 2, 1, 70, 90, 64, 64),
        (CORE("float32", 64),),
        dict(window=(20, 3)),
        mask="bool",
        layout="strided",
    ),
    Case(
        "cuda-core-f64",
        "float64",
        (1, 2, 2, 70, 40, 32, 32),
        (CORE("float64", 32),),
        dict(dropout_p=0.25, dropout_seed=7),
    ),
    Case(
        "blockwise-weights-f32",
        "float32",
        (1, 2, 1, 70, 90, 32, 32),
        (DROP32,),
        dict(causal=True, dropout_p=0.2, dropout_seed=3),
        what="weights",
    ),
    Case("blockwise-decode-f16", "float16", (1, 4, 2, 1, 300, 64, 64), ()),
    Case(
        "vjp-f32-dropout",
        "float32",
        (1, 2, 1, 70, 90, 32, 32),
        (CORE("float32", 32), DROP32),
        dict(dropout_p=0.2, dropout_seed=5),
        what="vjp",
    ),
    Case(
        "vjp-f64-dropout",
        "float64",
        (1, 1, 1, 40, 70, 16, 16),
        (CORE("float64", 32), DROP64),
        dict(causal=True, dropout_p=0.1, dropout_seed=9),
        what="vjp",
    ),
    Case(
        "tc-d64-softcap-alibi",
        "float16",
        (1, 2, 1, 70, 150, 64, 64),
        (TC(64),),
        dict(causal=True, softcap=20.0),
        alibi=True,
    ),
    Case(
        "cuda-core-f32-softcap-alibi-vjp",
        "float32",
        (1, 2, 1, 70, 90, 32, 32),
        (CORE("float32", 32),),
        dict(softcap=15.0, window=(30, 30)),
        alibi=True,
        what="vjp",
    ),
    Case("devices-mismatch", "float32", (1, 1, 1, 8, 8, 16, 16), (), what="devices"),
]


def _host_inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    B, Hq, Hkv, N, M, D, Dv = case.shape
    q = rng.standard_normal((B, Hq, N, D)).astype(case.dtype)
    k = rng.standard_normal((B, Hkv, M, D)).astype(case.dtype)
    v = rng.standard_normal((B, Hkv, M, Dv)).astype(case.dtype)
    if case.zero_query:  # every probability 1/M: a kept weight times 1/(1-p) is as large as it gets
        q[...] = 0
    mask = None
    if case.mask == "bool":
        mask = rng.random((B, 1, N, M)) > 0.3
    elif case.mask == "float":
        mask = rng.standard_normal((N, M)).astype(np.float32)
    return q, k, v, mask


def _to_device(cupy, x, layout):
    if layout == "strided":  # a transposed view: unit stride along the rows, not the head dimension
        return cupy.ascontiguousarray(cupy.asarray(x).swapaxes(-1, -2)).swapaxes(-1, -2)
    if layout == "misaligned":  # C-contiguous, 2 bytes past a 16-byte boundary: flat[1:].reshape(...)
        view = cupy.empty(x.size + 1, x.dtype)[1:].reshape(x.shape)
        view[...] = cupy.asarray(x)
        if not view.flags.c_contiguous or view.data.ptr % 16 == 0:
            raise AssertionError("the misaligned view is not what the case needs")
        return view
    return cupy.asarray(x)


def _recording(be: CupyBackend) -> list:
    """The names of the kernels ``be`` launches (a list that fills as it runs)."""
    launched = []
    kernel = be._kernel
    be._kernel = lambda xp, name: launched.append(name) or kernel(xp, name)
    return launched


def run_case(cupy, case: Case, seed: int) -> str:
    """Run ``case``; return a one-line description (starting with SKIP when it cannot run here), raise on a failure."""
    q, k, v, mask = _host_inputs(case, seed)
    opts = dict(case.options)
    if case.what == "devices":
        if cupy.cuda.runtime.getDeviceCount() < 2:
            return "SKIP (one CUDA device: arrays cannot be on different devices)"
        dq = cupy.asarray(q)
        with cupy.cuda.Device(1):
            dk = cupy.asarray(k)
        try:
            selfattn.scaled_dot_product_attention(dq, dk, dq, backend="cupy")
        except ValueError as exc:
            if "key is on CUDA device 1" not in str(exc):
                raise
            selfattn.scaled_dot_product_attention(dq, dq, dq, backend="cupy")  # the context is still usable
            cupy.cuda.Device().synchronize()
            return "refused before any launch: " + str(exc).split(";")[0]
        raise AssertionError("a key on device 1 with a query on device 0 was not refused")
    dq, dk, dv = (_to_device(cupy, x, case.layout) for x in (q, k, v))
    dmask = None if mask is None else cupy.asarray(mask)
    dev_opts = dict(opts)
    if case.alibi:
        slopes = (2.0 ** -np.arange(1, case.shape[1] + 1)).astype(np.float32)
        opts["alibi_slopes"], dev_opts["alibi_slopes"] = slopes, cupy.asarray(slopes)
    be = CupyBackend(**case.settings)
    launched = _recording(be)
    ref_out, ref_lse, ref_w = reference.forward(q, k, v, mask=mask, **opts)
    pb = normalize(
        dq,
        dk,
        dv,
        mask=dmask,
        return_lse=True,
        return_weights=case.what == "weights",
        needs_vjp=case.what == "vjp",
        **dev_opts,
    )
    out, lse, weights = be.forward(pb)
    checked = ["out"]
    # The conformance suite's rule: per element, each output at its own dtype (selfattn.testing.cases).
    smax = reference.score_max(
        q, k, mask=mask, scale=opts.get("scale"), softcap=opts.get("softcap"), alibi_slopes=opts.get("alibi_slopes")
    )
    g = np.random.default_rng(seed + 1).standard_normal(ref_out.shape).astype(case.dtype)
    bounds = reference.rounding_bounds(q, k, v, g, mask=mask, **opts)
    assert_close(out.get(), ref_out, case.dtype, "out", score_max=smax, bound=bounds["out"])
    if lse is not None:
        assert_close(lse.get(), ref_lse, case.dtype, "lse", score_max=smax)
        checked.append("lse")
    if case.what == "weights":
        assert_close(weights.get(), ref_w, case.dtype, "weights", score_max=smax)
        checked.append("weights")
    if case.what == "vjp":
        grads = be.backward(pb, out, lse, cupy.asarray(g))
        for name, got, exp in zip(("dq", "dk", "dv"), grads, reference.vjp(q, k, v, g, mask=mask, **opts), strict=True):
            assert_close(got.get(), exp, case.dtype, name, score_max=smax, bound=bounds.get(name))
        checked.append("dq, dk, dv")
    cupy.cuda.Device().synchronize()
    if not np.isfinite(ref_out).all() or not np.isfinite(out.get().astype(np.float64)).all():
        raise AssertionError(f"{case.name}: non-finite output")
    if case.zero_query and not np.abs(ref_out).max() > 1.0:
        raise AssertionError(f"{case.name}: no weight kept, the case checks nothing")
    unique = tuple(dict.fromkeys(launched))
    if unique != case.kernels:
        raise AssertionError(f"{case.name}: launched {list(unique)}, expected {list(case.kernels)}")
    return f"[{', '.join(unique) or 'cuBLAS only'}] {', '.join(checked)} match the float64 oracle"


RAWMODULE_SOURCE = r"""
extern "C" __global__ void add_one(float* x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += 1.0f;
}
"""


def rawmodule_check(cupy) -> str:
    """Compile a trivial kernel with CuPy's RawModule (NVRTC) and run it: the toolchain works at all."""
    x = cupy.asarray(np.arange(1000, dtype=np.float32))
    kernel = cupy.RawModule(code=RAWMODULE_SOURCE).get_function("add_one")
    kernel((4,), (256,), (x, np.int32(1000)))
    cupy.cuda.Device().synchronize()
    if not (x.get() == np.arange(1000, dtype=np.float32) + 1).all():
        raise AssertionError("add_one computed wrong values")
    return "RawModule: add_one compiled (NVRTC) and ran correctly"


def facts() -> dict:
    """Device, driver and package versions, as this process sees them (imports CuPy, and PyTorch if present)."""
    import importlib.metadata as md
    import platform

    import cupy

    out = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "selfattn": selfattn.__version__,
        "selfattn source": str(Path(selfattn.__file__).resolve().parent),
    }
    try:
        dist = md.distribution("selfattn")
        out["selfattn installed"] = f"yes ({dist.version})"
    except md.PackageNotFoundError:
        out["selfattn installed"] = "no (running from the checkout on PYTHONPATH)"
    out["pytest11 entry point"] = any(ep.value == "selfattn.testing.plugin" for ep in md.entry_points(group="pytest11"))
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"]

    def ver(v):
        return f"{v // 1000}.{(v % 1000) // 10}"

    out.update(
        {
            "device": name.decode() if isinstance(name, bytes) else str(name),
            "compute capability": str(dev.compute_capability),
            "devices": cupy.cuda.runtime.getDeviceCount(),
            "memory": f"{props['totalGlobalMem'] / 2**30:.0f} GiB",
            "driver (CUDA version it supports)": ver(cupy.cuda.runtime.driverGetVersion()),
            "CUDA runtime": ver(cupy.cuda.runtime.runtimeGetVersion()),
            "cupy": cupy.__version__,
        }
    )
    for dist in ("cupy-cuda13x", "cupy-cuda12x"):
        try:
            out["cupy distribution"] = f"{dist} {md.version(dist)}"
            break
        except md.PackageNotFoundError:
            continue
    try:
        import torch

        out["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda}, device: {torch.cuda.is_available()})"
    except ImportError:
        out["torch"] = "not installed"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-pool", action="store_true", help="CuPy's memory pool off: one allocation per array")
    ap.add_argument("--rawmodule", action="store_true", help="only compile and run a trivial RawModule kernel")
    ap.add_argument("--facts", metavar="FILE", help="write device/software facts as JSON to FILE and exit")
    ap.add_argument("-k", dest="select", default="", help="only cases whose name contains this")
    args = ap.parse_args(argv)
    if args.facts:
        data = facts()
        Path(args.facts).write_text(json.dumps(data, indent=2))
        print("\n".join(f"{k}: {v}" for k, v in data.items()))
        return 0
    ok, reason = CupyBackend().availability()
    if not ok:
        print(f"cupy backend unavailable: {reason}", file=sys.stderr)
        return 2
    import cupy

    if args.no_pool:
        cupy.cuda.set_allocator(None)
    if args.rawmodule:
        print(rawmodule_check(cupy), flush=True)
        return 0
    cc = int(cupy.cuda.Device().compute_capability)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for seed, case in enumerate(CASES):
        if args.select not in case.name:
            continue
        if any(k.startswith("attn_fwd_tc_") for k in case.kernels) and cc < launch.TC_MIN_CC:
            print(f"SKIP {case.name}: compute capability {cc} has no tensor-core kernel", flush=True)
            counts["skipped"] += 1
            continue
        t0 = time.perf_counter()
        try:
            msg = run_case(cupy, case, seed)
        except Exception:
            print(f"FAIL {case.name} ({time.perf_counter() - t0:.1f} s)\n{traceback.format_exc()}", flush=True)
            counts["failed"] += 1
            continue
        status = "skipped" if msg.startswith("SKIP") else "passed"
        counts[status] += 1
        print(
            f"{'SKIP' if status == 'skipped' else 'PASS'} {case.name} ({time.perf_counter() - t0:.1f} s): "
            f"{msg.removeprefix('SKIP ')}",
            flush=True,
        )
    print(f"smoke: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped", flush=True)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
