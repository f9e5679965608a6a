"""Sequence parallelism by state passing (docs/ARCHITECTURE.md §5).

Each sequence is split into R contiguous segments, one per rank of a sequence-parallel
(SP) group. Per layer, a rank needs from the ranks before it only

- the conv halo: the last d_conv-1 `xBC` rows before its segment (and, under a sliding
  window, the last r-1 scan inputs), exchanged by `halo`;
- the state entering its segment. The scan is affine in that state, S_out = a_seg S_in +
  S_local, so each rank scans from a zero state, the group all-gathers (a_seg, S_local)
  and an exclusive scan over earlier ranks gives S_in; its effect on the outputs is the
  correction C_t (a_0 ... a_t) S_in. Backward all-gathers dS_in and runs the reverse scan.

Traffic per layer and rank is O(h·p·n + halo) bytes, independent of the sequence length.

Attention layers (model/attention.py) have no such state: a rank's queries read the keys and values of its own
and every earlier rank's tokens. They are all-gathered (`context`: the halo below, as wide as the sequence before
the segment), so each rank sends its segment's keys and values once per layer, and its backward reduce-scatters
their gradients to the ranks that own them. Positions are global (rank x segment length + local index) and
document ids are numbered from the sequence's start, from the earlier ranks' `seq_idx` that `begin` gathers whole
for them. A ring (each rank passing key/value blocks on and accumulating its softmax online) would hold one
block at a time instead of the prefix, at R-1 sequential steps per layer; the all-gather is one collective and
exactly the one-process computation (docs/ARCHITECTURE.md §5 gives the memory).

Data parallelism: DeepSpeed's data-parallel group stays the whole world (every rank holds
a replica of the parameters, ZeRO partitions over all ranks), so a stage may change its
SP degree without a new engine. A rank's gradient is only its segment's share of the
sequence's gradient, so the loss each rank backpropagates is multiplied by the SP degree:
DeepSpeed's world average then equals the sum over the SP group averaged over the
data-parallel replicas (`longctx.pipeline.training.loss.sequence_loss`).

State normalization rescales by the norm of the whole state, which makes the incoming
state a non-affine function of every earlier rank: it would have to run rank after rank.
We refuse it under SP with an error naming the option (train those stages with
seq_parallel: 1 or use decay_scale / input_scale / window, which all work here).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx import kernels
from longctx.kernels.common import compute_dtype, document_ids, heads_of_groups, log_decays

from ..model.attention import ALL_EARLIER_ROWS
from ..model.mitigations import STATE_NORM_UNSUPPORTED
from ..model.ops import SSDArguments


class SequenceParallel:
    """This rank's place in its sequence-parallel group, and the batch's document halo.

    `bytes_sent` counts the payload this rank contributes to collectives (all-gather: its
    own buffer; reduce-scatter, all-gather's transpose: its own slot of the result, as many
    bytes as the all-gather it reverses; all-reduce and broadcast: the buffer), for
    `longctx bench sp`.

    It is both kinds of layer's ops provider: a Mamba layer's `conv` and `scan` (state passing), an
    attention layer's `conv`, `positions`, `documents` and `context` (attention.py's interface).

    Under torch.compile (train.compile) the collectives run eagerly: `keep_collectives_eager`.
    """

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.bytes_sent = 0
        self.seq_halo: Optional[torch.Tensor] = None    # seq_idx of the rows before this segment

    # -- collectives ------------------------------------------------------------------------------
    def all_gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t, group=self.group)
        self.bytes_sent += t.numel() * t.element_size()
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        self.bytes_sent += t.numel() * t.element_size()
        return t

    def reduce_scatter(self, slots: torch.Tensor) -> torch.Tensor:
        """slots (size, ...): slot i is this rank's part of rank i's result; returns the group's sum of this
        rank's slot (the backward of an all-gather). NCCL runs a true reduce-scatter; gloo (torch >= 2.8) one
        all-reduce per slot, so on CPU it moves no fewer bytes than the all-reduce of every slot did."""
        out = torch.empty_like(slots[0])
        dist.reduce_scatter(out, list(slots.contiguous().unbind(0)), group=self.group)
        self.bytes_sent += out.numel() * out.element_size()
        return out

    # -- per batch ------------------------------------------------------------------------------
    def begin(self, seq_idx: Optional[torch.Tensor], width: int) -> None:
        """Called once per forward: gathers the document ids of the `width` positions before this
        segment (every layer's conv and window halos read them; attention layers all of them,
        width ALL_EARLIER_ROWS)."""
        self.seq_halo = None if seq_idx is None else halo(seq_idx[..., None], width, self)[..., 0]

    def _halo_docs(self, seq_idx, k):
        return None if seq_idx is None else torch.cat([self.seq_halo[:, self.seq_halo.shape[1] - k:], seq_idx], 1)

    # -- the mixer's two sequence-wide operations --------------------------------------------------
    def conv(self, xBC, weight, bias, seq_idx):
        """kernels.causal_conv1d over the whole sequence, for this segment's rows."""
        return self.conv_from(xBC, weight, bias, seq_idx, None)[0]

    def conv_from(self, xBC, weight, bias, seq_idx, tail):
        """`conv` with a carried tail entering the sequence (on the first rank); (this segment's rows, the
        sequence's last d_conv-1 input rows: meaningful on the last rank)."""
        K = weight.shape[-1]
        before = halo(xBC, K - 1, self)
        docs = self._halo_docs(seq_idx, before.shape[1])
        if self.rank == 0 and tail is not None:      # the empty halo stays in the graph: its backward is collective
            before = torch.cat([tail.to(xBC.dtype), before], 1)
            docs = None if seq_idx is None else torch.cat([seq_idx[:, :1].expand(-1, K - 1), seq_idx], 1)
        k = before.shape[1]
        out, last = kernels.causal_conv1d(torch.cat([before, xBC], 1), weight, bias, seq_idx=docs)
        return out[:, k:], last

    def scan(self, x, dt, A, B, C, z, seq_idx, arguments: SSDArguments):
        """kernels.ssd over the whole sequence (zero initial state), for this segment's positions."""
        kw = arguments(0)
        if kw.get("window"):
            if kw.get("state_norm") is not None:
                raise ValueError(STATE_NORM_UNSUPPORTED)
            return self._windowed_scan(x, dt, A, B, C, z, seq_idx, kw)
        return self.scan_from(x, dt, A, B, C, z, seq_idx, arguments, None)[0]

    def scan_from(self, x, dt, A, B, C, z, seq_idx, arguments: SSDArguments, state):
        """`scan` with `state` entering the sequence (on the first rank; None: zeros); (this segment's
        outputs, the state at the segment's end: the sequence's final state on the last rank)."""
        kw = arguments(0)
        if kw.get("state_norm") is not None:
            raise ValueError(STATE_NORM_UNSUPPORTED)
        if kw.get("window"):
            raise ValueError("a carried state under a sliding window is not supported (the window never reads it)")
        y, local = kernels.ssd(x, dt, A, B, C, z=z, seq_idx=seq_idx, return_final_states=True,
                               initial_states=state if self.rank == 0 else None, **kw)
        cdt = compute_dtype(x)
        _, log_a = log_decays(dt, A, kw.get("dt_bias"), kw.get("dt_softplus", False), kw.get("dt_limit"),
                              kw.get("decay_scale"), cdt)
        carry = torch.exp(torch.cumsum(log_a, dim=1))                       # (b,l,h): a_0 ... a_t
        if seq_idx is not None:                                             # nothing crosses a document start
            prev = self.seq_halo[:, -1:] if self.rank > 0 else seq_idx[:, :1]
            same = document_ids(torch.cat([prev, seq_idx], 1))[:, 1:] == 0
            carry = carry * same[..., None].to(cdt)
        incoming = StatePass.apply(carry[:, -1], local.to(cdt), self)
        correction = torch.einsum("blhn,bhpn,blh->blhp", heads_of_groups(C.to(cdt), x.shape[2]), incoming, carry)
        if z is not None:
            correction = correction * F.silu(z.to(cdt))
        final = carry[:, -1][..., None, None] * incoming + local.to(cdt)
        return (y.to(cdt) + correction).to(y.dtype), final

    # -- an attention layer's (model/attention.py): its queries read this and every earlier rank's keys -------
    def positions(self, length: int, device) -> torch.Tensor:
        """Global positions of this segment's `length` tokens: the ranks' segments are equally long (the
        all-gathers need equal shapes; data.stream.rank_share cuts them so)."""
        return torch.arange(self.rank * length, (self.rank + 1) * length, device=device)

    def documents(self, seq_idx, batch: int, length: int, device) -> Optional[torch.Tensor]:
        """Document ids of this segment's tokens, numbered from the sequence's start (`document_ids` over the
        earlier ranks' seq_idx and this one's): the same on every rank for the same document."""
        if seq_idx is None:
            return None
        if self.seq_halo is None or self.seq_halo.shape[1] != self.rank * length:
            raise RuntimeError("an attention layer under sequence parallelism needs every earlier rank's seq_idx: "
                               "begin(seq_idx, ALL_EARLIER_ROWS) first (Mamba2LM.halo_width)")
        return document_ids(torch.cat([self.seq_halo, seq_idx], 1))[:, -length:]

    def context(self, k, v, positions, docs):
        """This segment's keys and values (b, l, hkv, d), rotated at `positions`, and documents -> the keys,
        values, positions and documents of the sequence up to this segment's end, for its queries to read.

        The keys and values of the earlier ranks are all-gathered as one halo of every row before the segment
        (`_Halo`: its backward reduce-scatters the gradient of each gathered row back to the rank that owns it,
        summed over the later ranks that read it). Under GQA the key/value heads go, not the query heads."""
        kv_heads, d = k.shape[2:]
        own = torch.cat([k.flatten(2), v.flatten(2)], -1)
        kv = torch.cat([halo(own, ALL_EARLIER_ROWS, self), own], 1)
        keys, values = (t.unflatten(-1, (kv_heads, d)) for t in kv.split(kv_heads * d, dim=-1))
        if self.rank == 0:            # no earlier keys: the same positions tensor lets `attend` skip the mask
            return keys, values, positions, docs
        key_positions = torch.arange(kv.shape[1], device=k.device)
        return keys, values, key_positions, None if docs is None else torch.cat([document_ids(self.seq_halo), docs], 1)

    def broadcast_from_last(self, t: torch.Tensor) -> torch.Tensor:
        """t as the group's last rank holds it, on every rank of the group."""
        dist.broadcast(t, src=dist.get_global_rank(self.group, self.size - 1), group=self.group)
        self.bytes_sent += t.numel() * t.element_size()
        return t

    @staticmethod
    def keep_collectives_eager() -> None:
        """Run the collectives outside torch.compile's tracing (train.compile: Mamba2LM calls it once its blocks
        are compiled and this is its sequence parallelism). Traced, their byte counter's new value at every call
        failed dynamo's guards, so each step recompiled until dynamo's limit sent the blocks back to eager. Not
        applied at import: torch.compiler.disable imports dynamo, seconds of every process's start-up."""
        for name in ("all_gather", "all_reduce", "reduce_scatter", "broadcast_from_last"):
            method = getattr(SequenceParallel, name)
            if not getattr(method, "runs_eagerly", False):
                eager = torch.compiler.disable(method)
                eager.runs_eagerly = True
                setattr(SequenceParallel, name, eager)

    def _windowed_scan(self, x, dt, A, B, C, z, seq_idx, kw):
        """Under a window of r tokens an output reads only the last r inputs: scan the r-1 inputs
        before the segment (from earlier ranks) and the segment, and keep the segment's outputs.
        No state is passed (the window never reads what is older)."""
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        inputs = torch.cat([x.flatten(2), B.flatten(2), dt], -1)
        before = halo(inputs, int(kw["window"]) - 1, self)
        k = before.shape[1]
        hx, hB, hdt = torch.split(before, [h * p, g * n, h], dim=-1)
        xs = torch.cat([hx.view(b, k, h, p), x], 1)
        Bs = torch.cat([hB.view(b, k, g, n), B], 1)
        Cs = torch.cat([C.new_zeros(b, k, g, n), C], 1)                     # halo outputs are discarded
        zs = None if z is None else torch.cat([z.new_zeros(b, k, h, p), z], 1)
        y = kernels.ssd(xs, torch.cat([hdt, dt], 1), A, Bs, Cs, z=zs, seq_idx=self._halo_docs(seq_idx, k), **kw)
        return y[:, k:]


