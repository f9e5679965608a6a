"""Chunked SSD in PyTorch: the state space dual form, differentiable, O(l * chunk) memory.

The sequence is cut into chunks of Q positions. Inside a chunk the output is a
masked, decayed "attention" C_t . B_s (quadratic in Q); across chunks only the
state at each chunk end is passed on (linear in the number of chunks):

    y_t = sum_{s<=t in chunk} (C_t.B_s) exp(cum_t - cum_s) u_s x_s      (intra-chunk)
        + exp(cum_t) C_t . H_c                                          (carried state)
    H_{c+1} = exp(cum_end) H_c + sum_s exp(cum_end - cum_s) u_s outer(x_s, B_s)

with cum the running sum of log a inside the chunk (kept in base 2: exp2) and u = input_scale * dt.
Document boundaries (seq_idx) mask every term that would cross one.

Mitigations:
- state norm rescales H at chunk ends (its positions are chunk ends: the chunk is cut to
  divide them). A rescale by s at the end of chunk c-1 acts on everything older exactly
  like an extra decay log s on entry to chunk c, so it is kept as `entry_log_scale`.
- window r: the output never reads the carried state (that would mean subtracting two
  large states, which cancels catastrophically when a ≈ 1). Instead it sums the band of
  the last r inputs directly: key chunks wholly inside the window through their written
  states (a sum of decayed positive terms), chunks cut by the window edge through masked
  Q x Q blocks, and the initial state while t < r.
"""
from __future__ import annotations

import math

import torch

from .common import (
    check_shapes,
    check_window,
    compute_dtype,
    finish_output,
    heads_of_groups,
    log_decays,
    per_head,
)
from .intra_chunk import chunks_first, group_scores, intra_chunk
from .layout import Chunks, documents, pad_rows, window_key_chunks

LOG2E = 1.0 / math.log(2.0)


def _chunk_len(chunk_size: int, length: int, state_norm) -> int:
    """Q = chunk_size, shortened for short calls, and cut so that every state-norm position is a chunk end."""
    Q = max(1, min(int(chunk_size), length))
    if state_norm is not None:
        Q = math.gcd(Q, int(state_norm.every), (-int(state_norm.offset)) % int(state_norm.every))
    return Q


def _pass_states(written, chunk_decay, initial, Q, length, state_norm, tau):
    """Chunk to chunk: the state entering each chunk, the final state, the log-scale on entry.

    Sequential over chunks only. State norm is applied at the chunk ends that are norm positions.
    """
    # unbind, not written[:, c]: each indexing op's backward writes a gradient the size of the whole
    # tensor, which made the backward quadratic in the number of chunks
    writes, decays = written.unbind(1), chunk_decay[..., None, None].unbind(2)
    state, carried = initial, []
    zero = torch.zeros_like(chunk_decay[:, :, 0])
    entry = [zero]
    nc = len(writes)
    for c in range(nc):
        carried.append(state)
        state = decays[c] * state + writes[c]
        end = (c + 1) * Q - 1
        log_s = zero
        if state_norm is not None and end < length and state_norm.is_norm_position(end):
            s = state_norm.scale(state, tau)
            state = state * s[:, :, None, None]
            log_s = torch.log2(s)
        if c + 1 < nc:
            entry.append(log_s)
    return torch.stack(carried, dim=1), state, torch.stack(entry, dim=-1)


def _read_out(Ch, states, from_start):
    """What per-chunk states (b,c,h,p,n) give each position of their chunk: C_t . S_c scaled by the
    decay from the chunk start (zero after a document boundary)."""
    return torch.einsum("bctHn,bcHpn,bHct->bctHp", Ch, states, from_start)


