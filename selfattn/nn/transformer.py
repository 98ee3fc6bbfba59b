"""Transformer encoder blocks built from the attention, normalisation and feed-forward layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._checks import as_activation, bool_arg, compute_dtype, dropout_arg, dtype_arg, int_arg, refuse_keywords
from ._module import Module
from .attention import MultiHeadAttention
from .feedforward import FeedForward
from .functional import dropout
from .normalization import LayerNorm

__all__ = ["TransformerEncoder", "TransformerEncoderLayer"]

Array = NDArray[Any]

_CALL_KEYWORDS = ("mask", "key_mask", "causal", "training", "rng", "backend")
_LAYER_INIT_KEYWORDS = ("norm_first", "dropout_p", "activation", "layer_norm_eps", "kv_heads", "dtype", "seed")


def _numpy_state(state_dict: Mapping[str, ArrayLike]) -> dict[str, Array]:
    return {k: np.asarray(v) for k, v in state_dict.items()}


class TransformerEncoderLayer(Module):
    """One Transformer encoder block, as ``torch.nn.TransformerEncoderLayer(batch_first=True)``.

    Post-norm (default): ``x = norm1(x + attn(x)); x = norm2(x + ff(x))``.
    Pre-norm (``norm_first=True``): ``x = x + attn(norm1(x)); x = x + ff(norm2(x))``.
    Sub-layers are ``self.self_attn`` (:class:`~selfattn.nn.MultiHeadAttention`),
    ``self.ff`` (:class:`~selfattn.nn.FeedForward`), ``self.norm1``,
    ``self.norm2`` (:class:`~selfattn.nn.LayerNorm`), all with parameters of
    ``dtype``; ``self.params`` is a flat dict of their parameters with
    PyTorch-like dotted names (``"self_attn.q_weight"``, ``"ff.linear1_weight"``,
    ``"norm1.weight"``, ...), saved and loaded by ``state_dict`` /
    ``load_state_dict``. ``dropout_p`` applies to attention weights, the FF
    hidden layer and both residual branches, only in calls with
    ``training=True``. ``kv_heads`` makes the attention grouped-query.

    Input and output ``(B, N, E)`` (or unbatched ``(N, E)``); the output has
    the input's float dtype (integer input: the layer's ``dtype``), see the
    dtype rule in :mod:`selfattn.nn`. Load PyTorch weights with
    :meth:`from_torch` / :meth:`load_torch_state_dict`; keywords of the
    PyTorch constructor (``d_model``, ``nhead``, ``dim_feedforward``,
    ``dropout``, ``batch_first``, ...) raise a TypeError naming the selfattn
    equivalent.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        ff_dim: int,
        *,
        norm_first: bool = False,
        dropout_p: float = 0.0,
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        kv_heads: int | None = None,
        dtype: DTypeLike = np.float32,
        seed: int | None = None,
        **unexpected: Any,
    ) -> None:
        if unexpected:
            refuse_keywords("TransformerEncoderLayer", unexpected, _LAYER_INIT_KEYWORDS)
        super().__init__()
        self.norm_first = bool_arg("norm_first", norm_first)
        self.dropout_p = dropout_arg(dropout_p)
        self.dtype = dtype_arg(dtype)
        s1, s2 = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(2))
        self.self_attn = MultiHeadAttention(
            embed_dim, num_heads, kv_heads=kv_heads, dropout_p=dropout_p, dtype=self.dtype, seed=s1
        )
        self.ff = FeedForward(embed_dim, ff_dim, activation=activation, dropout_p=dropout_p, dtype=self.dtype, seed=s2)
        self.norm1 = LayerNorm(embed_dim, eps=layer_norm_eps, dtype=self.dtype)
        self.norm2 = LayerNorm(embed_dim, eps=layer_norm_eps, dtype=self.dtype)
        self.embed_dim, self.num_heads, self.ff_dim = self.self_attn.embed_dim, self.self_attn.num_heads, self.ff.ff_dim
        self.activation = self.ff.activation

    def _children(self) -> dict[str, Module]:
        return {"self_attn": self.self_attn, "ff": self.ff, "norm1": self.norm1, "norm2": self.norm2}

    def __repr__(self) -> str:
        return (
            f"TransformerEncoderLayer({self.embed_dim}, {self.num_heads}, {self.ff_dim}, "
            f"norm_first={self.norm_first}, activation={self.activation!r}, dtype={self.dtype})"
        )

    @classmethod
    def from_torch(
        cls,
        state_dict: Mapping[str, ArrayLike],
        num_heads: int,
        *,
        norm_first: bool = False,
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        dtype: DTypeLike | None = None,
    ) -> TransformerEncoderLayer:
        """Build from a ``torch.nn.TransformerEncoderLayer`` state dict given as NumPy arrays.

        Keys: ``self_attn.in_proj_weight``, ``self_attn.in_proj_bias``,
        ``self_attn.out_proj.weight``/``.bias``, ``linear1.weight``/``.bias``,
        ``linear2.weight``/``.bias``, ``norm1.weight``/``.bias``,
        ``norm2.weight``/``.bias``. ``norm_first``, ``activation`` and
        ``layer_norm_eps`` are not in the state dict: pass the values the
        PyTorch layer was built with. ``dtype`` defaults to the arrays' dtype.
        """
        sd = _numpy_state(state_dict)
        w1 = sd["linear1.weight"]
        layer = cls(
            w1.shape[1],
            num_heads,
            w1.shape[0],
            norm_first=norm_first,
            activation=activation,
            layer_norm_eps=layer_norm_eps,
            dtype=w1.dtype if dtype is None else dtype,
        )
        return layer.load_torch_state_dict(sd)

    def load_torch_state_dict(self, state_dict: Mapping[str, ArrayLike]) -> TransformerEncoderLayer:
        """Copy weights from a ``torch.nn.TransformerEncoderLayer`` state dict (NumPy arrays), in place.

        Returns the layer; a missing key is a KeyError, a shape mismatch a ValueError.
        """
        sd = _numpy_state(state_dict)
        attn = {k[len("self_attn.") :]: v for k, v in sd.items() if k.startswith("self_attn.")}
        mha = MultiHeadAttention.from_torch(attn, self.num_heads, dtype=self.dtype)
        state = {f"self_attn.{k}": v for k, v in mha.params.items()}
        for ours, theirs in (
            ("ff.linear1", "linear1"),
            ("ff.linear2", "linear2"),
            ("norm1", "norm1"),
            ("norm2", "norm2"),
        ):
            sep = "_" if ours.startswith("ff.") else "."
            state[f"{ours}{sep}weight"], state[f"{ours}{sep}bias"] = sd[f"{theirs}.weight"], sd[f"{theirs}.bias"]
        return self.load_state_dict(state)

    def __call__(
        self,
        x: ArrayLike,
        *,
        mask: Array | None = None,
        key_mask: ArrayLike | None = None,
        causal: bool = False,
        training: bool = False,
        rng: np.random.Generator | None = None,
        backend: str | None = None,
        **unexpected: Any,
    ) -> Array:
        """Apply the block to ``x`` ``(B, N, E)`` (or ``(N, E)``).

        ``mask``/``key_mask``/``causal``/``backend`` are those of
        :meth:`MultiHeadAttention.__call__ <selfattn.nn.MultiHeadAttention.__call__>`
        (bool True = attend; ``key_mask`` True = real token: PyTorch's
        ``src_mask``/``src_key_padding_mask`` are inverted, and passing them by
        their PyTorch names raises a TypeError saying so). ``rng`` (numpy
        Generator) drives dropout when ``training``. Returns the same shape in
        ``x``'s float dtype. Padded query rows are computed like any other
        row; their outputs are meaningless and should be ignored.
        """
        if unexpected:
            refuse_keywords("TransformerEncoderLayer.__call__", unexpected, _CALL_KEYWORDS)
        arr = as_activation("x", x, self.embed_dim, layout="(B, N, {0}) or (N, {0})")
        training = bool_arg("training", training)
        h = arr.astype(compute_dtype((arr,), self.dtype), copy=False)
        drop = self.dropout_p if training else 0.0
        gen = (np.random.default_rng() if rng is None else rng) if drop > 0 else None

        def sa(y: Array) -> Array:
            seed = int(gen.integers(0, 2**63)) if gen is not None else None
            out = self.self_attn(
                y, mask=mask, key_mask=key_mask, causal=causal, training=training, dropout_seed=seed, backend=backend
            )
            assert isinstance(out, np.ndarray)
            return dropout(out, drop, gen) if gen is not None else out

        def ff(y: Array) -> Array:
            out = self.ff(y, training=training, rng=gen)
            return dropout(out, drop, gen) if gen is not None else out

        if self.norm_first:
            h = h + sa(self.norm1(h))
            h = h + ff(self.norm2(h))
        else:
            h = self.norm1(h + sa(h))
            h = self.norm2(h + ff(h))
        return h