def halo(t: torch.Tensor, width: int, sp: SequenceParallel) -> torch.Tensor:
    """The `width` rows (fewer near the sequence start) that precede this rank's segment of t (b,L,f)."""
    return _Halo.apply(t, width, sp)


class _Halo(torch.autograd.Function):
    """Forward: all-gather every rank's last min(width, L) rows, keep those just before this
    segment (several ranks' worth when width > L; every earlier rank's rows for an attention
    layer's keys and values). Backward: each rank places its halo gradient in the slots of
    the ranks it came from, and a reduce-scatter hands each rank the sum of its slot."""

    @staticmethod
    def forward(ctx, t, width, sp):
        b, L, f = t.shape
        m = min(width, L)
        tails = sp.all_gather(t[:, L - m:])
        before = torch.cat(tails[:sp.rank], 1) if sp.rank else t.new_empty(b, 0, f)
        keep = min(width, before.shape[1])
        ctx.sp, ctx.shape, ctx.m, ctx.keep = sp, t.shape, m, keep
        # `before` is new memory; a slice of it is copied, so the output does not hold every gathered row. Whole (an
        # attention layer's keys) it is returned as it is: a copy would cost the size of the sequence before it.
        return before if keep == before.shape[1] else before[:, before.shape[1] - keep:].clone()

    @staticmethod
    def backward(ctx, grad):
        sp, (b, L, f), m, keep = ctx.sp, ctx.shape, ctx.m, ctx.keep
        slots = grad.new_zeros(sp.size, b, m, f)
        if keep:
            flat = grad.new_zeros(b, sp.rank * m, f)
            flat[:, flat.shape[1] - keep:] = grad
            slots[:sp.rank] = flat.view(b, sp.rank, m, f).transpose(0, 1)
        out = grad.new_zeros(b, L, f)
        out[:, L - m:] = sp.reduce_scatter(slots)
        return out, None, None


