"""CUDA sources and host-side helpers of the CuPy backend.

``attn.cu`` (with ``common.cuh`` prepended) is compiled at run time by CuPy's
RawModule. ``launch`` holds the host-side logic as pure functions (kernel
names, launch configuration, tiling, mask strides, argument packing) and
imports no CuPy, so it is tested on the CPU. Developer tools that compile
(``tools/nvrtc_check.py``), emulate (``tests/plugins/good/selfattn_cuda_emulated``)
or benchmark these kernels live outside the package.
"""
