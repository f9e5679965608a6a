"""Training checkpoints: DeepSpeed state + trainer state, a completeness marker, `latest`, keep_last pruning.

Layout (docs/ARCHITECTURE.md §6): checkpoints/step_XXXXXXX/ (DeepSpeed files, trainer_state.json,
model_config.json, tokenizer_info.json and, for a Hugging Face tokenizer, tokenizer.json, then
COMPLETE.json last), checkpoints/latest (the tag of the newest complete checkpoint).

A checkpoint counts only when its COMPLETE.json exists and every file it lists has the size it
records (longctx.pipeline.model.checkpoint_layout: what loading a model from a checkpoint reads too).
Resuming takes the newest complete checkpoint and says what it skipped.
The checkpoints directory must be one filesystem all ranks write to (as DeepSpeed requires).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from ..model.checkpoint_layout import (
    LATEST,
    MARKER,
    incomplete_reason,
    marker_files,
    newest_complete,
    step_dirs,
    tag_of,
)

TOKENIZER_INFO = "tokenizer_info.json"
TOKENIZER_FILE = "tokenizer.json"
STOPPED = "stopped.json"     # in the run directory: the run stopped at a checkpoint on SIGTERM
EXIT_STOPPED = 143           # 128 + SIGTERM: stopped at a checkpoint, resume to continue (SLURM RequeueExit)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rank_state_file(ckpt_dir: Path, rank: int) -> Path:
    """What one rank alone holds (its rows' carried states), beside DeepSpeed's files."""
    return Path(ckpt_dir) / f"rank_state_{rank:05d}.pt"


def save(engine, ckpt_root: Path, step: int, trainer_state: dict, model_config, tokenizer_identity: dict,
         keep_last: int, is_rank0: bool, barrier, tokenizer_file: Optional[str] = None,
         rank_state: Optional[tuple] = None) -> str:
    tag = tag_of(step)
    ckpt_root = Path(ckpt_root)
    d = ckpt_root / tag
    if is_rank0 and (d / MARKER).exists():       # saving this step again (a resumed stop): it is incomplete until done
        (d / MARKER).unlink()
    barrier()
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"trainer": trainer_state}, save_latest=False)
    if rank_state is not None:                   # (rank, state): written by each rank before the marker's barrier
        import torch
        rank, state = rank_state
        tmp = rank_state_file(d, rank).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(rank_state_file(d, rank))
    if is_rank0:
        (d / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (d / "model_config.json").write_text(json.dumps(asdict(model_config), indent=1))
        (d / TOKENIZER_INFO).write_text(json.dumps(tokenizer_identity, indent=1))
        if tokenizer_file:                       # the run's tokenizer travels with its checkpoints
            shutil.copyfile(tokenizer_file, d / TOKENIZER_FILE)
    barrier()                                    # every rank's part is on disk before the marker says so
    if is_rank0:
        _write_atomic(d / MARKER, json.dumps({"step": step, "files": marker_files(d)}, indent=1))
        _write_atomic(ckpt_root / LATEST, tag)
        _prune(ckpt_root, keep_last, tag)
    barrier()
    return tag


def _prune(root: Path, keep_last: int, current: str) -> None:
    """Keep the newest `keep_last` checkpoints (0: all). A directory that cannot be removed is reported:
    it keeps its disk space, and the operator should know."""
    if keep_last <= 0:
        return
    for old in step_dirs(root)[keep_last:]:
        if old.name == current:
            continue
        try:
            shutil.rmtree(old)
        except OSError as e:
            print(f"warning: could not remove old checkpoint {old}: {e}; it still takes disk space", flush=True)


def write_stop_marker(run_dir: Path, step: int) -> None:
    """Tells the launcher (`longctx run`) that the run stopped at a checkpoint rather than failed."""
    _write_atomic(Path(run_dir) / STOPPED, json.dumps({"step": step, "checkpoint": tag_of(step) if step else None}))


def load(engine, ckpt_root: Path, tag: str) -> dict:
    _, client = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if client is None or "trainer" not in client:
        raise RuntimeError(f"{Path(ckpt_root) / tag}: not a longctx checkpoint (no trainer state)")
    return client["trainer"]


def _recorded_steps(metrics_file: Optional[Path]) -> int:
    if metrics_file is None or not metrics_file.exists():
        return 0
    return sum(1 for line in metrics_file.read_text().splitlines() if line.strip())


class Checkpointer:
    """This run's checkpoints: where they are, which one to resume from, saving and loading them
    through the engine. Everything the trainer knows about checkpoints goes through here."""

    def __init__(self, engine, root: Path, *, is_rank0: bool, barrier, keep_last: int, model_config,
                 tokenizer_identity: dict, tokenizer_file: Optional[str] = None, metrics_file: Optional[Path] = None):
        self.engine, self.root = engine, Path(root)
        self.is_rank0, self.barrier, self.keep_last = is_rank0, barrier, keep_last
        self.model_config, self.tokenizer_identity = model_config, tokenizer_identity
        self.tokenizer_file, self.metrics_file = tokenizer_file, metrics_file

    def to_resume(self, resume: str) -> Optional[tuple]:
        """(root, tag) of the checkpoint `run.resume` names: never | auto (the newest complete one here) |
        a checkpoint directory. With `auto`, a run that recorded steps but has no complete checkpoint is
        refused: starting over would overwrite its metrics."""
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            if not path.is_dir():
                raise ConfigError(f"run.resume: {resume} is not a checkpoint directory")
            reason = incomplete_reason(path)
            if reason is not None:
                raise ConfigError(f"run.resume: {resume} is not a complete checkpoint ({reason})")
            return path.parent, path.name
        tag, skipped = newest_complete(self.root)
        if skipped and self.is_rank0:
            print(f"warning: resuming from {tag or 'nothing'}; skipped: " + "; ".join(skipped), flush=True)
        if tag is None:
            recorded = _recorded_steps(self.metrics_file)
            if recorded:
                raise ConfigError(
                    f"{self.metrics_file} records {recorded} steps but there is no complete checkpoint in "
                    f"{self.root}{' (skipped: ' + '; '.join(skipped) + ')' if skipped else ''}: refusing to start "
                    "over. Set run.resume=never to start a new run (this one's outputs move to previous/ beside it), "
                    "or run.resume=PATH to a checkpoint")
            return None
        return self.root, tag

    def save(self, step: int, trainer_state: dict, rank_state: Optional[tuple] = None) -> str:
        """rank_state: (this rank, what it alone holds), saved beside the checkpoint (`load_rank_state`)."""
        return save(self.engine, self.root, step, trainer_state, self.model_config, self.tokenizer_identity,
                    self.keep_last, self.is_rank0, self.barrier, tokenizer_file=self.tokenizer_file,
                    rank_state=rank_state)

    def load(self, root: Path, tag: str) -> dict:
        return load(self.engine, root, tag)

    @staticmethod
    def load_rank_state(root: Path, tag: str, rank: int):
        """What `save(..., rank_state=(rank, state))` wrote, or None when it wrote nothing for this rank."""
        path = rank_state_file(Path(root) / tag, rank)
        if not path.is_file():
            return None
        import torch
        return torch.load(path, map_location="cpu", weights_only=True)
