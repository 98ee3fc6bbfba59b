"""A git revision's Numba kernels against this checkout's, side by side in one process.

``python tools/kernel_ab.py --base REV [--shape B,H,N,D] [--what fwd|bwd] [--causal]
[--dtype float32|float64] [--kernels simd|blas|fused] [--threads N] [--blocks K]``

How a kernel change is measured on a shared, noisy machine: two processes (or two checkouts)
timed one after the other differ by more than most kernel changes do, so both versions run in
*one* process, in alternating blocks of calls. The kernel modules of ``REV``
(``selfattn/backends/_numba/*.py``, which import only each other) are written to a private
package in a cache directory (``~/.cache/selfattn/kernel_ab/<sha>``, so Numba's disk cache
keeps their machine code between runs) and imported beside this checkout's; the host code
(``selfattn/backends/numba_.py``) is this checkout's, and each call is routed to one set of
kernels or the other. Prints the largest difference between the two results (0.0: same bits),
each one's median time and the ratio of this checkout's time to ``REV``'s: the median, the
interquartile range and the min-max over blocks (``selfattn._bench.timing.block_samples``).

Only the kernels differ: ``REV``'s kernels must take the arguments this checkout's host code
passes them (a change of a kernel's signature cannot be compared this way: the run then stops
with exit status 2 and says so; pick a ``REV`` at or after the change).
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "selfattn/backends/_numba"


def absolute_parents(source: str) -> str:
    """``source`` with imports from above ``selfattn.backends._numba`` made absolute.

    ``from .x`` stays (the copy is a package of the kernel modules);
    ``from ..x`` becomes ``from selfattn.backends.x``, ``from ...x`` ``from selfattn.x``.
    """

    def absolute(m: re.Match[str]) -> str:
        parent = ".".join(["selfattn", "backends", "_numba"][: 4 - len(m.group(1))])
        rest = m.group(2)
        return f"from {parent}{'.' + rest if rest else ''} import"

    return re.sub(r"^from (\.{2,3})(\w[\w.]*)? import", absolute, source, flags=re.M)


def base_package(rev: str, cache: Path | None = None) -> str:
    """Write ``rev``'s kernel modules to a package under ``cache``; put it on ``sys.path``; return its name."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if sha.returncode != 0:
        raise SystemExit(f"--base {rev!r}: not a commit of {ROOT} ({sha.stderr.strip()})")
    full = sha.stdout.strip()
    cache = Path.home() / ".cache" / "selfattn" / "kernel_ab" if cache is None else cache
    name = f"selfattn_kernels_{full[:12]}"
    pkg = cache / full / name
    if not (pkg / "__init__.py").exists():
        files = subprocess.run(
            ["git", "-C", str(ROOT), "ls-tree", "--name-only", full, f"{KERNELS}/"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        pkg.mkdir(parents=True, exist_ok=True)
        for path in files:
            if path.endswith(".py"):
                text = subprocess.run(
                    ["git", "-C", str(ROOT), "show", f"{full}:{path}"], capture_output=True, text=True, check=True
                ).stdout
                (pkg / Path(path).name).write_text(absolute_parents(text))
        (pkg / "__init__.py").touch()
    if str(pkg.parent) not in sys.path:
        sys.path.insert(0, str(pkg.parent))
    return name


def route(base: str) -> Callable[[bool], None]:
    """Make the Numba backend's kernel lookup switchable; returns ``use_base(flag)``."""
    from selfattn.backends import numba_

    state = {"pkg": "selfattn.backends._numba"}

    def lookup(path: str):
        mod, fn = path.split(".")
        return getattr(importlib.import_module(f"{state['pkg']}.{mod}"), fn)

    numba_._kernel = lookup

    def use_base(flag: bool) -> None:
        state["pkg"] = base if flag else "selfattn.backends._numba"

    return use_base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/kernel_ab.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision whose kernels are the baseline")
    parser.add_argument("--shape", default="1,4,1024,64", help="B,H,N,D (default %(default)s)")
    parser.add_argument("--what", choices=("fwd", "bwd"), default="fwd", help="time the forward or the backward")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--kernels", choices=("simd", "blas", "fused"), default="simd")
    parser.add_argument("--threads", type=int, default=None, help="Numba threads (default: Numba's)")
    parser.add_argument("--blocks", type=int, default=15, help="alternating blocks (default %(default)s)")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per block (default %(default)s)")
    parser.add_argument("--cache", type=Path, default=None, help="where REV's kernels are written")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(x) for x in args.shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        parser.error(f"--shape must be four positive integers B,H,N,D, got {args.shape!r}")

    import numba

    from selfattn._bench.timing import block_samples
    from selfattn._problem import normalize
    from selfattn.backends import numba_

    if args.threads:
        numba.set_num_threads(args.threads)
    use_base = route(base_package(args.base, args.cache))
    backend = numba_.NumbaBackend(kernels=args.kernels)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(args.dtype) for _ in range(3))
    pb = normalize(q, k, v, causal=args.causal, needs_vjp=args.what == "bwd")
    if args.what == "bwd":
        out, lse, _ = backend.forward(pb)
        g = rng.standard_normal(out.shape).astype(args.dtype)

        def call() -> tuple[np.ndarray, ...]:
            return backend.backward(pb, out, lse, g)
    else:

        def call() -> tuple[np.ndarray, ...]:
            return backend.forward(pb)[:1]

    def version(base: bool) -> Callable[[], tuple[np.ndarray, ...]]:
        def run() -> tuple[np.ndarray, ...]:
            use_base(base)
            return call()

        return run

    fb, fn = version(True), version(False)
    print(f"compiling {args.base}'s kernels and this checkout's (cached after the first run) ...", flush=True)
    try:
        base_result = fb()
    except (TypeError, numba.core.errors.TypingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"{args.base}'s kernels do not take the arguments this checkout's host code passes them "
            f"(a kernel's signature changed since {args.base}; compare against a revision at or after "
            f"that change): {first}",
            file=sys.stderr,
        )
        return 2
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(base_result, fn(), strict=True))
    t = np.array(block_samples([fb, fn], blocks=args.blocks, calls=3, min_time=args.min_time))
    r = t[1] / t[0]
    label = f"{'causal ' if args.causal else ''}{args.what} {shape} {args.dtype}, {args.kernels} kernels"
    print(f"{label}, {numba.get_num_threads()} thread(s), {args.blocks} blocks")
    print(f"max |this - base| {diff:.3g}")
    print(f"base {np.median(t[0]) * 1e3:.3f} ms  this {np.median(t[1]) * 1e3:.3f} ms")
    q1, q3 = np.percentile(r, [25, 75])
    print(f"this / base {np.median(r):.3f} [IQR {q1:.3f}-{q3:.3f}, min-max {r.min():.3f}-{r.max():.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
