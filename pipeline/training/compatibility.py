"""What a resumed run must share with the checkpoint it continues, and what it may change.

Each checkpoint records the run's identity (`run_identity`): the model architecture, the
tokenizer, the shards, the world size, ZeRO stage and precision, the stage plan and the whole
config. On resume, `check_resume` refuses a change that would make the continuation a different
run than the one checkpointed, naming the field with its old and new value; every other change
(later stages, the evaluation grid, checkpoint cadence, learning rates of stages not yet done, ...)
is allowed and returned as a note, which the trainer logs.

Refused:
- model.*: any architecture field (the weights would not fit, or mean something else). A field the checkpoint
  does not record was added to longctx after it was written, with a default that keeps the old behaviour: the
  checkpoint has that default (a run from an older longctx resumes under a newer one, its new fields unset);
- tokenizer: another tokenizer (token ids would mean other text);
- data: other shards than the loader's position was recorded in (re-prepared data shifts it);
- train.zero_stage, train.precision: DeepSpeed's optimizer state is laid out by them;
- the world size, under ZeRO 1-3 (the optimizer state is partitioned over the ranks);
- a stage already started: its name, seq_len, global_batch_tokens; a finished stage's steps;
  the current stage's steps below those already done.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import List

from omegaconf import OmegaConf

from ..config import Config, ConfigError, flatten
from ..model.config import Mamba2Config

STAGE_KEYS = ("name", "seq_len", "global_batch_tokens")


def run_identity(cfg: Config, model_config, tokenizer_identity: dict, dataset_identity: str, world_size: int,
                 plans) -> dict:
    """The record a checkpoint keeps of the run it belongs to (JSON-ready)."""
    identity = {"model": asdict(model_config), "tokenizer": tokenizer_identity, "dataset": dataset_identity,
                "world_size": world_size, "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision,
                "stages": [{"name": p.name, "seq_len": p.seq_len, "global_batch_tokens": p.global_batch_tokens,
                            "steps": p.steps, "first_step": p.first_step} for p in plans],
                "config": flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))}
    return json.loads(json.dumps(identity))          # tuples become lists, as they come back from the file


# The architecture fields' defaults, for checkpoints written before a field existed (JSON-ready, as in a checkpoint)
_MODEL_DEFAULTS = json.loads(json.dumps(asdict(Mamba2Config())))


def architecture_changes(saved: dict, now: dict, defaults: dict, prefix: str = "model"):
    """(field, old, new) for each architecture field that differs, nested sections (attn_cfg) field by field; a
    field missing from the checkpoint's record counts as its default there."""
    for k in sorted(set(saved) | set(now)):
        old, new = saved.get(k, defaults.get(k)), now.get(k, defaults.get(k))
        if isinstance(old, dict) and isinstance(new, dict):
            yield from architecture_changes(old, new, defaults.get(k) or {}, f"{prefix}.{k}")
        elif old != new:
            yield f"{prefix}.{k}", old, new


def check_resume(saved: dict, now: dict, step: int, where: str) -> List[str]:
    """Raise ConfigError on a change the checkpoint at `step` cannot continue under; return the allowed
    changes as notes."""
    def refuse(field, old, new, why):
        raise ConfigError(f"{where}: cannot resume: {field} changed since the checkpoint (it has {old!r}, this run "
                          f"{new!r}): {why}. Undo the change, or start a new run with run.resume=never")

    for field, old, new in architecture_changes(saved["model"], now["model"], _MODEL_DEFAULTS):
        refuse(field, old, new, "the weights belong to the architecture they were made in")
    if saved["tokenizer"] != now["tokenizer"]:
        refuse("tokenizer", saved["tokenizer"], now["tokenizer"], "token ids would stand for other text")
    if saved["dataset"] != now["dataset"]:
        refuse("data (the shards)", saved["dataset"], now["dataset"],
               "the loader's position was recorded in other shards (data re-prepared?); point data.shards at the "
               "shards the run started on")
    for key, why in (("zero_stage", "DeepSpeed's optimizer state is laid out by the ZeRO stage"),
                     ("precision", "DeepSpeed's optimizer state is laid out by the precision")):
        if saved[key] != now[key]:
            refuse(f"train.{key}", saved[key], now[key], why)
    if saved["world_size"] != now["world_size"] and saved["zero_stage"] > 0:
        refuse("the world size", saved["world_size"], now["world_size"],
               f"ZeRO stage {saved['zero_stage']} partitions the optimizer state over the ranks")
    for i, old in enumerate(saved["stages"]):
        if old["first_step"] >= step:
            break                                            # not started: free to change
        key = f"curriculum.stages[{i}]"
        if i >= len(now["stages"]):
            refuse(key, old["name"], None, "the stage was already trained")
        new = now["stages"][i]
        for k in STAGE_KEYS:
            if new[k] != old[k]:
                refuse(f"{key}.{k}", old[k], new[k], "the stage was already trained on it")
        finished = old["first_step"] + old["steps"] <= step
        if finished and new["steps"] != old["steps"]:
            refuse(f"{key}.steps", old["steps"], new["steps"], "the stage is finished")
        done = step - old["first_step"]          # of the stage the checkpoint is in (a finished one is equal)
        if not finished and new["steps"] < done:
            refuse(f"{key}.steps", old["steps"], new["steps"], f"{done} of its steps are done")
    notes = []
    if saved["world_size"] != now["world_size"]:
        notes.append(f"world size {saved['world_size']} -> {now['world_size']}")
    old_cfg, new_cfg = saved["config"], now["config"]
    for k in sorted(set(old_cfg) | set(new_cfg)):
        if k.startswith(("run.", "model.", "tokenizer.")) or old_cfg.get(k) == new_cfg.get(k):
            continue
        notes.append(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}")
    return notes