class TransformerEncoder(Module):
    """A stack of :class:`TransformerEncoderLayer`, as ``torch.nn.TransformerEncoder``.

    ``self.layers`` is the list of ``num_layers`` layers (each seeded from
    ``seed``); ``final_norm=True`` adds ``self.norm`` (a
    :class:`~selfattn.nn.LayerNorm`, PyTorch's ``norm=`` argument) after the
    last layer. Input/output ``(B, N, E)`` (or ``(N, E)``) in the input's float
    dtype (see the dtype rule in :mod:`selfattn.nn`); call options as in
    :meth:`TransformerEncoderLayer.__call__`. ``params`` / ``state_dict`` /
    ``load_state_dict`` use the names ``"layers.{i}.<layer param>"`` and
    ``"norm.weight"``/``"norm.bias"``. Zero layers is allowed (the stack is
    the identity, or the final norm).

    Note that PyTorch's ``TransformerEncoder.forward(src, mask=...)`` takes a
    bool mask with True = masked out; selfattn's ``mask`` is True = may attend.
    """

    def __init__(
        self,
        num_layers: int,
        embed_dim: int,
        num_heads: int,
        ff_dim: int,
        *,
        norm_first: bool = False,
        dropout_p: float = 0.0,
        activation: str = "relu",
        final_norm: bool = False,
        layer_norm_eps: float = 1e-5,
        kv_heads: int | None = None,
        dtype: DTypeLike = np.float32,
        seed: int | None = None,
        **unexpected: Any,
    ) -> None:
        if unexpected:
            refuse_keywords("TransformerEncoder", unexpected, (*_LAYER_INIT_KEYWORDS, "final_norm"))
        super().__init__()
        num_layers = int_arg("num_layers", num_layers, minimum=0)
        self.embed_dim = int_arg("embed_dim", embed_dim)
        self.num_heads = int_arg("num_heads", num_heads)
        self.ff_dim = int_arg("ff_dim", ff_dim)
        self.dtype = dtype_arg(dtype)
        seeds = np.random.SeedSequence(seed).spawn(num_layers)
        self.layers = [
            TransformerEncoderLayer(
                embed_dim,
                num_heads,
                ff_dim,
                norm_first=norm_first,
                dropout_p=dropout_p,
                activation=activation,
                layer_norm_eps=layer_norm_eps,
                kv_heads=kv_heads,
                dtype=self.dtype,
                seed=int(s.generate_state(1)[0]),
            )
            for s in seeds
        ]
        self.norm_first, self.activation, self.layer_norm_eps = norm_first, activation, layer_norm_eps
        self.norm = (
            LayerNorm(embed_dim, eps=layer_norm_eps, dtype=self.dtype) if bool_arg("final_norm", final_norm) else None
        )

    def _children(self) -> dict[str, Module]:
        children: dict[str, Module] = {f"layers.{i}": layer for i, layer in enumerate(self.layers)}
        if self.norm is not None:
            children["norm"] = self.norm
        return children

    def __repr__(self) -> str:
        return (
            f"TransformerEncoder({len(self.layers)} x {self.layers[0]!r}, final_norm={self.norm is not None})"
            if self.layers
            else f"TransformerEncoder(0 layers, final_norm={self.norm is not None})"
        )

    @classmethod
    def from_torch(
        cls,
        state_dict: Mapping[str, ArrayLike],
        num_heads: int,
        *,
        norm_first: bool = False,
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        dtype: DTypeLike | None = None,
    ) -> TransformerEncoder:
        """Build from a ``torch.nn.TransformerEncoder`` state dict (NumPy arrays).

        Layers are read from ``layers.{i}.*`` (see
        :meth:`TransformerEncoderLayer.from_torch`); ``norm.weight``/``norm.bias``
        present means a final LayerNorm. Pass the PyTorch layer's
        ``norm_first``/``activation``/``layer_norm_eps``. KeyError when there
        are no ``layers.{i}`` entries numbered ``0..L-1``.
        """
        sd = _numpy_state(state_dict)
        idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
        if not idx or idx != list(range(len(idx))):
            raise KeyError("state_dict has no layers.{i}.* entries (or they are not numbered 0..L-1)")
        w1 = sd["layers.0.linear1.weight"]
        enc = cls(
            len(idx),
            w1.shape[1],
            num_heads,
            w1.shape[0],
            norm_first=norm_first,
            activation=activation,
            final_norm="norm.weight" in sd,
            layer_norm_eps=layer_norm_eps,
            dtype=w1.dtype if dtype is None else dtype,
        )
        for i, layer in enumerate(enc.layers):
            pre = f"layers.{i}."
            layer.load_torch_state_dict({k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)})
        if enc.norm is not None:
            enc.norm.load_state_dict({"weight": sd["norm.weight"], "bias": sd["norm.bias"]})
        return enc

    def __call__(
        self,
        x: ArrayLike,
        *,
        mask: Array | None = None,
        key_mask: ArrayLike | None = None,
        causal: bool = False,
        training: bool = False,
        rng: np.random.Generator | None = None,
        backend: str | None = None,
        **unexpected: Any,
    ) -> Array:
        """Run every layer in order (then the final norm): ``(B, N, E)`` -> ``(B, N, E)`` in ``x``'s float dtype.

        With no layers and no final norm, returns a copy of ``x`` (validated, in the dtype of the rule).
        """
        if unexpected:
            refuse_keywords("TransformerEncoder.__call__", unexpected, _CALL_KEYWORDS)
        arr = as_activation("x", x, self.embed_dim, layout="(B, N, {0}) or (N, {0})")
        # Layers return new arrays; an empty stack copies so that the result never aliases the input.
        h = arr.astype(compute_dtype((arr,), self.dtype), copy=not self.layers and self.norm is None)
        for layer in self.layers:
            h = layer(h, mask=mask, key_mask=key_mask, causal=causal, training=training, rng=rng, backend=backend)
        return h if self.norm is None else self.norm(h)
