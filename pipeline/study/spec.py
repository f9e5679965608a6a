"""A study file (`longctx study STUDY.yaml`): a grid of variants x seeds over a base run config.

    study: lengthgen                      # the study's name
    base: configs/length_generalization/continue.yaml
    overrides: [eval.every_checkpoint=false]         # for every cell
    seeds: [0, 1, 2]                      # run.seed of each cell
    variants:                             # name -> overrides on top of the base's and `overrides`
      continued: []
      state passing: [curriculum.stages.1.carry_state=batch]
    baseline: continued                   # paired differences are taken against it
    evaluate:                             # on each cell's final checkpoint; per kind
      passkey: {lengths: [256, 1024, 4096], depths: [0, 0.5, 1], samples: 8}
      length: {lengths: [16384]}
      variants: {decay 0.9: {decay_scale: 0.9}}      # evaluation-time mitigations beside "as trained"
    out: runs/studies/lengthgen

Each cell is an ordinary run directory, `OUT/cells/<variant as a folder name>/seed-<seed>`. Unknown keys are
errors naming the key (and the file); every cell's config is loaded and validated when the study is read, so a
bad override fails before any cell trains."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import yaml

from ..config import Config, ConfigError, load_config, planning_chunk_size
from ..training.curriculum import plan

KEYS = ("study", "base", "overrides", "seeds", "variants", "baseline", "evaluate", "out")
REQUIRED = ("study", "base", "seeds", "variants", "baseline", "out")
EVALUATE_KEYS = {"passkey": ("lengths", "depths", "samples"), "length": ("lengths", "buckets"),
                 "niah": ("tasks", "lengths", "samples"), "variants": None}
NAME = re.compile(r"^\S(.*\S)?$")          # a variant's or study's name: no surrounding blanks


def folder(name: str) -> str:
    """A name as a folder: runs of anything but letters, digits and ._- become one '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "-"


@dataclass
class Cell:
    variant: str
    seed: int
    run_dir: Path
    overrides: List[str]        # the base's, then `overrides`, the variant's, run.seed and run.dir
    config: Config


@dataclass
class Study:
    name: str
    base: str
    seeds: List[int]
    variants: Dict[str, List[str]]
    baseline: str
    out: Path
    overrides: List[str] = field(default_factory=list)
    evaluate: Dict[str, Any] = field(default_factory=dict)
    cells: List[Cell] = field(default_factory=list)


def _fail(where: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {key}: {msg}")


def _overrides(value, where: str, key: str) -> List[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(o, str) and "=" in o for o in value):
        raise _fail(where, key, f"must be a list of key=value overrides, got {value!r}")
    return list(value)


def _seeds(value, where: str) -> List[int]:
    if not isinstance(value, list) or not value or not all(type(s) is int for s in value):
        raise _fail(where, "seeds", f"must be a non-empty list of integers (run.seed of each cell), got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(where, "seeds", f"repeats a seed: {value}")
    return list(value)


def _variants(value, where: str) -> Dict[str, List[str]]:
    if not isinstance(value, dict) or not value:
        raise _fail(where, "variants", "must map each variant's name to its overrides (a list, [] for none)")
    out = {}
    for name, overrides in value.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise _fail(where, f"variants.{name}", "a variant's name must be text without leading or trailing "
                        "blanks")
        out[name] = _overrides(overrides, where, f"variants.{name}")
    folders: Dict[str, str] = {}
    for name in out:
        other = folders.setdefault(folder(name), name)
        if other != name:
            raise _fail(where, "variants", f"{other!r} and {name!r} would share the folder {folder(name)!r}: "
                        "rename one")
    return out


def _evaluate(value, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(where, "evaluate", f"must map evaluation kinds to their settings, got {value!r}")
    for kind, settings in value.items():
        if kind not in EVALUATE_KEYS:
            raise _fail(where, f"evaluate.{kind}", f"unknown evaluation; choose from {', '.join(EVALUATE_KEYS)}")
        if not isinstance(settings, dict):
            raise _fail(where, f"evaluate.{kind}", f"must be a mapping, got {settings!r}")
        allowed = EVALUATE_KEYS[kind]
        for key in settings:
            if allowed is not None and key not in allowed:
                raise _fail(where, f"evaluate.{kind}.{key}", f"unknown key; {kind} takes {', '.join(allowed)}")
    return value


def load_study(path: str) -> Study:
    """The study at `path`, every cell's config loaded and validated."""
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such study file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a study file is a mapping with the keys {', '.join(KEYS)}")
    for key in raw:
        if key not in KEYS:
            raise _fail(where, str(key), f"unknown key; a study file has {', '.join(KEYS)}")
    for key in REQUIRED:
        if key not in raw:
            raise _fail(where, key, "is missing")
    if not isinstance(raw["study"], str) or not NAME.match(raw["study"]):
        raise _fail(where, "study", f"must be a name (text), got {raw['study']!r}")
    study = Study(name=raw["study"], base=str(raw["base"]), seeds=_seeds(raw["seeds"], where),
                  variants=_variants(raw["variants"], where), baseline=raw["baseline"], out=Path(str(raw["out"])),
                  overrides=_overrides(raw.get("overrides"), where, "overrides"),
                  evaluate=_evaluate(raw.get("evaluate"), where))
    if study.baseline not in study.variants:
        raise _fail(where, "baseline", f"{study.baseline!r} is not one of the variants ({', '.join(study.variants)})")
    study.cells = [_cell(study, variant, seed, where) for variant in study.variants for seed in study.seeds]
    return study


def _cell(study: Study, variant: str, seed: int, where: str) -> Cell:
    run_dir = study.out / "cells" / folder(variant) / f"seed-{seed}"
    overrides = [*study.overrides, *study.variants[variant], f"run.seed={seed}", f"run.dir={run_dir}"]
    try:
        config = load_config(study.base, overrides)
        # the stage plan too (seq_len against chunks and ranks, carry_state, ...), as `longctx run --plan` does
        plan(config, config.launch.local_procs, planning_chunk_size(config)[0], where)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{where}: variant {variant!r}, seed {seed}: {e}") from None
    return Cell(variant, seed, run_dir, overrides, config)
