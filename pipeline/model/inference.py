"""Recurrent inference: the per-layer decoding state (conv tail, SSM state, sliding-window
ring buffer) that continues a sequence call after call with memory independent of its length.

A `LayerCache` is one of the mixer's sequence-wide operation providers (see `ops.py`): the
mixer hands it the conv and the scan, and it advances itself."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from longctx import kernels

from .ops import SSDArguments


@dataclass
class LayerCache:
    conv_tail: torch.Tensor   # (b, d_conv-1, conv_dim): last pre-conv xBC rows
    ssm: torch.Tensor         # (b, h, p, n) fp32: the full state
    seqlen: int = 0           # tokens read so far (state-norm positions count from the sequence start)
    # sliding window only: the last <= r tokens' scan inputs and the state before them
    ring: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None   # x (b,m,h,p), B (b,m,g,n), dt (b,m,h)
    lagged: Optional[torch.Tensor] = None                                     # (b, h, p, n) fp32

    @classmethod
    def zeros(cls, batch: int, d_conv: int, conv_dim: int, state_shape, device, dtype) -> "LayerCache":
        return cls(conv_tail=torch.zeros(batch, d_conv - 1, conv_dim, device=device, dtype=dtype),
                   ssm=torch.zeros(batch, *state_shape, device=device, dtype=torch.float32))

    def conv(self, xBC, weight, bias, seq_idx):
        out, tail = kernels.causal_conv1d(xBC, weight, bias, tail=self.conv_tail, seq_idx=seq_idx)
        self.conv_tail = tail.detach()
        return out

    def scan(self, x, dt, A, B, C, z, seq_idx, arguments: SSDArguments):
        """kernels.ssd continuing from this cache, which it advances.

        Under a sliding window the cache keeps the last r tokens' inputs (ring) and the
        state before them (lagged): the call rescans ring + new tokens from the lagged
        state, so each new output sees exactly its last r inputs (memory O(r), not O(l))."""
        window = arguments(0).get("window")
        if not window:
            y, self.ssm = kernels.ssd(x, dt, A, B, C, z=z, seq_idx=seq_idx, initial_states=self.ssm,
                                      return_final_states=True, **arguments(self.seqlen))
            self.seqlen += x.shape[1]
            return y
        if seq_idx is not None:
            raise ValueError("seq_idx with a cache under a sliding window is not supported: "
                             "decode one document per row")
        rx, rB, rdt = self.ring if self.ring is not None else (x[:, :0], B[:, :0], dt[:, :0])
        m = rx.shape[1]
        xs, Bs, dts = torch.cat([rx, x], 1), torch.cat([rB, B], 1), torch.cat([rdt, dt], 1)
        Cs = torch.cat([torch.zeros_like(rB), C], 1)           # outputs of the ring positions are discarded
        zs = None if z is None else torch.cat([torch.zeros_like(rx), z], 1)
        lagged = self.lagged if self.lagged is not None else torch.zeros_like(self.ssm)
        start = self.seqlen - m                                 # sequence position of the ring's first token
        y, self.ssm = kernels.ssd(xs, dts, A, Bs, Cs, z=zs, initial_states=lagged, return_final_states=True,
                                  **arguments(start))
        leaving = xs.shape[1] - window
        if leaving > 0:                                         # advance the lagged state past tokens leaving the ring
            _, self.lagged = kernels.ssd(xs[:, :leaving], dts[:, :leaving], A, Bs[:, :leaving],
                                         torch.zeros_like(Bs[:, :leaving]), initial_states=lagged,
                                         return_final_states=True, **{**arguments(start), "window": None})
        else:
            self.lagged = lagged
        self.ring = (xs[:, -window:].detach(), Bs[:, -window:].detach(), dts[:, -window:].detach())
        self.seqlen += x.shape[1]
        return y[:, m:]


@dataclass
class Mamba2Cache:
    """Recurrent state of every layer: memory independent of how many tokens were read."""

    layers: List[LayerCache]
    seqlen: int = 0
