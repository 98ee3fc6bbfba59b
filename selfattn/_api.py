"""The public attention functions: validate once, dispatch, reshape the result."""

from __future__ import annotations

from ._dispatch import Explanation, select
from ._problem import array_library, normalize

__all__ = ["scaled_dot_product_attention", "scaled_dot_product_attention_vjp", "explain"]


def _package(pb, out, lse, weights):
    result = [out.reshape(pb.out_shape(pb.dv))]
    if pb.return_lse:
        result.append(lse.reshape(pb.lse_shape()))
    if pb.return_weights:
        result.append(weights.reshape(pb.out_shape(pb.m)))
    return result[0] if len(result) == 1 else tuple(result)


def scaled_dot_product_attention(query, key, value, *, mask=None, causal=False, window=None, scale=None,
                                 dropout_p=0.0, dropout_seed=None, return_lse=False, return_weights=False,
                                 backend=None):
    """Exact attention ``softmax(query @ key.T * scale + mask) @ value``.

    Parameters
    ----------
    query : array ``(..., Hq, N, D)`` or ``(N, D)``
    key : array ``(..., Hkv, M, D)`` or ``(M, D)``
    value : array ``(..., Hkv, M, Dv)`` or ``(M, Dv)``
        ``numpy.ndarray`` (or ``cupy.ndarray`` with the cupy backend), all of
        one library and one dtype among float16, float32, float64. Axis -3 is
        the head axis; axes before it are batch axes and must match exactly.
        ``Hq`` must be a multiple of ``Hkv``: query head ``h`` uses key/value
        head ``h // (Hq // Hkv)`` (grouped-query attention; K/V are not copied).
        N = 0 and M = 0 are allowed. Non-contiguous and read-only arrays are
        fine; inputs are never modified.
    mask : bool or float array broadcastable to ``(..., Hq, N, M)``, optional
        Boolean: True = may attend. Float: added to the scaled scores
        (``-inf`` excludes). Never expanded to full size.
    causal : bool
        Bottom-right aligned: query ``i`` may attend key ``j`` iff
        ``j <= i + (M - N)`` (FlashAttention >= 2.1). PyTorch's ``is_causal`` is
        top-left aligned (``j <= i``); for that, pass
        ``mask=numpy.tril(numpy.ones((N, M), bool))`` instead.
    window : int or (left, right), optional
        Sliding window: query ``i`` may attend ``j`` iff
        ``i + (M-N) - left <= j <= i + (M-N) + right``; ``w`` means ``(w, w)``.
        With ``causal`` the right reach is also capped at 0.
    scale : float, optional
        Finite positive score scale; default ``1/sqrt(D)``.
    dropout_p : float in [0, 1)
        Dropout on the attention weights; kept weights are scaled by
        ``1/(1-p)``. The pattern is a pure function of ``dropout_seed`` and the
        element's (batch·head, i, j) index (see :mod:`selfattn._dropout`), so it
        is identical on every backend and in the backward pass.
    dropout_seed : int in [0, 2**64), optional
        Seed of the pattern; None draws a fresh one (when ``dropout_p > 0``).
    return_lse : bool
        Also return the natural log-sum-exp of the masked, scaled scores,
        ``(..., Hq, N)``, float32 for float16 inputs, else the input dtype.
    return_weights : bool
        Also return the attention probabilities ``(..., Hq, N, M)`` (before
        dropout), in the input dtype. This materializes N x M values.
    backend : str, optional
        Run on this backend or raise; see :func:`selfattn.use_backend`.

    Returns
    -------
    out, or the tuple ``(out, lse?, weights?)`` in that order.
        ``out`` has shape ``(..., Hq, N, Dv)`` and the input dtype (float16
        inputs accumulate in float32).

    Edge cases: a query row with nothing to attend (fully masked, or M = 0)
    gets output 0, lse ``-inf`` and weights 0, never NaN. NaN in a query row,
    or in a key/value row that a query attends, propagates to that query's
    outputs; whether NaN in a key/value row that a query may *not* attend
    reaches it is unspecified (a backend may skip masked blocks entirely).

    Raises
    ------
    TypeError, ValueError
        Malformed arguments, with the argument, the value and the fix named.
    selfattn.UnsupportedFeatureError
        The chosen backend does not declare a capability the call needs.
    selfattn.BackendNotFoundError, selfattn.BackendUnavailableError, selfattn.NoBackendError
        Backend selection failed; the message lists what is installed.
    """
    pb = normalize(query, key, value, mask=mask, causal=causal, window=window, scale=scale,
                   dropout_p=dropout_p, dropout_seed=dropout_seed, return_lse=return_lse,
                   return_weights=return_weights)
    impl = select(pb, backend)
    out, lse, weights = impl.forward(pb)
    return _package(pb, out, lse, weights)


