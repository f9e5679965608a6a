"""`longctx eval passkey|length|states CKPT --variants NAME=KEY=VAL[,KEY=VAL...] ...`: any number of variants of a
model side by side on the same prompts.

A variant is the checkpoint as it is (`NAME=` with no keys), with mitigations (the `mitigations` section's keys:
decay_scale, input_scale, a_scale, state_norm.every, state_norm.multiplier, state_norm.thresholds, window), with
its attention layers' RoPE positions interpolated (`rotary_scaling=S`: positions divided by S), or
another checkpoint (`checkpoint=PATH`, e.g. a `longctx calibrate` output or a continued run), with or without
mitigations on top. Mitigations compose with the model's own (a calibrated a_scale, a training stage's): a key
the variant sets replaces the model's value for that key (`a_scale=1` removes it), the others are kept, so
`"cal + window=checkpoint=runs/cal,window=64"` keeps the calibrated scales. Examples: `"as trained="`,
`"decay 0.9=decay_scale=0.9"`, `"norm=state_norm.every=64"`, `"calibrated=checkpoint=runs/cal"`,
`"per layer=decay_scale=[0.9,0.95]"`, `"PI x4=rotary_scaling=4"`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from ..mitigations import MitigationsConfig, StateNormConfig

MITIGATION_KEYS = tuple(f.name for f in fields(MitigationsConfig) if f.name != "state_norm") + tuple(
    f"state_norm.{f.name}" for f in fields(StateNormConfig))
KEYS = ("checkpoint", "rotary_scaling") + MITIGATION_KEYS


@dataclass
class VariantSpec:
    name: str
    checkpoint: Optional[str] = None           # None: the checkpoint being evaluated
    mitigations: Dict = field(default_factory=dict)   # nested overrides of the mitigations section; {}: as it is
    rotary_scaling: Optional[float] = None     # RoPE position interpolation of the attention layers; None: as is


def parse_variant(text: str) -> VariantSpec:
    """NAME=KEY=VAL[,KEY=VAL...]; a comma splits only before another KEY=, so list values keep theirs."""
    name, eq, rest = text.partition("=")
    if not eq or not name.strip():
        raise ValueError(f"--variants {text!r}: expected NAME=KEY=VAL[,KEY=VAL...] (NAME= alone: the model as it is)")
    spec = VariantSpec(name.strip())
    dotlist = []
    for item in filter(None, re.split(r",(?=\s*[A-Za-z_][\w.]*\s*=)", rest)):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in KEYS:
            raise ValueError(f"--variants {text!r}: unknown key {key!r} in variant {spec.name!r}; one of "
                             f"{', '.join(KEYS)}")
        if key == "checkpoint":
            spec.checkpoint = value.strip()
        elif key == "rotary_scaling":
            try:
                spec.rotary_scaling = float(value)
            except ValueError:
                raise ValueError(f"--variants {text!r}: rotary_scaling must be a number, got {value.strip()!r}") \
                    from None
        else:
            dotlist.append(f"{key}={value.strip()}")
    spec.mitigations = OmegaConf.to_container(OmegaConf.from_dotlist(dotlist)) if dotlist else {}
    return spec


def parse_variants(texts: List[str]) -> List[VariantSpec]:
    specs = [parse_variant(t) for t in texts]
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--variants: the name {twice[0]!r} is given twice; each variant needs its own name")
    return specs
