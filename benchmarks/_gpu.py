"""GPU benchmark cases shared by the asv classes (``bench_gpu.py``) and ``tools/gpu_bench.py``.

One place defines what is timed: the shapes, how inputs are made on the
device, and the call each "backend" makes:

* ``cupy``: ``selfattn`` with ``backend="cupy"`` (the dispatcher's instance, its defaults);
* ``cupy-cuda-cores``: float16 on the CUDA-core kernel (``CupyBackend(tensor_cores=False)``);
* ``cupy-fused``: decode on the fused kernel instead of the blockwise path
  (``CupyBackend(decode_max_rows=0)``);
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` on the same GPU.

The variants are separate backend instances, called as the public API calls
the dispatcher's instance (normalize, then ``forward``), never the dispatcher's
instance with a setting changed. Every call is
asynchronous: the timing code synchronizes (asv inside the timed function, the
tool through CUDA events). Importing this module imports neither CuPy nor
PyTorch; :func:`need_gpu` and :func:`need_torch` raise ``NotImplementedError``
with the reason when either is missing, which asv reports as n/a.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Shape",
    "PREFILL",
    "DECODE",
    "QUICK_PREFILL",
    "QUICK_DECODE",
    "BACKENDS",
    "DECODE_BACKENDS",
    "DTYPES",
    "need_gpu",
    "need_torch",
    "flops",
    "Case",
    "make_case",
    "extra_mib",
]


@dataclass(frozen=True)
class Shape:
    """``(batch, heads, n, m, d)``: query rows ``n``, keys ``m``, head size ``d`` (no GQA)."""

    name: str
    batch: int
    heads: int
    n: int
    m: int
    d: int


#: Prefill shapes of issue 15's report (N = M = 4096).
PREFILL = {
    s.name: s for s in (Shape("4x16x4096x64", 4, 16, 4096, 4096, 64), Shape("4x16x4096x128", 4, 16, 4096, 4096, 128))
}
#: Decode: one query row per head against M = 32768 keys.
DECODE = {s.name: s for s in (Shape("decode-1x32x32768x128", 1, 32, 1, 32768, 128),)}
#: Tiny stand-ins for dry runs (``tools/gpu_bench.py --quick``): the same code paths.
QUICK_PREFILL = {s.name: s for s in (Shape("1x1x16x64", 1, 1, 16, 16, 64), Shape("1x1x16x128", 1, 1, 16, 16, 128))}
QUICK_DECODE = {s.name: s for s in (Shape("decode-1x1x300x64", 1, 1, 1, 300, 64),)}

BACKENDS = ("cupy", "cupy-cuda-cores", "torch")
DECODE_BACKENDS = ("cupy", "cupy-fused", "torch")
DTYPES = ("float16", "float32")


def need_gpu():
    """``cupy`` when the CuPy backend can run here, else ``NotImplementedError`` with the reason."""
    try:
        from selfattn.backends.cupy_ import CupyBackend
    except Exception as exc:  # an old commit without the backend
        raise NotImplementedError(f"no CuPy backend in this selfattn: {exc!r}") from exc
    ok, reason = CupyBackend().availability()
    if not ok:
        raise NotImplementedError(f"cupy backend unavailable: {reason}")
    import cupy

    return cupy


def need_torch():
    """``(torch, torch.nn.functional)`` with a CUDA device, else ``NotImplementedError``."""
    try:
        import torch
        import torch.nn.functional as F  # noqa: N812
    except ImportError as exc:
        raise NotImplementedError(f"torch is not installed: {exc}") from exc
    if not torch.cuda.is_available():
        raise NotImplementedError("torch has no CUDA device")
    return torch, F


def flops(shape: Shape, causal: bool, backward: bool) -> float:
    """Matmul FLOPs of exact attention: 4·B·H·N·M·D forward, 2.5x that more for the backward, halved if causal."""
    f = 4.0 * shape.batch * shape.heads * shape.n * shape.m * shape.d
    if backward:
        f *= 3.5
    return f / 2 if causal else f


@dataclass
class Case:
    """The callables of one (backend, shape, dtype, causal) point, inputs already on the device."""

    backend: str
    shape: Shape
    dtype: str
    causal: bool
    forward: object
    forward_backward: object
    sync: object

    def flops(self, backward: bool = False) -> float:
        return flops(self.shape, self.causal, backward)


def _selfattn_calls(cupy, backend, q, k, v, g, causal):
    import selfattn

    if backend == "cupy":

        def forward():
            return selfattn.scaled_dot_product_attention(q, k, v, causal=causal, backend="cupy")

        def forward_backward():
            _, back = selfattn.scaled_dot_product_attention_vjp(q, k, v, causal=causal, backend="cupy")
            return back(g)

        return forward, forward_backward
    from selfattn._problem import normalize
    from selfattn.backends.cupy_ import CupyBackend

    settings = {"cupy-cuda-cores": dict(tensor_cores=False), "cupy-fused": dict(decode_max_rows=0)}[backend]
    be = CupyBackend(**settings)

    def forward():  # what the public API does, less the (cached) backend selection
        return be.forward(normalize(q, k, v, causal=causal))[0]

    return forward, None  # the variants change the forward only


def make_case(backend: str, shape: Shape, dtype: str, causal: bool, seed: int = 0) -> Case:
    """Inputs drawn on the device (fresh random normals) and the calls for one point.

    Raises ``NotImplementedError`` where the point cannot run here (no GPU, no
    PyTorch, a float32 call on the float16-only ``cupy-cuda-cores`` variant).
    """
    cupy = need_gpu()
    if backend == "cupy-cuda-cores" and dtype != "float16":
        raise NotImplementedError("cupy-cuda-cores differs from cupy for float16 only")
    if backend not in BACKENDS + DECODE_BACKENDS:
        raise ValueError(f"unknown GPU benchmark backend {backend!r}")
    rng = cupy.random.default_rng(seed)

    def draw(rows):
        return rng.standard_normal((shape.batch, shape.heads, rows, shape.d), dtype=cupy.float32).astype(dtype)

    q, k, v, g = draw(shape.n), draw(shape.m), draw(shape.m), draw(shape.n)
    sync = cupy.cuda.Device().synchronize
    if backend == "torch":
        torch, F = need_torch()
        tq, tk, tv, tg = (torch.as_tensor(x, device="cuda") for x in (q, k, v, g))
        gq, gk, gv = (x.detach().clone().requires_grad_() for x in (tq, tk, tv))

        def forward():
            with torch.no_grad():
                return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

        def forward_backward():
            out = F.scaled_dot_product_attention(gq, gk, gv, is_causal=causal)
            return torch.autograd.grad(out, (gq, gk, gv), tg)

        return Case(backend, shape, dtype, causal, forward, forward_backward, torch.cuda.synchronize)
    forward, forward_backward = _selfattn_calls(cupy, backend, q, k, v, g, causal)
    return Case(backend, shape, dtype, causal, forward, forward_backward, sync)


def extra_mib(case: Case) -> float:
    """Device memory one forward takes from CuPy's pool beyond the arrays it returns, in MiB."""
    import cupy

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    before = pool.used_bytes()
    res = case.forward()
    case.sync()
    kept = sum(x.nbytes for x in (res if isinstance(res, tuple) else (res,)) if hasattr(x, "nbytes"))
    return (pool.total_bytes() - before - kept) / 2**20