def _window_band(y, r, Q, Cc, Bc, xu, cum, entry, written, initial, docs, from_start, cdt):
    """Add to y (b,c,Q,h,p) what the last r inputs before each chunk contribute (cross-chunk band)
    and the decayed initial state for positions t < r. xu: the inputs scaled by u."""
    b, nc, _, h, p = xu.shape
    Ch = heads_of_groups(Cc, h)
    total = cum[..., -1]                                                   # (b,h,c) log2 decay across a chunk
    pos = torch.arange(Q, device=xu.device)
    full_states = torch.zeros_like(written)                               # (b,c,h,p,n)
    between = entry                         # Λ_d[c]: log decay from key chunk end to chunk c start
    for d, whole in window_key_chunks(nc, Q, r):
        if whole:                                                          # whole key chunk c-d inside the window
            coef = torch.exp2(between[..., d:])                             # (b,h,c-d)
            if docs is not None:
                coef = coef * docs.reaches(d, cdt)
            full_states = torch.cat([full_states[:, :d], full_states[:, d:]
                                     + coef.permute(0, 2, 1)[..., None, None] * written[:, :-d]], dim=1)
        else:                                                              # chunk cut by the window edge: masked block
            in_window = (pos[:, None] + d * Q - pos[None, :]) < r          # (Q_t, Q_i)
            doc = None if docs is None else docs.by_chunk
            mask = in_window if doc is None else in_window & (doc[:, d:, :, None] == doc[:, :-d, None, :])[:, None]
            decay = torch.exp2(cum[..., d:, :, None] + between[..., d:, None, None]
                              + (total[..., :-d, None] - cum[..., :-d, :])[..., None, :])
            scores = group_scores(Cc[:, d:], Bc[:, :-d], chunks_first(decay)) * chunks_first(mask).to(cdt)
            y = torch.cat([y[:, :d], y[:, d:] + torch.einsum("bchts,bcshp->bcthp", scores, xu[:, :-d])], dim=1)
        between = torch.cat([between[..., :d + 1], between[..., d + 1:] + (entry + total)[..., 1:nc - d]], dim=-1)

    y = y + _read_out(Ch, full_states, from_start)

    if initial is not None:                                                # t < r still sees the initial state
        to_chunk = torch.cumsum(torch.cat([torch.zeros_like(total[..., :1]), (entry + total)[..., :-1]], -1), -1)
        gain = torch.exp2(cum + (to_chunk + entry)[..., None])              # (b,h,c,Q)
        t_global = torch.arange(nc * Q, device=xu.device).view(nc, Q)
        gain = gain * (t_global < r).to(cdt)
        if docs is not None:
            gain = gain * docs.in_first_document(cdt)
        y = y + torch.einsum("bctHn,bHpn,bHct->bctHp", Ch, initial, gain)
    return y


# Calls longer than this run segment by segment, each entering with the state the previous one ended in: the
# same arithmetic, but each segment's tensors stay within the caches (`longctx bench kernels --vs-minimal`:
# time(64K)/time(16K) was about 5 in one pass).
SEGMENT_TOKENS = 4096


