"""CI: what `pip install selfattn` (no extras) gives -- the NumPy backend, nothing heavier imported."""

import sys

import numpy as np

import selfattn

names = {r.name: r for r in selfattn.list_backends()}
assert names["numpy"].available and not names["numba"].available, names
assert "pip install 'selfattn[numba]'" in names["numba"].reason, names["numba"].reason
q = np.random.default_rng(0).standard_normal((2, 4, 64, 32)).astype(np.float32)
out = selfattn.scaled_dot_product_attention(q, q, q, causal=True)
assert out.shape == q.shape and selfattn.explain(q, q, q).backend == "numpy"
out, lse = selfattn.scaled_dot_product_attention_varlen(
    q[0], q[0], q[0], np.array([0, 20, 64]), np.array([0, 20, 64]), return_lse=True
)
assert out.shape == (4, 64, 32) and lse.shape == (4, 64)
assert not any(m in sys.modules for m in ("numba", "cupy", "dask")), "a heavy library was imported"
print("NumPy-only install: OK;", ", ".join(f"{r.name}={'yes' if r.available else 'no'}" for r in names.values()))
