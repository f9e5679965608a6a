"""The `mitigations` section of the run config, and its resolution into the per-layer values
the model consumes (`longctx.pipeline.model.mitigations.LayerMitigations`).

The paper's training-free fixes for state collapse:

- decay_scale λ_α <= 1: every step forgets more (a_t *= λ_α);
- input_scale λ_B <= 1: every step writes less;
- state_norm: every K tokens the state is shrunk to at most τ (per layer x head; τ given or
  calibrated as multiplier x ||h|| at the end of a prompt of the training length);
- window r: the output reads only what the last r tokens wrote;
- a_scale s > 0 (beyond the paper: Mamba Modulation's scale on A's spectrum, a_t = exp(s·Δ_t·A)), usually
  fitted per layer by `longctx calibrate`.

`MitigationsConfig` is the YAML section; `resolve` turns it into one `LayerMitigations`
per layer, which `Mamba2LM.set_mitigations` hands to the mixers. The scan kernels
(longctx.kernels.ssd) do the math.

They act on the Mamba layers' scans only: an attention layer (model.attn_layer_idx) takes none. A scalar applies
to every Mamba layer; a per-layer list keeps one entry per layer, attention layers included (so its indices are
the model's), and an attention layer's entry must be null (or 1 for a scale, which changes nothing): any other
value names an attention layer and is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, FrozenSet, Iterable, List, Optional, Sequence

import torch
from omegaconf import OmegaConf

from .model.mitigations import LayerMitigations


@dataclass
class StateNormConfig:
    every: int = 0                 # 0: off; else normalize after every `every` tokens
    multiplier: float = 1.0        # calibrated threshold = multiplier x the state norm at the training length
    thresholds: List[Any] = field(default_factory=list)   # given thresholds: per layer, or per layer x head


@dataclass
class MitigationsConfig:
    decay_scale: Any = 1.0         # λ_α in (0, 1]: scalar, one per layer, or per layer x head
    input_scale: Any = 1.0         # λ_B: same shapes
    a_scale: Any = 1.0             # s > 0 on A (a_t = exp(s·Δ_t·A)), as Mamba Modulation: same shapes
    state_norm: StateNormConfig = field(default_factory=StateNormConfig)
    window: int = 0                # 0: off; else sliding window of this many tokens


def _attention_entry(value, i: int, key: str, neutral: Optional[float]) -> None:
    """A per-layer list's entry at attention layer i: null, or the value that changes nothing (`neutral`)."""
    entries = value if isinstance(value, Sequence) else [value]
    if value is None or (neutral is not None and all(e == neutral for e in entries)):
        return
    raise ValueError(f"mitigations.{key}[{i}]: layer {i} is an attention layer (model.attn_layer_idx), and the "
                     "mitigations apply to the Mamba layers only: give null there"
                     + (f" (or {neutral:g})" if neutral is not None else ""))