def scaled_dot_product_attention_vjp(query, key, value, *, mask=None, causal=False, window=None, scale=None,
                                     dropout_p=0.0, dropout_seed=None, backend=None):
    """Attention forward plus a pullback: ``out, backward = ...; dq, dk, dv = backward(grad_out)``.

    Arguments are those of :func:`scaled_dot_product_attention` (without
    ``return_lse``/``return_weights``). Only ``query``, ``key``, ``value`` (and
    ``mask``), ``out`` and the log-sum-exp are kept between the two passes: the
    backward recomputes the probabilities blockwise, reuses the forward's
    dropout pattern, and sums ``dk``/``dv`` over the query heads sharing a
    key/value head. ``backward`` may be called several times.

    ``grad_out`` must have ``out``'s shape, dtype and array library. The
    gradients have the shapes and dtype of ``query``, ``key`` and ``value``;
    rows with nothing to attend contribute zero gradient. The gradient of an
    additive mask is not computed.
    """
    pb = normalize(query, key, value, mask=mask, causal=causal, window=window, scale=scale,
                   dropout_p=dropout_p, dropout_seed=dropout_seed, needs_vjp=True)
    impl = select(pb, backend)
    out4, lse4, _ = impl.forward(pb)
    out = out4.reshape(pb.out_shape(pb.dv))
    q_shape, k_shape, v_shape = query.shape, key.shape, value.shape

    def backward(grad_out):
        """Gradients ``(dq, dk, dv)`` of ``sum(out * grad_out)`` w.r.t. query, key, value."""
        lib = array_library(grad_out)
        if lib is None:
            raise TypeError(
                f"grad_out must be a {pb.array_type} array like the output, got {type(grad_out).__name__}; "
                "convert it first (e.g. numpy.asarray(grad_out))"
            )
        if lib != pb.array_type:
            raise TypeError(f"grad_out is a {lib} array but the output is a {pb.array_type} array")
        if grad_out.dtype != out.dtype:
            raise TypeError(f"grad_out has dtype {grad_out.dtype}, expected {out.dtype} (the output's dtype); "
                            f"cast it with grad_out.astype({out.dtype})")
        if tuple(grad_out.shape) != tuple(out.shape):
            raise ValueError(f"grad_out has shape {tuple(grad_out.shape)}, expected the output's shape {tuple(out.shape)}")
        dq, dk, dv = impl.backward(pb, out4, lse4, grad_out.reshape(out4.shape))
        return dq.reshape(q_shape), dk.reshape(k_shape), dv.reshape(v_shape)

    return out, backward


def explain(query, key, value, *, vjp=False, backend=None, **options) -> Explanation:
    """The backend decision for a call, without computing it.

    Takes the arguments of :func:`scaled_dot_product_attention` (``vjp=True``
    explains :func:`scaled_dot_product_attention_vjp` instead). Returns an
    :class:`~selfattn.Explanation` whose ``backend`` is the chosen name, or None
    with ``error`` set when the call would fail; ``trail`` lists each backend
    considered and why it was taken or skipped. Invalid arguments still raise.
    """
    pb = normalize(query, key, value, needs_vjp=vjp, **options)
    trail = []
    try:
        impl = select(pb, backend, trail=trail)
    except Exception as exc:
        return Explanation(None, trail, f"{type(exc).__name__}: {exc}")
    return Explanation(impl.name, trail)
