"""The CuPy backend: attention on NVIDIA GPUs.

Importing this module never imports CuPy and never touches a GPU: the
dispatcher imports it to read :data:`backend`'s capabilities. CuPy is imported
on the first :meth:`CupyBackend.availability` check or call.

Forward (no weights requested, max(D, Dv) <= 256): one fused RawModule kernel
(``_cuda/attn.cu``): online softmax over K/V tiles staged in shared memory,
float32 accumulation for float16/float32 (float64 for float64), O(N) memory,
causal/window block skipping, masks read through broadcast strides, GQA by
head index arithmetic, soft-capping and ALiBi inside the loop (no N x M bias
array), dropout with the core's counter hash at the problem's coordinates
(so chunks of a larger call, e.g. Dask blocks, run fused too). A packed
variable-length batch is one launch over every (query head, query tile of
one sequence), from a tile table built on the host. float16 on an
sm_80+ GPU with D and Dv multiples of 8, at most 128, runs the tensor-core
variant (``attn_fwd_tc_float16_*``: mma.sync m16n8k16 with float32
accumulation, FlashAttention-2 tiling); other float16 calls use CUDA cores.

Forward with ``return_weights`` (or larger heads, or decode-like calls with
fewer than 16 query rows against 256+ keys: ``launch.forward_path``; varlen
calls stay fused whatever their lengths) and the backward pass:
blockwise over query rows with ``cupy.matmul`` (cuBLAS) in the compute dtype,
recomputing the probabilities from the log-sum-exp (FlashAttention-2 style);
temporaries stay within ``block_bytes`` per score tile except the weights the
caller asked for. Dropout multipliers come from the ``dropout_tile`` kernel.
All work runs on the device that holds ``query`` and on CuPy's current stream.
"""

from __future__ import annotations

import importlib.util
import threading
from functools import partial
from typing import Any

import numpy as np

from .._capabilities import FEATURES, Capabilities
from .._problem import Problem
from . import _blockwise
from ._base import Backend
from ._cuda import launch

