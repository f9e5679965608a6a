"""A model from any directory users hand us: a training checkpoint (DeepSpeed, ZeRO 0-3) or a
mamba_ssm / Hugging Face model directory."""
from __future__ import annotations

import importlib
import json
import os
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch

from .checkpoint_layout import incomplete_reason, newest_complete
from .config import Mamba2Config
from .formats import load_tensors, load_weights, refusal
from .mamba2 import Mamba2LM
from .mitigations import LayerMitigations


def find_checkpoint(path: Path):
    """(checkpoints root, tag) when `path` is a checkpoint, a checkpoints/ root or a run dir (its newest
    complete checkpoint), else None. Checkpoints that are there but incomplete are an error, not None."""
    for root in (path, path / "checkpoints"):
        tag, skipped = newest_complete(root)
        if tag is not None:
            return root, tag
        if skipped:
            raise ValueError(f"{root}: no complete checkpoint ({'; '.join(skipped)})")
    if (path / "model_config.json").exists() and (path / "trainer_state.json").exists():
        reason = incomplete_reason(path)
        if reason is not None:
            raise ValueError(f"{path}: not a complete checkpoint ({reason})")
        return path.parent, path.name
    return None


# Every file of a DeepSpeed checkpoint is read with weights_only=True. Its model states (mp_rank_*_model_states.pt,
# zero_pp_rank_*_model_states.pt) hold only tensors and plain containers; its ZeRO 1-3 optimizer states
# ([bf16_]zero_pp_rank_*_optim_states.pt) also these DeepSpeed classes, plain data that run nothing when
# unpickled: found in fp32 and bf16 checkpoints at every ZeRO stage; DynamicLossScaler is fp16's LossScaler
# (fp16 needs CUDA, so it was not seen here). Anything else in them is refused.
DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address")


@contextmanager
def _deepspeed_weights_only(d: Path):
    """Every torch.load inside is weights_only=True, DEEPSPEED_GLOBALS allowed. DeepSpeed's zero_to_fp32 passes
    weights_only=False itself; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that argument."""
    allowed = [getattr(importlib.import_module(module), name)
               for module, _, name in (g.rpartition(".") for g in DEEPSPEED_GLOBALS)]
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                yield
            except pickle.UnpicklingError as e:
                raise refusal(sorted(d.glob("*.pt")), e) from None
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def load_training_checkpoint(root: Path, tag: str) -> Mamba2LM:
    d = root / tag
    config = Mamba2Config.from_dict(json.loads((d / "model_config.json").read_text()))
    model = Mamba2LM(config)
    if list(d.glob("*zero_pp_rank_*optim_states.pt")):       # ZeRO 1-3: gather the fp32 partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with _deepspeed_weights_only(d):
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        files = sorted(d.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ValueError(f"{d}: no DeepSpeed model states found")
        state = load_tensors(files[0])["module"]
    load_weights(model, {k: v.float() for k, v in state.items()}, f"{d} (model_config.json)")
    trainer = json.loads((d / "trainer_state.json").read_text())
    layers = trainer.get("mitigations", {}).get(str(trainer.get("stage")))
    model.set_mitigations(None if layers is None else [LayerMitigations(**m) for m in layers])
    return model


def load_any(path) -> Mamba2LM:
    path = Path(path)
    found = find_checkpoint(path)
    if found is not None:
        return load_training_checkpoint(*found)
    return Mamba2LM.from_pretrained(path)
