"""CUDA sources and host-side helpers of the CuPy backend.

Nothing here imports CuPy: ``launch`` holds pure functions (launch
configuration, tiling, mask strides, argument packing) that are tested on the
CPU, and ``nvrtc_check`` compiles every kernel source with NVRTC (through the
``cuda-python`` bindings) without needing a GPU.
"""
