"""Quickstart: attention output and weights for one q, k, v on every available backend.

Run:  python examples/quickstart.py
"""

import numpy as np

import selfattn
from selfattn.nn import MultiHeadAttention

rng = np.random.default_rng(0)
# (batch, heads, sequence, head_dim)
q = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)
k = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)
v = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)

results = {}
for rec in selfattn.list_backends():
    if not rec.available:
        print(f"{rec.name:6s}: unavailable ({rec.reason})")
        continue
    if rec.capabilities.array_type != "numpy":  # e.g. cupy wants cupy arrays, dask dask arrays
        import importlib

        xp = importlib.import_module(
            {"dask": "dask.array"}.get(rec.capabilities.array_type, rec.capabilities.array_type)
        )
        args = [xp.asarray(a) for a in (q, k, v)]
    else:
        args = [q, k, v]
    out, weights = selfattn.scaled_dot_product_attention(*args, causal=True, return_weights=True, backend=rec.name)
    out, weights = (np.asarray(a.get() if hasattr(a, "get") else a) for a in (out, weights))
    results[rec.name] = out
    print(
        f"{rec.name:6s}: out {out.shape} {out.dtype}, weights {weights.shape}, "
        f"rows sum to 1: {np.allclose(weights.sum(-1), 1, atol=1e-5)}, "
        f"first query attends only itself: {bool(np.all(weights[..., 0, 1:] == 0))}"
    )

names = list(results)
for name in names[1:]:
    diff = float(np.abs(results[name] - results[names[0]]).max())
    print(f"max |{name} - {names[0]}| = {diff:.2e}")

print("weights[0, 0] (batch 0, head 0), causal:")
print(np.array2string(weights[0, 0], precision=2, suppress_small=True))

# The same through a layer: self-attention over (batch, tokens, embed_dim).
mha = MultiHeadAttention(embed_dim=32, num_heads=4, seed=0)
x = rng.standard_normal((2, 6, 32)).astype(np.float32)
y, w = mha(x, causal=True, need_weights=True)
print(f"MultiHeadAttention: x {x.shape} -> y {y.shape}, head-averaged weights {w.shape}")
print("quickstart OK")
