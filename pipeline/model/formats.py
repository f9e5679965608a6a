"""Pretrained-model directories: the mamba_ssm layout and the Hugging Face Mamba2 layout.

mamba_ssm (state-spaces/mamba2-*, and the hybrids mamba2attn-*): config.json = MambaConfig (d_model,
n_layer, vocab_size, ssm_cfg={"layer": "Mamba2", ...}, attn_layer_idx, attn_cfg, ...) and
pytorch_model.bin (or model.safetensors). An attention layer's keys are its MHA's (mixer.in_proj,
mixer.conv1d, mixer.out_proj). The Hugging Face Mamba2 layout has no attention layers: a hybrid
exports only in the mamba_ssm layout.
Hugging Face (Mamba2ForCausalLM): config.json with model_type "mamba2" (hidden_size,
state_size, num_heads, ...) and model.safetensors (possibly sharded); the only key that
differs is backbone.embeddings.weight (ours, like mamba_ssm: backbone.embedding.weight).
"""
from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import asdict, fields
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .config import AttnConfig, Mamba2Config
from .mitigations import MITIGATIONS_FILE, load_layers, save_layers

FORMATS = ("mamba_ssm", "hf")

# mamba_ssm MambaConfig keys that do not change what the model computes.
_MAMBA_SSM_IGNORED = {"fused_add_norm"}
_MAMBA2_SSM_IGNORED = {"layer", "use_mem_eff_path", "conv_init", "process_group", "sequence_parallel"}
_TOP_LEVEL = {"d_model", "d_intermediate", "n_layer", "vocab_size", "rms_norm", "residual_in_fp32",
              "pad_vocab_size_multiple", "tie_embeddings"}
_ATTENTION = {"attn_layer_idx", "attn_cfg"}
_SSM_FIELDS = {f.name for f in fields(Mamba2Config)} - _TOP_LEVEL - _ATTENTION - {"norm_epsilon"}
# mamba_ssm's MHA defaults where ours differ (AttnConfig keeps a language model's): a config.json that leaves
# `causal` out means what mamba_ssm builds from it, a non-causal layer (which validate() then refuses)
_MHA_DEFAULTS = {"causal": False}

# Hugging Face Mamba2Config key -> ours.
_HF_KEYS = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
            "state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "head_dim": "headdim",
            "n_groups": "ngroups", "chunk_size": "chunk_size", "time_step_min": "dt_min",
            "time_step_max": "dt_max", "time_step_floor": "dt_init_floor", "time_step_limit": "dt_limit",
            "use_bias": "bias", "use_conv_bias": "conv_bias", "layer_norm_epsilon": "norm_epsilon",
            "residual_in_fp32": "residual_in_fp32", "tie_word_embeddings": "tie_embeddings"}


class CheckpointError(ValueError):
    pass


# ----------------------------------------------------------------------------- configs

def _tuple(v):
    return tuple(float(x) for x in v)


def config_from_mamba_ssm(d: dict, source: str) -> Mamba2Config:
    unknown = set(d) - _TOP_LEVEL - _ATTENTION - _MAMBA_SSM_IGNORED - {"ssm_cfg"}
    if unknown:
        raise CheckpointError(f"{source}: unknown mamba_ssm config keys {sorted(unknown)}")
    ssm = dict(d.get("ssm_cfg") or {})
    layer = ssm.get("layer", "Mamba1")  # mamba_ssm's own default when ssm_cfg has no "layer"
    if layer != "Mamba2":
        raise CheckpointError(f"{source}: ssm_cfg.layer is {layer!r}; longctx supports Mamba-2 checkpoints only")
    unknown = set(ssm) - _SSM_FIELDS - _MAMBA2_SSM_IGNORED
    if unknown:
        raise CheckpointError(f"{source}: unknown ssm_cfg keys {sorted(unknown)}")
    kw = {k: d[k] for k in _TOP_LEVEL if k in d}
    kw.update({k: v for k, v in ssm.items() if k in _SSM_FIELDS})
    for k in ("A_init_range", "dt_limit"):
        if k in kw:
            kw[k] = _tuple(kw[k])
    kw.update(_attention_from_mamba_ssm(d, source))
    try:
        return Mamba2Config(**kw).validate()
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _attention_from_mamba_ssm(d: dict, source: str) -> dict:
    """attn_layer_idx and attn_cfg (mamba_ssm ignores attn_cfg when no layer is attention, and so do we)."""
    layers = list(d.get("attn_layer_idx") or [])
    if not layers:
        return {}
    cfg = dict(d.get("attn_cfg") or {})
    unknown = set(cfg) - {f.name for f in fields(AttnConfig)}
    if unknown:
        raise CheckpointError(f"{source}: unknown attn_cfg keys {sorted(unknown)} (mamba_ssm's MHA arguments: "
                              f"{sorted(f.name for f in fields(AttnConfig))})")
    if "num_heads" not in cfg:
        raise CheckpointError(f"{source}: attention layers {layers} but attn_cfg has no num_heads")
    return {"attn_layer_idx": [int(i) for i in layers], "attn_cfg": AttnConfig(**{**_MHA_DEFAULTS, **cfg})}