def _per_layer_head(value, n_layer: int, nheads: int, key: str, attention: FrozenSet[int] = frozenset(),
                    neutral: Optional[float] = None) -> Optional[List[Optional[List[float]]]]:
    """scalar | [n_layer scalars] | [n_layer x nheads] -> n_layer lists of nheads floats; None for each layer in
    `attention` (whose entry in a list must be null or `neutral`)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [None if i in attention else [float(value)] * nheads for i in range(n_layer)]
    if isinstance(value, Sequence) and len(value) == n_layer:
        rows = []
        for i, v in enumerate(value):
            if i in attention:
                _attention_entry(v, i, key, neutral)
                rows.append(None)
            elif isinstance(v, (int, float)):
                rows.append([float(v)] * nheads)
            elif isinstance(v, Sequence) and len(v) == nheads and all(isinstance(e, (int, float)) for e in v):
                rows.append([float(e) for e in v])
            else:
                raise ValueError(f"mitigations.{key}[{i}]: expected a number or a list of {nheads} numbers "
                                 f"(one per head), got {v!r}")
        return rows
    raise ValueError(f"mitigations.{key}: expected a number, a list of {n_layer} numbers (one per layer) or "
                     f"{n_layer} lists of {nheads} (per layer x head), got {value!r}")


def _check_scale(value, key: str, at_most_one: bool = True) -> None:
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if v is not None:           # null: an attention layer's entry (resolve checks which layers those are)
                _check_scale(v, f"{key}[{i}]", at_most_one)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):     # YAML's yes/true is not a scale
        raise ValueError(f"{key}: {value!r} is not a number")
    if at_most_one and not 0 < value <= 1:
        raise ValueError(f"{key}: {value!r} is outside (0, 1]: a scale only forgets more or writes less")
    if not 0 < value:
        raise ValueError(f"{key}: {value!r} must be positive (A stays negative: the state decays)")


def check_scales(cfg: MitigationsConfig, where: str) -> None:
    """decay_scale and input_scale are numbers in (0, 1], a_scale positive, scalar or per layer (x head);
    `where` prefixes the key."""
    for name in ("decay_scale", "input_scale", "a_scale"):
        value = getattr(cfg, name)
        _check_scale(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value, f"{where}.{name}",
                     at_most_one=name != "a_scale")


def resolve(cfg: MitigationsConfig, n_layer: int, nheads: int, calibrated: Optional[torch.Tensor] = None,
            attention: Iterable[int] = ()) -> List[LayerMitigations]:
    """One LayerMitigations per layer. `calibrated` (n_layer, nheads) thresholds are used when the
    config gives none. The layers in `attention` (model.attn_layer_idx) get none (an inactive LayerMitigations);
    a per-layer value that names one is refused."""
    check_scales(cfg, "mitigations")
    attention = frozenset(attention)
    decay = _per_layer_head(cfg.decay_scale, n_layer, nheads, "decay_scale", attention, neutral=1.0)
    inp = _per_layer_head(cfg.input_scale, n_layer, nheads, "input_scale", attention, neutral=1.0)
    a_sc = _per_layer_head(cfg.a_scale, n_layer, nheads, "a_scale", attention, neutral=1.0)
    sn = cfg.state_norm
    if sn.every < 0:
        raise ValueError(f"mitigations.state_norm.every must be >= 0, got {sn.every}")
    if cfg.window < 0:
        raise ValueError(f"mitigations.window must be >= 0, got {cfg.window}")
    thresholds = None
    if sn.every:
        if sn.thresholds:
            thresholds = _per_layer_head(list(sn.thresholds), n_layer, nheads, "state_norm.thresholds", attention)
        elif calibrated is not None:
            thresholds = calibrated.tolist()
        else:
            raise ValueError("mitigations.state_norm.every is set but there are no thresholds: give "
                             "mitigations.state_norm.thresholds or calibrate them (calibrate_state_norm)")
        if any(v <= 0 for i, row in enumerate(thresholds) if i not in attention for v in row):
            raise ValueError("mitigations.state_norm.thresholds must be positive")
    layers = []
    for i in range(n_layer):
        if i in attention:
            layers.append(LayerMitigations())
            continue
        layers.append(LayerMitigations(
            decay_scale=None if all(v == 1.0 for v in decay[i]) else decay[i],
            input_scale=None if all(v == 1.0 for v in inp[i]) else inp[i],
            a_scale=None if all(v == 1.0 for v in a_sc[i]) else a_sc[i],
            state_norm_every=int(sn.every),
            state_norm_threshold=None if thresholds is None else thresholds[i],
            window=int(cfg.window)))
    return layers


# The LayerMitigations fields each top-level key of the section sets.
_FIELDS = {"decay_scale": ("decay_scale",), "input_scale": ("input_scale",), "a_scale": ("a_scale",),
           "state_norm": ("state_norm_every", "state_norm_threshold"), "window": ("window",)}


def on_top(base: Optional[List[LayerMitigations]], layers: List[LayerMitigations],
           keys: Iterable[str]) -> List[LayerMitigations]:
    """`layers` (resolved from a section that sets the top-level `keys`) on top of `base` (a loaded model's own
    mitigations, e.g. `longctx calibrate`'s scales, or None): the fields of `keys` come from `layers`, every
    other from `base`. So a variant that sets only a window keeps a calibrated a_scale, and one that sets
    a_scale replaces it (a_scale=1 removes it)."""
    if base is None:
        return layers
    taken = [f for k in keys for f in _FIELDS[k]]
    return [replace(b or LayerMitigations(), **{f: getattr(m, f) for f in taken}) for b, m in zip(base, layers)]


def merge_overrides(base: MitigationsConfig, overrides: dict, where: str = "stage") -> MitigationsConfig:
    """A curriculum stage's `mitigations:` dict applied on top of the run's section (unknown keys are errors)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.create(dict(overrides or {})))
    except Exception as e:
        raise ValueError(f"{where}.mitigations: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


