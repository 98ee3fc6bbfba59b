"""The Dask backend: the same attention call on ``dask.array`` inputs, as a lazy graph of chunk pairs.

``selfattn.scaled_dot_product_attention(q, k, v, ...)`` with Dask arrays
returns Dask arrays; nothing is computed until the caller computes them, on
whatever scheduler runs (synchronous, threads, processes,
``dask.distributed`` on one machine or many, ``dask_cuda`` with CuPy chunks).

The algorithm is the log-sum-exp merge, nothing else: the call is cut into
*pairs* (batch·head chunk, query chunk, key chunk). Each pair task computes
the partial ``(out, lse)`` of its query rows over its keys with the backend
that automatic selection picks for the chunks' own arrays (NumPy chunks:
numba or numpy by size; CuPy chunks: cupy), in the accumulation dtype; a tree
of merges per query chunk (fan-in ``selfattn.split-every``) combines them::

    lse = logsumexp_j(lse_j),  out = sum_j exp(lse_j - lse) out_j

Pairs that the causal/window band excludes entirely are never created
(4 x 4 causal chunks: 10 pairs of 16). Each pair's problem carries its global
position (band offset, dropout counters: :class:`~selfattn.backends.Coordinates`),
so masking and the dropout pattern are exactly those of a single call.

The backward uses the same pairs: each gets the whole call's ``out``,
``lse`` and ``grad_out`` rows of its query chunk (so ``rowsum(dO * O)`` and
the probabilities are global) and emits pieces of ``dq``, ``dk``, ``dv`` that
tree sums add up (``dq_i = sum_j``, ``dk_j, dv_j = sum_i``). The backward
graph references the forward's ``out``/``lse`` keys: computed together
(``dask.compute(out, dq, dk, dv)``) the forward runs once; to compute the
gradients later without running it again, persist ``out`` first.

Chunks
------
* batch and heads: the caller's chunks of ``query`` (head boundaries rounded
  up to whole grouped-query groups); ``key``/``value`` are rechunked to match.
* N (queries) and M (keys): the caller's chunks of ``query`` (resp. ``key``,
  else ``value``) along that axis when it has several; an axis left in one
  chunk is split evenly into chunks of at most ``L`` rows, where ``L`` is the
  largest multiple of 128 (at least 128) for which a query block and its
  output, ``bb·hh·L·(D + Dv)`` values of the accumulation dtype, fit in
  ``selfattn.chunk-size`` (default 16 MiB: ``L = 4096`` for 8 heads of 64
  in float32). See ``docs/distributed.md`` for how to choose.
* D and Dv: one chunk (rechunked if needed). Uneven chunks are fine.

Configuration (``dask.config``; read when the graph is built)
------------------------------------------------------------
``selfattn.chunk-size`` (``"16MiB"``), ``selfattn.split-every`` (4, the merge
and sum fan-in), ``selfattn.inner-backend`` (None: automatic per pair; or a
backend name such as ``"numpy"``), ``selfattn.threads-per-task`` (1: each task
runs the Numba backend on one thread, because a Dask worker already runs as
many tasks side by side as it has threads, and ``distributed`` limits
OpenBLAS/MKL/OpenMP threads per worker but not Numba's; None: no limit).

Importing this module imports neither dask nor distributed; calls do (the
inputs are Dask arrays, so Dask is already loaded).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._capabilities import FEATURES, Capabilities
from .._problem import Array, Coordinates, Problem, array_library
from . import _dask_tasks as tasks
from ._base import Backend

__all__ = ["DaskBackend", "backend", "Settings", "settings", "Layout", "layout", "CONFIG_DEFAULTS"]

#: Defaults of the ``selfattn.*`` keys of ``dask.config`` this backend reads.
CONFIG_DEFAULTS: dict[str, Any] = {
    "chunk-size": "16MiB",
    "split-every": 4,
    "inner-backend": None,
    "threads-per-task": 1,
}

#: Default chunk lengths along N and M are multiples of this (and at least this).
ROW_QUANTUM = 128


@dataclass(frozen=True)
class Settings:
    """The ``selfattn.*`` Dask configuration in force, validated."""

    chunk_bytes: int
    split_every: int
    inner: str | None
    threads: int | None


def settings() -> Settings:
    """Read and validate ``selfattn.chunk-size``, ``split-every``, ``inner-backend``, ``threads-per-task``."""
    import dask.config
    from dask.utils import parse_bytes

    def get(key: str) -> Any:
        return dask.config.get(f"selfattn.{key}", default=CONFIG_DEFAULTS[key])

    raw = get("chunk-size")
    try:
        chunk_bytes = int(parse_bytes(raw)) if isinstance(raw, str) else int(raw)
    except (TypeError, ValueError):
        chunk_bytes = 0
    if isinstance(raw, bool) or chunk_bytes <= 0:
        raise ValueError(f"dask config selfattn.chunk-size must be a positive size such as '16MiB', got {raw!r}")
    split = get("split-every")
    if isinstance(split, bool) or not isinstance(split, int) or split < 2:
        raise ValueError(f"dask config selfattn.split-every must be an int >= 2 (the merge fan-in), got {split!r}")
    inner = get("inner-backend")
    if inner is not None and not isinstance(inner, str):
        raise ValueError(f"dask config selfattn.inner-backend must be a backend name or None, got {inner!r}")
    threads = get("threads-per-task")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"dask config selfattn.threads-per-task must be a positive int or None, got {threads!r}")
    return Settings(chunk_bytes, split, inner, threads)


# -- the chunk layout -------------------------------------------------------------------------------------------------
def _starts(sizes: tuple[int, ...]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _whole_groups(chunks: tuple[int, ...], group: int) -> tuple[int, ...]:
    """Head chunks with every boundary rounded up to a multiple of ``group`` (GQA groups stay whole)."""
    ends = sorted({-(-e // group) * group for e in _starts(chunks)[1:]})
    return tuple(b - a for a, b in zip([0] + ends[:-1], ends, strict=True))


def _split(total: int, per_row: int, chunk_bytes: int) -> tuple[int, ...]:
    """The default chunks of an axis of ``total`` rows: even, each at most ``chunk_bytes`` / ``per_row`` rows."""
    rows = max(ROW_QUANTUM, chunk_bytes // max(per_row, 1) // ROW_QUANTUM * ROW_QUANTUM)
    if total <= rows:
        return (total,)
    n = -(-total // rows)
    base, extra = divmod(total, n)
    return tuple(base + (1 if i < extra else 0) for i in range(n))


@dataclass(frozen=True)
class Layout:
    """Chunk sizes of the pair grid: flat batch, query heads (whole GQA groups), query rows, keys."""

    batch: tuple[int, ...]
    heads: tuple[int, ...]
    rows: tuple[int, ...]
    keys: tuple[int, ...]
    group: int

    @property
    def kv_heads(self) -> tuple[int, ...]:
        """Key/value head chunks, aligned with the query head chunks."""
        return tuple(h // self.group for h in self.heads)

    def bands(self, pb: Problem) -> list[tuple[int, int]]:
        """``(query chunk, key chunk)`` pairs that can attend anything, in row-major order.

        Exact: a pair is kept iff some (row, key) in it is inside the causal/window
        band (:meth:`Problem.key_range` of the chunk's rows meets the key chunk).
        Empty chunks make no pairs.
        """
        rs, ks = _starts(self.rows), _starts(self.keys)
        kept = []
        for ii in range(len(self.rows)):
            i0, i1 = rs[ii], rs[ii + 1]
            if i1 == i0:
                continue
            lo, hi = pb.key_range(i0, i1)
            for jj in range(len(self.keys)):
                j0, j1 = ks[jj], ks[jj + 1]
                if j1 > j0 and max(lo, j0) < min(hi, j1):
                    kept.append((ii, jj))
        return kept


def layout(pb: Problem, st: Settings) -> Layout:
    """The chunk layout of a Dask problem (see the module docstring); reads chunk metadata only."""
    q, k, v = pb.query, pb.key, pb.value
    g = pb.group
    batch = tuple(int(c) for c in q.chunks[0])
    heads = _whole_groups(tuple(int(c) for c in q.chunks[1]), g)
    per_row = max(batch) * max(heads) * (pb.d + pb.dv) * pb.compute_dtype.itemsize
    rows = tuple(int(c) for c in q.chunks[2]) if len(q.chunks[2]) > 1 else _split(pb.n, per_row, st.chunk_bytes)
    if len(k.chunks[2]) > 1:
        keys = tuple(int(c) for c in k.chunks[2])
    elif len(v.chunks[2]) > 1:
        keys = tuple(int(c) for c in v.chunks[2])
    else:
        keys = _split(pb.m, per_row, st.chunk_bytes)
    return Layout(batch, heads, rows, keys, g)


# -- graph building ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Inputs:
    """The problem's Dask arrays rechunked to the layout, and how to address a pair's blocks."""

    query: Any
    key: Any
    value: Any
    mask: Any
    alibi: Any
    library: str  # the chunks' array library

    def arrays(self) -> list[Any]:
        return [x for x in (self.query, self.key, self.value, self.mask, self.alibi) if x is not None]

    def blocks(self, pb: Problem, bi: int, hi: int, ii: int, jj: int) -> tuple[Any, ...]:
        """Task arguments: the keys of the pair's query, key, value, mask and ALiBi blocks."""
        mk = None
        if self.mask is not None:
            full = (pb.batch, pb.q_heads, pb.n, pb.m)
            # A broadcast (size-1) mask axis has one block; a full one is chunked like the pair grid.
            index = (i if s == f else 0 for i, s, f in zip((bi, hi, ii, jj), self.mask.shape, full, strict=True))
            mk = (self.mask.name,) + tuple(index)
        ak = None if self.alibi is None else (self.alibi.name, bi, hi)
        return (
            (self.query.name, bi, hi, ii, 0),
            (self.key.name, bi, hi, jj, 0),
            (self.value.name, bi, hi, jj, 0),
            mk,
            ak,
        )


def _chunk_library(pb: Problem) -> str:
    libs = []
    for name, x in (("query", pb.query), ("key", pb.key), ("value", pb.value)):
        lib = array_library(x._meta)
        if lib is None:
            raise TypeError(
                f"{name} is a Dask array of {type(x._meta).__module__}.{type(x._meta).__name__} chunks; "
                "the Dask backend runs NumPy or CuPy chunks: convert them, e.g. with "
                f"{name}.map_blocks(numpy.asarray)"
            )
        libs.append(lib)
    if len(set(libs)) > 1:
        raise TypeError(
            f"query, key and value must have chunks of one array library, got {libs}; convert them "
            "with map_blocks(numpy.asarray) or map_blocks(cupy.asarray)"
        )
    return libs[0]


def _inputs(pb: Problem, lay: Layout) -> _Inputs:
    q = pb.query.rechunk((lay.batch, lay.heads, lay.rows, -1))
    k = pb.key.rechunk((lay.batch, lay.kv_heads, lay.keys, -1))
    v = pb.value.rechunk((lay.batch, lay.kv_heads, lay.keys, -1))
    mk = pb.mask
    if mk is not None:
        assert pb.mask_index is not None
        if mk.shape[0] != 1 and not np.array_equal(pb.mask_index, np.arange(pb.batch)):
            # Several batch axes, the mask broadcast over some: one mask entry per flat batch entry
            # (gathered lazily, block by block; the other axes stay broadcast).
            mk = mk[pb.mask_index]
        full = (pb.batch, pb.q_heads, pb.n, pb.m)
        grid = (lay.batch, lay.heads, lay.rows, lay.keys)
        mk = mk.rechunk(tuple(c if s == f else (s,) for s, f, c in zip(mk.shape, full, grid, strict=True)))
    alibi = None if pb.alibi is None else pb.alibi.rechunk((lay.batch, lay.heads))
    return _Inputs(q, k, v, mk, alibi, _chunk_library(pb))


def _options(pb: Problem, st: Settings, ins: _Inputs) -> tasks.Options:
    return tasks.Options(
        scale=pb.scale,
        causal=pb.causal,
        window=pb.window,
        softcap=pb.softcap,
        dropout_p=pb.dropout_p,
        dropout_seed=pb.dropout_seed,
        inner=st.inner,
        threads=st.threads,
        mask_batched=ins.mask is not None and ins.mask.shape[0] == pb.batch,
    )


def _pair(pb: Problem, opts: tasks.Options, lay: Layout, bi: int, hi: int, ii: int, jj: int) -> tasks.Pair:
    """The pair's band offset and global dropout counters (composed with the problem's own, for a chunk)."""
    b0, b1 = _starts(lay.batch)[bi : bi + 2]
    h0 = _starts(lay.heads)[hi]
    i0, j0 = _starts(lay.rows)[ii], _starts(lay.keys)[jj]
    c = pb.coords
    bidx = np.arange(b0, b1, dtype=np.int64) if c.batch_index is None else c.batch_index[b0:b1]
    coords = Coordinates(
        batch_index=bidx,
        head_start=c.head_start + h0,
        total_heads=pb.q_heads if c.total_heads is None else c.total_heads,
        row_start=c.row_start + i0,
        col_start=c.col_start + j0,
    )
    return tasks.Pair(opts, int(pb.offset) + i0 - j0, coords)  # type: ignore[arg-type]


def _stub_problem(
    pb: Problem,
    lay: Layout,
    opts: tasks.Options,
    ins: _Inputs,
    bi: int,
    hi: int,
    ii: int,
    jj: int,
    weights: bool,
    vjp: bool,
) -> Problem:
    """A pair's problem with zero-stride NumPy stand-ins of the right shapes: for backend choice, no data."""
    cdt = pb.compute_dtype

    def stub(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.broadcast_to(np.zeros((), dtype), shape)

    bb, hh, rows, cols = lay.batch[bi], lay.heads[hi], lay.rows[ii], lay.keys[jj]
    mask = mask_index = None
    if ins.mask is not None:
        full = (pb.batch, pb.q_heads, pb.n, pb.m)
        sizes = zip((bb, hh, rows, cols), ins.mask.shape, full, strict=True)
        mask = stub(tuple(n if s == f else 1 for n, s, f in sizes), ins.mask.dtype)
        mask_index = np.zeros(bb, dtype=np.int64)
    pair = _pair(pb, opts, lay, bi, hi, ii, jj)
    hkv = hh // lay.group
    return Problem(
        array_type=ins.library,
        query=stub((bb, hh, rows, pb.d), cdt),
        key=stub((bb, hkv, cols, pb.d), cdt),
        value=stub((bb, hkv, cols, pb.dv), cdt),
        batch_shape=(bb,),
        mask=mask,
        mask_index=mask_index,
        causal=pb.causal,
        window=pb.window,
        scale=pb.scale,
        softcap=pb.softcap,
        alibi=None if pb.alibi is None else stub((bb, hh), pb.alibi.dtype),
        dropout_p=pb.dropout_p,
        dropout_seed=pb.dropout_seed,
        return_lse=True,
        return_weights=weights,
        needs_vjp=vjp,
        offset=pair.offset,
        coords=pair.coords,
    )


def _inner_choice(
    pb: Problem, lay: Layout, opts: tasks.Options, ins: _Inputs, bands: list[tuple[int, int]], weights: bool, vjp: bool
) -> list[str]:
    """Names of the inner backends the pairs will use (first and last pair; raises what a pair would raise)."""
    names: list[str] = []
    nb, nh = len(lay.batch), len(lay.heads)
    for bi, hi, (ii, jj) in [(0, 0, bands[0]), (nb - 1, nh - 1, bands[-1])] if bands else []:
        name = tasks.inner_backend(_stub_problem(pb, lay, opts, ins, bi, hi, ii, jj, weights, vjp), opts.inner).name
        if name not in names:
            names.append(name)
    return names


def _tree(
    layer: dict,
    name: str,
    prefix: tuple[int, ...],
    leaves: list[Any],
    func: Callable[..., Any],
    extra: tuple[Any, ...],
    split_every: int,
) -> Any:
    """Add a reduction tree over ``leaves`` to ``layer`` (fan-in ``split_every``); return the root's key."""
    keys, level = list(leaves), 0
    while len(keys) > 1:
        nxt = []
        for g in range(0, len(keys), split_every):
            group = keys[g : g + split_every]
            if len(group) == 1:
                nxt.append(group[0])
                continue
            key = (name,) + prefix + (level, g // split_every)
            layer[key] = (func, group) + extra
            nxt.append(key)
        keys, level = nxt, level + 1
    return keys[0]


class _Graph:
    """Layers added on top of the input arrays' graphs; one layer per output array (plus tree layers)."""

    def __init__(self, inputs: list[Any]) -> None:
        from dask.highlevelgraph import HighLevelGraph

        self._base = HighLevelGraph.merge(*(x.dask for x in inputs))
        self.layers: dict[str, dict] = {}
        self.deps: dict[str, set[str]] = {}

    def add(self, name: str, layer: dict, deps: set[str]) -> None:
        self.layers[name] = layer
        self.deps[name] = set(deps)

    def array(self, name: str, chunks: tuple[tuple[int, ...], ...], like: Any, dtype: Any) -> Any:
        import dask.array as da
        from dask.array.utils import meta_from_array
        from dask.highlevelgraph import HighLevelGraph

        graph = HighLevelGraph({**self._base.layers, **self.layers}, {**self._base.dependencies, **self.deps})
        return da.Array(graph, name, chunks, meta=meta_from_array(like, ndim=len(chunks), dtype=dtype))


def _token(*parts: Any) -> str:
    from dask.base import tokenize

    return tokenize(*parts)


class DaskBackend(Backend):
    """Attention on Dask arrays as a graph of chunk pairs merged by log-sum-exp (see the module docstring)."""

    name = "dask"
    priority = 30
    capabilities = Capabilities(
        array_type="dask",
        features=frozenset(FEATURES) - {"varlen"},
        notes={"varlen": "packed variable-length batches are not planned on Dask arrays yet"},
    )

    def __init__(self) -> None:
        self._version: str | None = None

    @property
    def version(self) -> str:  # type: ignore[override]
        if self._version is None:
            try:
                from importlib.metadata import version

                self._version = version("dask")
            except Exception:  # pragma: no cover - metadata missing
                self._version = "unknown"
        return self._version

    def availability(self) -> tuple[bool, str]:
        if importlib.util.find_spec("dask") is None:
            return False, "dask is not installed; pip install 'selfattn[dask]'"
        return True, ""

    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {"dask": self.version}
        try:
            from importlib.metadata import version

            d["distributed"] = version("distributed")
        except Exception:
            d["distributed"] = "not installed"
        d["config"] = {f"selfattn.{k}": v for k, v in CONFIG_DEFAULTS.items()}
        return d

    # -- planning ----------------------------------------------------------------------------------------------------
    def plan(self, problem: Problem) -> str:
        """The graph size: chunks, pair tasks (band), merge fan-in, inner backend (for ``explain``)."""
        pb = problem
        st = settings()
        if pb.batch * pb.q_heads == 0:
            return "empty batch or head axis: zero-filled blocks, no pair tasks"
        lay = layout(pb, st)
        ins = _inputs(pb, lay)
        opts = _options(pb, st, ins)
        bands = lay.bands(pb)
        nbh = len(lay.batch) * len(lay.heads)
        npairs = nbh * len(bands)
        grid = len(lay.rows) * len(lay.keys)
        band = ""
        if pb.lower is not None or pb.upper is not None:
            kind = "causal" if pb.causal and pb.window is None else "window" if not pb.causal else "causal window"
            band = f" ({len(bands)} of {grid} chunk pairs in the {kind} band)"
        names = _inner_choice(pb, lay, opts, ins, bands, pb.return_weights, pb.needs_vjp)
        threads = "no thread limit" if st.threads is None else f"{st.threads} thread{'s' * (st.threads > 1)} per task"
        text = (
            f"{nbh} batch·head chunks x {len(lay.rows)} query chunks x {len(lay.keys)} key chunks: "
            f"{npairs} pair tasks{band}, merge fan-in {st.split_every}, "
            f"inner backend {' / '.join(names) or 'none (no pair attends anything)'} on {ins.library} chunks, "
            f"{threads}"
        )
        if pb.return_weights:
            text += f"; weights: {nbh * grid} blocks"
        if pb.needs_vjp:
            text += f"; backward: {npairs} pair tasks, dq/dk/dv by tree sums"
        return text

    def _setup(
        self, pb: Problem, weights: bool, vjp: bool
    ) -> tuple[Settings, Layout, _Inputs, tasks.Options, list[tuple[int, int]]]:
        st = settings()
        lay = layout(pb, st)
        ins = _inputs(pb, lay)
        opts = _options(pb, st, ins)
        bands = lay.bands(pb)
        _inner_choice(pb, lay, opts, ins, bands, weights, vjp)  # typed errors now, not at compute time
        return st, lay, ins, opts, bands

    # -- forward -----------------------------------------------------------------------------------------------------
    def forward(self, problem: Problem) -> tuple[Array, Array | None, Array | None]:
        pb = problem
        if pb.batch * pb.q_heads == 0:
            return self._empty_forward(pb)
        st, lay, ins, opts, bands = self._setup(pb, weights=pb.return_weights, vjp=False)
        dtype, lse_dtype, lib = pb.dtype.name, pb.lse_dtype.name, ins.library
        tok = _token("forward", [x.name for x in ins.arrays()], opts, lay, st.split_every, pb.offset, pb.coords)
        pname, mname, oname, lname = (f"selfattn-{s}-{tok}" for s in ("pairs", "merge", "out", "lse"))
        pairs: dict = {}
        merges: dict = {}
        outs: dict = {}
        lses: dict = {}
        by_row: dict[int, list[int]] = {}
        for ii, jj in bands:
            by_row.setdefault(ii, []).append(jj)
        for bi, bb in enumerate(lay.batch):
            for hi, hh in enumerate(lay.heads):
                for ii, rows in enumerate(lay.rows):
                    leaves = []
                    for jj in by_row.get(ii, ()):
                        key = (pname, bi, hi, ii, jj)
                        pairs[key] = (tasks.pair_forward, _pair(pb, opts, lay, bi, hi, ii, jj)) + ins.blocks(
                            pb, bi, hi, ii, jj
                        )
                        leaves.append(key)
                    if leaves:
                        root = _tree(merges, mname, (bi, hi, ii), leaves, tasks.merge, (), st.split_every)
                        outs[(oname, bi, hi, ii, 0)] = (tasks.cast, root, 0, dtype)
                        lses[(lname, bi, hi, ii)] = (tasks.cast, root, 1, lse_dtype)
                    else:  # no key reaches these rows: output 0, lse -inf
                        outs[(oname, bi, hi, ii, 0)] = (tasks.full, (bb, hh, rows, pb.dv), 0.0, dtype, lib)
                        lses[(lname, bi, hi, ii)] = (tasks.full, (bb, hh, rows), -np.inf, lse_dtype, lib)
        graph = _Graph(ins.arrays())
        graph.add(pname, pairs, {x.name for x in ins.arrays()})
        graph.add(mname, merges, {pname})
        graph.add(oname, outs, {pname, mname})
        graph.add(lname, lses, {pname, mname})
        out = graph.array(oname, (lay.batch, lay.heads, lay.rows, (pb.dv,)), ins.query, pb.dtype)
        lse = graph.array(lname, (lay.batch, lay.heads, lay.rows), ins.query, pb.lse_dtype)
        weights = self._weights(pb, lay, ins, opts, bands, lse, tok) if pb.return_weights else None
        return out, (lse if pb.want_lse else None), weights

    def _weights(
        self,
        pb: Problem,
        lay: Layout,
        ins: _Inputs,
        opts: tasks.Options,
        bands: list[tuple[int, int]],
        lse: Any,
        tok: str,
    ) -> Any:
        """The probabilities ``(B, Hq, N, M)``, lazily, one block per (batch·head, query, key) chunk."""
        wname = f"selfattn-weights-{tok}"
        inband = set(bands)
        layer: dict = {}
        for bi, bb in enumerate(lay.batch):
            for hi, hh in enumerate(lay.heads):
                for ii, rows in enumerate(lay.rows):
                    for jj, cols in enumerate(lay.keys):
                        key = (wname, bi, hi, ii, jj)
                        if (ii, jj) in inband:
                            layer[key] = (
                                (tasks.pair_weights, _pair(pb, opts, lay, bi, hi, ii, jj))
                                + ins.blocks(pb, bi, hi, ii, jj)
                                + ((lse.name, bi, hi, ii), pb.dtype.name)
                            )
                        else:
                            layer[key] = (tasks.full, (bb, hh, rows, cols), 0.0, pb.dtype.name, ins.library)
        graph = _Graph(ins.arrays() + [lse])
        graph.add(wname, layer, {x.name for x in ins.arrays()} | {lse.name})
        return graph.array(wname, (lay.batch, lay.heads, lay.rows, lay.keys), ins.query, pb.dtype)

    def _empty_forward(self, pb: Problem) -> tuple[Array, Array | None, Array | None]:
        import dask.array as da

        out = da.zeros((pb.batch, pb.q_heads, pb.n, pb.dv), dtype=pb.dtype)
        lse = da.full((pb.batch, pb.q_heads, pb.n), -np.inf, dtype=pb.lse_dtype) if pb.want_lse else None
        w = da.zeros((pb.batch, pb.q_heads, pb.n, pb.m), dtype=pb.dtype) if pb.return_weights else None
        return out, lse, w

    # -- backward ----------------------------------------------------------------------------------------------------
    def backward(self, problem: Problem, out: Array, lse: Array, grad_out: Array) -> tuple[Array, Array, Array]:
        import dask.array as da

        pb = problem
        if pb.batch * pb.q_heads == 0:
            return (
                da.zeros(pb.query.shape, dtype=pb.dtype),
                da.zeros(pb.key.shape, dtype=pb.dtype),
                da.zeros(pb.value.shape, dtype=pb.dtype),
            )
        st, lay, ins, opts, bands = self._setup(pb, weights=False, vjp=True)
        row_chunks = (lay.batch, lay.heads, lay.rows)
        out = da.asarray(out).rechunk(row_chunks + (-1,))
        lse = da.asarray(lse).rechunk(row_chunks)
        grad_out = da.asarray(grad_out).rechunk(row_chunks + (-1,))
        extra = [out, lse, grad_out]
        tok = _token(
            "backward", [x.name for x in ins.arrays() + extra], opts, lay, st.split_every, pb.offset, pb.coords
        )
        pname = f"selfattn-pairs-bwd-{tok}"
        names = {g: (f"selfattn-{g}-sum-{tok}", f"selfattn-{g}-{tok}") for g in ("dq", "dk", "dv")}
        pairs: dict = {}
        trees: dict[str, dict] = {g: {} for g in names}
        finals: dict[str, dict] = {g: {} for g in names}
        by_row: dict[int, list[int]] = {}
        by_col: dict[int, list[int]] = {}
        for ii, jj in bands:
            by_row.setdefault(ii, []).append(jj)
            by_col.setdefault(jj, []).append(ii)
        dtype, lib, g = pb.dtype.name, ins.library, lay.group
        for bi, bb in enumerate(lay.batch):
            for hi, hh in enumerate(lay.heads):
                for ii, jj in bands:
                    pairs[(pname, bi, hi, ii, jj)] = (
                        (tasks.pair_backward, _pair(pb, opts, lay, bi, hi, ii, jj))
                        + ins.blocks(pb, bi, hi, ii, jj)
                        + ((out.name, bi, hi, ii, 0), (lse.name, bi, hi, ii), (grad_out.name, bi, hi, ii, 0))
                    )
                # dq of query chunk i sums over its key chunks; dk, dv of key chunk j over its query chunks.
                for grad, field, sizes, width, heads, along in (
                    ("dq", 0, lay.rows, pb.d, hh, by_row),
                    ("dk", 1, lay.keys, pb.d, hh // g, by_col),
                    ("dv", 2, lay.keys, pb.dv, hh // g, by_col),
                ):
                    tname, fname = names[grad]
                    for idx, size in enumerate(sizes):
                        leaves = [
                            (pname, bi, hi) + ((idx, o) if grad == "dq" else (o, idx)) for o in along.get(idx, ())
                        ]
                        key = (fname, bi, hi, idx, 0)
                        if leaves:
                            root = _tree(
                                trees[grad], tname, (bi, hi, idx), leaves, tasks.total, (field,), st.split_every
                            )
                            finals[grad][key] = (tasks.cast, root, field, dtype)
                        else:  # no pair touches this chunk: zero gradient
                            finals[grad][key] = (tasks.full, (bb, heads, size, width), 0.0, dtype, lib)
        graph = _Graph(ins.arrays() + extra)
        graph.add(pname, pairs, {x.name for x in ins.arrays() + extra})
        for grad, (tname, fname) in names.items():
            graph.add(tname, trees[grad], {pname})
            graph.add(fname, finals[grad], {pname, tname})
        dq = graph.array(names["dq"][1], (lay.batch, lay.heads, lay.rows, (pb.d,)), ins.query, pb.dtype)
        dk = graph.array(names["dk"][1], (lay.batch, lay.kv_heads, lay.keys, (pb.d,)), ins.query, pb.dtype)
        dv = graph.array(names["dv"][1], (lay.batch, lay.kv_heads, lay.keys, (pb.dv,)), ins.query, pb.dtype)
        return dq, dk, dv


#: The instance the dispatcher registers.
backend = DaskBackend()