def config_to_mamba_ssm(c: Mamba2Config) -> dict:
    if c.norm_epsilon != 1e-5:
        raise CheckpointError("mamba_ssm layout cannot store norm_epsilon != 1e-5 (MambaConfig has no such key); "
                              "export with format='hf'")
    ssm = {"layer": "Mamba2"}
    for name in sorted(_SSM_FIELDS):
        value = getattr(c, name)
        if name == "dt_limit" and tuple(value) == (0.0, math.inf):
            continue  # the default; keeps config.json strict JSON
        ssm[name] = list(value) if isinstance(value, tuple) else value
    d = {k: getattr(c, k) for k in sorted(_TOP_LEVEL)}
    # every attn_cfg key written, so mamba_ssm's own defaults (causal: false) never apply; except ours alone
    d.update(ssm_cfg=ssm, attn_layer_idx=list(c.attn_layer_idx),
             attn_cfg=_attn_cfg_to_mamba_ssm(c.attn_cfg) if c.attn_layer_idx else {}, fused_add_norm=True)
    return d


def _attn_cfg_to_mamba_ssm(a: AttnConfig) -> dict:
    """attn_cfg as mamba_ssm's MHA takes it. `rotary_scaling` is ours (MHA has no such argument and would refuse
    it): left out at 1, where the layer is exactly MHA's and loads in mamba_ssm; written otherwise, so the
    directory still describes the model it holds (mamba_ssm then refuses it rather than compute another model),
    and a config.json without it loads as 1."""
    cfg = asdict(a)
    if cfg["rotary_scaling"] == 1:
        del cfg["rotary_scaling"]
    return cfg


def config_from_hf(d: dict, source: str) -> Mamba2Config:
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={d['hidden_act']!r}; Mamba-2 uses silu")
    kw = {ours: d[hf] for hf, ours in _HF_KEYS.items() if hf in d}
    hidden, expand = kw.get("d_model", 768), kw.get("expand", 2)
    if "num_heads" in d and d["num_heads"] * kw.get("headdim", 64) != expand * hidden:
        raise CheckpointError(f"{source}: num_heads * head_dim ({d['num_heads']} * {kw.get('headdim', 64)}) "
                              f"must equal expand * hidden_size ({expand * hidden})")
    if "dt_limit" in kw:
        kw["dt_limit"] = _tuple(kw["dt_limit"])
    kw["pad_vocab_size_multiple"] = 1  # HF stores the padded vocabulary size itself
    return Mamba2Config(**kw).validate()


def config_to_hf(c: Mamba2Config) -> dict:
    if c.attn_layer_idx:
        raise CheckpointError(f"the Hugging Face Mamba2 layout has no attention layers (transformers' "
                              f"Mamba2ForCausalLM builds a Mamba-2 mixer in every layer), and this model has "
                              f"attention at layers {list(c.attn_layer_idx)}; export with format='mamba_ssm'")
    unsupported = {"d_intermediate": c.d_intermediate != 0, "d_ssm": c.ssm_dim != c.d_inner,
                   "rms_norm": not c.rms_norm, "rmsnorm": not c.rmsnorm, "D_has_hdim": c.D_has_hdim}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"the Hugging Face Mamba2 layout cannot express model fields {bad}; "
                              "export with format='mamba_ssm'")
    d = {hf: getattr(c, ours) for hf, ours in _HF_KEYS.items()}
    d["time_step_limit"] = list(c.dt_limit)
    d.update(vocab_size=c.padded_vocab_size, num_heads=c.nheads, hidden_act="silu", rms_norm=True,
             model_type="mamba2", architectures=["Mamba2ForCausalLM"])
    return d


# ----------------------------------------------------------------------------- weights

def refusal(files, error: Exception) -> CheckpointError:
    """Why torch.load(weights_only=True) refused one of `files`: each that names globals the unpickler may not
    load (those a caller allowed with torch.serialization.safe_globals excepted), and what to do."""
    culprits = []
    for f in files:
        try:
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(f))
        except (ValueError, RuntimeError):        # not torch.save's zip format
            names = ["a raw pickle, not torch.save's format"]
        if names:
            culprits.append(f"{f} ({', '.join(names)})")
    detail = str(error).partition("WeightsUnpickler error:")[2].strip().split("\n")[0].split(". ")[0]
    return CheckpointError(
        f"refused to unpickle {'; '.join(culprits) or ', '.join(map(str, files))}: unpickling would import and "
        "call what it names, and longctx reads only tensors and plain data from a checkpoint (torch.load "
        f"weights_only=True{': ' + detail if detail else ''}). If you did not write this file, do not load it; if "
        "you trust it, re-save its tensors (torch.save of a state dict, or model.safetensors)")


