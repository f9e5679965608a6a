"""Training checkpoints: DeepSpeed state + trainer state, atomic `latest`, keep_last pruning.

Layout (ARCHITECTURE §6): checkpoints/step_XXXXXXX/ (DeepSpeed files, trainer_state.json,
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
