"""Attention layers on plain NumPy parameter arrays.

Every layer keeps its parameters as NumPy arrays in a ``dict`` (``layer.params``),
so ``numpy.savez(path, **layer.state_dict())`` saves it and
``layer.load_state_dict(numpy.load(path))`` restores it. Layers compute with
NumPy matmuls and call :func:`selfattn.scaled_dot_product_attention` (or its
VJP) for the attention itself, so they run on every NumPy-array backend
(``backend=`` is passed through).

Weight layout follows PyTorch (``y = x @ W.T + b``) and the ``from_torch``
loaders take a PyTorch ``state_dict`` whose values are NumPy arrays
(``{k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}``).

Mask conventions (differ from PyTorch's ``nn.MultiheadAttention``!):

* ``mask`` boolean: **True = may attend** (PyTorch ``attn_mask`` bool: True = *not*
  allowed, so pass ``~torch_mask``). A float ``mask`` is added to the scaled
  scores in both libraries (``-inf`` excludes) and is passed unchanged.
  PyTorch's 3-D ``(B*H, N, M)`` attn_mask becomes ``mask.reshape(B, H, N, M)``.
* ``key_mask`` ``(B, M)`` boolean: **True = real token** (PyTorch
  ``key_padding_mask`` bool: True = padding, so pass ``~key_padding_mask``).
* ``causal=True``: bottom-right aligned; equal to PyTorch's ``is_causal`` /
  ``generate_square_subsequent_mask`` for self-attention (N = M).
* A query row that may attend nothing gets output ``out_proj.bias`` (its
  attention output is 0), where PyTorch gives NaN.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .. import scaled_dot_product_attention, scaled_dot_product_attention_vjp

__all__ = ["MultiHeadAttention", "LayerNorm", "FeedForward", "TransformerEncoderLayer", "TransformerEncoder",
           "gelu", "erf"]

_FLOATS = (np.float16, np.float32, np.float64)


# ----------------------------------------------------------------------------- helpers

def _int_arg(name, value, *, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _dtype_arg(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float16, float32 or float64, got {dtype!r}") from None
    if dt not in _FLOATS:
        raise TypeError(f"dtype must be float16, float32 or float64, got {dt}")
    return dt


def _dropout_arg(p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(p).__name__} {p!r}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return p


def _as_input(name, x, dtype, last, *, allow_2d=True):
    """Validate a (B, L, last) activation (or (L, last)) and cast it to ``dtype``."""
    if isinstance(x, np.ndarray):
        arr = x
    else:
        if type(x).__module__.split(".")[0] in ("cupy", "torch"):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__module__}.{type(x).__name__}; "
                            "convert it first (e.g. tensor.numpy() or cupy.asnumpy(x))")
        try:
            arr = np.asarray(x)
        except Exception:
            raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}") from None
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        raise TypeError(f"{name} must be a real float (or int) array, got dtype {arr.dtype}")
    if arr.ndim not in ((2, 3) if allow_2d else (3,)):
        raise ValueError(f"{name} must have shape (B, L, {last})" + (f" or (L, {last})" if allow_2d else "")
                         + f", got shape {arr.shape}")
    if arr.shape[-1] != last:
        raise ValueError(f"{name} has feature size {arr.shape[-1]} (shape {arr.shape}), expected {last}")
    return arr.astype(dtype, copy=False)


def _linear(x, w, b):
    y = x @ w.T
    return y if b is None else y + b


def _xavier(rng, shape, dtype):
    fan_out, fan_in = shape
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _torch_linear_init(rng, out_f, in_f, dtype, bias=True):
    # nn.Linear.reset_parameters: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)); same for the bias.
    bound = 1.0 / math.sqrt(in_f) if in_f > 0 else 0.0
    w = rng.uniform(-bound, bound, size=(out_f, in_f)).astype(dtype)
    b = rng.uniform(-bound, bound, size=(out_f,)).astype(dtype) if bias else None
    return w, b


class _Params:
    """Shared ``state_dict`` / ``load_state_dict`` over ``self.params``."""

    params: dict

    def state_dict(self):
        """A new ``dict`` name -> copy of each parameter array (``numpy.savez(path, **sd)`` saves it)."""
        return {k: np.array(v, copy=True) for k, v in self.params.items()}

    def load_state_dict(self, state):
        """Copy arrays from a mapping (e.g. ``numpy.load(path)``) into the parameters, in place.

        Every parameter name must be present with the same shape; values are
        cast to the layer's dtype. Raises KeyError (missing/unexpected names) or
        ValueError (shape mismatch) naming the parameter; nothing is changed then.
        """
        keys = set(state.keys())
        missing = sorted(set(self.params) - keys)
        extra = sorted(keys - set(self.params))
        if missing or extra:
            raise KeyError(f"state dict mismatch for {type(self).__name__}: missing {missing}, unexpected {extra}")
        new = {}
        for k, cur in self.params.items():
            v = np.asarray(state[k])
            if v.shape != cur.shape:
                raise ValueError(f"parameter {k!r} has shape {v.shape} in the state dict, expected {cur.shape}")
            new[k] = v.astype(cur.dtype, copy=True)
        self.params.update(new)
        return self

    def num_parameters(self):
        """Total number of scalar parameters."""
        return int(sum(v.size for v in self.params.values()))


# ----------------------------------------------------------------------------- multi-head attention

class MultiHeadAttention(_Params):
    """Multi-head (and grouped-query) attention with input/output projections.

    ``MultiHeadAttention(embed_dim, num_heads, *, kv_heads=None, kdim=None,
    vdim=None, bias=True, dropout_p=0.0, dtype=numpy.float32, seed=None)``

    Computes, for query ``(B, N, E)`` and key/value ``(B, M, kdim)``/``(B, M, vdim)``::

        q = query @ q_weight.T + q_bias        -> (B, num_heads, N, E/num_heads)
        k = key   @ k_weight.T + k_bias        -> (B, kv_heads,  M, E/num_heads)
        v = value @ v_weight.T + v_bias        -> (B, kv_heads,  M, E/num_heads)
        o = scaled_dot_product_attention(q, k, v, ...)    # GQA: K/V never repeated
        out = concat_heads(o) @ out_weight.T + out_bias   -> (B, N, E)

    Parameters (``self.params``, arrays of ``dtype``): ``q_weight (E, E)``,
    ``k_weight (kv_heads*hd, kdim)``, ``v_weight (kv_heads*hd, vdim)``,
    ``out_weight (E, E)`` and, with ``bias=True``, ``q_bias``, ``k_bias``,
    ``v_bias``, ``out_bias``. Initialisation follows PyTorch: the input
    projections are Xavier-uniform (over the packed ``(3E, E)`` matrix when
    ``kdim == vdim == E`` and ``kv_heads == num_heads``, as PyTorch does;
    separately otherwise), ``out_weight`` is PyTorch's default Linear init
    ``U(±1/sqrt(E))`` and all biases are zero. ``seed`` seeds
    ``numpy.random.default_rng``.

    ``dropout_p`` is dropout on the attention weights, applied only in calls
    with ``training=True``. Raises TypeError/ValueError naming the argument for
    non-integer sizes, ``embed_dim % num_heads != 0``,
    ``num_heads % kv_heads != 0``, a bad dtype or ``dropout_p`` outside [0, 1).
    Use :meth:`from_torch` to load ``torch.nn.MultiheadAttention`` weights.
    """

    def __init__(self, embed_dim, num_heads, *, kv_heads=None, kdim=None, vdim=None, bias=True, dropout_p=0.0,
                 dtype=np.float32, seed=None):
        self.embed_dim = _int_arg("embed_dim", embed_dim)
        self.num_heads = _int_arg("num_heads", num_heads)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        self.kv_heads = self.num_heads if kv_heads is None else _int_arg("kv_heads", kv_heads)
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of kv_heads ({self.kv_heads})")
        self.kdim = self.embed_dim if kdim is None else _int_arg("kdim", kdim)
        self.vdim = self.embed_dim if vdim is None else _int_arg("vdim", vdim)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.bias = bool(bias)
        self.dropout_p = _dropout_arg(dropout_p)
        self.dtype = _dtype_arg(dtype)
        self.head_dim = self.embed_dim // self.num_heads
        e, kvd = self.embed_dim, self.kv_heads * self.head_dim
        rng = np.random.default_rng(seed)
        if self.kdim == e and self.vdim == e and kvd == e:
            packed = _xavier(rng, (3 * e, e), self.dtype)
            qw, kw, vw = packed[:e], packed[e:2 * e], packed[2 * e:]
        else:
            qw = _xavier(rng, (e, e), self.dtype)
            kw = _xavier(rng, (kvd, self.kdim), self.dtype)
            vw = _xavier(rng, (kvd, self.vdim), self.dtype)
        ow, _ = _torch_linear_init(rng, e, e, self.dtype, bias=False)
        self.params = {"q_weight": qw, "k_weight": kw, "v_weight": vw, "out_weight": ow}
        if self.bias:
            for name, size in (("q_bias", e), ("k_bias", kvd), ("v_bias", kvd), ("out_bias", e)):
                self.params[name] = np.zeros(size, self.dtype)

    def __repr__(self):
        extra = "" if self.kv_heads == self.num_heads else f", kv_heads={self.kv_heads}"
        return (f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}{extra}, "
                f"kdim={self.kdim}, vdim={self.vdim}, bias={self.bias}, dtype={self.dtype})")

    # -- PyTorch interop --------------------------------------------------------------------------------------------
    @classmethod
    def from_torch(cls, state_dict, num_heads, *, dtype=None):
        """Build a layer from a ``torch.nn.MultiheadAttention`` state dict given as NumPy arrays.

        Accepts ``in_proj_weight (3E, E)`` or ``q_proj_weight``/``k_proj_weight``/
        ``v_proj_weight`` (PyTorch uses these when ``kdim``/``vdim`` differ from
        ``E``), optional ``in_proj_bias (3E,)``, ``out_proj.weight`` and optional
        ``out_proj.bias``. ``bias_k``/``bias_v`` (``add_bias_kv=True``) are not
        supported (ValueError). ``dtype`` defaults to the arrays' dtype. The
        PyTorch module must be built with ``batch_first=True`` for the inputs
        to line up as ``(B, N, E)`` (the weights are the same either way).
        Convert PyTorch masks as described in :mod:`selfattn.nn.layers`:
        ``mask=~attn_mask`` (bool), ``key_mask=~key_padding_mask``.
        """
        sd = {k: np.asarray(v) for k, v in state_dict.items()}
        if "bias_k" in sd or "bias_v" in sd:
            raise ValueError("state_dict has bias_k/bias_v (add_bias_kv=True), which is not supported")
        if "out_proj.weight" not in sd:
            raise KeyError("state_dict lacks 'out_proj.weight'; is it a torch.nn.MultiheadAttention state dict?")
        e = sd["out_proj.weight"].shape[0]
        if "in_proj_weight" in sd:
            w = sd["in_proj_weight"]
            qw, kw, vw = w[:e], w[e:2 * e], w[2 * e:]
        elif all(k in sd for k in ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            qw, kw, vw = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
        else:
            raise KeyError("state_dict needs 'in_proj_weight' or q_proj_weight/k_proj_weight/v_proj_weight")
        has_bias = "in_proj_bias" in sd
        dtype = qw.dtype if dtype is None else dtype
        layer = cls(e, num_heads, kdim=kw.shape[1], vdim=vw.shape[1], bias=has_bias, dtype=dtype)
        new = {"q_weight": qw, "k_weight": kw, "v_weight": vw, "out_weight": sd["out_proj.weight"]}
        if has_bias:
            b = sd["in_proj_bias"]
            new.update(q_bias=b[:e], k_bias=b[e:2 * e], v_bias=b[2 * e:],
                       out_bias=sd.get("out_proj.bias", np.zeros(e, dtype)))
        layer.load_state_dict(new)
        return layer

    # -- forward ----------------------------------------------------------------------------------------------------
    def _prepare(self, query, key, value, mask, key_mask, training, dropout_seed):
        p = self.params
        xq = _as_input("query", query, self.dtype, self.embed_dim)
        unbatched = xq.ndim == 2
        self_attn = key is None
        xk = xq if key is None else _as_input("key", key, self.dtype, self.kdim)
        if value is None:
            if key is not None and self.vdim != self.kdim:
                raise ValueError("value is required when vdim != kdim")
            if key is None and self.vdim != self.embed_dim:
                raise ValueError("value is required when vdim != embed_dim")
            xv = xk
        else:
            xv = _as_input("value", value, self.dtype, self.vdim)
        if key is None and value is not None:
            raise ValueError("value was given without key; pass key too (or neither for self-attention)")
        if self_attn and self.kdim != self.embed_dim:
            raise ValueError(f"self-attention needs kdim == embed_dim; this layer has kdim={self.kdim}, pass key")
        if not (xk.ndim == xq.ndim == xv.ndim):
            raise ValueError(f"query, key and value must all be batched (3-D) or all unbatched (2-D), "
                             f"got shapes {xq.shape}, {xk.shape}, {xv.shape}")
        if unbatched:
            xq, xk, xv = xq[None], xk[None], xv[None]
        b, n, _ = xq.shape
        if xk.shape[0] != b or xv.shape[0] != b:
            raise ValueError(f"query, key and value must share the batch size, got {xq.shape[0]}, {xk.shape[0]}, "
                             f"{xv.shape[0]}")
        if xk.shape[1] != xv.shape[1]:
            raise ValueError(f"key and value must have the same length M, got {xk.shape[1]} and {xv.shape[1]}")
        m = xk.shape[1]
        full_mask = self._combine_masks(mask, key_mask, b, n, m, unbatched)
        if not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training must be a bool, got {type(training).__name__}")
        drop = self.dropout_p if training else 0.0
        if drop > 0.0 and dropout_seed is None:
            dropout_seed = int(np.random.default_rng().integers(0, 2 ** 63))
        h, hkv, hd = self.num_heads, self.kv_heads, self.head_dim
        q = _linear(xq, p["q_weight"], p.get("q_bias")).reshape(b, n, h, hd).transpose(0, 2, 1, 3)
        k = _linear(xk, p["k_weight"], p.get("k_bias")).reshape(b, m, hkv, hd).transpose(0, 2, 1, 3)
        v = _linear(xv, p["v_weight"], p.get("v_bias")).reshape(b, m, hkv, hd).transpose(0, 2, 1, 3)
        return dict(xq=xq, xk=xk, xv=xv, q=q, k=k, v=v, mask=full_mask, drop=drop, seed=dropout_seed,
                    unbatched=unbatched, self_attn=self_attn, value_given=value is not None, b=b, n=n, m=m)

    def _combine_masks(self, mask, key_mask, b, n, m, unbatched):
        h = self.num_heads
        if mask is not None:
            if not isinstance(mask, np.ndarray):
                raise TypeError(f"mask must be a numpy.ndarray (bool True = attend, or float additive), "
                                f"got {type(mask).__name__}")
            if mask.dtype != bool and mask.dtype not in _FLOATS:
                raise TypeError(f"mask must be bool (True = attend) or float (additive), got dtype {mask.dtype}")
            if mask.ndim not in (2, 3, 4) or (mask.ndim == 3 and not unbatched):
                raise ValueError(f"mask must have shape (N, M) or (B|1, H|1, N, M) (or (H|1, N, M) for unbatched "
                                 f"inputs), got {mask.shape}; reshape a PyTorch (B*H, N, M) mask with "
                                 f".reshape(B, H, N, M)")
            if mask.ndim == 3:
                mask = mask[None]
            target = (b, h, n, m)
            if any(s not in (1, t) for s, t in zip(mask.shape[::-1], target[::-1])):
                raise ValueError(f"mask with shape {mask.shape} does not broadcast to (B, H, N, M) = {target}")
            if mask.dtype != bool:
                mask = mask.astype(self.dtype, copy=False)
        if key_mask is None:
            return mask
        km = np.asarray(key_mask)
        if km.dtype != bool:
            raise TypeError(f"key_mask must be a bool array (True = real token, False = padding), got dtype "
                            f"{km.dtype}; for a PyTorch key_padding_mask pass ~key_padding_mask")
        if unbatched and km.ndim == 1:
            km = km[None]
        if km.shape != (b, m):
            raise ValueError(f"key_mask must have shape (B, M) = {(b, m)}, got {km.shape}")
        km4 = km[:, None, None, :]
        if mask is None:
            return km4
        if mask.dtype == bool:
            return mask & km4
        return mask + np.where(km4, 0.0, -np.inf).astype(mask.dtype)

    def _check_mode(self, causal, need_weights, average_weights):
        for name, val in (("causal", causal), ("need_weights", need_weights), ("average_weights", average_weights)):
            if not isinstance(val, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(val).__name__}")

    def __call__(self, query, key=None, value=None, *, mask=None, key_mask=None, causal=False, need_weights=False,
                 average_weights=True, training=False, dropout_seed=None, backend=None):
        """Apply the layer.

        Parameters
        ----------
        query : ``(B, N, E)`` (or unbatched ``(N, E)``) array
            Cast to the layer's dtype (float or int input accepted).
        key, value : ``(B, M, kdim)``, ``(B, M, vdim)``, optional
            Omit both for self-attention (key = value = query). If only
            ``value`` is omitted it defaults to ``key``.
        mask : bool or float array, optional
            Shape ``(N, M)`` or ``(B|1, H|1, N, M)``. Bool True = may attend;
            float is added to the scaled scores.
        key_mask : bool ``(B, M)``, optional
            True = real token, False = padding (never attended).
        causal : bool
            Bottom-right aligned causal masking (query ``i`` sees keys
            ``j <= i + M - N``).
        need_weights, average_weights : bool
            With ``need_weights`` return ``(out, weights)``: ``weights`` is
            ``(B, N, M)`` averaged over heads if ``average_weights`` else
            ``(B, H, N, M)`` per head (attention probabilities before dropout).
        training : bool
            Apply ``dropout_p`` (only when True). ``dropout_seed`` fixes the pattern.
        backend : str, optional
            selfattn backend for the attention core.

        Returns ``out`` ``(B, N, E)`` (or ``(N, E)``) of the layer's dtype, or
        ``(out, weights)``. N = 0 or M = 0 is allowed; rows with nothing to
        attend get attention output 0 (so ``out`` = ``out_bias``), never NaN.
        """
        self._check_mode(causal, need_weights, average_weights)
        st = self._prepare(query, key, value, mask, key_mask, training, dropout_seed)
        res = scaled_dot_product_attention(st["q"], st["k"], st["v"], mask=st["mask"], causal=bool(causal),
                                           dropout_p=st["drop"], dropout_seed=st["seed"],
                                           return_weights=bool(need_weights), backend=backend)
        o, w = res if need_weights else (res, None)
        b, n = st["b"], st["n"]
        o2 = o.transpose(0, 2, 1, 3).reshape(b, n, self.embed_dim)
        out = _linear(o2, self.params["out_weight"], self.params.get("out_bias"))
        if st["unbatched"]:
            out = out[0]
        if not need_weights:
            return out
        if average_weights:
            w = w.mean(axis=1, dtype=w.dtype)
        if st["unbatched"]:
            w = w[0]
        return out, w

    def vjp(self, query, key=None, value=None, *, mask=None, key_mask=None, causal=False, training=False,
            dropout_seed=None, backend=None):
        """Forward pass plus a pullback for training.

        Takes the arguments of :meth:`__call__` (without ``need_weights``) and
        returns ``(out, backward)``. ``backward(grad_out)`` (``grad_out`` of
        ``out``'s shape, cast to the layer dtype) returns
        ``(d_query, d_key, d_value, d_params)``: gradients of
        ``sum(out * grad_out)`` w.r.t. the inputs (``d_key``/``d_value`` are None
        when ``key``/``value`` were omitted; their contributions are then summed
        into ``d_query``/``d_key``) and a dict with one gradient per entry of
        ``self.params``. The attention gradient comes from
        :func:`selfattn.scaled_dot_product_attention_vjp` (same dropout
        pattern as the forward). The parameters at call time are used for the
        backward too; do not update them in place between the two.
        """
        self._check_mode(causal, False, True)
        st = self._prepare(query, key, value, mask, key_mask, training, dropout_seed)
        o, attn_back = scaled_dot_product_attention_vjp(st["q"], st["k"], st["v"], mask=st["mask"],
                                                        causal=bool(causal), dropout_p=st["drop"],
                                                        dropout_seed=st["seed"], backend=backend)
        b, n, m = st["b"], st["n"], st["m"]
        e, h, hkv, hd = self.embed_dim, self.num_heads, self.kv_heads, self.head_dim
        o2 = o.transpose(0, 2, 1, 3).reshape(b, n, e)
        p = self.params
        out = _linear(o2, p["out_weight"], p.get("out_bias"))
        unbatched = st["unbatched"]
        out_ret = out[0] if unbatched else out
        out_shape = out_ret.shape

        def backward(grad_out):
            g = np.asarray(grad_out)
            if g.shape != out_shape:
                raise ValueError(f"grad_out has shape {g.shape}, expected the output's shape {out_shape}")
            if g.dtype.kind != "f":
                raise TypeError(f"grad_out must be a float array, got dtype {g.dtype}")
            g = g.astype(self.dtype, copy=False)
            if unbatched:
                g = g[None]
            grads = {"out_weight": np.einsum("bni,bnj->ij", g, o2)}
            if self.bias:
                grads["out_bias"] = g.sum(axis=(0, 1))
            do = (g @ p["out_weight"]).reshape(b, n, h, hd).transpose(0, 2, 1, 3)
            dq, dk, dv = attn_back(np.ascontiguousarray(do, dtype=o.dtype))
            dqp = dq.transpose(0, 2, 1, 3).reshape(b, n, e)
            dkp = dk.transpose(0, 2, 1, 3).reshape(b, m, hkv * hd)
            dvp = dv.transpose(0, 2, 1, 3).reshape(b, m, hkv * hd)
            for name, dproj, x in (("q", dqp, st["xq"]), ("k", dkp, st["xk"]), ("v", dvp, st["xv"])):
                grads[f"{name}_weight"] = np.einsum("bni,bnj->ij", dproj, x)
                if self.bias:
                    grads[f"{name}_bias"] = dproj.sum(axis=(0, 1))
            dxq = dqp @ p["q_weight"]
            dxk = dkp @ p["k_weight"]
            dxv = dvp @ p["v_weight"]
            if st["self_attn"]:
                dxq = dxq + dxk + dxv
                dxk = dxv = None
            elif not st["value_given"]:
                dxk = dxk + dxv
                dxv = None
            if unbatched:
                dxq, dxk, dxv = (None if a is None else a[0] for a in (dxq, dxk, dxv))
            grads = {k: grads[k].astype(self.dtype, copy=False) for k in p}
            return dxq, dxk, dxv, grads

        return out_ret, backward


# ----------------------------------------------------------------------------- erf / gelu

def erf(x):
    """The error function, elementwise, for real arrays (NumPy has none).

    Computed in float64 from the everywhere-positive series
    ``erf(z) = 2/sqrt(pi) * exp(-z^2) * sum_n 2^n z^(2n+1) / (1*3*...*(2n+1))``
    (no cancellation) for ``|z| < 6`` and ``sign(z)`` beyond (where erf rounds
    to ±1 in float64). Agrees with :func:`math.erf` to a few ulps. Returns
    float64 for integer input, else ``x``'s dtype; NaN propagates.
    """
    x = np.asarray(x)
    out_dtype = x.dtype if x.dtype.kind == "f" else np.float64
    z = np.abs(x.astype(np.float64))
    small = z < 6.0
    zs = np.where(small, z, 0.0)
    z2 = zs * zs
    term = zs.copy()
    total = zs.copy()
    k = 0
    while True:
        term = term * (2.0 * z2) / (2 * k + 3)
        total = total + term
        k += 1
        if k > 400 or not np.any(term > 1e-17 * total):
            break
    r = 2.0 / math.sqrt(math.pi) * np.exp(-z2) * total
    r = np.where(small, r, 1.0)
    r = np.where(np.isnan(z), np.nan, r)
    return (np.sign(x) * r).astype(out_dtype, copy=False)


def gelu(x):
    """Exact GELU ``x * (1 + erf(x / sqrt(2))) / 2`` (PyTorch's default ``approximate='none'``).

    Computed in float64 and returned in ``x``'s float dtype.
    """
    xf = np.asarray(x, dtype=np.float64)
    return (0.5 * xf * (1.0 + erf(xf / math.sqrt(2.0)))).astype(np.asarray(x).dtype, copy=False)


def _relu(x):
    return np.maximum(x, 0)


_ACTIVATIONS = {"relu": _relu, "gelu": gelu}


def _activation_arg(activation):
    if not isinstance(activation, str) or activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
    return activation


# ----------------------------------------------------------------------------- LayerNorm / FeedForward

class LayerNorm(_Params):
    """Layer normalisation over the last axis, as ``torch.nn.LayerNorm(dim)``.

    ``LayerNorm(dim, *, eps=1e-5, elementwise_affine=True, dtype=numpy.float32)``.
    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased
    variance, computed in float64 for float16/float32 input and returned in
    the layer dtype. Input ``(..., dim)``; parameters ``weight`` (ones) and
    ``bias`` (zeros), shape ``(dim,)``. A constant row maps to ``bias``.
    """

    def __init__(self, dim, *, eps=1e-5, elementwise_affine=True, dtype=np.float32):
        self.dim = _int_arg("dim", dim)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        self.eps = float(eps)
        self.dtype = _dtype_arg(dtype)
        self.params = {}
        if elementwise_affine:
            self.params = {"weight": np.ones(self.dim, self.dtype), "bias": np.zeros(self.dim, self.dtype)}

    def __repr__(self):
        return f"LayerNorm({self.dim}, eps={self.eps}, dtype={self.dtype})"

    def __call__(self, x):
        """Normalise ``x`` ``(..., dim)``; returns the same shape in the layer dtype."""
        x = np.asarray(x)
        if x.dtype.kind not in "fiu" or x.dtype.kind == "b":
            raise TypeError(f"x must be a real float array, got dtype {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got {x.shape}")
        xf = x.astype(np.float64)
        mu = xf.mean(axis=-1, keepdims=True)
        var = ((xf - mu) ** 2).mean(axis=-1, keepdims=True)
        y = (xf - mu) / np.sqrt(var + self.eps)
        if self.params:
            y = y * self.params["weight"] + self.params["bias"]
        return y.astype(self.dtype, copy=False)


class FeedForward(_Params):
    """Position-wise feed-forward block ``linear2(dropout(act(linear1(x))))``.

    ``FeedForward(embed_dim, ff_dim, *, activation="relu", dropout_p=0.0,
    bias=True, dtype=numpy.float32, seed=None)``. Input ``(..., embed_dim)``,
    output the same shape in the layer dtype. ``activation`` is ``"relu"`` or
    ``"gelu"`` (exact erf GELU, PyTorch's default). Parameters
    ``linear1_weight (ff_dim, embed_dim)``, ``linear1_bias (ff_dim,)``,
    ``linear2_weight (embed_dim, ff_dim)``, ``linear2_bias (embed_dim,)``, with
    PyTorch's default Linear init ``U(±1/sqrt(fan_in))``. Dropout (on the
    hidden activations) only in calls with ``training=True``.
    """

    def __init__(self, embed_dim, ff_dim, *, activation="relu", dropout_p=0.0, bias=True, dtype=np.float32,
                 seed=None):
        self.embed_dim = _int_arg("embed_dim", embed_dim)
        self.ff_dim = _int_arg("ff_dim", ff_dim)
        self.activation = _activation_arg(activation)
        self.dropout_p = _dropout_arg(dropout_p)
        self.dtype = _dtype_arg(dtype)
        rng = np.random.default_rng(seed)
        w1, b1 = _torch_linear_init(rng, self.ff_dim, self.embed_dim, self.dtype, bias)
        w2, b2 = _torch_linear_init(rng, self.embed_dim, self.ff_dim, self.dtype, bias)
        self.params = {"linear1_weight": w1, "linear2_weight": w2}
        if bias:
            self.params.update(linear1_bias=b1, linear2_bias=b2)

    def __repr__(self):
        return f"FeedForward({self.embed_dim}, {self.ff_dim}, activation={self.activation!r}, dtype={self.dtype})"

    def __call__(self, x, *, training=False, rng=None):
        """Apply to ``x`` ``(..., embed_dim)``; ``rng`` (a numpy Generator) drives training dropout."""
        x = np.asarray(x)
        if x.dtype.kind not in "fiu" or x.dtype.kind == "b":
            raise TypeError(f"x must be a real float array, got dtype {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape (..., {self.embed_dim}), got {x.shape}")
        p = self.params
        hid = _ACTIVATIONS[self.activation](_linear(x.astype(self.dtype, copy=False), p["linear1_weight"],
                                                    p.get("linear1_bias")))
        if training and self.dropout_p > 0:
            rng = np.random.default_rng() if rng is None else rng
            keep = rng.random(hid.shape) >= self.dropout_p
            hid = np.where(keep, hid / (1.0 - self.dropout_p), 0).astype(self.dtype, copy=False)
        return _linear(hid, p["linear2_weight"], p.get("linear2_bias")).astype(self.dtype, copy=False)


# ----------------------------------------------------------------------------- Transformer encoder

class TransformerEncoderLayer(_Params):
    """One Transformer encoder block, as ``torch.nn.TransformerEncoderLayer(batch_first=True)``.

    ``TransformerEncoderLayer(embed_dim, num_heads, ff_dim, *, norm_first=False,
    dropout_p=0.0, activation="relu", layer_norm_eps=1e-5, kv_heads=None,
    dtype=numpy.float32, seed=None)``.

    Post-norm (default): ``x = norm1(x + attn(x)); x = norm2(x + ff(x))``.
    Pre-norm (``norm_first=True``): ``x = x + attn(norm1(x)); x = x + ff(norm2(x))``.
    Input and output ``(B, N, E)`` in the layer dtype. Sub-layers are
    ``self.self_attn`` (:class:`MultiHeadAttention`), ``self.ff``
    (:class:`FeedForward`), ``self.norm1``, ``self.norm2``; ``self.params`` is
    a flat dict of all their parameters with PyTorch-like dotted names
    (``"self_attn.q_weight"``, ``"ff.linear1_weight"``, ``"norm1.weight"``, ...).
    ``dropout_p`` applies to attention weights, the FF hidden layer and both
    residual branches, only in calls with ``training=True``.
    Load PyTorch weights with :meth:`from_torch` / :meth:`load_torch_state_dict`.
    """

    def __init__(self, embed_dim, num_heads, ff_dim, *, norm_first=False, dropout_p=0.0, activation="relu",
                 layer_norm_eps=1e-5, kv_heads=None, dtype=np.float32, seed=None):
        if not isinstance(norm_first, (bool, np.bool_)):
            raise TypeError(f"norm_first must be a bool, got {type(norm_first).__name__}")
        self.norm_first = bool(norm_first)
        self.dropout_p = _dropout_arg(dropout_p)
        self.dtype = _dtype_arg(dtype)
        ss = np.random.SeedSequence(seed)
        s1, s2 = (int(s.generate_state(1)[0]) for s in ss.spawn(2))
        self.self_attn = MultiHeadAttention(embed_dim, num_heads, kv_heads=kv_heads, dropout_p=dropout_p,
                                            dtype=self.dtype, seed=s1)
        self.ff = FeedForward(embed_dim, ff_dim, activation=activation, dropout_p=dropout_p, dtype=self.dtype,
                              seed=s2)
        self.norm1 = LayerNorm(embed_dim, eps=layer_norm_eps, dtype=self.dtype)
        self.norm2 = LayerNorm(embed_dim, eps=layer_norm_eps, dtype=self.dtype)
        self.embed_dim, self.num_heads, self.ff_dim = self.self_attn.embed_dim, self.self_attn.num_heads, ff_dim
        self.activation = activation

    def _children(self):
        return {"self_attn": self.self_attn, "ff": self.ff, "norm1": self.norm1, "norm2": self.norm2}

    @property
    def params(self):
        """Flat view ``{"child.name": array}``; arrays are shared with the sub-layers."""
        return {f"{c}.{k}": v for c, layer in self._children().items() for k, v in layer.params.items()}

    def load_state_dict(self, state):
        """Load a mapping with the names of :attr:`params` (e.g. ``numpy.load`` of :meth:`state_dict`)."""
        keys = set(state.keys())
        want = set(self.params)
        if keys != want:
            raise KeyError(f"state dict mismatch for TransformerEncoderLayer: missing {sorted(want - keys)}, "
                           f"unexpected {sorted(keys - want)}")
        for c, layer in self._children().items():
            layer.load_state_dict({k: state[f"{c}.{k}"] for k in layer.params})
        return self

    def __repr__(self):
        return (f"TransformerEncoderLayer({self.embed_dim}, {self.num_heads}, {self.ff_dim}, "
                f"norm_first={self.norm_first}, activation={self.activation!r}, dtype={self.dtype})")

    @classmethod
    def from_torch(cls, state_dict, num_heads, *, norm_first=False, activation="relu", layer_norm_eps=1e-5,
                   dtype=None):
        """Build from a ``torch.nn.TransformerEncoderLayer`` state dict given as NumPy arrays.

        Keys: ``self_attn.in_proj_weight``, ``self_attn.in_proj_bias``,
        ``self_attn.out_proj.weight``/``.bias``, ``linear1.weight``/``.bias``,
        ``linear2.weight``/``.bias``, ``norm1.weight``/``.bias``,
        ``norm2.weight``/``.bias``. ``norm_first``, ``activation`` and
        ``layer_norm_eps`` are not in the state dict: pass the values the
        PyTorch layer was built with.
        """
        sd = {k: np.asarray(v) for k, v in state_dict.items()}
        w1 = sd["linear1.weight"]
        dtype = w1.dtype if dtype is None else dtype
        layer = cls(w1.shape[1], num_heads, w1.shape[0], norm_first=norm_first, activation=activation,
                    layer_norm_eps=layer_norm_eps, dtype=dtype)
        layer.load_torch_state_dict(sd)
        return layer

    def load_torch_state_dict(self, state_dict):
        """Copy weights from a ``torch.nn.TransformerEncoderLayer`` state dict (NumPy arrays), in place."""
        sd = {k: np.asarray(v) for k, v in state_dict.items()}
        attn = {k[len("self_attn."):]: v for k, v in sd.items() if k.startswith("self_attn.")}
        mha = MultiHeadAttention.from_torch(attn, self.num_heads, dtype=self.dtype)
        self.self_attn.load_state_dict(mha.params)
        self.ff.load_state_dict({"linear1_weight": sd["linear1.weight"], "linear1_bias": sd["linear1.bias"],
                                 "linear2_weight": sd["linear2.weight"], "linear2_bias": sd["linear2.bias"]})
        self.norm1.load_state_dict({"weight": sd["norm1.weight"], "bias": sd["norm1.bias"]})
        self.norm2.load_state_dict({"weight": sd["norm2.weight"], "bias": sd["norm2.bias"]})
        return self

    def __call__(self, x, *, mask=None, key_mask=None, causal=False, training=False, rng=None, backend=None):
        """Apply the block to ``x`` ``(B, N, E)`` (or ``(N, E)``).

        ``mask``/``key_mask``/``causal``/``backend`` are those of
        :meth:`MultiHeadAttention.__call__` (bool True = attend; key_mask True =
        real token). ``rng`` (numpy Generator) drives dropout when ``training``.
        Returns the same shape in the layer dtype.
        """
        x = _as_input("x", x, self.dtype, self.embed_dim)
        drop = self.dropout_p if training else 0.0
        if drop > 0:
            rng = np.random.default_rng() if rng is None else rng

        def dropout(y):
            if drop == 0:
                return y
            return np.where(rng.random(y.shape) >= drop, y / (1 - drop), 0).astype(self.dtype, copy=False)

        def sa(y):
            seed = int(rng.integers(0, 2 ** 63)) if drop > 0 else None
            return dropout(self.self_attn(y, mask=mask, key_mask=key_mask, causal=causal, training=bool(training),
                                          dropout_seed=seed, backend=backend))

        def ff(y):
            return dropout(self.ff(y, training=bool(training), rng=rng))

        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + ff(self.norm2(x))
        else:
            x = self.norm1(x + sa(x))
            x = self.norm2(x + ff(x))
        return x


class TransformerEncoder:
    """A stack of :class:`TransformerEncoderLayer`, as ``torch.nn.TransformerEncoder``.

    ``TransformerEncoder(num_layers, embed_dim, num_heads, ff_dim, *,
    norm_first=False, dropout_p=0.0, activation="relu", final_norm=False,
    layer_norm_eps=1e-5, dtype=numpy.float32, seed=None)``. ``self.layers`` is
    the list of layers; ``final_norm=True`` adds ``self.norm`` (a
    :class:`LayerNorm`, PyTorch's ``norm=`` argument) after the last layer.
    Input/output ``(B, N, E)``; call options as in
    :meth:`TransformerEncoderLayer.__call__`. ``params`` is a flat dict with
    names ``"layers.{i}.<layer param>"`` and ``"norm.weight"``/``"norm.bias"``.
    """

    def __init__(self, num_layers, embed_dim, num_heads, ff_dim, *, norm_first=False, dropout_p=0.0,
                 activation="relu", final_norm=False, layer_norm_eps=1e-5, dtype=np.float32, seed=None):
        num_layers = _int_arg("num_layers", num_layers, minimum=0)
        seeds = np.random.SeedSequence(seed).spawn(max(num_layers, 1))
        self.layers = [TransformerEncoderLayer(embed_dim, num_heads, ff_dim, norm_first=norm_first,
                                               dropout_p=dropout_p, activation=activation,
                                               layer_norm_eps=layer_norm_eps, dtype=dtype,
                                               seed=int(seeds[i].generate_state(1)[0]))
                       for i in range(num_layers)]
        self.embed_dim = _int_arg("embed_dim", embed_dim)
        self.num_heads, self.ff_dim = num_heads, ff_dim
        self.norm_first, self.activation, self.layer_norm_eps = norm_first, activation, layer_norm_eps
        self.dtype = _dtype_arg(dtype)
        self.norm = LayerNorm(embed_dim, eps=layer_norm_eps, dtype=dtype) if final_norm else None

    def __repr__(self):
        return (f"TransformerEncoder({len(self.layers)} x {self.layers[0]!r}, final_norm={self.norm is not None})"
                if self.layers else "TransformerEncoder(0 layers)")

    @property
    def params(self):
        """Flat dict of every parameter (arrays shared with the layers)."""
        out = {f"layers.{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.params.items()}
        if self.norm is not None:
            out.update({f"norm.{k}": v for k, v in self.norm.params.items()})
        return out

    def state_dict(self):
        """Copies of all parameters, for ``numpy.savez(path, **enc.state_dict())``."""
        return {k: np.array(v, copy=True) for k, v in self.params.items()}

    def load_state_dict(self, state):
        """Load the names of :attr:`params` (KeyError on missing/unexpected names)."""
        keys, want = set(state.keys()), set(self.params)
        if keys != want:
            raise KeyError(f"state dict mismatch for TransformerEncoder: missing {sorted(want - keys)}, "
                           f"unexpected {sorted(keys - want)}")
        for i, layer in enumerate(self.layers):
            layer.load_state_dict({k: state[f"layers.{i}.{k}"] for k in layer.params})
        if self.norm is not None:
            self.norm.load_state_dict({k: state[f"norm.{k}"] for k in self.norm.params})
        return self

    @classmethod
    def from_torch(cls, state_dict, num_heads, *, norm_first=False, activation="relu", layer_norm_eps=1e-5,
                   dtype=None):
        """Build from a ``torch.nn.TransformerEncoder`` state dict (NumPy arrays).

        Layers are read from ``layers.{i}.*`` (see
        :meth:`TransformerEncoderLayer.from_torch`); ``norm.weight``/``norm.bias``
        present means a final LayerNorm. Pass the PyTorch layer's
        ``norm_first``/``activation``/``layer_norm_eps``.
        """
        sd = {k: np.asarray(v) for k, v in state_dict.items()}
        idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
        if not idx or idx != list(range(len(idx))):
            raise KeyError("state_dict has no layers.{i}.* entries (or they are not numbered 0..L-1)")
        w1 = sd["layers.0.linear1.weight"]
        dtype = w1.dtype if dtype is None else dtype
        enc = cls(len(idx), w1.shape[1], num_heads, w1.shape[0], norm_first=norm_first, activation=activation,
                  final_norm="norm.weight" in sd, layer_norm_eps=layer_norm_eps, dtype=dtype)
        for i, layer in enumerate(enc.layers):
            pre = f"layers.{i}."
            layer.load_torch_state_dict({k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)})
        if enc.norm is not None:
            enc.norm.load_state_dict({"weight": sd["norm.weight"], "bias": sd["norm.bias"]})
        return enc

    def __call__(self, x, *, mask=None, key_mask=None, causal=False, training=False, rng=None, backend=None):
        """Run every layer in order (then the final norm); ``(B, N, E)`` -> ``(B, N, E)``."""
        for layer in self.layers:
            x = layer(x, mask=mask, key_mask=key_mask, causal=causal, training=training, rng=rng, backend=backend)
        if self.norm is not None:
            x = self.norm(x)
        return x
