"""The mitigations each curriculum stage trains with: the run's section with the stage's
overrides merged in, resolved per layer once per stage (state-norm thresholds calibrated on
a prompt of the stage's length when the config gives none) and kept in the checkpoint, so a
resumed run uses the very thresholds it calibrated before."""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Dict, List, Optional

import torch

from ..config import Config
from ..mitigations import MitigationsConfig, merge_overrides, resolve
from ..model.mitigations import LayerMitigations, calibrate_state_norm

Layers = Optional[List[LayerMitigations]]


class StageMitigations:
    """`prompt(seq_len)` gives one row of held-out tokens (1, seq_len) for calibration."""

    def __init__(self, cfg: Config, module, prompt: Callable[[int], torch.Tensor]):
        self.cfg, self.module, self.prompt = cfg, module, prompt
        self.by_stage: Dict[int, Layers] = {}

    def stage_config(self, stage) -> MitigationsConfig:
        """The stage's mitigations section: the top-level one with the stage's overrides merged in."""
        return merge_overrides(self.cfg.mitigations, self.cfg.curriculum.stages[stage.index].mitigations,
                               f"curriculum.stages[{stage.index}]")

    def of(self, stage) -> Layers:
        """The stage's per-layer mitigations, resolved (and calibrated) the first time it is asked for."""
        if stage.index not in self.by_stage:
            self.by_stage[stage.index] = self.resolve(self.stage_config(stage), stage)
        return self.by_stage[stage.index]

    def resolve(self, mit: MitigationsConfig, stage) -> Layers:
        """Per-layer mitigations of a merged config, calibrating state norm on a prompt of the stage's length.
        The model must read whole sequences (no sequence parallelism) while this runs."""
        c = self.module.config
        shape = dict(n_layer=c.n_layer, nheads=c.nheads, attention=c.attn_layer_idx)
        calibrated = None
        if mit.state_norm.every and not mit.state_norm.thresholds:
            scales = type(mit)(decay_scale=mit.decay_scale, input_scale=mit.input_scale, a_scale=mit.a_scale)
            self.module.set_mitigations(resolve(scales, **shape))
            was_training = self.module.training
            self.module.eval()
            calibrated = calibrate_state_norm(self.module, self.prompt(stage.seq_len), mit.state_norm.multiplier)
            self.module.train(was_training)
        layers = resolve(mit, calibrated=calibrated, **shape)
        return layers if any(m.active for m in layers) else None

    def state_dict(self) -> dict:
        return {str(k): None if v is None else [asdict(m) for m in v] for k, v in self.by_stage.items()}

    def load_state_dict(self, state: dict) -> None:
        self.by_stage = {int(k): None if v is None else [LayerMitigations(**m) for m in v] for k, v in state.items()}