__all__ = ["CupyBackend", "backend", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'selfattn[cuda12]'  (or selfattn[cuda13] for CUDA 13)"


def _driver_probe():
    """``(ok, reason)`` from the CUDA driver library itself, loaded with ctypes.

    Runs before CuPy is imported, so on machines without a driver or device
    (most CI machines) checking availability stays cheap and never imports CuPy.
    """
    import ctypes
    import sys

    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so", "libcuda.dylib")
    lib, errors = None, []
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as exc:
            errors.append(str(exc))
    if lib is None:
        return False, f"no CUDA driver: could not load {names[0]} ({errors[0] if errors else 'not found'})"

    def errname(code):
        ptr = ctypes.c_char_p()
        try:
            if lib.cuGetErrorName(code, ctypes.byref(ptr)) == 0 and ptr.value:
                return ptr.value.decode()
        except Exception:  # pragma: no cover - very old drivers
            pass
        return f"error {code}"

    try:
        rc = lib.cuInit(0)
        if rc != 0:
            return False, f"no usable CUDA driver/device: cuInit failed with {errname(rc)}"
        count = ctypes.c_int(0)
        rc = lib.cuDeviceGetCount(ctypes.byref(count))
        if rc != 0:
            return False, f"no usable CUDA driver/device: cuDeviceGetCount failed with {errname(rc)}"
    except AttributeError as exc:  # not a real driver library
        return False, f"no usable CUDA driver: {exc}"
    if count.value < 1:
        return False, "no CUDA device: the CUDA driver reports 0 devices"
    return True, ""


class CupyBackend(Backend):
    """Fused CUDA forward + blockwise cuBLAS backward on CuPy arrays."""

    name = "cupy"
    priority = 10
    capabilities = Capabilities(
        array_type="cupy",
        features=frozenset(FEATURES),
        notes={
            "float16": (
                "float32 accumulation; the forward uses tensor cores (mma.sync m16n8k16) on "
                "sm_80+ when D and Dv are multiples of 8 and at most 128, CUDA cores otherwise"
            ),
        },
    )

    def __init__(
        self,
        block_bytes: int = 256 * 2**20,
        tensor_cores: bool = True,
        decode_max_rows: int = launch.DECODE_MAX_ROWS,
        decode_min_keys: int = launch.DECODE_MIN_KEYS,
    ) -> None:
        """A CuPy backend with its own settings (the dispatcher's instance uses the defaults).

        ``block_bytes`` bounds one score tile of the blockwise (cuBLAS) paths.
        ``tensor_cores=False`` keeps float16 on the CUDA-core kernel. Calls with
        fewer than ``decode_max_rows`` query rows against at least
        ``decode_min_keys`` keys take the blockwise path
        (:func:`launch.forward_path`); ``decode_max_rows=0`` keeps them on the
        fused kernel. The last three exist for A/B benchmarks and bisecting:
        build a second instance rather than changing the dispatcher's.
        """
        for name, val, least in (
            ("block_bytes", block_bytes, 1),
            ("decode_max_rows", decode_max_rows, 0),
            ("decode_min_keys", decode_min_keys, 0),
        ):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < least:
                raise ValueError(f"CupyBackend: {name} must be an integer >= {least}, got {val!r}")
        self.block_bytes = int(block_bytes)
        self.tensor_cores = bool(tensor_cores)
        self.decode_max_rows = int(decode_max_rows)
        self.decode_min_keys = int(decode_min_keys)
        self._modules: dict[tuple[str, str, int], Any] = {}  # (source, kernel or '-', device) -> RawModule
        self._lock = threading.Lock()

    @property
    def version(self) -> str:  # type: ignore[override]  # looked up lazily: no CuPy import at registration
        spec = importlib.util.find_spec("cupy")
        if spec is None:
            return ""
        try:
            from importlib.metadata import PackageNotFoundError, version
        except ImportError:  # pragma: no cover
            return ""
        for dist in ("cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x", "cupy"):
            try:
                return version(dist)
            except PackageNotFoundError:
                continue
        return ""

    # -- availability ------------------------------------------------------
    def availability(self):
        if importlib.util.find_spec("cupy") is None:
            return False, f"cupy is not installed; {INSTALL_HINT}"
        ok, reason = _driver_probe()
        if not ok:
            return False, reason
        try:
            import cupy
        except Exception as exc:  # broken install, missing CUDA libraries...
            return False, f"cupy failed to import ({type(exc).__name__}: {exc}); reinstall with {INSTALL_HINT}"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:
            return False, (
                f"no usable CUDA driver/device: cupy.cuda.runtime.getDeviceCount() raised {type(exc).__name__}: {exc}"
            )
        if count < 1:
            return False, "no CUDA device: cupy.cuda.runtime.getDeviceCount() returned 0"
        return True, ""

    def info(self):
        ok, reason = self.availability()
        if not ok:
            return {"available": False, "reason": reason}
        import cupy

        out = {"cupy": cupy.__version__, "devices": cupy.cuda.runtime.getDeviceCount()}
        try:
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            name = props["name"]
            out["device"] = name.decode() if isinstance(name, bytes) else str(name)
            out["compute_capability"] = f"{props['major']}.{props['minor']}"
        except Exception:  # pragma: no cover - informative only
            pass
        return out

    # -- kernels -----------------------------------------------------------
    def _module(self, cupy, only, fname="attn.cu"):
        dev = cupy.cuda.Device().id
        key = (fname, only, dev)
        mod = self._modules.get(key)
        if mod is None:
            with self._lock:
                mod = self._modules.get(key)
                if mod is None:
                    mod = cupy.RawModule(code=launch.kernel_source(fname, only=only))
                    self._modules[key] = mod
        return mod

    def _kernel(self, cupy, name):
        # Fused forwards compile one instantiation each; the small helpers share a module.
        only = name if name.startswith("attn_fwd_") else "-"
        return self._module(cupy, only).get_function(name)

    @staticmethod
    def _compute_capability(cupy) -> int:
        """major*10 + minor of the current device (e.g. 90 for an H100)."""
        return int(cupy.cuda.Device().compute_capability)

    # -- helpers -----------------------------------------------------------
    def _dropout_z(self, xp: Any, pb: Problem, b0: int, b1: int, i0: int, i1: int, j0: int, j1: int) -> Any:
        """Dropout multipliers (0 or 1/(1-p)) of a block, ``(bb, Hq, rows, cols)``, from the dropout_tile kernel.

        The kernel numbers batch·heads from a start counter; a chunk's global
        counters (:class:`~selfattn.backends.Coordinates`) are one run of ``Hq``
        per batch entry, so the default layout takes one launch and a chunk one
        launch per batch entry of the block. ``xp`` is CuPy (NumPy in the CPU emulation).
        """
        cdt = pb.compute_dtype
        Hq, rows, cols = pb.q_heads, i1 - i0, j1 - j0
        c = pb.coords
        z = xp.empty((b1 - b0, Hq, rows, cols), dtype=cdt)
        if c.is_default(Hq):
            runs = [(0, b1 - b0, b0 * Hq)]
        else:
            bh = c.batch_heads(b0, b1, Hq)
            runs = [(b, b + 1, int(bh[b * Hq])) for b in range(b1 - b0)]
        kernel = self._kernel(xp, launch.dropout_kernel_name(cdt))
        for r0, r1, bh0 in runs:
            zr = z[r0:r1]
            grid, block = launch.elementwise_launch(zr.size)
            if grid is not None:
                args = launch.pack_dropout_args(
                    z=zr,
                    n_bh=(r1 - r0) * Hq,
                    rows=rows,
                    cols=cols,
                    bh0=bh0,
                    i0=i0 + c.row_start,
                    j0=j0 + c.col_start,
                    dropout_p=pb.dropout_p,
                    dropout_seed=pb.dropout_seed,
                )
                kernel(grid, block, args)
        return z

    # -- forward -----------------------------------------------------------
    def forward(self, pb):
        import cupy

        _check_devices(pb)
        with cupy.cuda.Device(pb.query.device.id):
            return self._forward(cupy, pb)

    def _route(self, pb: Problem, compute_capability: int) -> tuple[str, str | None]:
        """``(path, kernel)``: ``"fused"`` with the forward kernel's name, or ``("blockwise", None)``.

        Every option of the contract (masks, band and its offset, soft-capping,
        ALiBi, chunk coordinates, dropout, packed varlen) runs in the fused
        kernels; weights, heads over 256 and decode-like calls
        (:func:`launch.forward_path`) take the blockwise cuBLAS path. A packed
        varlen batch stays fused whatever its lengths: the alternative is a
        Python loop over its sequences.
        """
        if pb.is_varlen:
            fused = launch.fused_ok(pb.d, pb.dv, False)
        else:
            fused = (
                launch.forward_path(
                    pb.d,
                    pb.dv,
                    pb.n,
                    pb.m,
                    pb.return_weights,
                    decode_max_rows=self.decode_max_rows,
                    decode_min_keys=self.decode_min_keys,
                )
                == "fused"
            )
        if not fused:
            return "blockwise", None
        if self.tensor_cores and launch.tc_ok(pb.dtype, pb.d, pb.dv, pb.return_weights, compute_capability):
            return "fused", launch.tc_kernel_name(launch.pick_tc_dmax(pb.d, pb.dv))
        return "fused", launch.fwd_kernel_name(pb.dtype, launch.pick_dmax(pb.d, pb.dv))

    def plan(self, pb: Problem) -> str:
        """One line for ``explain``: the forward kernel (or the blockwise path) and, for varlen, the tile count."""
        if pb.array_type == "cupy":
            import cupy

            with cupy.cuda.Device(pb.query.device.id):
                _, name = self._route(pb, self._compute_capability(cupy))
        else:  # the CPU emulation of the tests: NumPy stands in for CuPy
            _, name = self._route(pb, self._compute_capability(np))
        if name is None:
            what = "weights requested" if pb.return_weights else "decode-like or head size over 256"
            return f"blockwise cuBLAS forward ({what}); blockwise cuBLAS backward"
        extra = ""
        if pb.is_varlen:
            seq, _ = launch.varlen_tiles(pb.cu_seqlens_q, pb.cu_seqlens_k, pb.lower, pb.upper)
            extra = (
                f", one launch over {pb.num_sequences} packed sequences ({len(seq)} query tiles x {pb.q_heads} heads)"
            )
        return f"fused forward kernel {name}{extra}; blockwise cuBLAS backward"

    def _forward(self, cupy, pb):
        path, name = self._route(pb, self._compute_capability(cupy))
        if path == "fused":
            return self._forward_fused(cupy, pb, name)
        if pb.is_varlen:  # heads over 256: one sequence at a time on the blockwise path
            return _blockwise.forward_varlen(
                pb, cupy, block_bytes=self.block_bytes, dropout=partial(self._dropout_z, cupy)
            )
        return self._forward_blockwise(cupy, pb)

    def _forward_fused(self, cupy, pb, name=None):
        """The fused forward kernel ``name`` (default: the one :meth:`_route` picks) on ``pb``: ``(out, lse, None)``."""
        if name is None:
            name = self._route(pb, self._compute_capability(cupy))[1]
            if name is None:
                raise ValueError("the fused forward kernels cannot run this problem (weights or heads over 256)")
        B, Hq, Hkv, N, M, D, Dv = pb.batch, pb.q_heads, pb.kv_heads, pb.n, pb.m, pb.d, pb.dv
        tc = name.startswith("attn_fwd_tc_")
        threads = launch.TC_THREADS if tc else launch.BM
        out = cupy.empty((B, Hq, N, Dv), dtype=pb.dtype)
        lse = cupy.empty((B, Hq, N), dtype=pb.lse_dtype) if pb.want_lse else cupy.empty((1,), dtype=pb.lse_dtype)
        tiles = None
        if pb.is_varlen:
            tiles = launch.varlen_tiles(pb.cu_seqlens_q, pb.cu_seqlens_k, pb.lower, pb.upper)
            grid, block, _ = launch.varlen_launch(Hq, len(tiles[0]), threads)
        else:
            grid, block, _, _ = launch.fwd_launch(B, Hq, N, threads)
        if grid is None:
            return out, (lse if pb.want_lse else None), None
        if M == 0:
            out.fill(0)
            if pb.want_lse:
                lse.fill(-np.inf)
            return out, (lse if pb.want_lse else None), None
        # Every absent pointer argument gets this; the kernels never read it.
        placeholder = cupy.empty((1,), dtype=cupy.int64)
        mask = mask_index = mdt = mss = None
        if pb.mask is not None:
            mask = pb.mask
            if mask.dtype == np.bool_:
                mask = mask.view(cupy.uint8)
            mask_index = cupy.asarray(pb.mask_index, dtype=cupy.int64)
            mdt, mss = pb.mask.dtype, (pb.mask.shape, pb.mask.strides, pb.mask.itemsize)
        # Slopes in the accumulation dtype, (B or S, Hq) contiguous: a copy of B*Hq numbers at most.
        alibi = None if pb.alibi is None else cupy.ascontiguousarray(pb.alibi, dtype=pb.compute_dtype)
        batch_index = None
        if pb.dropout_p and pb.coords.batch_index is not None:
            batch_index = cupy.asarray(pb.coords.batch_index, dtype=cupy.int64)
        varlen = None
        if tiles is not None:
            # One host-to-device copy for the four tables.
            assert pb.cu_seqlens_q is not None and pb.cu_seqlens_k is not None
            parts = (pb.cu_seqlens_q, pb.cu_seqlens_k, tiles[0], tiles[1])
            table = cupy.asarray(np.concatenate(parts).astype(np.int64, copy=False))
            ends = np.cumsum([len(x) for x in parts])
            varlen = {
                n: table[e - len(x) : e]
                for n, x, e in zip(("cu_q", "cu_k", "tile_seq", "tile_row"), parts, ends, strict=True)
            }
            varlen["n_tiles"] = len(tiles[0])
        q, k, v = pb.query, pb.key, pb.value
        if tc:
            # The tensor-core kernel copies 16-byte row chunks (cp.async): give it
            # unit-stride rows and base pointers on 16-byte boundaries. A copy, not
            # ascontiguousarray: that returns a C-contiguous view as is, even one
            # that starts off a boundary (flat[1:].reshape(...)). A fresh
            # allocation is aligned (CuPy's pool: 512 bytes); O(N) like the input.
            q, k, v = (
                x if launch.tc_layout_ok(x.shape, x.strides, x.itemsize, _address(x)) else x.copy(order="C")
                for x in (q, k, v)
            )
        ss = {a: (x.shape, x.strides, x.itemsize) for a, x in (("q", q), ("k", k), ("v", v))}
        if mss is not None:
            ss["m"] = mss
        args = launch.pack_fwd_args(
            q=q,
            k=k,
            v=v,
            out=out,
            lse=lse,
            mask=mask,
            mask_index=mask_index,
            mask_dtype=mdt,
            shapes_strides=ss,
            sizes=dict(B=B, Hq=Hq, Hkv=Hkv, N=N, M=M, D=D, Dv=Dv),
            scale=pb.scale,
            lower=pb.lower,
            upper=pb.upper,
            dropout_p=pb.dropout_p,
            dropout_seed=pb.dropout_seed,
            write_lse=pb.want_lse,
            offset=None if pb.is_varlen else pb.offset,
            softcap=pb.softcap,
            alibi=alibi,
            coords=pb.coords,
            batch_index=batch_index,
            varlen=varlen,
            placeholder=placeholder,
        )
        self._kernel(cupy, name)(grid, block, args)
        return out, (lse if pb.want_lse else None), None

    def _forward_blockwise(self, xp: Any, pb: Problem) -> tuple[Any, Any, Any]:
        return _blockwise.forward(pb, xp, block_bytes=self.block_bytes, dropout=partial(self._dropout_z, xp))

    # -- backward ----------------------------------------------------------
    def backward(self, pb: Problem, out: Any, lse: Any, grad_out: Any) -> tuple[Any, Any, Any]:
        import cupy

        _check_devices(pb, grad_out=grad_out)
        with cupy.cuda.Device(pb.query.device.id):
            return self._backward(cupy, pb, out, lse, grad_out)

    def _backward(self, xp: Any, pb: Problem, out: Any, lse: Any, grad_out: Any) -> tuple[Any, Any, Any]:
        run = _blockwise.backward_varlen if pb.is_varlen else _blockwise.backward
        return run(pb, xp, out, lse, grad_out, block_bytes=self.block_bytes, dropout=partial(self._dropout_z, xp))


def _check_devices(pb: Problem, **others: Any) -> None:
    """Raise ValueError unless key, value, mask, alibi_slopes (and ``others``) are on the query's device.

    Every kernel runs on the query's device; a pointer into another GPU's memory
    would fault there (an illegal address that poisons the CUDA context) or,
    with peer access, be read slowly. selfattn never moves data between devices.
    """
    dev = pb.query.device.id
    named = [("key", pb.key), ("value", pb.value), ("mask", pb.mask), ("alibi_slopes", pb.alibi), *others.items()]
    for name, x in named:
        if x is None:
            continue
        other = x.device.id
        if other != dev:
            raise ValueError(
                f"{name} is on CUDA device {other} but query is on device {dev}; the cupy backend runs on the "
                f"query's device and never moves data between devices: copy {name} there first, e.g. "
                f"`with cupy.cuda.Device({dev}): {name} = {name}.copy()`"
            )


def _address(x) -> int:
    """Device (CuPy) or host (NumPy, in the CPU tests) address of ``x``'s first element."""
    data = x.data
    return data.ptr if hasattr(data, "ptr") else x.ctypes.data


#: The instance the dispatcher registers.
backend = CupyBackend()
