"""Chunked SSD in PyTorch: the state space dual form, differentiable, O(l * chunk) memory.

The sequence is cut into chunks of Q positions. Inside a chunk the output is a
masked, decayed "attention" C_t . B_s (quadratic in Q); across chunks only the
state at each chunk end is passed on (linear in the number of chunks):

    y_t = sum_{s<=t in chunk} (C_t.B_s) exp(cum_t - cum_s) u_s x_s      (intra-chunk)
        + exp(cum_t) C_t . H_c                                          (carried state)
    H_{c+1} = exp(cum_end) H_c + sum_s exp(cum_end - cum_s) u_s outer(x_s, B_s)

with cum the running sum of log a inside the chunk and u = input_scale * dt.
Document boundaries (seq_idx) mask every term that would cross one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import (check_shapes, compute_dtype, document_ids, finish_output, heads_of_groups,
                     log_decay_scale, per_head, process_dt)


def _pad_length(t: torch.Tensor, pad: int, dim: int = 1) -> torch.Tensor:
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def ssd_chunked(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
                dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None, return_final_states=False,
                decay_scale=None, input_scale=None):
    check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    b, l, h, p = x.shape
    n = B.shape[-1]
    cdt = compute_dtype(x)
    Q = max(1, min(int(chunk_size), l))  # a short call needs no padding to a full chunk
    pad = (-l) % Q
    L = l + pad
    nc = L // Q

    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    log_a = dtp * A.to(cdt)
    log_decay = log_decay_scale(decay_scale, h, cdt, x.device)
    if log_decay is not None:
        log_a = log_a + log_decay
    scale_in = per_head(input_scale, h, cdt, x.device, "input_scale")
    u = dtp if scale_in is None else dtp * scale_in

    # Padded positions get log a = 0 and u = 0: they leave the state untouched.
    log_a = _pad_length(log_a, pad).view(b, nc, Q, h).permute(0, 3, 1, 2)      # (b,h,c,Q)
    u = _pad_length(u, pad).view(b, nc, Q, h).permute(0, 3, 1, 2)              # (b,h,c,Q)
    xc = _pad_length(x.to(cdt), pad).view(b, nc, Q, h, p)
    Bc = _pad_length(B.to(cdt), pad).view(b, nc, Q, -1, n)
    Cc = _pad_length(C.to(cdt), pad).view(b, nc, Q, -1, n)
    Bh, Ch = heads_of_groups(Bc, h), heads_of_groups(Cc, h)                     # (b,c,Q,h,n)

    doc = document_ids(seq_idx)
    if doc is not None:
        doc = torch.cat([doc, doc[:, -1:].expand(b, pad)], dim=1).view(b, nc, Q)  # padding continues the last doc

    cum = torch.cumsum(log_a, dim=-1)                                           # (b,h,c,Q)

    # 1. intra-chunk: decayed, causally masked C.B scores
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    mask = causal if doc is None else causal & (doc[:, :, :, None] == doc[:, :, None, :])[:, None]
    seg = cum[..., :, None] - cum[..., None, :]                                 # (b,h,c,Q_t,Q_s)
    decay = torch.exp(torch.where(mask, seg, torch.full_like(seg, -math.inf)))
    CB = torch.einsum("bcthn,bcshn->bhcts", Ch, Bh)
    scores = CB * decay * u[..., None, :]
    y = torch.einsum("bhcts,bcshp->bcthp", scores, xc)

    # 2. what each chunk writes into the state at its end
    to_end = torch.exp(cum[..., -1:] - cum) * u                                 # (b,h,c,Q)
    if doc is not None:
        to_end = to_end * (doc == doc[:, :, -1:])[:, None].to(cdt)
    written = torch.einsum("bhcs,bcshp,bcshn->bchpn", to_end, xc, Bh)

    # 3. pass the state from chunk to chunk (sequential over chunks only)
    chunk_decay = torch.exp(cum[..., -1])                                       # (b,h,c)
    if doc is not None:
        prev_end = torch.cat([doc[:, :1, 0], doc[:, :-1, -1]], dim=1)           # doc before each chunk
        chunk_decay = chunk_decay * (doc[:, :, -1] == prev_end)[:, None].to(cdt)
    state = (initial_states.to(cdt) if initial_states is not None
             else x.new_zeros(b, h, p, n, dtype=cdt))
    carried = []
    for c in range(nc):
        carried.append(state)
        state = chunk_decay[:, :, c, None, None] * state + written[:, c]
    carried = torch.stack(carried, dim=1)                                       # (b,c,h,p,n)

    # 4. the carried state read out at every position of the chunk
    from_start = torch.exp(cum)                                                 # (b,h,c,Q)
    if doc is not None:
        from_start = from_start * (doc == prev_end[:, :, None])[:, None].to(cdt)
    y = y + torch.einsum("bctHn,bcHpn,bHct->bctHp", Ch, carried, from_start)

    y = y.reshape(b, L, h, p)[:, :l]
    y = finish_output(y, x, D, z).to(x.dtype)
    return (y, state) if return_final_states else y
