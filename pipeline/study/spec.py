"""A study file (`longctx study STUDY.yaml`): a grid of variants x seeds over a base run config.

    study: lengthgen                      # the study's name
    base: configs/length_generalization/continue.yaml
    overrides: [eval.every_checkpoint=false]         # for every cell
    seeds: [0, 1, 2]                      # run.seed of each cell
    variants:                             # name -> overrides on top of the base's and `overrides`
      trained at 256: {base: configs/collapse/short-state128.yaml}      # or a mapping: its own base,
      continued: {from: trained at 256}   # starting from an earlier variant's final checkpoint at the same seed,
      state passing: {from: trained at 256, overrides: [curriculum.stages.1.carry_state=batch]}
    baseline: continued                   # paired differences are taken against it
    evaluate:                             # on each cell's final checkpoint; per kind
      passkey: {lengths: [256, 1024, 4096], depths: [0, 0.5, 1], samples: 8}
      length: {lengths: [16384], margin: 0.2, min_position: 256, sequences: 8}
      variants: {decay 0.9: {decay_scale: 0.9}}      # evaluation-time mitigations beside "as trained" (or
                                          # rotary_scaling; `variants: [...]`: only those variants' cells)
      calibrate:                          # `longctx calibrate` on the final checkpoints of `variants`, evaluated
        calibrated decay: {param: decay, length: 4096, variants: [continued]}    # as another evaluation variant
    out: runs/studies/lengthgen

Each cell is an ordinary run directory, `OUT/cells/<variant as a folder name>/seed-<seed>`. A variant with `from`
continues the named (earlier) variant's cell of the same seed: its first run resumes from that cell's last
checkpoint, so its base must run past that checkpoint's step (a curriculum with more stages, typically). Unknown
keys are errors naming the key (and the file); every cell's config is loaded and validated when the study is
read, so a bad override fails before any cell trains."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from ..config import Config, ConfigError, load_config, planning_chunk_size
from ..training.curriculum import plan

KEYS = ("study", "base", "overrides", "seeds", "variants", "baseline", "evaluate", "laws", "out")
LAWS_KEYS = ("horizon", "passkey_threshold")     # laws.py's settings
REQUIRED = ("study", "seeds", "variants", "baseline", "out")
VARIANT_KEYS = ("base", "from", "overrides")
EVALUATE_KEYS = {"passkey": ("lengths", "depths", "samples", "calibration_length"),
                 "length": ("lengths", "buckets", "margin", "min_position", "sequences", "calibration_length"),
                 "niah": ("tasks", "lengths", "samples"), "variants": None, "calibrate": None}
# `longctx calibrate`'s options (launch/cli.py), and which variants' cells to calibrate
CALIBRATE_KEYS = ("param", "length", "samples", "batch", "steps", "lr", "per_head", "variants")
NAME = re.compile(r"^\S(.*\S)?$")          # a variant's or study's name: no surrounding blanks


def folder(name: str) -> str:
    """A name as a folder: runs of anything but letters, digits and ._- become one '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "-"


@dataclass
class Variant:
    overrides: List[str]
    base: Optional[str] = None          # None: the study's base
    start: Optional[str] = None         # `from`: the variant whose final checkpoint (same seed) this one continues


@dataclass
class Cell:
    variant: str
    seed: int
    run_dir: Path
    overrides: List[str]        # the study's `overrides`, the variant's, run.seed and run.dir
    config: Config
    base: str = ""              # the run config the overrides apply to
    start: Optional["Cell"] = None      # the cell this one continues (`from`)


@dataclass
class Study:
    name: str
    base: Optional[str]
    seeds: List[int]
    variants: Dict[str, Variant]
    baseline: str
    out: Path
    overrides: List[str] = field(default_factory=list)
    evaluate: Dict[str, Any] = field(default_factory=dict)
    laws: Optional[Dict[str, Any]] = None     # fit Stuffed Mamba's laws over the variants (laws.py); None: no
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


def _variant(name: str, value, where: str, earlier: List[str]) -> Variant:
    """A list of overrides, or a mapping with `base`, `from` and `overrides`."""
    key = f"variants.{name}"
    if not isinstance(value, dict):
        return Variant(_overrides(value, where, key))
    for k in value:
        if k not in VARIANT_KEYS:
            raise _fail(where, f"{key}.{k}", f"unknown key; a variant has {', '.join(VARIANT_KEYS)} (or is a list "
                        "of overrides)")
    start = value.get("from")
    if start is not None and start not in earlier:
        raise _fail(where, f"{key}.from", f"{start!r} is not a variant listed before {name!r} "
                    f"({', '.join(earlier) or 'none is'}): a cell continues one trained before it")
    base = value.get("base")
    if base is not None and not isinstance(base, str):
        raise _fail(where, f"{key}.base", f"must be the path of a run config, got {base!r}")
    return Variant(_overrides(value.get("overrides"), where, f"{key}.overrides"), base, start)


def _variants(value, where: str) -> Dict[str, Variant]:
    if not isinstance(value, dict) or not value:
        raise _fail(where, "variants", "must map each variant's name to its overrides (a list, [] for none) or to "
                    "{base, from, overrides}")
    out: Dict[str, Variant] = {}
    for name, spec in value.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise _fail(where, f"variants.{name}", "a variant's name must be text without leading or trailing "
                        "blanks")
        out[name] = _variant(name, spec, where, list(out))
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


