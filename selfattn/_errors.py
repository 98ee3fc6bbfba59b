"""Exception types raised by selfattn.

Every error a user can provoke is one of these, or a plain ``TypeError`` /
``ValueError`` for malformed arguments. The backend errors subclass the builtin
type a caller would naturally catch, so ``except RuntimeError`` or
``except NotImplementedError`` keep working for code that does not know about
selfattn.
"""

from __future__ import annotations

__all__ = [
    "SelfAttnError",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "UnsupportedFeatureError",
    "NoBackendError",
]


class SelfAttnError(Exception):
    """Base class of the errors that are specific to selfattn's dispatcher."""


class BackendNotFoundError(SelfAttnError, ValueError):
    """A backend name was given that no built-in backend or plugin provides."""


class BackendUnavailableError(SelfAttnError, RuntimeError):
    """The named backend exists but cannot run here (missing package, no device...)."""


class UnsupportedFeatureError(SelfAttnError, NotImplementedError):
    """The chosen backend does not declare a capability this call needs.

    Raised before any computation, from the backend's declared capabilities, so a
    backend never silently approximates a feature it does not implement.
    """


class NoBackendError(SelfAttnError, RuntimeError):
    """Automatic selection found no backend able to run the call; the message lists why."""
