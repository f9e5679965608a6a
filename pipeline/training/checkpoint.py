"""Training checkpoints: DeepSpeed state + trainer state, atomic `latest`, keep_last pruning.

Layout (docs/ARCHITECTURE.md §6): checkpoints/step_XXXXXXX/ (DeepSpeed files, trainer_state.json,
model_config.json, tokenizer_info.json and, for a Hugging Face tokenizer, tokenizer.json),
checkpoints/latest (the tag of the newest complete
checkpoint, replaced atomically after every rank has written its part).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ..config import ConfigError

LATEST = "latest"


def tag_of(step: int) -> str:
    return f"step_{step:07d}"


def latest_tag(ckpt_root: Path) -> Optional[str]:
    p = Path(ckpt_root) / LATEST
    if not p.exists():
        return None
    tag = p.read_text().strip()
    return tag if (Path(ckpt_root) / tag).is_dir() else None


TOKENIZER_INFO = "tokenizer_info.json"
TOKENIZER_FILE = "tokenizer.json"


def save(engine, ckpt_root: Path, step: int, trainer_state: dict, model_config, tokenizer_identity: dict,
         keep_last: int, is_rank0: bool, barrier, tokenizer_file: Optional[str] = None) -> str:
    tag = tag_of(step)
    ckpt_root = Path(ckpt_root)
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"trainer": trainer_state}, save_latest=False)
    if is_rank0:
        d = ckpt_root / tag
        (d / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (d / "model_config.json").write_text(json.dumps(asdict(model_config), indent=1))
        (d / TOKENIZER_INFO).write_text(json.dumps(tokenizer_identity, indent=1))
        if tokenizer_file:                       # the run's tokenizer travels with its checkpoints
            shutil.copyfile(tokenizer_file, d / TOKENIZER_FILE)
    barrier()                                    # every rank's shard is on disk before `latest` moves
    if is_rank0:
        tmp = ckpt_root / f"{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_root / LATEST)
        steps = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in steps[:-keep_last] if keep_last > 0 else []:
            if old != tag:
                shutil.rmtree(ckpt_root / old, ignore_errors=True)
    barrier()
    return tag


def load(engine, ckpt_root: Path, tag: str) -> dict:
    _, client = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if client is None or "trainer" not in client:
        raise RuntimeError(f"{Path(ckpt_root) / tag}: not a longctx checkpoint (no trainer state)")
    return client["trainer"]


class Checkpointer:
    """This run's checkpoints: where they are, which one to resume from, saving and loading them
    through the engine. Everything the trainer knows about checkpoints goes through here."""

    def __init__(self, engine, root: Path, *, is_rank0: bool, barrier, keep_last: int, model_config,
                 tokenizer_identity: dict, tokenizer_file: Optional[str] = None):
        self.engine, self.root = engine, Path(root)
        self.is_rank0, self.barrier, self.keep_last = is_rank0, barrier, keep_last
        self.model_config, self.tokenizer_identity = model_config, tokenizer_identity
        self.tokenizer_file = tokenizer_file

    def to_resume(self, resume: str) -> Optional[tuple]:
        """(root, tag) of the checkpoint `run.resume` names: never | auto (the latest here) | a directory."""
        if resume == "never":
            return None
        if resume == "auto":
            tag = latest_tag(self.root)
            return None if tag is None else (self.root, tag)
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"run.resume: {resume} is not a checkpoint directory")
        return path.parent, path.name

    def save(self, step: int, trainer_state: dict) -> str:
        return save(self.engine, self.root, step, trainer_state, self.model_config, self.tokenizer_identity,
                    self.keep_last, self.is_rank0, self.barrier, tokenizer_file=self.tokenizer_file)

    def load(self, root: Path, tag: str) -> dict:
        return load(self.engine, root, tag)
