"""Triton backend of `longctx.kernels.ssd`: chunked SSD forward and backward kernels.

`ssd_triton` takes the arguments of `kernels.ssd`. CUDA tensors run compiled kernels;
CPU tensors run them in the Triton interpreter when TRITON_INTERPRET=1 (tests).
"""
from .ssd import interpreting, ssd_triton

__all__ = ["ssd_triton", "interpreting"]
