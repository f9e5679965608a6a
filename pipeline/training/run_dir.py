"""Which run a run directory holds: its id (run.json), and `run.resume=never` setting an earlier run aside.

A new run gets a fresh id; every checkpoint records the id of the run that wrote it (`run_id` in
trainer_state.json). Resuming by `auto` continues only a checkpoint of this directory's run, so a
checkpoint of another run (left there, or copied in) is refused, never continued silently. `never`
moves the earlier run's outputs (checkpoints, metrics, evaluations, TensorBoard files, report) together
into previous/<time>-<id>/, so nothing of it can be pruned in favour of, resumed into, or mixed with the
new run, and nothing of it is lost. The data cache, job logs and the ranks' status stay where they are.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from .checkpoint import STOPPED

RUN_FILE = "run.json"
PREVIOUS = "previous"
OUTPUTS = ("checkpoints", "metrics.jsonl", "eval", "tensorboard", "report.md", "loss.png", STOPPED, RUN_FILE)


def recorded_run_id(run_dir: Path) -> Optional[str]:
    """The id of the run this directory holds, or None (a new directory, or one an older longctx wrote)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())["run_id"]


def start_run(run_dir: Path, rid: Optional[str] = None) -> str:
    """Records `rid` (a fresh id when None) as this directory's run; returns it."""
    rid = rid or uuid.uuid4().hex[:12]
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps({"run_id": rid, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    os.replace(tmp, run_dir / RUN_FILE)
    return rid


def set_aside(run_dir: Path) -> Optional[Path]:
    """Moves an earlier run's outputs into previous/<time>-<id>/ together; where they went, or None when the
    directory holds none."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in OUTPUTS if (run_dir / name).exists()]
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(max(p.stat().st_mtime for p in found)))
    dest = run_dir / PREVIOUS / f"{stamp}-{recorded_run_id(run_dir) or 'unnamed'}"
    suffix = 1
    while dest.exists():                 # two set aside within a second
        dest = dest.with_name(f"{dest.name.split('+')[0]}+{suffix}")
        suffix += 1
    dest.mkdir(parents=True)
    for path in found:
        os.replace(path, dest / path.name)
    return dest


def resume_mode(resume: str, say: bool = False) -> str:
    """`run.resume` as this process applies it: `never` starts one new run per job, so a job SLURM requeues
    (SLURM_RESTART_COUNT > 0, the same command again) continues that run instead of starting over each time."""
    if resume == "never" and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        if say:
            print(f"run.resume=never: restart {os.environ['SLURM_RESTART_COUNT']} of this SLURM job continues the "
                  "run it started (auto)", flush=True)
        return "auto"
    return resume


def is_under(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def check_run_id(run_dir: Path, checkpoint: Path, saved_id: Optional[str], resume: str) -> None:
    """Refuses to continue, by `auto`, a checkpoint another run wrote. A path given as run.resume is the
    user's choice of checkpoint: continued whatever run wrote it."""
    mine = recorded_run_id(run_dir)
    if resume == "auto" and mine is not None and saved_id is not None and saved_id != mine:
        raise ConfigError(f"{checkpoint}: written by run {saved_id}, but {Path(run_dir) / RUN_FILE} says this "
                          f"directory holds run {mine}: it is another run's checkpoint. Give it as "
                          f"run.resume={checkpoint} to continue from it, or start a new run with run.resume=never")
