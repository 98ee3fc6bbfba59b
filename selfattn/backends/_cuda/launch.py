"""Host-side logic of the CuPy backend as pure functions (no CuPy, testable on a CPU).

Kernel sources and names, launch configuration, tiling, mask stride
preparation, dropout parameters and the exact argument tuples passed to the
kernels in ``attn.cu``. ``cupy_.py`` only adds device arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..._dropout import split_seed, threshold

__all__ = [
    "KERNEL_SOURCES", "BM", "DMAX_CHOICES", "GRID_MAX", "INT32_MAX",
    "kernel_source", "kernel_names", "pick_dmax", "fwd_kernel_name", "dropout_kernel_name",
    "fwd_launch", "elementwise_launch", "element_strides", "mask_kind", "mask_strides",
    "band_args", "dropout_args", "FWD_SIGNATURE", "DROPOUT_SIGNATURE", "pack_fwd_args",
    "pack_dropout_args", "fused_ok", "forward_path", "DECODE_MAX_ROWS", "DECODE_MIN_KEYS",
    "TC_DMAX_CHOICES", "TC_THREADS", "TC_MIN_CC",
    "tc_kernel_name", "pick_tc_dmax", "tc_ok", "tc_layout_ok", "kernel_signature",
]

_HERE = Path(__file__).resolve().parent

#: Kernel sources compiled into one RawModule each; ``common.cuh`` is prepended.
KERNEL_SOURCES = ("attn.cu",)
#: Query rows per CUDA block of the fused forward (= threads per block; SA_BM in attn.cu).
BM = 64
#: Head sizes the fused forward is instantiated for (max(D, Dv) is rounded up to one).
DMAX_CHOICES = (32, 64, 128, 256)
#: Head sizes of the float16 tensor-core forward (``attn_fwd_tc_float16_<DMAX>``); it
#: runs 128 threads (4 warps x 16 query rows, SA_TC_THREADS) per block of BM rows.
TC_DMAX_CHOICES = (32, 64, 128)
TC_THREADS = 128
#: Oldest compute capability (major*10 + minor) with mma.sync.m16n8k16 and cp.async.
TC_MIN_CC = 80
#: Largest gridDim.x; kernels loop over blocks beyond it.
GRID_MAX = 2**31 - 1
INT32_MAX = 2**31 - 1
_DTYPE_NAMES = ("float16", "float32", "float64")


def _instantiated(line: str):
    """Kernel name of an ``SA_DEFINE_FWD``/``SA_DEFINE_FWD_TC`` instantiation line, else None."""
    for prefix in ("SA_DEFINE_FWD(", "SA_DEFINE_FWD_TC("):
        if line.startswith(prefix):
            return line[len(prefix):].split(",", 1)[0].strip()
    return None


def kernel_source(fname: str, only=None) -> str:
    """Source of ``fname`` as compiled: ``common.cuh`` followed by the file.

    With ``only`` (a forward kernel name, ``attn_fwd_*``), the other forward
    instantiations are left out, so the runtime compiles just the kernel it
    launches (each instantiation takes seconds in NVRTC + ptxas). Any other
    ``only`` (e.g. ``"-"``) keeps the small helper kernels alone.
    """
    text = (_HERE / fname).read_text()
    if only is not None:
        lines = text.splitlines()
        names = [_instantiated(ln) for ln in lines]
        if only.startswith("attn_fwd_") and only not in names:
            raise KeyError(f"no kernel {only!r} in {fname}")
        text = "\n".join(ln for ln, nm in zip(lines, names, strict=True) if nm is None or nm == only) + "\n"
    return (_HERE / "common.cuh").read_text() + "\n" + text


def fwd_kernel_name(dtype, dmax: int) -> str:
    return f"attn_fwd_{np.dtype(dtype).name}_{int(dmax)}"


def tc_kernel_name(dmax: int) -> str:
    """Name of the float16 tensor-core forward for head size ``dmax``."""
    return f"attn_fwd_tc_float16_{int(dmax)}"


def dropout_kernel_name(compute_dtype) -> str:
    return f"dropout_tile_{np.dtype(compute_dtype).name}"


def kernel_names(fname: str = "attn.cu") -> tuple:
    """Every ``extern "C"`` kernel that ``fname`` must define."""
    if fname != "attn.cu":
        raise KeyError(fname)
    fwd = tuple(fwd_kernel_name(dt, dm) for dt in _DTYPE_NAMES for dm in DMAX_CHOICES)
    tc = tuple(tc_kernel_name(dm) for dm in TC_DMAX_CHOICES)
    return fwd + tc + (dropout_kernel_name("float32"), dropout_kernel_name("float64"))


def kernel_signature(name: str) -> tuple:
    """The ``(parameter, C type)`` list of kernel ``name`` (every forward shares one)."""
    if name.startswith("attn_fwd_"):
        return tuple(FWD_SIGNATURE)
    if name.startswith("dropout_tile_"):
        return DROPOUT_SIGNATURE
    raise KeyError(name)


def pick_dmax(d: int, dv: int):
    """Smallest instantiated head size >= max(d, dv), or None (use the blockwise path)."""
    need = max(int(d), int(dv))
    for dm in DMAX_CHOICES:
        if need <= dm:
            return dm
    return None


def fused_ok(d: int, dv: int, return_weights: bool) -> bool:
    """Whether the fused forward kernel can handle the call (else the blockwise cuBLAS path must)."""
    return not return_weights and pick_dmax(d, dv) is not None


#: Defaults of :func:`forward_path` (and ``CupyBackend``): decode-like calls (fewer query rows
#: than DECODE_MAX_ROWS per head, at least DECODE_MIN_KEYS keys) take the blockwise cuBLAS path
#: even where the fused kernel could run. Constants: change them per backend instance instead.
DECODE_MAX_ROWS = 16
DECODE_MIN_KEYS = 256


def forward_path(d: int, dv: int, n: int, m: int, return_weights: bool, *,
                 decode_max_rows: int = DECODE_MAX_ROWS, decode_min_keys: int = DECODE_MIN_KEYS) -> str:
    """``"fused"`` or ``"blockwise"``: which forward the CuPy backend runs.

    Calls with fewer than ``decode_max_rows`` query rows against at least
    ``decode_min_keys`` keys go blockwise (``CupyBackend`` passes its own
    settings; ``decode_max_rows=0`` keeps every call on the fused kernel).

    The fused kernels give a block 64 query rows of one head and walk its keys
    in order, so with a handful of rows (decoding: N = 1) most threads idle and
    the walk over M keys is serial. The blockwise path then reads K and V once
    per key/value head through cuBLAS (GQA heads share the read) and keeps an
    N x M score block -- small when N is. The crossover here is an estimate
    from that argument, not a GPU measurement; the GPU benchmark times a decode
    shape both ways (benchmarks/bench_gpu.py, tools/gpu_bench.py) so a GPU run can check it.
    """
    if not fused_ok(d, dv, return_weights):
        return "blockwise"
    if int(n) < int(decode_max_rows) and int(m) >= int(decode_min_keys):
        return "blockwise"
    return "fused"


def pick_tc_dmax(d: int, dv: int):
    """Head size of the tensor-core forward for ``(d, dv)``, or None when it does not apply.

    It needs ``d`` and ``dv`` to be multiples of 8 (a row chunk of 8 halves is
    one 16-byte copy) and at most 128 (registers: O and the Q fragments stay in
    registers for the whole key loop).
    """
    d, dv = int(d), int(dv)
    if d % 8 or dv % 8 or d <= 0 or dv <= 0:
        return None
    for dm in TC_DMAX_CHOICES:
        if max(d, dv) <= dm:
            return dm
    return None


def tc_ok(dtype, d: int, dv: int, return_weights: bool, compute_capability: int) -> bool:
    """Whether the float16 tensor-core forward handles the call (sm_80+, float16, no weights)."""
    return (np.dtype(dtype) == np.float16 and not return_weights
            and int(compute_capability) >= TC_MIN_CC and pick_tc_dmax(d, dv) is not None)


def tc_layout_ok(shape, byte_strides, itemsize: int, address: int) -> bool:
    """Whether an array can be read by the tensor-core forward in place.

    The last axis must have unit stride, every other stride (of an axis longer
    than 1) and the base address must be multiples of 16 bytes; otherwise the
    backend passes a contiguous copy (same O(N) memory as the input).
    """
    if address % 16:
        return False
    for i, (n, st) in enumerate(zip(shape, byte_strides, strict=True)):
        if n == 1:
            continue
        if i == len(shape) - 1:
            if st != itemsize:
                return False
        elif st % 16 or st < 0:
            return False
    return True


def fwd_launch(batch: int, q_heads: int, n: int, threads: int = BM):
    """``(grid, block, n_row_blocks, total_blocks)`` for a forward kernel; grid is None when there is no work.

    Both forwards give each block BM query rows of one (batch, query head):
    the CUDA-core kernel with ``threads = BM`` (a row per thread), the
    tensor-core kernel with ``threads = TC_THREADS`` (16 rows per warp).
    """
    n_row_blocks = -(-int(n) // BM)
    total = n_row_blocks * int(batch) * int(q_heads)
    if total == 0:
        return None, (int(threads),), n_row_blocks, 0
    return (min(total, GRID_MAX),), (int(threads),), n_row_blocks, total


def elementwise_launch(total: int, threads: int = 256, max_blocks: int = 65536):
    """``(grid, block)`` for a grid-stride loop over ``total`` elements (grid None when empty)."""
    if total <= 0:
        return None, (threads,)
    return (max(1, min(-(-int(total) // threads), max_blocks)),), (threads,)


def element_strides(shape, byte_strides, itemsize: int) -> tuple:
    """Strides in elements, 0 for size-1 axes (a broadcast axis may have any byte stride)."""
    out = []
    for n, s in zip(shape, byte_strides, strict=True):
        if n == 1:
            out.append(0)
        else:
            if s % itemsize:
                raise ValueError(f"stride {s} is not a multiple of the item size {itemsize}")
            out.append(s // itemsize)
    return tuple(out)


_MASK_KINDS = {"bool": 1, "float16": 2, "float32": 3, "float64": 4}


def mask_kind(dtype) -> int:
    """Mask code of ``attn.cu``: 0 none, 1 bool, 2 float16, 3 float32, 4 float64."""
    if dtype is None:
        return 0
    return _MASK_KINDS[np.dtype(dtype).name]


def mask_strides(shape, byte_strides, itemsize: int) -> tuple:
    """Element strides ``(sb, sh, si, sj)`` of a ``(Bm, Hm, Nm, Mm)`` mask; broadcast axes get 0.

    The batch stride multiplies the per-batch mask index (``Problem.mask_index``),
    the head stride the query head, the row/column strides the query/key index:
    the mask is read in place, never expanded.
    """
    if len(shape) != 4:
        raise ValueError(f"mask must be 4-D (Bm, Hm, Nm, Mm), got shape {tuple(shape)}")
    return element_strides(shape, byte_strides, itemsize)


def band_args(lower, upper) -> tuple:
    """``(has_lower, lower, has_upper, upper)`` as int32 values (bounds clamped to int32)."""
    lo = 0 if lower is None else min(int(lower), INT32_MAX)
    up = 0 if upper is None else min(int(upper), INT32_MAX)
    return (np.int32(lower is not None), np.int32(lo), np.int32(upper is not None), np.int32(up))


def dropout_args(p: float, seed) -> tuple:
    """``(threshold, seed_lo, seed_hi, drop_scale, use_dropout)`` for the kernels (uint32s, float64, int32)."""
    if not p:
        return np.uint32(0), np.uint32(0), np.uint32(0), np.float64(1.0), np.int32(0)
    k0, k1 = split_seed(int(seed))
    return (np.uint32(threshold(p)), np.uint32(k0), np.uint32(k1),
            np.float64(1.0 / (1.0 - p)), np.int32(1))


#: Parameter (name, C type) list of the fused forward, in order (SA_FWD_ARGS in attn.cu).
FWD_SIGNATURE = (
    [("q", "ptr"), ("k", "ptr"), ("v", "ptr"), ("out", "ptr"), ("lse", "ptr"),
     ("mask", "ptr"), ("mask_index", "ptr"), ("mask_kind", "int")]
    + [(f"{a}s{i}", "long long") for a in "qkvm" for i in range(4)]
    + [(n, "int") for n in ("Hq", "G", "N", "M", "D", "Dv")]
    + [("n_row_blocks", "long long"), ("total_blocks", "long long"), ("scale", "double"),
       ("has_lower", "int"), ("lower", "int"), ("has_upper", "int"), ("upper", "int"),
       ("threshold", "sa_u32"), ("seed_lo", "sa_u32"), ("seed_hi", "sa_u32"),
       ("drop_scale", "double"), ("use_dropout", "int"), ("write_lse", "int")]
)

#: Parameter list of dropout_tile_* (SA_DROP_ARGS in attn.cu).
DROPOUT_SIGNATURE = (
    ("z", "ptr"), ("n_bh", "long long"), ("rows", "int"), ("cols", "int"), ("bh0", "long long"),
    ("i0", "int"), ("j0", "int"), ("seed_lo", "sa_u32"), ("seed_hi", "sa_u32"),
    ("threshold", "sa_u32"), ("drop_scale", "double"),
)

_CTYPES: dict[str, Any] = {"int": np.int32, "long long": np.int64, "double": np.float64, "sa_u32": np.uint32}


def _pack(signature, values: dict) -> tuple:
    missing = [n for n, _ in signature if n not in values]
    extra = set(values) - {n for n, _ in signature}
    if missing or extra:
        raise KeyError(f"missing kernel arguments {missing}, unknown {sorted(extra)}")
    out = []
    for name, ctype in signature:
        val = values[name]
        if ctype == "ptr":
            out.append(val)
        else:
            typ = _CTYPES[ctype]
            if typ is not np.float64:
                info = np.iinfo(typ)
                if not (info.min <= int(val) <= info.max):
                    raise OverflowError(f"kernel argument {name}={int(val)} does not fit in {ctype}")
                out.append(typ(int(val)))
            else:
                out.append(typ(float(val)))
    return tuple(out)


def pack_fwd_args(*, q, k, v, out, lse, mask, mask_index, mask_dtype, shapes_strides, sizes,
                  scale, lower, upper, dropout_p, dropout_seed, write_lse) -> tuple:
    """The argument tuple of ``attn_fwd_*``.

    ``shapes_strides`` maps ``"q"``, ``"k"``, ``"v"`` and (when a mask is given)
    ``"m"`` to ``(shape, byte_strides, itemsize)``; ``sizes`` holds ``B, Hq, Hkv,
    N, M, D, Dv``. Pointers (``q`` ... ``mask_index``) are passed through as given.
    """
    vals = {"q": q, "k": k, "v": v, "out": out, "lse": lse, "mask": mask, "mask_index": mask_index,
            "mask_kind": mask_kind(mask_dtype)}
    for a in "qkvm":
        if a == "m" and mask_dtype is None:
            st = (0, 0, 0, 0)
        elif a == "m":
            st = mask_strides(*shapes_strides[a])
        else:
            shape, bstr, isz = shapes_strides[a]
            st = element_strides(shape, bstr, isz)
        for i in range(4):
            vals[f"{a}s{i}"] = st[i]
    B, Hq, Hkv, N, M, D, Dv = (sizes[x] for x in ("B", "Hq", "Hkv", "N", "M", "D", "Dv"))
    _, _, n_row_blocks, total = fwd_launch(B, Hq, N)
    vals.update(Hq=Hq, G=Hq // Hkv, N=N, M=M, D=D, Dv=Dv, n_row_blocks=n_row_blocks,
                total_blocks=total, scale=scale, write_lse=int(bool(write_lse)))
    vals.update(zip(("has_lower", "lower", "has_upper", "upper"), band_args(lower, upper), strict=True))
    vals.update(zip(("threshold", "seed_lo", "seed_hi", "drop_scale", "use_dropout"),
                    dropout_args(dropout_p, dropout_seed), strict=True))
    return _pack(FWD_SIGNATURE, vals)


def pack_dropout_args(*, z, n_bh, rows, cols, bh0, i0, j0, dropout_p, dropout_seed) -> tuple:
    """The argument tuple of ``dropout_tile_*`` for a ``(n_bh, rows, cols)`` tile at ``(bh0, i0, j0)``."""
    thr, lo, hi, sc, _ = dropout_args(dropout_p, dropout_seed)
    return _pack(DROPOUT_SIGNATURE, dict(z=z, n_bh=n_bh, rows=rows, cols=cols, bh0=bh0, i0=i0, j0=j0,
                                         seed_lo=lo, seed_hi=hi, threshold=thr, drop_scale=sc))
