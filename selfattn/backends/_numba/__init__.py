"""Numba kernel families of the ``numba`` backend (imported on first use: these modules import Numba).

* :mod:`.args` -- the host helper that builds kernel arguments (no Numba);
* :mod:`.pool` -- the worker threads that run task ranges (no Numba);
* :mod:`.scratch` -- per-thread work arrays reused across calls (no Numba);
* :mod:`.tiles` -- tile primitives shared by the families;
* :mod:`.fused` -- fused loop kernels (no BLAS);
* :mod:`.blas` -- BLAS-tile kernels;
* :mod:`.microkernel`, :mod:`.simd` -- the SIMD family's vector micro-kernels and kernels.
"""
