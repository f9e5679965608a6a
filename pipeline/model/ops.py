"""The mixer's two sequence-wide operations, the causal conv and the SSD scan, over whole
sequences in one process.

Every provider of these operations has the same two methods, so the mixer has one path:
`LocalOps` (here), `longctx.pipeline.parallel.SequenceParallel` (the sequence split over
ranks) and `longctx.pipeline.model.inference.LayerCache` (decoding, continuing a state).
Providers that training with a carried state uses (`carry.py`) also have `conv_from` and
`scan_from`, which enter with a given conv tail / SSM state and return the final one. A provider
given to `Mamba2LM.set_sequence_parallel` also has `keep_collectives_eager()`, which the model calls
once its blocks are compiled (train.compile): the model never imports the provider's module.
`arguments(offset)` gives the layer's SSD keyword arguments, mitigations included, with
state-norm positions counted from `offset` tokens before the call.
"""
from __future__ import annotations

from typing import Callable, Dict

from longctx import kernels

SSDArguments = Callable[[int], Dict]


class LocalOps:
    def conv(self, xBC, weight, bias, seq_idx):
        out, _ = kernels.causal_conv1d(xBC, weight, bias, seq_idx=seq_idx)
        return out

    def scan(self, x, dt, A, B, C, z, seq_idx, arguments: SSDArguments):
        return kernels.ssd(x, dt, A, B, C, z=z, seq_idx=seq_idx, **arguments(0))

    # entered with a carried state (carry.py): (output, the final conv tail / SSM state)
    def conv_from(self, xBC, weight, bias, seq_idx, tail):
        return kernels.causal_conv1d(xBC, weight, bias, tail=tail, seq_idx=seq_idx)

    def scan_from(self, x, dt, A, B, C, z, seq_idx, arguments: SSDArguments, state):
        return kernels.ssd(x, dt, A, B, C, z=z, seq_idx=seq_idx, initial_states=state, return_final_states=True,
                           **arguments(0))


LOCAL = LocalOps()
