"""The intra-chunk term of the chunked scan, with a hand-written backward.

    y_t = sum_{s <= t, same chunk, mask} (C_t . B_s) 2^(cum_t - cum_s) xu_s

Autograd through the plain expression keeps and walks every (Q x Q) intermediate (the
difference, the mask, the power, two products) and spends about a dozen passes over
(b, h, c, Q, Q) tensors per call; on CPU at small model sizes those passes are most of
the scan's time. The gradient needs only two of them:

    dscores = dy . xu^T          dxu = scores^T . dy
    dCB     = dscores * decay    (summed over the heads of a group)
    dseg    = dscores * scores * ln 2,   dcum_t = sum_s dseg_ts - sum_s dseg_st

Masked pairs have decay 0, hence no gradient, with no mask in the backward.
Checked against the plain expression (and the step-by-step reference) in float64 by
tests/test_ssd.py.
"""
from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def _decay(cum, mask):
    """2^(cum_t - cum_s) where mask, else 0: (b,c,h,Q_t,Q_s)."""
    seg = cum[..., :, None] - cum[..., None, :]
    return torch.exp2(seg.masked_fill_(~mask, -math.inf))


def _grouped(t: torch.Tensor, g: int) -> torch.Tensor:
    """(b,c,h,Q,Q) -> (b,c,g,h/g,Q,Q): the heads of each group together."""
    b, c, h = t.shape[:3]
    return t.view(b, c, g, h // g, *t.shape[3:])


def group_scores(Cc, Bc, decay):
    """(b,c,h,Q_t,Q_s): C_t.B_s times each head's decay (b,c,h,Q_t,Q_s). The heads of a group share B and C,
    so their product is computed once per group (b,c,g,Q,Q), not once per head. Chunks before heads: the
    products with x (b,c,Q,h,p) then batch over (b,c,h) without copying the Q x Q blocks."""
    CB = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc)
    return (CB[:, :, :, None] * _grouped(decay, Bc.shape[-2])).flatten(2, 3)


class IntraChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Cc, Bc, cum, xu, mask):
        decay = _decay(cum, mask)                                          # (b,c,h,Q,Q)
        scores = group_scores(Cc, Bc, decay)
        ctx.save_for_backward(Cc, Bc, xu, decay, scores)
        return torch.einsum("bchts,bcshp->bcthp", scores, xu)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        Cc, Bc, xu, decay, scores = ctx.saved_tensors
        g = Bc.shape[-2]
        dscores = torch.einsum("bcthp,bcshp->bchts", dy, xu)
        dxu = torch.einsum("bchts,bcthp->bcshp", scores, dy)
        dCB = _grouped(dscores * decay, g).sum(3)                          # (b,c,g,Q,Q)
        dC = torch.einsum("bcgts,bcsgn->bctgn", dCB, Bc)
        dB = torch.einsum("bcgts,bctgn->bcsgn", dCB, Cc)
        dseg = dscores.mul_(scores)                                        # dscores is not needed after this
        dcum = (dseg.sum(-1) - dseg.sum(-2)) * LN2                         # (b,c,h,Q)
        return dC, dB, dcum, dxu, None


def intra_chunk(Cc, Bc, cum, xu, mask):
    """(b,c,Q,h,p): C (b,c,Q,g,n), B (b,c,Q,g,n), cum (b,h,c,Q) running log2 decays, xu (b,c,Q,h,p) the
    inputs scaled by u, mask (Q,Q) or (b,1,c,Q,Q) the pairs (t, s) that interact."""
    return IntraChunk.apply(Cc, Bc, cum.transpose(1, 2), xu, chunks_first(mask))


def chunks_first(t: torch.Tensor) -> torch.Tensor:
    """A (b,h,c,...) tensor as (b,c,h,...), the layout of the Q x Q blocks here; a (Q,Q) mask as it is."""
    return t if t.dim() < 5 else t.transpose(1, 2)
