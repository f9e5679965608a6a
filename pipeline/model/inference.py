"""Decoding: the per-layer state that continues a sequence call after call. A Mamba layer's (conv tail, SSM
state, sliding-window ring buffer) has a memory independent of the sequence's length; an attention layer's
(`AttentionCache`: every key and value read so far) grows with it.

A `LayerCache` is one of the mixer's sequence-wide operation providers (see `ops.py`): the
mixer hands it the conv and the scan, and it advances itself."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

from longctx import kernels
from longctx.kernels.common import document_ids

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
        return _conv_continuing(self, xBC, weight, bias, seq_idx)

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


def _conv_continuing(cache, x, weight, bias, seq_idx):
    """The causal conv continuing from `cache.conv_tail` (the call's first document continues the tail's), which
    it advances: kernels.causal_conv1d's new tail keeps only rows of the call's last document, so a document that
    starts within d_conv-1 rows of the call's end does not read the one before it next call."""
    out, tail = kernels.causal_conv1d(x, weight, bias, tail=cache.conv_tail, seq_idx=seq_idx)
    cache.conv_tail = tail.detach()
    return out


@dataclass
class AttentionCache:
    """An attention layer's decoding state: the (rotated) keys and values of every token read so far, each one's
    document, and the conv tail when the layer has a conv. The buffers grow by doubling, so appending a token
    does not copy them all.

    Documents continue across calls as the Mamba layers' state does: a call's first document (of its seq_idx)
    is the one the previous call ended in; each later one starts afresh."""

    keys: torch.Tensor                        # (b, capacity, kv_heads, head_dim); the first `seqlen` are read
    values: torch.Tensor
    docs: torch.Tensor                        # (b, capacity) int64 document ids
    conv_tail: Optional[torch.Tensor] = None  # (b, d_conv-1, qkv_dim): last pre-conv q, k, v rows
    seqlen: int = 0                           # tokens read so far

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, conv: Optional[Tuple[int, int]], device,
              dtype) -> "AttentionCache":
        """`conv`: (d_conv, channels) of the layer's conv, or None."""
        kv = torch.zeros(batch, 0, kv_heads, head_dim, device=device, dtype=dtype)
        tail = None if conv is None else torch.zeros(batch, conv[0] - 1, conv[1], device=device, dtype=dtype)
        return cls(keys=kv, values=kv.clone(), docs=torch.zeros(batch, 0, dtype=torch.int64, device=device),
                   conv_tail=tail)

    def conv(self, x, weight, bias, seq_idx):
        return _conv_continuing(self, x, weight, bias, seq_idx)

    def positions(self, length: int, device) -> torch.Tensor:
        """Sequence positions of the next `length` tokens."""
        return torch.arange(self.seqlen, self.seqlen + length, device=device)

    def documents(self, seq_idx: Optional[torch.Tensor], batch: int, length: int, device) -> torch.Tensor:
        """(b, length) document ids of the next tokens: the last one read continues into the call's first."""
        last = self.docs[:, self.seqlen - 1] if self.seqlen else torch.zeros(batch, dtype=torch.int64, device=device)
        if seq_idx is None:
            return last[:, None].expand(batch, length)
        return last[:, None] + document_ids(seq_idx).to(device)

    def context(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, docs: torch.Tensor):
        """The attention mixer's view (attention.py): appends this call's keys, values and documents; returns
        every one read so far with their positions (0 .. seqlen-1)."""
        keys, values, key_docs = self.append(k, v, docs)
        return keys, values, torch.arange(self.seqlen, device=k.device), key_docs

    def append(self, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor):
        """Adds this call's keys, values (b, l, kv_heads, head_dim) and documents; returns all read so far."""
        end = self.seqlen + k.shape[1]
        if end > self.keys.shape[1]:
            grown = max(end, 2 * self.keys.shape[1])
            self.keys, self.values, self.docs = (
                torch.cat([t[:, :self.seqlen], t.new_zeros(t.shape[0], grown - self.seqlen, *t.shape[2:])], dim=1)
                for t in (self.keys, self.values, self.docs))
        start, self.seqlen = self.seqlen, end
        self.keys[:, start:end], self.values[:, start:end], self.docs[:, start:end] = k.detach(), v.detach(), docs
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):    # this call's keys stay differentiable
            return (torch.cat([self.keys[:, :start], k], 1), torch.cat([self.values[:, :start], v], 1),
                    self.docs[:, :end])
        return self.keys[:, :end], self.values[:, :end], self.docs[:, :end]


@dataclass
class Mamba2Cache:
    """Decoding state of every layer (LayerCache for a Mamba layer, AttentionCache for an attention layer)."""

    layers: List[Union[LayerCache, AttentionCache]]
    seqlen: int = 0
