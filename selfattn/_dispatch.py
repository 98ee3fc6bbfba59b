"""Backend registry and selection.

Selection precedence for a call (first match wins):

1. the ``backend=`` argument: that backend or an error, never a fallback;
2. the innermost ``with selfattn.use_backend(name)`` (a :mod:`contextvars`
   variable: threads and asyncio tasks each see their own choice);
3. ``selfattn.set_backend(name)``, else the ``SELFATTN_BACKEND`` environment
   variable;
4. automatic: the first backend, by ascending priority (cupy 10, numba 20,
   dask 30, numpy 100, plugins 200 unless they say otherwise), that consumes this array
   type, is available, declares every capability the call needs, and whose
   declared work range (``Capabilities.min_flops`` / ``work_range``) holds the call's size --
   a smaller call goes to the next such backend (NumPy for a toy call: no
   JIT compile, no thread hand-off). The last able backend takes any size.

Automatic selection never converts arrays between libraries. A backend that
handles the array type but is skipped (unavailable, or missing a capability)
is logged at DEBUG on the ``selfattn`` logger; in strict mode
(``SELFATTN_STRICT=1`` or ``use_backend(strict=True)``) any such skip is an
error instead (a backend passed over for a small problem is not a skip: a
later backend is simply faster there). Automatic decisions are cached per
(array type, dtype, needed features, strictness) as the list of able
backends; the size check on it costs a comparison per call.

Backends come from :data:`selfattn.backends.BUILTIN` and from the
``selfattn.backends`` entry-point group. An entry point names either a backend
object or a zero-argument callable returning one. A plugin that fails to load
is skipped with a warning naming it; a plugin whose name is already taken is
refused with a warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._capabilities import Capabilities, required_features
from ._errors import BackendNotFoundError, BackendUnavailableError, NoBackendError, UnsupportedFeatureError
from ._problem import Problem
from .backends import BUILTIN, Backend

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendRecord",
    "Explanation",
    "list_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "select",
    "registry",
]

ENTRY_POINT_GROUP = "selfattn.backends"
_log = logging.getLogger("selfattn")


@dataclass
class _Entry:
    name: str
    source: str
    priority: int
    array_type: str | None = None
    extra: str | None = None
    requires: tuple[str, ...] = ()
    module: str | None = None
    backend: Any = None
    load_error: str | None = None
    availability: tuple[bool, str] | None = None


@dataclass(frozen=True)
class BackendRecord:
    """One row of :func:`list_backends`.

    ``available`` is True or False; ``reason`` says why not (empty when
    available); ``capabilities`` is the backend's declaration (None only if the
    backend could not even be loaded); ``source`` is ``"builtin"`` or
    ``"plugin (<distribution>)"``; ``install`` is the pip command that adds it.
    """

    name: str
    available: bool
    reason: str
    version: str
    capabilities: Capabilities | None
    priority: int
    source: str
    install: str


@dataclass
class Explanation:
    """The decision trail of :func:`selfattn.explain`: ``backend`` is the chosen name (or None)."""

    backend: str | None
    trail: list = field(default_factory=list)
    error: str | None = None

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}"] + [f"  - {t}" for t in self.trail]
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


class _Registry:
    """The set of known backends, discovered lazily on first use."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] | None = None
        self._cache: dict = {}

    def reset(self) -> None:
        """Forget discovered backends and cached decisions (tests and plugin installs use this)."""
        with self._lock:
            self._entries = None
            self._cache = {}

    # -- discovery -------------------------------------------------------
    def entries(self) -> dict[str, _Entry]:
        if self._entries is None:
            with self._lock:
                if self._entries is None:
                    self._entries = self._discover()
        return self._entries

    def _discover(self) -> dict[str, _Entry]:
        entries = {
            spec.name: _Entry(
                spec.name, "builtin", spec.priority, spec.array_type, spec.extra, spec.requires, spec.module
            )
            for spec in BUILTIN.values()
        }
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
            if ep.name in entries:
                warnings.warn(
                    f"selfattn: refusing backend {ep.name!r} from {dist}: the name is already registered "
                    f"by {entries[ep.name].source}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            try:
                obj = ep.load()
                backend = obj() if callable(obj) and not hasattr(obj, "forward") else obj
                _check_backend_object(ep.name, backend)
            except Exception as exc:  # a broken plugin must not break selfattn
                warnings.warn(
                    f"selfattn: skipping backend plugin {ep.name!r} ({ep.value}) from {dist}: "
                    f"{type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            entries[ep.name] = _Entry(
                ep.name,
                f"plugin ({dist})",
                int(getattr(backend, "priority", 200)),
                backend.capabilities.array_type,
                None,
                (),
                None,
                backend,
            )
        return dict(sorted(entries.items(), key=lambda kv: (kv[1].priority, kv[0])))

    # -- lookup ----------------------------------------------------------
    def entry(self, name: str) -> _Entry:
        if not isinstance(name, str):
            raise TypeError(f"backend must be a backend name (str) or None, got {name!r}")
        entries = self.entries()
        if name not in entries:
            raise BackendNotFoundError(f"unknown backend {name!r}. Registered: {', '.join(entries)}. {_install_hint()}")
        return entries[name]

    def load(self, entry: _Entry) -> Any:
        """The backend object of ``entry`` (imports built-in modules on first use)."""
        if entry.backend is None and entry.load_error is None:
            with self._lock:
                if entry.backend is None and entry.load_error is None:
                    try:
                        assert entry.module is not None, "plugins are loaded at discovery"
                        entry.backend = importlib.import_module(entry.module).backend
                    except Exception as exc:
                        entry.load_error = f"failed to import {entry.module}: {type(exc).__name__}: {exc}"
        return entry.backend

    def available(self, entry: _Entry) -> tuple[bool, str]:
        """``(ok, reason)``; checked once per process and cached."""
        if entry.availability is None:
            missing = [r for r in entry.requires if importlib.util.find_spec(r) is None]
            if missing:
                hint = f"pip install 'selfattn[{entry.extra}]'" if entry.extra else "install it"
                entry.availability = (False, f"{', '.join(missing)} is not installed; {hint}")
            else:
                backend = self.load(entry)
                if backend is None:
                    entry.availability = (False, entry.load_error or "failed to load")
                else:
                    try:
                        ok, reason = backend.availability()
                    except Exception as exc:
                        ok, reason = False, f"availability check failed: {type(exc).__name__}: {exc}"
                    entry.availability = (bool(ok), "" if ok else str(reason))
        assert entry.availability is not None
        return entry.availability


registry = _Registry()


def _check_backend_object(name: str, backend: Any) -> None:
    for attr in ("capabilities", "forward"):
        if not hasattr(backend, attr):
            raise TypeError(f"backend object for {name!r} has no {attr!r} attribute")
    if not isinstance(backend.capabilities, Capabilities):
        raise TypeError(f"backend {name!r}.capabilities must be a selfattn.Capabilities")


def _install_hint() -> str:
    extras = ", ".join(f"pip install 'selfattn[{s.extra}]' for {s.name}" for s in BUILTIN.values() if s.extra)
    return f"Install more with: {extras}."


# -- user choice state -------------------------------------------------------
@dataclass(frozen=True)
class _Choice:
    name: str | None
    strict: bool | None


_choice: contextvars.ContextVar[_Choice | None] = contextvars.ContextVar("selfattn_backend", default=None)
_global_name: str | None = None


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (None restores automatic selection).

    It ranks below ``backend=`` and ``use_backend`` and above the
    ``SELFATTN_BACKEND`` environment variable. Raises
    :class:`~selfattn.BackendNotFoundError` for an unknown name.
    """
    global _global_name
    if name is not None:
        registry.entry(name)
    _global_name = name


@contextlib.contextmanager
def use_backend(name: str | None = None, *, strict: bool | None = None) -> Iterator[str | None]:
    """Context manager choosing the backend (and/or strictness) for calls inside it.

    ``name=None`` keeps the outer choice; ``strict=True`` turns every automatic
    skip into an error, ``strict=False`` allows skips even if
    ``SELFATTN_STRICT`` is set. Scoped with a context variable, so it is local
    to the current thread or asyncio task. Yields the backend name in force.
    """
    if name is not None:
        registry.entry(name)
    if strict is not None and not isinstance(strict, bool):
        raise TypeError(f"strict must be True, False or None, got {strict!r}")
    outer = _choice.get()
    new = _Choice(
        name if name is not None else (outer.name if outer else None),
        strict if strict is not None else (outer.strict if outer else None),
    )
    token = _choice.set(new)
    try:
        yield new.name
    finally:
        _choice.reset(token)


def _requested(backend_arg: str | None) -> tuple[str | None, str | None]:
    if backend_arg is not None:
        return backend_arg, "the backend= argument"
    c = _choice.get()
    if c is not None and c.name is not None:
        return c.name, "use_backend()"
    if _global_name is not None:
        return _global_name, "set_backend()"
    env = os.environ.get("SELFATTN_BACKEND")
    if env:
        return env, "the SELFATTN_BACKEND environment variable"
    return None, None


def _strict() -> bool:
    c = _choice.get()
    if c is not None and c.strict is not None:
        return c.strict
    return os.environ.get("SELFATTN_STRICT", "").strip().lower() not in ("", "0", "false", "no", "off")


def get_backend(name: str) -> Backend:
    """The backend object registered as ``name``; raises if unknown or unavailable here."""
    entry = registry.entry(name)
    ok, reason = registry.available(entry)
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}. {_install_hint()}")
    return registry.load(entry)


def _small(problem: Problem, caps: Capabilities) -> str | None:
    """Why ``problem`` is outside the work range ``caps`` declares (None when it is inside)."""
    return caps.pays_off.outside(problem)


def select(
    problem: Problem, backend_arg: str | None = None, trail: list[str] | None = None, *, automatic: bool = False
) -> Backend:
    """Choose the backend object for a normalized problem (see the module docstring).

    ``automatic=True`` applies the automatic rule only, ignoring ``backend_arg``,
    ``use_backend``, ``set_backend`` and ``SELFATTN_BACKEND`` (the Dask backend
    picks the backend of its chunks this way: the user's choice named Dask itself).
    """
    need = required_features(problem)
    array_type = problem.array_type
    name, source = (None, None) if automatic else _requested(backend_arg)
    strict = _strict()
    # Keyed on the dtype object: np.dtype.name is a slow Python-level property.
    key = (array_type, problem.dtype, need, strict)
    if trail is None:
        if name is None:
            hit = registry._cache.get(key)
            if hit is not None:
                return _by_size(problem, hit)
        else:  # an explicit choice that already passed its checks for this kind of call
            chosen = registry._cache.get((name,) + key)
            if chosen is not None:
                return chosen
    dtype = problem.dtype.name
    if name is not None:
        backend = get_backend(name)
        caps = backend.capabilities
        if caps.array_type != array_type:
            raise TypeError(
                f"backend {name!r} (chosen by {source}) works on {caps.array_type} arrays but the inputs are "
                f"{array_type} arrays; selfattn never converts between array libraries: convert the inputs, "
                f"or choose a backend for {array_type} arrays"
            )
        reasons = caps.missing(array_type, dtype, need)
        if reasons:
            raise UnsupportedFeatureError(
                f"backend {name!r} (chosen by {source}) cannot run this call: {'; '.join(reasons)}"
            )
        if trail is not None:
            trail.append(f"{name}: chosen by {source}")
        registry._cache[(name,) + key] = backend
        return backend

    skipped = []
    eligible: list[Backend] = []
    for entry in registry.entries().values():
        if entry.array_type is not None and entry.array_type != array_type:
            if trail is not None:
                trail.append(f"{entry.name}: not considered, it works on {entry.array_type} arrays")
            continue
        ok, reason = registry.available(entry)
        if ok:
            reasons = registry.load(entry).capabilities.missing(array_type, dtype, need)
            reason = "; ".join(reasons)
            ok = not reasons
        if not ok:
            msg = f"{entry.name}: skipped, {reason}"
            skipped.append(msg)
            _log.debug("selfattn automatic selection: %s", msg)
            if trail is not None:
                trail.append(msg)
            if strict:
                cls = UnsupportedFeatureError if registry.available(entry)[0] else BackendUnavailableError
                raise cls(
                    f"strict backend selection: {msg} (SELFATTN_STRICT / use_backend(strict=True) forbid "
                    "skipping; choose a backend explicitly or disable strict mode)"
                )
            continue
        eligible.append(registry.load(entry))
    if not eligible:
        raise NoBackendError(
            f"no backend can run this call ({array_type} arrays, {dtype}, needs {sorted(need) or 'no options'}): "
            + ("; ".join(skipped) or "no backend handles this array type")
            + f". {_install_hint()}"
        )
    registry._cache[key] = tuple(eligible)
    chosen = _by_size(problem, eligible)
    if trail is not None:
        for backend in eligible:
            if backend is chosen:
                trail.append(
                    f"{backend.name}: chosen automatically (priority {backend.priority}"
                    + (", the last backend able to run it" if _small(problem, backend.capabilities) else "")
                    + ")"
                )
                break
            trail.append(f"{backend.name}: passed over, {_small(problem, backend.capabilities)}")
        later = [b.name for b in eligible[eligible.index(chosen) + 1 :]]
        if later:
            trail.append(f"also able to run it: {', '.join(later)}")
    return chosen


def _by_size(problem: Problem, eligible: Sequence[Backend]) -> Backend:
    """The first eligible backend whose declared work range holds the problem.

    A backend declares (``Capabilities.min_flops`` or ``work_range``) where it
    pays off; outside it a later backend runs the call -- e.g. NumPy instead of
    a JIT backend whose thread hand-off and compile cost more than a tiny call.
    The last eligible backend always takes what no earlier one wants.
    """
    for backend in eligible:
        if backend.capabilities.pays_off.covers(problem):
            return backend
    return eligible[-1]


def list_backends() -> list[BackendRecord]:
    """One :class:`BackendRecord` per registered backend, in automatic-selection order.

    Loads built-in backend modules (which are light: numba and cupy are only
    imported by a backend's availability check or first call) to read their
    capabilities and version.
    """
    records = []
    for entry in registry.entries().values():
        ok, reason = registry.available(entry)
        backend = registry.load(entry)
        version = str(getattr(backend, "version", "") or "") if backend is not None else ""
        install = (
            f"pip install 'selfattn[{entry.extra}]'"
            if entry.extra
            else ("included" if entry.source == "builtin" else entry.source)
        )
        records.append(
            BackendRecord(
                name=entry.name,
                available=ok,
                reason=reason,
                version=version,
                capabilities=getattr(backend, "capabilities", None),
                priority=entry.priority,
                source=entry.source,
                install=install,
            )
        )
    return records
