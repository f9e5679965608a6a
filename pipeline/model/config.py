"""The architecture's hyperparameters, named as mamba_ssm names them so published configs load."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple


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

    def validate(self) -> "Mamba2Config":
        if self.ssm_dim % self.headdim:
            raise ValueError(f"model: d_ssm ({self.ssm_dim}) must be a multiple of headdim ({self.headdim})")
        if self.nheads % self.ngroups:
            raise ValueError(f"model: nheads ({self.nheads}) must be a multiple of ngroups ({self.ngroups})")
        if self.ssm_dim > self.d_inner:
            raise ValueError(f"model: d_ssm ({self.ssm_dim}) cannot exceed expand * d_model ({self.d_inner})")
        if self.norm_before_gate:
            raise ValueError("model: norm_before_gate=True is not Mamba-2's layout (mamba_ssm uses False)")
        return self
