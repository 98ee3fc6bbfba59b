"""Self-attention by hand in NumPy, step by step, checked against selfattn.

    X            (N, d_model)   token vectors
    Q = X W_Q    (N, d_k)       what each token is looking for
    K = X W_K    (N, d_k)       what each token offers to be found by
    V = X W_V    (N, d_v)       what each token hands over
    S = Q K^T / sqrt(d_k)       (N, N) scores
    A = softmax(S, axis=-1)     (N, N) each row sums to 1
    out = A V                   (N, d_v) weighted sum of values

Run:  python examples/numpy_walkthrough.py
"""

import numpy as np

import selfattn

np.set_printoptions(precision=3, suppress=True)
rng = np.random.default_rng(42)

words = ["the", "cat", "sat", "on", "the", "mat"]
n, d_model, d_k, d_v = len(words), 8, 4, 4

# 1. token vectors: one row per word (a real model would look these up in an embedding table)
vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
embedding = rng.standard_normal((len(vocab), d_model))
X = embedding[[vocab[w] for w in words]]
print("1. X, shape", X.shape)

# 2. projections
W_Q = rng.standard_normal((d_model, d_k)) / np.sqrt(d_model)
W_K = rng.standard_normal((d_model, d_k)) / np.sqrt(d_model)
W_V = rng.standard_normal((d_model, d_v)) / np.sqrt(d_model)
Q, K, V = X @ W_Q, X @ W_K, X @ W_V
print("2. Q, K, V shapes", Q.shape, K.shape, V.shape)

# 3. scores: how well query i matches key j, scaled so their variance does not grow with d_k
S = Q @ K.T / np.sqrt(d_k)
print("3. scores S = Q K^T / sqrt(d_k):\n", S)

# 4. softmax over keys (subtract the row max first: same result, no overflow)
E = np.exp(S - S.max(axis=-1, keepdims=True))
A = E / E.sum(axis=-1, keepdims=True)
print("4. attention weights A (rows sum to 1):\n", A)
for i, w in enumerate(words):
    j = int(A[i].argmax())
    print(f"   {w!r:6} attends most to {words[j]!r} (weight {A[i, j]:.2f})")

# 5. weighted sum of the values
out = A @ V
print("5. out = A V, shape", out.shape)

# 6. the library computes the same (2-D inputs = one head, no batch)
lib_out, lib_w = selfattn.scaled_dot_product_attention(Q, K, V, return_weights=True)
print("6. max |by hand - selfattn| output:", np.abs(out - lib_out).max(), " weights:", np.abs(A - lib_w).max())
assert np.allclose(out, lib_out, atol=1e-12) and np.allclose(A, lib_w, atol=1e-12)

# 7. causal masking: token i may only look at tokens j <= i (future scores -> -inf before the softmax)
S_causal = np.where(np.tril(np.ones((n, n), bool)), S, -np.inf)
E = np.exp(S_causal - S_causal.max(axis=-1, keepdims=True))
A_causal = E / E.sum(axis=-1, keepdims=True)
lib_causal = selfattn.scaled_dot_product_attention(Q, K, V, causal=True)
print("7. causal weights:\n", A_causal)
print("   max |by hand - selfattn| (causal):", np.abs(A_causal @ V - lib_causal).max())
assert np.allclose(A_causal @ V, lib_causal, atol=1e-12)

# 8. several heads = several independent (W_Q, W_K, W_V) sets, stacked on a head axis
h = 2
WQ, WK, WV = (rng.standard_normal((h, d_model, d_k)) / np.sqrt(d_model) for _ in range(3))
Qh, Kh, Vh = X @ WQ, X @ WK, X @ WV  # (h, N, d_k) each
Sh = Qh @ np.swapaxes(Kh, -1, -2) / np.sqrt(d_k)
Ah = np.exp(Sh - Sh.max(-1, keepdims=True))
Ah /= Ah.sum(-1, keepdims=True)
multi = Ah @ Vh
print(
    "8. two heads, max |by hand - selfattn|:", np.abs(multi - selfattn.scaled_dot_product_attention(Qh, Kh, Vh)).max()
)
assert np.allclose(multi, selfattn.scaled_dot_product_attention(Qh, Kh, Vh), atol=1e-12)
print("walkthrough OK: the hand-written attention matches selfattn")
