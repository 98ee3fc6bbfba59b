"""How layers hold their parameters: one container for leaves and stacks, and the initialisers.

A layer stores its own parameters in a dict and names its sub-layers
(children); :class:`Module` turns that into the flat, dotted parameter names of
``params`` / ``state_dict`` / ``load_state_dict`` (``"layers.0.self_attn.q_weight"``),
so a stack of layers needs no code of its own to save or load itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["Module", "torch_linear_init", "xavier_uniform"]

_M = TypeVar("_M", bound="Module")


class Module:
    """Base of every layer: own parameters plus named sub-layers, saved under dotted names.

    Subclasses fill ``self._own`` (name -> array of ``self.dtype``) and, when
    they contain other layers, override :meth:`_children`.
    """

    #: The dtype of the layer's parameters (float16, float32 or float64).
    dtype: np.dtype[Any]

    def __init__(self) -> None:
        self._own: dict[str, NDArray[Any]] = {}

    def _children(self) -> Mapping[str, Module]:
        """Sub-layers by name prefix (``{"self_attn": mha, "norm1": ln}``, ``{"layers.0": layer}``)."""
        return {}

    @property
    def params(self) -> dict[str, NDArray[Any]]:
        """Every parameter, by flat dotted name (``"self_attn.q_weight"``, ``"layers.1.norm2.bias"``).

        A layer without sub-layers returns its live parameter dict: assigning
        ``layer.params[name] = array`` replaces that parameter. A layer with
        sub-layers returns a new dict each time whose arrays are the
        sub-layers' own (in-place updates such as ``params[k] -= step`` reach
        them; to replace arrays, use :meth:`load_state_dict`).
        """
        children = self._children()
        if not children:
            return self._own
        flat = dict(self._own)
        for prefix, child in children.items():
            flat.update({f"{prefix}.{name}": value for name, value in child.params.items()})
        return flat

    @params.setter
    def params(self, value: Mapping[str, NDArray[Any]]) -> None:
        if self._children():
            raise AttributeError(f"{type(self).__name__}.params cannot be replaced; use load_state_dict(mapping)")
        self._own = dict(value)

    def state_dict(self) -> dict[str, NDArray[Any]]:
        """A new dict, name -> copy of each parameter (``numpy.savez(path, **layer.state_dict())`` saves it)."""
        return {name: np.array(value, copy=True) for name, value in self.params.items()}

    def load_state_dict(self: _M, state: Mapping[str, ArrayLike]) -> _M:
        """Copy arrays from a mapping with the names of :attr:`params` (e.g. ``numpy.load(path)``), in place.

        Every name must be present with the parameter's shape; values are cast
        to the parameter's dtype. Raises KeyError (missing or unexpected
        names, all listed), ValueError (a shape mismatch) or TypeError (a
        non-numeric array), naming the parameter; nothing is changed then.
        Returns the layer.
        """
        current = self.params
        keys = set(state.keys())
        missing, extra = sorted(set(current) - keys), sorted(keys - set(current))
        if missing or extra:
            raise KeyError(f"state dict mismatch for {type(self).__name__}: missing {missing}, unexpected {extra}")
        new = {}
        for name, cur in current.items():
            value = np.asarray(state[name])
            if value.dtype.kind not in "fiu":
                raise TypeError(f"parameter {name!r} has dtype {value.dtype} in the state dict, expected numbers")
            if value.shape != cur.shape:
                raise ValueError(f"parameter {name!r} has shape {value.shape} in the state dict, expected {cur.shape}")
            new[name] = value.astype(cur.dtype, copy=True)
        self._assign(new)
        return self

    def _assign(self, flat: Mapping[str, NDArray[Any]]) -> None:
        # Validated by load_state_dict: every own name and every child's prefixed name is present.
        for name in self._own:
            self._own[name] = flat[name]
        for prefix, child in self._children().items():
            head = prefix + "."
            child._assign({name[len(head) :]: value for name, value in flat.items() if name.startswith(head)})

    def num_parameters(self) -> int:
        """Total number of scalar parameters."""
        return int(sum(value.size for value in self.params.values()))


def xavier_uniform(rng: np.random.Generator, shape: tuple[int, int], dtype: np.dtype[Any]) -> NDArray[Any]:
    """Glorot/Xavier uniform ``U(±sqrt(6 / (fan_in + fan_out)))`` for a ``(fan_out, fan_in)`` weight."""
    fan_out, fan_in = shape
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def torch_linear_init(
    rng: np.random.Generator, out_features: int, in_features: int, dtype: np.dtype[Any], bias: bool = True
) -> tuple[NDArray[Any], NDArray[Any] | None]:
    """PyTorch's ``nn.Linear`` default: weight and bias ``U(±1/sqrt(in_features))``.

    (``kaiming_uniform(a=sqrt(5))`` reduces to that bound.) Returns
    ``(weight (out, in), bias (out,) or None)``.
    """
    bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    weight = rng.uniform(-bound, bound, size=(out_features, in_features)).astype(dtype)
    b = rng.uniform(-bound, bound, size=(out_features,)).astype(dtype) if bias else None
    return weight, b