class StatePass(torch.autograd.Function):
    """(a_seg (b,h), S_local (b,h,p,n)) of this rank -> S_in, the state entering its segment:
    S_in_r = sum_{k<r} (a_{k+1} ... a_{r-1}) S_local_k.

    Backward: with G_r the gradient reaching S_out_r from later ranks,
    G_r = dS_in_{r+1} + a_{r+1} G_{r+1} (G_{R-1} = 0); dS_local_r = G_r, da_r = <G_r, S_in_r>."""

    @staticmethod
    def forward(ctx, a_seg, local, sp):
        b, h = a_seg.shape
        gathered = sp.all_gather(torch.cat([a_seg.reshape(b, h), local.reshape(b, -1)], 1))
        a_all = torch.stack([t[:, :h] for t in gathered])                   # (R,b,h)
        incoming = torch.zeros_like(local)
        for k in range(sp.rank):
            incoming = a_all[k][..., None, None] * incoming + gathered[k][:, h:].view_as(local)
        ctx.sp = sp
        ctx.save_for_backward(a_all, incoming)
        return incoming

    @staticmethod
    def backward(ctx, d_incoming):
        sp = ctx.sp
        a_all, incoming = ctx.saved_tensors
        d_all = sp.all_gather(d_incoming)
        g = torch.zeros_like(incoming)
        for i in range(sp.size - 2, sp.rank - 1, -1):
            g = d_all[i + 1] + a_all[i + 1][..., None, None] * g
        return (g * incoming).sum((-2, -1)), g, None


# ----------------------------------------------------------------------------- groups

class Groups:
    """Sequence-parallel groups per SP degree, built once and reused across stages.

    Ranks dp*R .. dp*R+R-1 form SP group dp (the layout `longctx.data.stream.rank_share` slices by).
    Every rank must create every group, in the same order (torch.distributed.new_group)."""

    def __init__(self, world: int, rank: int):
        self.world, self.rank = world, rank
        self._by_degree: Dict[int, Optional[SequenceParallel]] = {}

    def get(self, degree: int) -> Optional[SequenceParallel]:
        """None for degree 1 (no sequence parallelism)."""
        if degree == 1:
            return None
        if self.world % degree:
            raise ValueError(f"world size {self.world} is not divisible by seq_parallel {degree}")
        if degree not in self._by_degree:
            groups = [dist.new_group(list(range(d * degree, (d + 1) * degree))) for d in range(self.world // degree)]
            self._by_degree[degree] = SequenceParallel(groups[self.rank // degree], self.rank % degree, degree)
        return self._by_degree[degree]