def _laws(value, study: Study, where: str) -> Optional[Dict[str, Any]]:
    """`laws: {}` (or with horizon / passkey_threshold) asks for the capacity-law fits, which need the loss
    against position and passkey evaluated."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(where, "laws", f"must be a mapping ({{}} for the defaults), got {value!r}")
    for k in value:
        if k not in LAWS_KEYS:
            raise _fail(where, f"laws.{k}", f"unknown key; laws takes {', '.join(LAWS_KEYS)}")
    for kind in ("length", "passkey"):
        if kind not in study.evaluate:
            raise _fail(where, "laws", f"needs evaluate.{kind} (T_forget reads the loss against position, capacity "
                        "the passkey accuracy)")
    return value


def _eval_variants(study: Study, where: str) -> None:
    """evaluate.variants: name -> `longctx eval --variants` keys (mitigations, rotary_scaling) and, optionally, the
    study variants whose cells it applies to (`variants`, default: all; rotary_scaling needs attention layers)."""
    for name, keys in (study.evaluate.get("variants") or {}).items():
        key = f"evaluate.variants.{name}"
        if not isinstance(keys, dict):
            raise _fail(where, key, f"must map `longctx eval --variants` keys to values, got {keys!r}")
        _known_variants(keys.get("variants") or [], study, where, f"{key}.variants")


def _known_variants(names, study: Study, where: str, key: str) -> None:
    for v in names:
        if v not in study.variants:
            raise _fail(where, key, f"{v!r} is not one of the variants ({', '.join(study.variants)})")


def _applies(options: dict, study: Study, variant: str) -> bool:
    """Whether an evaluation-time entry (a calibration, an evaluation variant) applies to a variant's cells."""
    return variant in (options.get("variants") or study.variants)


def eval_variants_for(study: Study, variant: str) -> Dict[str, dict]:
    """The evaluation variants that apply to a variant's cells: name -> their `longctx eval --variants` keys."""
    return {name: {k: v for k, v in keys.items() if k != "variants"}
            for name, keys in (study.evaluate.get("variants") or {}).items() if _applies(keys, study, variant)}


def _calibrations(study: Study, where: str) -> None:
    """evaluate.calibrate: name -> longctx calibrate's options (param and length required) and the variants whose
    cells are calibrated (default: all); each calibrated model is evaluated as the evaluation variant `name`."""
    for name, options in (study.evaluate.get("calibrate") or {}).items():
        key = f"evaluate.calibrate.{name}"
        if not isinstance(options, dict):
            raise _fail(where, key, f"must map longctx calibrate's options to values, got {options!r}")
        for k in options:
            if k not in CALIBRATE_KEYS:
                raise _fail(where, f"{key}.{k}", f"unknown key; a calibration takes {', '.join(CALIBRATE_KEYS)}")
        for k in ("param", "length"):
            if k not in options:
                raise _fail(where, f"{key}.{k}", "is missing")
        if name in (study.evaluate.get("variants") or {}):
            raise _fail(where, key, "is also the name of an evaluation variant: rename one")
        _known_variants(options.get("variants") or [], study, where, f"{key}.variants")


def calibrations_for(study: Study, variant: str) -> Dict[str, dict]:
    """The calibrations that apply to a variant's cells: name -> longctx calibrate's options."""
    return {name: {k: v for k, v in options.items() if k != "variants"}
            for name, options in (study.evaluate.get("calibrate") or {}).items() if _applies(options, study, variant)}


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
    study = Study(name=raw["study"], base=None if raw.get("base") is None else str(raw["base"]),
                  seeds=_seeds(raw["seeds"], where),
                  variants=_variants(raw["variants"], where), baseline=raw["baseline"], out=Path(str(raw["out"])),
                  overrides=_overrides(raw.get("overrides"), where, "overrides"),
                  evaluate=_evaluate(raw.get("evaluate"), where))
    if study.baseline not in study.variants:
        raise _fail(where, "baseline", f"{study.baseline!r} is not one of the variants ({', '.join(study.variants)})")
    for name, variant in study.variants.items():
        if variant.base is None and study.base is None:
            raise _fail(where, "base", f"is missing, and variant {name!r} names no base of its own")
    _eval_variants(study, where)
    _calibrations(study, where)
    study.laws = _laws(raw.get("laws"), study, where)
    cells: Dict[tuple, Cell] = {}
    for variant in study.variants:
        for seed in study.seeds:
            cells[variant, seed] = _cell(study, variant, seed, where, cells)
    study.cells = list(cells.values())
    return study


def total_steps(config: Config) -> int:
    return sum(stage.steps for stage in config.curriculum.stages)


def _cell(study: Study, variant: str, seed: int, where: str, earlier: Dict[tuple, Cell]) -> Cell:
    spec = study.variants[variant]
    run_dir = study.out / "cells" / folder(variant) / f"seed-{seed}"
    overrides = [*study.overrides, *spec.overrides, f"run.seed={seed}", f"run.dir={run_dir}"]
    base = spec.base or study.base
    try:
        config = load_config(base, overrides)
        # the stage plan too (seq_len against chunks and ranks, carry_state, ...), as `longctx run --plan` does
        plan(config, config.launch.local_procs, planning_chunk_size(config)[0], where)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{where}: variant {variant!r}, seed {seed}: {e}") from None
    start = earlier[spec.start, seed] if spec.start is not None else None
    if start is not None and total_steps(config) <= total_steps(start.config):
        raise _fail(where, f"variants.{variant}.from", f"{spec.start!r} trains {total_steps(start.config)} steps and "
                    f"{variant!r} {total_steps(config)} in all: continuing it would train nothing (give {variant!r} "
                    "a base whose curriculum runs past the other's, e.g. one more stage)")
    return Cell(variant, seed, run_dir, overrides, config, base, start)
