"""Per-layer mitigation values as the model consumes them, their file beside a saved model,
and the calibration of state-norm thresholds on a prompt.

The YAML schema these come from lives in `longctx.pipeline.mitigations`; the model needs
only what is here (no omegaconf)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import torch

MITIGATIONS_FILE = "longctx_mitigations.json"

STATE_NORM_UNSUPPORTED = ("mitigations.state_norm is not supported with seq_parallel > 1: the rescaling depends on "
                          "the norm of the whole state, so the segments cannot be scanned in parallel. Train stages "
                          "with state norm at seq_parallel: 1, or use decay_scale / input_scale / window")


@dataclass
class LayerMitigations:
    """What one layer's scan receives; None / 0 means off."""

    decay_scale: Optional[List[float]] = None      # one per head
    input_scale: Optional[List[float]] = None
    a_scale: Optional[List[float]] = None          # A x this (per head): in every path, decoding included
    state_norm_every: int = 0
    state_norm_threshold: Optional[List[float]] = None
    window: int = 0

    @property
    def active(self) -> bool:
        return bool(self.decay_scale or self.input_scale or self.a_scale or self.state_norm_every or self.window)


@torch.no_grad()
def calibrate_state_norm(model, prompt_ids: torch.Tensor, multiplier: float = 1.0,
                         every: Optional[int] = None, chunk_len: int = 4096) -> torch.Tensor:
    """Thresholds (n_layer, nheads) = multiplier x ||h||_F at the end of `prompt_ids` (a prompt of
    the training length), averaged over its batch rows; NaN in an attention layer's row (it has no state).
    Measured with state norm off and the other mitigations on; installed on the model's Mamba layers (and
    saved with it) when `every` is given."""
    layers = model.mitigations
    if layers is not None:
        # a layer without mitigations is None in the list: every attention layer, for one
        model.set_mitigations([LayerMitigations(**{**asdict(m or LayerMitigations()), "state_norm_every": 0,
                                                    "state_norm_threshold": None}) for m in layers])
    try:
        cache = model.init_cache(prompt_ids.shape[0])
        model.prefill(prompt_ids, cache, chunk_len=chunk_len)
    finally:
        model.set_mitigations(layers)
    attention, nheads = model.config.attention_layers, model.config.nheads
    norms = torch.stack([torch.full((nheads,), math.nan, device=prompt_ids.device) if i in attention else
                         lc.ssm.float().square().sum((-2, -1)).sqrt().mean(0) for i, lc in enumerate(cache.layers)])
    thresholds = multiplier * norms.clamp_min(1e-6)
    if every:
        base = layers or [LayerMitigations() for _ in range(len(cache.layers))]
        model.set_mitigations([m if i in attention else
                               LayerMitigations(**{**asdict(m or LayerMitigations()), "state_norm_every": int(every),
                                                   "state_norm_threshold": thresholds[i].tolist()})
                               for i, m in enumerate(base)])
    return thresholds


def save_layers(layers: Optional[List[LayerMitigations]], directory) -> None:
    path = Path(directory) / MITIGATIONS_FILE
    if layers is None or not any(m is not None and m.active for m in layers):
        if path.exists():
            path.unlink()
        return
    # a layer without mitigations (None: an attention layer, or one whose values are all neutral) is written empty
    path.write_text(json.dumps({"layers": [asdict(m or LayerMitigations()) for m in layers]}, indent=1))


def load_layers(directory) -> Optional[List[LayerMitigations]]:
    path = Path(directory) / MITIGATIONS_FILE
    if not path.exists():
        return None
    try:
        return [LayerMitigations(**m) for m in json.loads(path.read_text())["layers"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a longctx mitigations file ({e})") from None
