"""Carried state: a micro-batch's rows start from the (detached) final state of the rows before them.

`curriculum.stages[].carry_state` (docs/guides/research.md, "Carried state"; Buitrago Ruiz & Gu, arXiv 2507.02782):

- `batch` (State Passing): each row starts from the final state of the same row at the previous micro-step,
  which read other text: the model learns to read past a state it did not make, as it must beyond its
  training length.
- `document` (truncated BPTT): the loader keeps one document stream per row (`PackedStream.next_lane_batch`),
  so a document longer than a row continues in the same row at the next micro-step, its state carried.

A row's state is each layer's conv tail (the last d_conv-1 pre-conv rows) and SSM state; both enter the row's
first document (the conv tail continues document 0, as `kernels.causal_conv1d` does with a tail). Gradients
stop at the carried state (it is detached). Under sequence parallelism the carried state enters the first
rank of the group and the final one is taken from the last rank, which holds the sequence's end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

CARRY_MODES = ("none", "batch", "document")


@dataclass
class LayerCarry:
    """One layer's entering state (None: zeros) and, after a forward, its final state (detached)."""
    tail: Optional[torch.Tensor] = None       # (b, d_conv-1, conv_dim)
    state: Optional[torch.Tensor] = None      # (b, h, p, n) fp32
    final_tail: Optional[torch.Tensor] = None
    final_state: Optional[torch.Tensor] = None


class CarriedOps:
    """The mixer's conv and scan (`ops.py`) from the inner provider (whole sequences, or this rank's segment
    under sequence parallelism) entered with a carried state; records the final one."""

    def __init__(self, inner, carry: LayerCarry):
        self.inner, self.carry = inner, carry

    def conv(self, xBC, weight, bias, seq_idx):
        out, tail = self.inner.conv_from(xBC, weight, bias, seq_idx, self.carry.tail)
        self.carry.final_tail = tail.detach()
        return out

    def scan(self, x, dt, A, B, C, z, seq_idx, arguments):
        y, state = self.inner.scan_from(x, dt, A, B, C, z, seq_idx, arguments, self.carry.state)
        self.carry.final_state = state.detach()        # the scan's compute dtype (fp32; fp64 for fp64)
        return y


@dataclass
class CarriedStates:
    """Every layer's carried state for the rows of one micro-batch: tails (layers, b, d_conv-1, conv_dim) and
    states (layers, b, h, p, n) fp32."""
    tails: torch.Tensor
    states: torch.Tensor

    @classmethod
    def of(cls, layers: List[LayerCarry]) -> "CarriedStates":
        return cls(torch.stack([c.final_tail for c in layers]), torch.stack([c.final_state for c in layers]))

    def entering(self, rows: Optional[torch.Tensor] = None) -> List[LayerCarry]:
        """Per layer, the state entering the next micro-batch; `rows` (b,) bool: which rows take it (others
        start from zeros: a row that begins a new document under document resets)."""
        tails, states = self.tails, self.states
        if rows is not None:
            keep = rows.to(device=tails.device)
            tails = tails * keep[None, :, None, None].to(tails.dtype)
            states = states * keep[None, :, None, None, None].to(states.dtype)
        return [LayerCarry(tail=t, state=s) for t, s in zip(tails, states)]

    def from_last_rank(self, sp) -> "CarriedStates":
        """Under sequence parallelism: every rank of the group gets the last rank's (the sequence's end).
        One broadcast per micro-step (a collective costs milliseconds on gloo however small): the tails travel
        in the states' dtype, which holds them exactly (fp32 holds every bf16 / fp16 value)."""
        both = torch.cat([self.tails.reshape(-1).to(self.states.dtype), self.states.reshape(-1)])
        tails, states = sp.broadcast_from_last(both).split([self.tails.numel(), self.states.numel()])
        return CarriedStates(tails.view(self.tails.shape).to(self.tails.dtype), states.view(self.states.shape))

    def state_dict(self) -> dict:
        return {"tails": self.tails.cpu(), "states": self.states.cpu()}

    @classmethod
    def from_state_dict(cls, d: dict, device) -> "CarriedStates":
        return cls(d["tails"].to(device), d["states"].to(device))
