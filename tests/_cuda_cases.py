"""Inputs and argument packing shared by the CuPy backend's test files (CPU and GPU)."""

from __future__ import annotations

import numpy as np

from selfattn.backends._cuda import launch

__all__ = ["EMU_CASES", "FEATURE_CASES", "BLOCK_CASES", "GPU_CASES", "case_id", "make_inputs", "pack_for"]


def case_id(case: dict) -> str:
    """A test id for an options dict (``"plain"`` when empty)."""
    return "-".join(f"{k}" for k in case) or "plain"


def pack_for(pb, out="OUT", lse="LSE", placeholder="NONE"):
    """``launch.pack_fwd_args`` for a normalized (non-varlen) problem; strings stand for the device arrays."""
    ss = {a: (x.shape, x.strides, x.itemsize) for a, x in (("q", pb.query), ("k", pb.key), ("v", pb.value))}
    mdt = None
    if pb.mask is not None:
        ss["m"] = (pb.mask.shape, pb.mask.strides, pb.mask.itemsize)
        mdt = pb.mask.dtype
    return launch.pack_fwd_args(
        q=pb.query,
        k=pb.key,
        v=pb.value,
        out=out,
        lse=lse,
        mask=pb.mask,
        mask_index=pb.mask_index,
        mask_dtype=mdt,
        shapes_strides=ss,
        sizes=dict(B=pb.batch, Hq=pb.q_heads, Hkv=pb.kv_heads, N=pb.n, M=pb.m, D=pb.d, Dv=pb.dv),
        scale=pb.scale,
        lower=pb.lower,
        upper=pb.upper,
        dropout_p=pb.dropout_p,
        dropout_seed=pb.dropout_seed,
        write_lse=pb.want_lse,
        offset=pb.offset,
        softcap=pb.softcap,
        alibi=None if pb.alibi is None else pb.alibi.astype(pb.compute_dtype),
        coords=pb.coords,
        batch_index=pb.coords.batch_index,
        placeholder=placeholder,
    )


EMU_CASES = [
    dict(),
    dict(causal=True),
    dict(window=(2, 1)),
    dict(causal=True, window=(3, 0), mask="bool_row"),
    dict(mask="float_full"),
    dict(mask="bool_batch", dropout_p=0.3, dropout_seed=123),
]


def make_inputs(case, dtype=np.float32, shape=(2, 4, 2, 70, 40, 6, 5), contiguous=True):
    """``(q, k, v, kwargs)`` for ``shape = (B, Hq, Hkv, N, M, D, Dv)``; ``case["mask"]`` names a mask kind."""
    rng = np.random.default_rng(7)
    B, Hq, Hkv, N, M, D, Dv = shape
    q = rng.standard_normal((B, Hq, N, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, M, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, M, Dv)).astype(dtype)
    if not contiguous:
        q = np.asfortranarray(q)
        k = rng.standard_normal((B, Hkv, D, M)).astype(dtype).swapaxes(-1, -2)
    kw = dict(case)
    al = kw.pop("alibi", None)
    if al == "per_head":
        kw["alibi_slopes"] = rng.uniform(0.05, 0.6, Hq).astype(np.float32)
    elif al == "per_batch":
        kw["alibi_slopes"] = rng.uniform(0.05, 0.6, (B, Hq))
    mk = kw.pop("mask", None)
    if mk == "bool_row":
        kw["mask"] = rng.random((1, 1, M)) > 0.2
    elif mk == "float_full":
        kw["mask"] = rng.standard_normal((B, Hq, N, M)).astype(np.float32)
    elif mk == "bool_batch":
        kw["mask"] = rng.random((B, 1, N, M)) > 0.5
    return q, k, v, kw


#: Soft-capping and ALiBi (``alibi``: per-head float32 slopes, or per-batch float64 ones), with the other options.
FEATURE_CASES = [
    dict(softcap=2.5),
    dict(alibi="per_head", causal=True),
    dict(alibi="per_batch", window=(5, 2), softcap=1.5, mask="bool_row"),
    dict(softcap=3.0, alibi="per_head", mask="float_full", dropout_p=0.3, dropout_seed=77),
]

BLOCK_CASES = EMU_CASES + [dict(window=(0, 0), mask="float_full", dropout_p=0.5, dropout_seed=2**63 + 11)]
GPU_CASES = BLOCK_CASES + [
    dict(causal=True, mask="bool_row", dropout_p=0.2, dropout_seed=9),
    dict(causal=True, softcap=3.0, alibi="per_batch", dropout_p=0.2, dropout_seed=17),
]
