"""Attention layers as mamba_ssm defines them (`mamba_ssm.modules.mha.MHA`, the mixer of the layers its
`attn_layer_idx` names), so hybrid and transformer checkpoints load with the same state-dict keys:
`in_proj` (q, k, v and an optional gated-MLP branch), an optional causal depthwise `conv1d` over q, k, v (no
activation), rotary embedding on the first `rotary_emb_dim` channels of each query and key head, softmax
attention, `out_proj` over [attention output, MLP branch].

The attention itself is one function, `attend`: queries against keys and values with explicit positions and
document ids. Where those come from is the mixer's ops provider (`self.ops`, or the decoding cache), as the conv
and the scan are a Mamba layer's (`ops.py`), so the mixer has one path. A provider has, besides `conv`:

- `positions(length, device)`: the sequence positions of this call's tokens (RoPE and the causal mask);
- `documents(seq_idx, batch, length, device)`: their document ids (None: one document), numbered so that ids
  compare equal across everything the call attends to;
- `context(k, v, positions, documents)`: the keys, values, positions and documents its queries read.

`WholeSequences` (here) reads the call's own tokens; `inference.AttentionCache` adds those read before
(decoding); `longctx.pipeline.parallel.SequenceParallel` (the sequence split over ranks) gives global positions
and documents and gathers the keys and values of this rank and every earlier rank of its group. Queries and keys
are rotated at their positions before any gathering, so gathered keys need nothing more.

Packed documents: with `seq_idx` a query reads only keys of its own document (a block-diagonal causal mask).
Positions are the sequence's, not restarted per document: RoPE's scores depend only on the distance between a
query and a key, so each document attends exactly as it would alone.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx.kernels.common import document_ids

from .config import Mamba2Config
from .inference import AttentionCache
from .ops import LocalOps

# A halo width (`Mamba2LM.halo_width`): every row before a segment. An attention layer under sequence parallelism
# reads the keys of every earlier rank, and with them their document ids.
ALL_EARLIER_ROWS = sys.maxsize

# Scores (batch x heads x queries x keys) per scaled_dot_product_attention call where a mask is built: the mask,
# and on CPU the scores too, are materialized, so long prompts are attended in blocks of queries (2^27 fp32
# scores are 512 MiB).
SCORES_PER_CALL = 1 << 27


def rotary(x: torch.Tensor, positions: torch.Tensor, dim: int, base: float, interleaved: bool,
           scaling: float = 1.0) -> torch.Tensor:
    """RoPE on the first `dim` channels of each head of x (b, l, h, d) at `positions` (l,), as flash_attn's
    RotaryEmbedding (mamba_ssm's): frequencies base^(-2i/dim); channel pairs (i, i + dim/2) (interleaved: (2i,
    2i+1)) rotated by position x frequency. The angles are computed in fp32 (fp64 for fp64 inputs) and their
    cos / sin cast to x's dtype: positions of long sequences do not fit a bf16. `scaling` > 1 is position
    interpolation (Chen et al. 2023, arXiv 2306.15595): positions divided by it, so a longer sequence's angles stay
    within those trained; 1 is RoPE itself (a division by 1 is exact)."""
    if dim == 0:
        return x
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=x.device, dtype=compute) / dim)
    angles = (positions.to(compute) / scaling)[:, None] * inv_freq             # (l, dim/2)
    cos, sin = angles.cos().to(x.dtype)[:, None], angles.sin().to(x.dtype)[:, None]    # (l, 1, dim/2)
    rot, rest = x[..., :dim], x[..., dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    else:
        a, b = rot.chunk(2, dim=-1)
        rotated = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return torch.cat([rotated, rest], dim=-1)


def visible(q_pos, k_pos, q_doc=None, k_doc=None, causal: bool = True) -> torch.Tensor:
    """(b or 1, 1, lq, lk) bool: which keys each query reads (its own document's, at or before its position)."""
    allowed = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
    if causal:
        allowed = k_pos[None, :] <= q_pos[:, None]
    allowed = allowed[None]
    if q_doc is not None:
        allowed = allowed & (q_doc[:, :, None] == k_doc[:, None, :])
    return allowed[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
           q_doc: Optional[torch.Tensor] = None, k_doc: Optional[torch.Tensor] = None, *,
           scale: Optional[float] = None, causal: bool = True) -> torch.Tensor:
    """Softmax attention of queries q (b, lq, h, d) over keys and values k, v (b, lk, hkv, d) -> (b, lq, h, d).

    q_pos (lq,) and k_pos (lk,) are positions in the sequence (the same for every batch row), q_doc (b, lq) and
    k_doc (b, lk) document ids (None: one document). Query i reads key j iff k_pos[j] <= q_pos[i] (when causal)
    and q_doc[i] == k_doc[j]. hkv divides h: key/value head j serves query heads j*h/hkv .. (j+1)*h/hkv - 1
    (grouped-query attention, by repeating them, as mamba_ssm). `scale`: None is 1/sqrt(d).
    Passing the same tensor as q_pos and k_pos without documents (a whole sequence) takes the plain causal
    kernel, which builds no mask."""
    b, lq, h, _ = q.shape
    if k.shape[2] != h:
        k, v = k.repeat_interleave(h // k.shape[2], dim=2), v.repeat_interleave(h // v.shape[2], dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)         # (b, heads, l, d)
    if q_doc is None and (not causal or q_pos is k_pos):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).transpose(1, 2)
    rows = max(1, SCORES_PER_CALL // max(1, b * h * k.shape[2]))
    out = [F.scaled_dot_product_attention(
        q[:, :, s:s + rows], k, v, scale=scale,
        attn_mask=visible(q_pos[s:s + rows], k_pos, None if q_doc is None else q_doc[:, s:s + rows], k_doc, causal))
        for s in range(0, lq, rows)]
    return torch.cat(out, dim=2).transpose(1, 2)


class WholeSequences(LocalOps):
    """An attention layer's ops over whole sequences in this process: the conv is LocalOps', positions count from
    the call's first token, documents are the call's `seq_idx` runs, and the queries read the call's own keys."""

    def positions(self, length: int, device) -> torch.Tensor:
        return torch.arange(length, device=device)

    def documents(self, seq_idx, batch: int, length: int, device) -> Optional[torch.Tensor]:
        return document_ids(seq_idx)

    def context(self, k, v, positions, docs):
        # the same positions tensor for queries and keys: `attend`'s plain causal kernel, without a mask
        return k, v, positions, docs


WHOLE_SEQUENCES = WholeSequences()


class AttentionMixer(nn.Module):
    """mamba_ssm's MHA in a hybrid's (or a transformer's) block; `model.attn_cfg` gives its hyperparameters.

    Mitigations and carried state are the Mamba layers' (Mamba2LM refuses them here): `mitigation` and `carry`
    stay None so the model's per-layer lists keep one entry per layer. Sequence parallelism swaps `ops`."""

    local_ops = WHOLE_SEQUENCES       # what set_sequence_parallel(None) puts back

    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        a = config.attn_cfg
        self.layer_idx = layer_idx
        self.num_heads, self.kv_heads, self.head_dim = a.num_heads, a.kv_heads(), a.dim(config.d_model)
        self.rotary_dim, self.rotary_base, self.interleaved = a.rotary_emb_dim, a.rotary_emb_base, \
            a.rotary_emb_interleaved
        self.rotary_scaling = a.rotary_scaling
        self.causal, self.softmax_scale = a.causal, a.softmax_scale
        self.qkv_dim = self.head_dim * (self.num_heads + 2 * self.kv_heads)
        self.mlp_dim = a.mlp_width()
        self.d_conv = a.d_conv
        self.in_proj = nn.Linear(config.d_model, self.qkv_dim + self.mlp_dim, bias=a.qkv_proj_bias)
        if self.d_conv > 0:
            self.conv1d = nn.Conv1d(self.qkv_dim, self.qkv_dim, kernel_size=self.d_conv, groups=self.qkv_dim,
                                    padding=self.d_conv - 1)
        self.out_proj = nn.Linear(self.head_dim * self.num_heads + self.mlp_dim // 2, config.d_model,
                                  bias=a.out_proj_bias)
        self.mitigation = None
        self.carry = None
        self.ops = self.local_ops

    def _rotate(self, x, positions):
        return rotary(x, positions, self.rotary_dim, self.rotary_base, self.interleaved, self.rotary_scaling)

    def forward(self, u, seq_idx=None, cache: Optional[AttentionCache] = None):
        """u (b, l, d_model). With `cache`, attends to every token it holds too and appends this call's."""
        b, l, _ = u.shape
        ops = self.ops if cache is None else cache      # whole sequences (here or split over ranks), or decoding
        qkv, mlp = self.in_proj(u).split([self.qkv_dim, self.mlp_dim], dim=-1)
        if self.d_conv > 0:
            qkv = ops.conv(qkv, self.conv1d.weight, self.conv1d.bias, seq_idx)
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))
        positions, docs = ops.positions(l, u.device), ops.documents(seq_idx, b, l, u.device)
        q, k = self._rotate(q, positions), self._rotate(k, positions)
        keys, values, key_positions, key_docs = ops.context(k, v, positions, docs)
        out = attend(q, keys, values, positions, key_positions, docs, key_docs, scale=self.softmax_scale,
                     causal=self.causal)
        out = out.flatten(-2)
        if self.mlp_dim > 0:
            up, gate = mlp.chunk(2, dim=-1)
            out = torch.cat([out, up * F.silu(gate)], dim=-1)
        return self.out_proj(out)

    def init_cache(self, batch: int, device=None, dtype=None) -> AttentionCache:
        w = self.in_proj.weight
        return AttentionCache.empty(batch, self.kv_heads, self.head_dim,
                                    conv=(self.d_conv, self.qkv_dim) if self.d_conv > 0 else None,
                                    device=device or w.device, dtype=dtype or w.dtype)


def with_rotary_scaling(model: nn.Module, scale: float) -> nn.Module:
    """A copy of `model` whose attention layers read RoPE positions divided by `scale` (position interpolation,
    here without the fine-tuning it is usually followed by), its config saying so: an evaluation variant of a
    model trained at scale 1. Refused for a model without attention layers or without RoPE."""
    import copy
    import dataclasses
    mixers = [m for m in model.modules() if isinstance(m, AttentionMixer)]
    if not mixers:
        raise ValueError("rotary_scaling interpolates the positions of attention layers; this model has none")
    if mixers[0].rotary_dim == 0:
        raise ValueError("rotary_scaling interpolates RoPE's positions; this model's attention layers have no RoPE "
                         "(attn_cfg.rotary_emb_dim is 0)")
    if not scale > 0:
        raise ValueError(f"rotary_scaling must be positive, got {scale}")
    scaled = copy.deepcopy(model)
    for m in scaled.modules():
        if isinstance(m, AttentionMixer):
            m.rotary_scaling = scale
    scaled.config.attn_cfg = dataclasses.replace(scaled.config.attn_cfg, rotary_scaling=scale)
    return scaled
