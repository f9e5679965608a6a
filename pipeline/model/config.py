"""The architecture's hyperparameters, named as mamba_ssm names them so published configs load."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional, Tuple


@dataclass
class AttnConfig:
    """The attention layers' hyperparameters: mamba_ssm's `attn_cfg`, the arguments of its MHA, by their names.
    mamba_ssm's own defaults, except `causal` (mamba_ssm: false, which no language model can train with)."""

    num_heads: int = 0                   # query heads (required when model.attn_layer_idx is set)
    num_heads_kv: Optional[int] = None   # key/value heads, dividing num_heads (GQA; 1: MQA); null: num_heads
    head_dim: Optional[int] = None       # channels per head; null: d_model / num_heads
    rotary_emb_dim: int = 0              # leading channels of each head that RoPE rotates (even); 0: no RoPE
    rotary_emb_base: float = 10000.0     # RoPE's base (frequencies base^(-2i/rotary_emb_dim))
    rotary_emb_interleaved: bool = False  # rotate channel pairs (0,1),(2,3).. (GPT-J); false: halves (GPT-NeoX)
    # RoPE position interpolation: positions divided by this (> 1 stretches the trained lengths' angles over longer
    # sequences). Not a mamba_ssm key: a mamba_ssm config.json carries it only when it is not 1
    rotary_scaling: float = 1.0
    causal: bool = True                  # must be true (decoding and training are causal)
    qkv_proj_bias: bool = True           # a bias on in_proj (q, k, v and the MLP branch)
    out_proj_bias: bool = True           # a bias on out_proj
    softmax_scale: Optional[float] = None   # null: 1 / sqrt(head_dim)
    mlp_dim: int = 0                     # > 0: a gated MLP branch inside the layer (rounded up to a multiple of 256)
    d_conv: int = 0                      # > 0: a causal depthwise conv of this width over q, k, v (no activation)

    def kv_heads(self) -> int:
        return self.num_heads if self.num_heads_kv is None else self.num_heads_kv

    def dim(self, d_model: int) -> int:
        """Channels per head."""
        return self.head_dim if self.head_dim is not None else d_model // max(1, self.num_heads)

    def mlp_width(self) -> int:
        """in_proj's MLP columns (up and gate), as mamba_ssm rounds them."""
        return math.ceil(self.mlp_dim / 256) * 256

    def validate(self, d_model: int) -> None:
        where = "model: attn_cfg"
        if self.num_heads < 1:
            raise ValueError(f"{where}.num_heads must be >= 1 when model.attn_layer_idx names attention layers "
                             f"(got {self.num_heads})")
        if self.kv_heads() < 1 or self.num_heads % self.kv_heads():
            raise ValueError(f"{where}.num_heads_kv ({self.kv_heads()}) must divide num_heads ({self.num_heads})")
        if self.head_dim is None and d_model % self.num_heads:
            raise ValueError(f"{where}.head_dim is null, so d_model ({d_model}) must be a multiple of num_heads "
                             f"({self.num_heads}); or give head_dim")
        head_dim = self.dim(d_model)
        if head_dim < 1:
            raise ValueError(f"{where}.head_dim must be >= 1, got {head_dim}")
        if self.rotary_emb_dim < 0 or self.rotary_emb_dim % 2 or self.rotary_emb_dim > head_dim:
            raise ValueError(f"{where}.rotary_emb_dim ({self.rotary_emb_dim}) must be even and in [0, head_dim "
                             f"= {head_dim}]: RoPE rotates channel pairs of each head")
        if self.rotary_emb_base <= 0:
            raise ValueError(f"{where}.rotary_emb_base must be positive, got {self.rotary_emb_base}")
        if not self.rotary_scaling > 0:
            raise ValueError(f"{where}.rotary_scaling must be positive, got {self.rotary_scaling}")
        if self.rotary_scaling != 1 and self.rotary_emb_dim == 0:
            raise ValueError(f"{where}.rotary_scaling ({self.rotary_scaling}) interpolates RoPE's positions, but "
                             "rotary_emb_dim is 0 (no RoPE): set rotary_emb_dim or leave rotary_scaling at 1")
        if not self.causal:
            raise ValueError(f"{where}.causal is false (mamba_ssm's default when attn_cfg has no `causal`): a "
                             "language model's attention must not read later tokens; set causal: true")
        if self.mlp_dim < 0 or self.d_conv < 0:
            raise ValueError(f"{where}: mlp_dim and d_conv must be >= 0, got {self.mlp_dim} and {self.d_conv}")
        if self.softmax_scale is not None and self.softmax_scale <= 0:
            raise ValueError(f"{where}.softmax_scale must be positive or null, got {self.softmax_scale}")


