"""Causal depthwise conv1d of the Mamba-2 mixer, with document resets and a carried tail.

out[t] = bias + sum_k w[k] * x[t - (K-1) + k], where rows from an earlier document
(seq_idx) count as zero, and rows before t=0 come from `tail` (the last K-1 input
rows of the previous call: recurrent decoding, chunked prefill, the sequence-parallel
halo) or are zero.
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import document_ids


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  tail: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None):
    """x (b,l,d); weight (d,K) or nn.Conv1d's (d,1,K); tail (b,K-1,d) or None.

    Returns (out (b,l,d), new_tail (b,K-1,d)): the conv output before activation and
    the last K-1 input rows, ready for the next call.
    """
    if weight.dim() == 3:
        weight = weight[:, 0, :]
    b, l, d = x.shape
    K = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(b, K - 1, d)
    elif tail.shape != (b, K - 1, d):
        raise ValueError(f"conv tail must be (batch, {K - 1}, {d}), got {tuple(tail.shape)}")
    full = torch.cat([tail.to(x.dtype), x], dim=1)                     # (b, K-1+l, d)
    if seq_idx is not None:
        doc = document_ids(seq_idx)
        doc_full = torch.cat([doc[:, :1].expand(b, K - 1), doc], dim=1)  # the tail continues doc 0
    out = x.new_zeros(b, l, d) if bias is None else bias.to(x.dtype).expand(b, l, d).clone()
    for k in range(K):
        rows = full[:, k:k + l]
        if seq_idx is not None:
            rows = rows * (doc_full[:, k:k + l] == doc)[..., None].to(x.dtype)
        out = out + rows * weight[:, k].to(x.dtype)
    return out, full[:, full.shape[1] - (K - 1):]