def load_tensors(path: Path, **kw):
    """torch.load(path) with weights_only=True: tensors and plain containers only. A file whose unpickling would
    import or call anything else (a pickle can run any code) is refused before any of it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        raise refusal([path], e) from None


def weight_files(path: Path) -> List[Path]:
    """The weights files of a model directory: model.safetensors or pytorch_model.bin, or the shards their
    *.index.json names."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).exists():
            return [path / single]
        if (path / index).exists():
            shards = json.loads((path / index).read_text())["weight_map"].values()
            return [path / shard for shard in sorted(set(shards))]
    raise CheckpointError(f"{path}: no weights found (expected model.safetensors, pytorch_model.bin "
                          "or a sharded *.index.json)")


def _read_weights(path: Path) -> Dict[str, torch.Tensor]:
    state = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file
            state.update(load_file(str(f)))
        else:
            state.update(load_tensors(f))
    return state


def weight_shapes(path: Path) -> Dict[str, tuple]:
    """Each tensor's shape, in our key names, read without loading the weights (safetensors' header;
    a torch.save file memory-mapped)."""
    path = Path(path)
    shapes = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as handle:
                shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
        else:
            shapes.update({k: tuple(v.shape) for k, v in load_tensors(f, mmap=True).items()})
    return _hf_to_ours(shapes) if _read_config(path)[1] == "hf" else shapes


def _hf_to_ours(state):
    return {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in state.items()}


def _ours_to_hf(state):
    return {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v for k, v in state.items()}


def detect_format(config: dict) -> str:
    if config.get("model_type") == "mamba2" or "hidden_size" in config:
        return "hf"
    if "d_model" in config:
        return "mamba_ssm"
    raise CheckpointError("config.json is neither a mamba_ssm MambaConfig (d_model, ssm_cfg) nor a Hugging Face "
                          "Mamba2Config (model_type: mamba2)")


def read_config(path) -> Mamba2Config:
    """The architecture of a mamba_ssm or Hugging Face directory, without loading weights."""
    return _read_config(Path(path))[0]


def _read_config(path: Path):
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json; expected a mamba_ssm or Hugging Face Mamba2 directory")
    raw = json.loads(cfg_file.read_text())
    fmt = detect_format(raw)
    config = config_from_hf(raw, str(cfg_file)) if fmt == "hf" else config_from_mamba_ssm(raw, str(cfg_file))
    return config, fmt


def load_weights(model, state: Dict[str, torch.Tensor], where: str) -> None:
    """Our-layout state dict into `model`: every key must fit; a tied head may be absent or equal."""
    state = dict(state)
    tied = model.config.tie_embeddings
    if tied and "lm_head.weight" in state:
        head = state.pop("lm_head.weight")
        if not torch.equal(head, state.get("backbone.embedding.weight", head)):
            raise CheckpointError(f"{where}: lm_head.weight differs from the embedding but the config ties them "
                                  "(tie_embeddings / tie_word_embeddings = true)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the config: missing {missing}, unexpected {unexpected}")


def load_pretrained(cls, path, dtype: Optional[torch.dtype] = None, device=None):
    path = Path(path)
    config, fmt = _read_config(path)
    state = _read_weights(path)
    if fmt == "hf":
        state = _hf_to_ours(state)
    model = cls(config)
    load_weights(model, state, str(path))
    model.set_mitigations(load_layers(path))   # calibrated thresholds etc. saved with the model
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model


def save_pretrained(model, path, format: str = "mamba_ssm", safe_serialization: Optional[bool] = None):
    """Write `model` as a directory the other tools load. Atomic: a temp dir renamed into place."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    config = config_to_hf(model.config) if format == "hf" else config_to_mamba_ssm(model.config)
    safe = (format == "hf") if safe_serialization is None else safe_serialization
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if format == "hf":
        state = _ours_to_hf(state)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if safe:
        from safetensors.torch import save_file
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # safetensors stores no aliases; loaders re-tie
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, tmp / "pytorch_model.bin")
    save_layers(model.mitigations, tmp)
    if path.exists():
        for f in ("config.json", "model.safetensors", "pytorch_model.bin", MITIGATIONS_FILE):
            if (path / f).exists():
                os.remove(path / f)
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
        tmp.rmdir()
    else:
        os.replace(tmp, path)
