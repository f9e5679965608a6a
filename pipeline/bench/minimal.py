"""The best plain-PyTorch CPU reference for the SSD scan, for `longctx bench kernels --vs-minimal`.

A transcription of `ssd_minimal_discrete` from mamba_ssm (mamba_ssm/modules/ssd_minimal.py, Tri Dao and
Albert Gu, Apache-2.0; "Transformers are SSMs", arXiv 2405.21060, listing 1), written with torch ops in
place of einops. It takes discretized inputs: X = x * dt, A = A * dt (per position and head), with B and
C per head. Its chunk-to-chunk pass is one matrix product over all chunk pairs (quadratic in the number
of chunks), which is what our sequential pass is measured against.
"""
from __future__ import annotations

import json
from typing import List, Sequence

import torch
import torch.nn.functional as F


def segsum(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum(x[..., j+1:i+1]) for j <= i, -inf above the diagonal (stable form)."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)
    below = torch.tril(torch.ones(T, T, device=x.device, dtype=torch.bool), diagonal=-1)
    x = x.masked_fill(~below, 0)
    x_segsum = torch.cumsum(x, dim=-2)
    on_or_below = torch.tril(torch.ones(T, T, device=x.device, dtype=torch.bool), diagonal=0)
    return x_segsum.masked_fill(~on_or_below, -torch.inf)


def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    """X (b,l,h,p), A (b,l,h), B and C (b,l,h,n); l a multiple of block_len. Returns (Y, final_state)."""
    b, l, h, p = X.shape
    c = l // block_len
    X, A, B, C = (t.reshape(b, c, block_len, *t.shape[2:]) for t in (X, A, B, C))
    A = A.permute(0, 3, 1, 2)                                   # b h c l
    A_cumsum = torch.cumsum(A, dim=-1)
    # 1. intra-chunk outputs (diagonal blocks)
    L = torch.exp(segsum(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    # 2. the state each chunk writes
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    # 3. chunk-to-chunk recurrence, as one product over chunk pairs
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. state -> output per position
    state_decay_out = torch.exp(A_cumsum)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, state_decay_out)
    return (Y_diag + Y_off).reshape(b, l, h, p), final_state


def minimal_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=True):
    """Our scan's arguments (B, C with one group) through ssd_minimal_discrete: the same output."""
    dt = dt.float() + (0 if dt_bias is None else dt_bias)
    dt = F.softplus(dt) if dt_softplus else dt
    h = x.shape[2]
    y, _ = ssd_minimal_discrete(x.float() * dt[..., None], A * dt, B.float().expand(-1, -1, h, -1),
                                C.float().expand(-1, -1, h, -1), chunk_size)
    if D is not None:
        y = y + x.float() * D[:, None]
    return y.to(x.dtype)


def run_minimal_bench(lengths: Sequence[int], heads: int, headdim: int, d_state: int, chunks: Sequence[int],
                      repeats: int = 2) -> List[dict]:
    """Forward+backward of our torch scan and of ssd_minimal_discrete on the same inputs, each at every chunk
    size, in one process, timed in turn. `vs_minimal` = minimal's best / ours at its best (> 1: ours faster); `auto` is
    our scan with chunk_size "auto" (what the model uses on this device)."""
    from longctx.kernels import auto_chunk_size, ssd

    from .kernels import _rel, _time_fwd_bwd, _time_interleaved
    rows = []
    for length in lengths:
        inputs = _inputs_for(length, heads, headdim, d_state)
        ours, ref = {}, {}
        for q in chunks:
            (ours[q], y), (ref[q], y_min) = _time_interleaved(
                [lambda **a: ssd(**a, backend="torch", dt_softplus=True, chunk_size=q),
                 lambda **a: minimal_scan(**a, chunk_size=q)], inputs, repeats)
            err = _rel(y, y_min)
        auto = auto_chunk_size(length, "cpu")
        auto_ms = ours[auto] if auto in ours else _time_fwd_bwd(
            lambda **a: ssd(**a, backend="torch", dt_softplus=True, chunk_size="auto"), inputs, repeats)[0]
        best, best_ref = min(ours, key=ours.get), min(ref, key=ref.get)
        quarter = length // 4 if length // 4 in lengths else None
        rows.append({"growth_vs_quarter": None if quarter is None else growth_in_turn(
                         length, quarter, heads, headdim, d_state, repeats),
                     "length": length, "heads": heads, "headdim": headdim, "d_state": d_state,
                     "ours_ms": ours, "minimal_ms": ref, "ours_best_chunk": best, "ours_best_ms": ours[best],
                     "minimal_best_chunk": best_ref, "minimal_best_ms": ref[best_ref],
                     "vs_minimal": ref[best_ref] / ours[best], "auto_chunk": auto, "auto_ms": auto_ms,
                     "auto_vs_minimal": ref[best_ref] / auto_ms, "max_rel_err_vs_minimal": err})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def growth_in_turn(length: int, shorter: int, heads: int, headdim: int, d_state: int, repeats: int) -> float:
    """time(length) / time(shorter) of our scan (chunk_size auto), the two lengths timed in turn (A B A B ...
    after a warm-up of each): the rows' times come minutes apart, and a machine whose speed drifts in between
    would move the ratio by as much as the growth is meant to show."""
    from longctx.kernels import ssd

    from .kernels import _time_interleaved

    def scan(**a):
        return ssd(**a, backend="torch", dt_softplus=True, chunk_size="auto")
    (long_ms, _), (short_ms, _) = _time_interleaved(
        [scan, scan], [_inputs_for(n, heads, headdim, d_state) for n in (length, shorter)], repeats)
    return long_ms / short_ms


def _inputs_for(length, heads, headdim, d_state):
    from .kernels import _inputs
    return _inputs(length, heads, headdim, d_state, "cpu", torch.float32)


def print_minimal(rows: List[dict]) -> None:
    print("| length | ours, best chunk (ms) | ssd_minimal, best chunk (ms) | vs minimal | auto chunk (ms) | "
          "auto vs minimal | time / time at 1/4 the length (timed in turn) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        growth = "-" if r["growth_vs_quarter"] is None else f"{r['growth_vs_quarter']:.2f}"
        print(f"| {r['length']:,} | {r['ours_best_ms']:.0f} (Q={r['ours_best_chunk']}) | {r['minimal_best_ms']:.0f} "
              f"(Q={r['minimal_best_chunk']}) | {r['vs_minimal']:.2f}× | {r['auto_ms']:.0f} (Q={r['auto_chunk']}) | "
              f"{r['auto_vs_minimal']:.2f}× | {growth} |")