@dataclass
class Mamba2Config:
    """Architecture. Field names are mamba_ssm's (MambaConfig + Mamba2 ssm_cfg, flattened)."""

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_intermediate: int = 0          # > 0: a gated MLP after each mixer (own norm2)
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    d_ssm: Optional[int] = None      # None: d_inner; smaller leaves an MLP branch inside the mixer
    ngroups: int = 1
    chunk_size: int = 256
    A_init_range: Tuple[float, float] = (1.0, 16.0)
    D_has_hdim: bool = False
    rmsnorm: bool = True             # gated RMSNorm on the mixer output; False gates inside the scan
    norm_before_gate: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: Tuple[float, float] = (0.0, math.inf)
    bias: bool = False
    conv_bias: bool = True
    rms_norm: bool = True            # block norms: RMSNorm (True) or LayerNorm
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    # layers (0-based) whose mixer is attention (mamba_ssm's MHA) instead of Mamba-2; every layer, with d_intermediate
    # > 0: a transformer. Mitigations and carried state are the Mamba layers' (ARCHITECTURE §4)
    attn_layer_idx: List[int] = field(default_factory=list)
    attn_cfg: AttnConfig = field(default_factory=AttnConfig)   # the attention layers (mamba_ssm's attn_cfg)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def ssm_dim(self) -> int:
        return self.d_inner if self.d_ssm is None else self.d_ssm

    @property
    def nheads(self) -> int:
        return self.ssm_dim // self.headdim

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_size_multiple)
        return (self.vocab_size + m - 1) // m * m

    @property
    def attention_layers(self) -> FrozenSet[int]:
        return frozenset(self.attn_layer_idx)

    @classmethod
    def from_dict(cls, d: dict) -> "Mamba2Config":
        """The config as `dataclasses.asdict` wrote it to JSON (a training checkpoint's model_config.json):
        tuples come back from lists, attn_cfg from its dict; keys written before attention existed default."""
        kw = dict(d)
        for name in ("A_init_range", "dt_limit"):
            if name in kw:
                kw[name] = tuple(kw[name])
        if "attn_cfg" in kw:
            kw["attn_cfg"] = AttnConfig(**kw["attn_cfg"])
        return cls(**kw)

    def validate(self) -> "Mamba2Config":
        bad = [i for i in self.attn_layer_idx if not 0 <= i < self.n_layer]
        if bad or len(set(self.attn_layer_idx)) != len(self.attn_layer_idx):
            raise ValueError(f"model: attn_layer_idx {list(self.attn_layer_idx)} must name distinct layers in "
                             f"[0, n_layer = {self.n_layer})")
        if self.attn_layer_idx:
            self.attn_cfg.validate(self.d_model)
        if len(self.attn_layer_idx) == self.n_layer:
            return self                         # a transformer: the Mamba fields describe no layer
        if self.ssm_dim % self.headdim:
            raise ValueError(f"model: d_ssm ({self.ssm_dim}) must be a multiple of headdim ({self.headdim})")
        if self.nheads % self.ngroups:
            raise ValueError(f"model: nheads ({self.nheads}) must be a multiple of ngroups ({self.ngroups})")
        if self.ssm_dim > self.d_inner:
            raise ValueError(f"model: d_ssm ({self.ssm_dim}) cannot exceed expand * d_model ({self.d_inner})")
        if self.norm_before_gate:
            raise ValueError("model: norm_before_gate=True is not Mamba-2's layout (mamba_ssm uses False)")
        return self
