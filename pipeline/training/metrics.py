"""Run logging: metrics.jsonl (one object per optimizer step), TensorBoard scalars, and what the console shows
of them (progress.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .progress import Progress

TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "seq_len", "stage")
EVAL_KEYS = ("eval_loss", "passkey_accuracy", "passkey_accuracy_mitigated", "niah_accuracy", "niah_accuracy_mitigated",
             "collapse_point", "collapse_point_mitigated", "max_state_norm")


class MetricsLogger:
    """Rank 0 writes; other ranks hold an inert logger. `resume_step` drops records after it, so a
    resumed run's file equals an uninterrupted run's (an earlier run's file was set aside by
    run.resume=never before: training.run_dir). Every record logged is shown by `progress` (when given),
    which decides what of it reaches the console."""

    def __init__(self, run_dir: Path, active: bool, resume_step: int = 0, progress: Optional[Progress] = None):
        self.active = active
        self.path = Path(run_dir) / "metrics.jsonl"
        self.progress = progress
        self.tb = None
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue            # a line cut by a kill
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self.file = open(self.path, "a")
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for group, keys in (("train", TRAIN_KEYS), ("eval", EVAL_KEYS)):
            for k in keys:
                if isinstance(record.get(k), (int, float)):
                    self.tb.add_scalar(f"{group}/{k}", record[k], record["step"])
        if self.progress is not None:
            self.progress.show(record)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.active:
            self.tb.add_scalar(tag, value, step)

    def image(self, tag: str, png, step: int) -> None:
        if self.active and Path(png).exists():
            import matplotlib.image
            self.tb.add_image(tag, matplotlib.image.imread(str(png))[..., :3], step, dataformats="HWC")

    def close(self) -> None:
        if self.active:
            self.file.close()
            self.tb.close()
