"""The token loss: cross-entropy over a micro-batch, whole sequences or one rank's segment of them."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from longctx.data.stream import IGNORE

from ..parallel import SequenceParallel


def sequence_loss(logits, labels, sp: Optional[SequenceParallel], ignore_index: int = IGNORE):
    """(loss to backpropagate, the sequence's mean token loss: a detached 0-dim tensor, so reading it
    is the caller's choice of host synchronisation).

    The mean is over the valid labels of the whole micro-batch (every segment of it), so it
    equals the single-process loss; the backpropagated loss is this rank's share times the
    SP degree (see the module docstring)."""
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                            reduction="sum")
    if sp is None:
        share = total / (labels != ignore_index).sum()
        return share, share.detach()
    counts = torch.stack([(labels != ignore_index).sum().to(total.dtype), total.detach()])
    sp.all_reduce(counts)
    share = total / counts[0]
    return share * sp.size, counts[1] / counts[0]


def lm_loss(logits, labels):
    """Mean token loss over the valid labels of one process's whole sequences."""
    return sequence_loss(logits, labels, None)[0]
