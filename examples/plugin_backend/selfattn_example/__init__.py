"""A minimal selfattn backend written only against the public contract (see README.md).

Everything a backend needs comes from the :class:`selfattn.backends.Problem`
it receives: the normalised arrays ``(B, Hq, N, D)``, the causal/window band
(:meth:`~selfattn.backends.Problem.band`), the mask restricted to a block
(:meth:`~selfattn.backends.Problem.mask_block`), ALiBi distances
(:meth:`~selfattn.backends.Problem.distance`) and the dropout keep-mask at the
call's global counters (:meth:`~selfattn.backends.Problem.dropout_keep`).
"""

from __future__ import annotations

import numpy as np

import selfattn
from selfattn.backends import Backend, Problem

__all__ = ["ExampleBackend", "make_backend"]


class ExampleBackend(Backend):
    """Naive, materialised attention in NumPy: readable, O(N·M) memory, for the plugin example."""

    name = "example"
    version = "1.0"
    priority = 300  # never chosen automatically ahead of the built-ins
    capabilities = selfattn.Capabilities(
        array_type="numpy",
        dtypes={"float32", "float64"},
        features={
            "bool_mask",
            "float_mask",
            "causal",
            "window",
            "gqa",
            "dropout",
            "lse",
            "weights",
            "softcap",
            "alibi",
            "chunks",
        },
        notes={
            "float16": "not implemented in the example",
            "vjp": "the example computes no gradients",
            "varlen": "the example does not take packed batches",
        },
    )

    def forward(self, problem: Problem) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        pb = problem
        cdt = pb.compute_dtype
        B, N, M = pb.batch, pb.n, pb.m
        k = np.repeat(pb.key, pb.group, axis=1).astype(cdt)  # GQA: query head h uses kv head h // group
        v = np.repeat(pb.value, pb.group, axis=1).astype(cdt)
        s = pb.query.astype(cdt) @ k.swapaxes(-1, -2) * cdt.type(pb.scale)
        if pb.softcap is not None:
            s = pb.softcap * np.tanh(s / pb.softcap)
        if pb.alibi is not None:
            s = s - pb.alibi.astype(cdt)[:, :, None, None] * np.abs(pb.distance(0, N, 0, M))
        allowed = pb.band(0, N, 0, M)
        if pb.mask is not None:
            mask = pb.mask_block(0, B, 0, N, 0, M)
            if mask.dtype == np.bool_:
                allowed = mask if allowed is None else mask & allowed
            else:
                s = s + mask
        if allowed is not None:
            s = np.where(allowed, s, -np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            mx = s.max(axis=-1, keepdims=True) if M else np.zeros(s.shape[:-1] + (1,), cdt)
            mx = np.where(np.isneginf(mx), 0, mx)
            e = np.exp(s - mx)
            total = e.sum(axis=-1, keepdims=True)
            p = np.where(total == 0, 0, e / np.where(total == 0, 1, total))
            lse = (mx + np.log(total))[..., 0].astype(cdt)
        z = p
        if pb.dropout_p > 0:
            z = p * pb.dropout_keep(0, B, 0, N, 0, M) / (1.0 - pb.dropout_p)
        out = (z @ v).astype(pb.dtype)
        weights = p.astype(pb.dtype) if pb.return_weights else None
        return out, (lse if pb.want_lse else None), weights


def make_backend() -> ExampleBackend:
    """Entry-point target: a zero-argument factory returning the backend."""
    return ExampleBackend()
