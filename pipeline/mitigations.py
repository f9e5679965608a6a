"""The `mitigations` config section: the paper's training-free fixes for state collapse.

The scan kernels implement them (kernels.ssd: decay_scale, input_scale, state_norm,
window); this module holds their configuration. Issue [B] wires them into the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List


@dataclass
class StateNormConfig:
    every: int = 0                 # 0: off; else normalize after every `every` tokens (multiple of chunk_size)
    multiplier: float = 1.0        # calibrated threshold = multiplier * ||h|| at the training length
    thresholds: List[Any] = field(default_factory=list)   # explicit per layer x head thresholds


@dataclass
class MitigationsConfig:
    decay_scale: Any = 1.0         # λ_α <= 1: scalar, one per layer, or per layer x head
    input_scale: Any = 1.0         # λ_B <= 1: same shapes
    state_norm: StateNormConfig = field(default_factory=StateNormConfig)
    window: int = 0                # 0: off; else sliding window of this many tokens

    def is_default(self) -> bool:
        return self == MitigationsConfig()