def ssd_chunked(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
                dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None, return_final_states=False,
                decay_scale=None, input_scale=None, state_norm=None, window=None):
    check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    window = check_window(window)
    kw = dict(chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
              decay_scale=decay_scale, input_scale=input_scale)
    # a window reads across segment starts and state-norm positions count from the call's start: one pass
    q = _chunk_len(chunk_size, x.shape[1], None)
    seg = max(q, SEGMENT_TOKENS // q * q)               # whole chunks: the chunks are those of one pass
    if x.shape[1] > seg and window is None and state_norm is None:
        y, final = _by_segments(seg, x, dt, A, B, C, z, seq_idx, initial_states, kw)
    else:
        y, final = _one_pass(x, dt, A, B, C, z=z, initial_states=initial_states, seq_idx=seq_idx,
                             state_norm=state_norm, window=window, **kw)
    return (y, final) if return_final_states else y


def _by_segments(seg, x, dt, A, B, C, z, seq_idx, initial_states, kw):
    """(y, final state) of one pass, computed over consecutive segments of `seg` positions."""
    def cut(t):          # split, not slicing: a slice's backward writes a gradient the size of the whole input
        return t.split(seg, 1) if t is not None else [None] * -(-x.shape[1] // seg)

    state, ys = initial_states, []
    for i, (xs, dts, Bs, Cs, zs, docs) in enumerate(zip(cut(x), cut(dt), cut(B), cut(C), cut(z), cut(seq_idx))):
        if i and seq_idx is not None:       # a document starting exactly here takes nothing from before it
            continues = seq_idx[:, i * seg] == seq_idx[:, i * seg - 1]
            state = state * continues[:, None, None, None].to(state.dtype)
        y, state = _one_pass(xs, dts, A, Bs, Cs, z=zs, initial_states=state, seq_idx=docs, **kw)
        ys.append(y)
    return torch.cat(ys, 1), state


def _one_pass(x, dt, A, B, C, *, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx,
              decay_scale, input_scale, state_norm=None, window=None):
    b, l, h, p = x.shape
    n = B.shape[-1]
    cdt = compute_dtype(x)
    chunks = Chunks(b, h, l, _chunk_len(chunk_size, l, state_norm))
    Q, pad, L, nc = chunks.Q, chunks.pad, chunks.L, chunks.nc

    dtp, log_a = log_decays(dt, A, dt_bias, dt_softplus, dt_limit, decay_scale, cdt)
    scale_in = per_head(input_scale, h, cdt, x.device, "input_scale")
    u = dtp if scale_in is None else dtp * scale_in
    tau = None if state_norm is None else state_norm.thresholds(h, cdt, x.device)

    log_a, u = chunks.heads_first(log_a), chunks.heads_first(u)                  # (b,h,c,Q)
    xc = pad_rows(x.to(cdt), pad).view(b, nc, Q, h, p)
    Bc = pad_rows(B.to(cdt), pad).view(b, nc, Q, -1, n)
    Cc = pad_rows(C.to(cdt), pad).view(b, nc, Q, -1, n)
    xu = xc * u.permute(0, 2, 3, 1)[..., None]                                  # every term reads u_s x_s

    docs = documents(seq_idx, chunks)
    doc = None if docs is None else docs.by_chunk                               # (b,c,Q)

    # Decays are powers of 2 from here on: torch's CPU exp leaves its vector path for inputs below about
    # -87 and for -inf (masked pairs, fast-forgetting heads), 10-100x slower there; exp2 does not.
    cum = torch.cumsum(log_a, dim=-1) * LOG2E                                   # (b,h,c,Q) log2 decays

    # 1. intra-chunk: decayed, causally masked C.B scores (band-limited under a window)
    idx = torch.arange(Q, device=x.device)
    causal = idx[:, None] >= idx[None, :]
    if window is not None:
        causal = causal & (idx[:, None] - idx[None, :] < window)
    mask = causal if doc is None else causal & (doc[:, :, :, None] == doc[:, :, None, :])[:, None]
    y = intra_chunk(Cc, Bc, cum, xu, mask)                                      # (b,c,Q,h,p)

    # 2. what each chunk writes into the state at its end
    to_end = torch.exp2(cum[..., -1:] - cum)                                     # (b,h,c,Q)
    if docs is not None:
        to_end = to_end * docs.writes_to_end(cdt)
    written = torch.einsum("bhcs,bcshp,bcshn->bchpn", to_end, xu, heads_of_groups(Bc, h))

    # 3. pass the state from chunk to chunk (sequential over chunks only)
    chunk_decay = torch.exp2(cum[..., -1])                                       # (b,h,c)
    if docs is not None:
        chunk_decay = chunk_decay * docs.passes_state(cdt)
    initial = initial_states.to(cdt) if initial_states is not None else None
    carried, state, entry = _pass_states(written, chunk_decay,
                                         initial if initial is not None else x.new_zeros(b, h, p, n, dtype=cdt),
                                         Q, l, state_norm, tau)

    # 4. read out what came before the chunk
    from_start = torch.exp2(cum)                                                 # (b,h,c,Q)
    if docs is not None:
        from_start = from_start * docs.reads_entering(cdt)
    if window is None:
        y = y + _read_out(heads_of_groups(Cc, h), carried, from_start)
    else:
        y = _window_band(y, window, Q, Cc, Bc, xu, cum, entry, written, initial, docs, from_start, cdt)

    y = y.reshape(b, L, h, p)[:, :l]
    return finish_output(y, x, D, z).to(x.dtype), state
