"""Causal depthwise conv1d of the Mamba-2 mixer, with document resets and a carried tail.

out[t] = bias + sum_k w[k] * x[t - (K-1) + k], where rows from an earlier document
(seq_idx) count as zero, and rows before t=0 come from `tail` (the last K-1 input
rows of the previous call: recurrent decoding, chunked prefill, a carried state, the
sequence-parallel halo) or are zero. The tail continues the call's first document; the
tail a call returns keeps only its last document's rows (the others zeroed), so a
document that starts within K-1 rows of a call's end reads nothing of the one before
it in the next call. (A caller whose next call starts a new document passes no tail.)

Computed as the conv without resets (K in-place multiply-adds over whole rows) minus
the few products that cross a document start: at most K-1 positions per start read an
earlier document, so masking every row of every tap (what a plain expression does)
costs K full passes for a handful of positions. The backward is written out for the
same reason: autograd's walk over the plain expression was ~4x the forward's cost.
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import document_ids


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  tail: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None):
    """x (b,l,d); weight (d,K) or nn.Conv1d's (d,1,K); tail (b,K-1,d) or None.

    Returns (out (b,l,d), new_tail (b,K-1,d)): the conv output before activation and
    the last K-1 input rows, ready for the next call, whose first document continues this
    call's last: with seq_idx, rows of earlier documents are zeroed (a zero row adds nothing).
    """
    if weight.dim() == 3:
        weight = weight[:, 0, :]
    b, l, d = x.shape
    K = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(b, K - 1, d)
    elif tail.shape != (b, K - 1, d):
        raise ValueError(f"conv tail must be (batch, {K - 1}, {d}), got {tuple(tail.shape)}")
    full = torch.cat([tail.to(x.dtype), x], dim=1)                     # (b, K-1+l, d), contiguous
    taps = weight.t().to(x.dtype).contiguous()                         # (K, d): tap k's weights contiguous
    new_tail = full[:, full.shape[1] - (K - 1):]
    if seq_idx is None:
        return _CausalConv.apply(full, taps, None if bias is None else bias.to(x.dtype), None, None, None), new_tail
    doc = document_ids(seq_idx)
    doc_full = torch.cat([doc[:, :1].expand(b, K - 1), doc], dim=1)         # the tail continues document 0
    out = _CausalConv.apply(full, taps, None if bias is None else bias.to(x.dtype), *_crossing_pairs(doc, doc_full))
    last = doc_full[:, doc_full.shape[1] - (K - 1):] == doc[:, -1:]
    return out, new_tail * last.unsqueeze(-1).to(new_tail.dtype)


def _crossing_pairs(doc: torch.Tensor, doc_full: torch.Tensor):
    """(row, position, tap) of every product that reads an earlier document: doc (b,l) the rows' document ids,
    doc_full (b,K-1+l) those of the tail's rows and the rows."""
    l = doc.shape[1]
    # tap K-1 reads the position itself: never another document
    crossing = torch.stack([doc_full[:, k:k + l] != doc for k in range(doc_full.shape[1] - l)], dim=-1)
    return crossing.nonzero(as_tuple=True)


class _CausalConv(torch.autograd.Function):
    """out = bias + sum_k taps[k] * full[:, k:k+l], less the products listed in (rows, pos, tap)."""

    @staticmethod
    def forward(ctx, full, taps, bias, rows, pos, tap):
        K = taps.shape[0]
        b, l, d = full.shape[0], full.shape[1] - (K - 1), full.shape[2]
        out = full.new_zeros(b, l, d) if bias is None else bias.expand(b, l, d).clone()
        for k in range(K):
            out.addcmul_(full[:, k:k + l], taps[k])
        if rows is not None and rows.numel():
            out.index_put_((rows, pos), -(full[rows, pos + tap] * taps[tap]), accumulate=True)
        ctx.save_for_backward(full, taps, rows, pos, tap)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        full, taps, rows, pos, tap = ctx.saved_tensors
        grad = grad.contiguous()
        K, l = taps.shape[0], grad.shape[1]
        grad_full = torch.zeros_like(full)
        grad_taps = torch.empty_like(taps)
        for k in range(K):
            grad_full[:, k:k + l].addcmul_(grad, taps[k])
            grad_taps[k] = (grad * full[:, k:k + l]).sum((0, 1))
        if rows is not None and rows.numel():
            g = grad[rows, pos]
            grad_full.index_put_((rows, pos + tap), -(g * taps[tap]), accumulate=True)
            grad_taps.index_add_(0, tap, -(g * full[rows, pos + tap]))
        grad_bias = grad.sum((0, 1)) if ctx.has_bias else None
        return grad_full, grad_taps, grad_bias, None, None, None
