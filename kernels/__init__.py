"""SSD scan kernels (docs/ARCHITECTURE.md §4): reference, chunked PyTorch, Triton.

`ssd` is the single entry point; `ssd_naive` the ground truth it is tested against.
"""
from __future__ import annotations

import math

import torch

from .chunked import ssd_chunked
from .common import StateNorm
from .conv import causal_conv1d
from .reference import ssd_naive, ssd_step

BACKENDS = ("auto", "torch", "triton")


def auto_chunk_size(length: int, device_type: str) -> int:
    """The chunk length `chunk_size="auto"` takes. On CPU the chunked torch scan is fastest with short
    chunks at every length measured (`longctx bench kernels --vs-minimal`: 64 beat 128 and 256 from 1K to
    64K tokens at h=8, p=64, n=64, and at the demo's shapes); on CUDA the Triton kernels' 256."""
    return 64 if device_type == "cpu" else 256


def ssd(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None, return_final_states=False,
        decay_scale=None, input_scale=None, state_norm=None, window=None, backend="auto"):
    """Mamba-2 selective scan. Shapes as mamba_ssm's `mamba_chunk_scan_combined`.

    Returns y (like x), or (y, final_states) with final_states (b,h,p,n) in the
    compute dtype (fp32; fp64 when x is fp64).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(x.shape[1], x.device.type)
    kw = dict(chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
              initial_states=initial_states, seq_idx=seq_idx, return_final_states=return_final_states,
              decay_scale=decay_scale, input_scale=input_scale, state_norm=state_norm, window=window)
    # "auto": the Triton kernels on CUDA tensors, except where they would only fall back to torch
    # anyway (state norm, fp64), so that model code on GPU does not warn at every call.
    auto_triton = (backend == "auto" and x.is_cuda and state_norm is None and x.dtype != torch.float64
                   and _triton_backend() is not None)
    if backend == "triton" or auto_triton:
        impl = _triton_backend()
        if impl is None:
            raise RuntimeError("ssd(backend='triton'): triton is not importable; install it or use backend='torch'")
        return impl(x, dt, A, B, C, **kw)
    return ssd_chunked(x, dt, A, B, C, **kw)


_TRITON = []


def _triton_backend():
    """kernels.triton.ssd_triton, or None when triton cannot be imported. Imported on first use so that
    CPU-only code never pays for (or depends on) triton."""
    if not _TRITON:
        try:
            from .triton import ssd_triton
        except ImportError:
            ssd_triton = None
        _TRITON.append(ssd_triton)
    return _TRITON[0]


__all__ = ["ssd", "ssd_naive", "ssd_step", "ssd_chunked", "StateNorm", "causal_conv1d", "BACKENDS",
           "auto_chunk_size"]
