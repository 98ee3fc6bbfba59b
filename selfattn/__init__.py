"""selfattn: exact self-attention on NumPy, Numba and CuPy behind one API.

>>> import numpy as np, selfattn
>>> q = k = v = np.ones((2, 4, 16, 8), np.float32)   # (batch, heads, N, D)
>>> selfattn.scaled_dot_product_attention(q, k, v, causal=True).shape
(2, 4, 16, 8)

Public API: :func:`scaled_dot_product_attention`,
:func:`scaled_dot_product_attention_vjp`, backend selection
(:func:`use_backend`, :func:`set_backend`, :func:`list_backends`,
:func:`explain`, :func:`get_backend`), :class:`Capabilities` and the error
types. Importing selfattn imports NumPy only; numba and cupy are imported when
a backend that needs them first runs.
"""

from ._api import (
    explain,
    scaled_dot_product_attention,
    scaled_dot_product_attention_varlen,
    scaled_dot_product_attention_varlen_vjp,
    scaled_dot_product_attention_vjp,
)
from ._capabilities import DTYPES, FEATURES, Capabilities, WorkRange
from ._dispatch import BackendRecord, Explanation, get_backend, list_backends, set_backend, use_backend
from ._errors import (
    BackendNotFoundError,
    BackendUnavailableError,
    NoBackendError,
    SelfAttnError,
    UnsupportedFeatureError,
)
from ._merge import merge_attention
from .backends._base import Backend

__version__ = "0.1.0"


def __getattr__(name):
    # `selfattn.nn` is loaded on first access, keeping `import selfattn` minimal.
    if name == "nn":
        import importlib

        return importlib.import_module("selfattn.nn")
    raise AttributeError(f"module 'selfattn' has no attribute {name!r}")


__all__ = [
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_vjp",
    "scaled_dot_product_attention_varlen",
    "scaled_dot_product_attention_varlen_vjp",
    "merge_attention",
    "explain",
    "use_backend",
    "set_backend",
    "get_backend",
    "list_backends",
    "BackendRecord",
    "Explanation",
    "Backend",
    "Capabilities",
    "WorkRange",
    "FEATURES",
    "DTYPES",
    "SelfAttnError",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "UnsupportedFeatureError",
    "NoBackendError",
]
