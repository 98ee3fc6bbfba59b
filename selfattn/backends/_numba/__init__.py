"""Numba kernel families of the ``numba`` backend (imported on first use: these modules import Numba).

* :mod:`.args` -- the host helper that builds kernel arguments (no Numba);
* :mod:`.pool` -- the worker threads that run task ranges (no Numba);
* :mod:`.tiles` -- tile primitives shared by the families;
* :mod:`.fused` -- fused loop kernels (no BLAS);
* :mod:`.blas` -- BLAS-tile kernels.
"""
