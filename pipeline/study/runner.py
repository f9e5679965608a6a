"""`longctx study STUDY.yaml`: train every cell of a study (an ordinary `longctx run` each), evaluate each cell's
final checkpoint, then summarize (summary.py).

Resumable at every level, as a study of many runs on a shared machine needs to be: a cell whose training
finished (`study_trained.json` in its run directory) is not trained again, a killed one is continued by its own
run's resume (`run.resume=auto`), an evaluation whose files are there is not run again. A cell that fails is
recorded with its log and the others go on; the study exits non-zero when any failed, naming them."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

from .spec import Cell, Study, calibrations_for, eval_variants_for, folder

TRAINED = "study_trained.json"
EVAL_DIR = "study-eval"
CALIBRATE_DIR = "study-calibrate"
# A calibration reads the held-out stream in another order than the cell's evaluations (seed = the cell's): the
# scales are not fitted on the very sequences the loss-vs-position evaluation then reads first.
CALIBRATION_SEED_OFFSET = 1000
RESULT_FILES = {"passkey": "passkey.json", "length": "loss_vs_position.json", "niah": "niah.json"}
AS_TRAINED = "as trained"


@dataclass
class Failure:
    variant: str
    seed: int
    step: str                   # train | evaluate <kind>
    log: str
    error: str


def log_path(study: Study, cell: Cell) -> Path:
    return study.out / "logs" / f"{folder(cell.variant)}-seed-{cell.seed}.log"


def starting_checkpoint(cell: Cell) -> List[str]:
    """For a cell that continues another (`from`): resume from that cell's last checkpoint until it has one of
    its own (then its own run's resume takes over)."""
    if cell.start is None or (cell.run_dir / "checkpoints" / "latest").exists():
        return []
    start = cell.start
    latest = start.run_dir / "checkpoints" / "latest"
    if not (start.run_dir / TRAINED).exists() or not latest.exists():
        raise RuntimeError(f"it continues {start.variant!r} seed {start.seed}, whose training did not finish "
                           f"({start.run_dir})")
    return [f"run.resume={start.run_dir / 'checkpoints' / latest.read_text().strip()}"]


def train_cell(study: Study, cell: Cell) -> None:
    """`longctx run BASE OVERRIDES` for the cell, its output appended to the cell's log; skipped when done."""
    if (cell.run_dir / TRAINED).exists():
        return
    log = log_path(study, cell)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "longctx", "run", cell.base, *cell.overrides, *starting_checkpoint(cell)]
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"`longctx run` exited with status {rc}")
    (cell.run_dir / TRAINED).write_text(json.dumps({"command": cmd, "seconds": round(time.time() - t0, 1)}))


def calibrated_dir(cell: Cell, name: str) -> Path:
    return cell.run_dir / CALIBRATE_DIR / folder(name)


def calibrate_cell(study: Study, cell: Cell, name: str) -> None:
    """`longctx calibrate` on the cell's final checkpoint (evaluate.calibrate.NAME); kept when done."""
    from ..evaluate.calibrate import calibrate
    out = calibrated_dir(cell, name)
    if (out / "calibration.json").exists():
        return
    options = calibrations_for(study, cell.variant)[name]
    calibrate(str(cell.run_dir / "checkpoints"), data=cell.config.data.shards or cell.config.data.prepare.output,
              out=str(out), seed=cell.seed + CALIBRATION_SEED_OFFSET, **options)


def eval_variants(study: Study, cell: Cell) -> List[str]:
    """The evaluation-time variants as `longctx eval --variants` specs: the model as trained, each of
    `evaluate.variants` that applies to the cell (mitigations keys, nested ones dotted), then the cell's calibrated
    models."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}={json.dumps(v) if isinstance(v, list) else v}"
    extra = eval_variants_for(study, cell.variant)
    return ([f"{AS_TRAINED}="] + [f"{name}={','.join(flat(keys))}" for name, keys in extra.items()]
            + [f"{name}=checkpoint={calibrated_dir(cell, name)}" for name in calibrations_for(study, cell.variant)])


def evaluate_cell(study: Study, cell: Cell, kind: str) -> dict:
    """One evaluation kind on the cell's final checkpoint, every evaluation-time variant on the same prompts
    (the cell's seed picks them: the same prompts for every variant at a seed). Reuses results already written."""
    from ..evaluate.any_checkpoint import evaluate_checkpoint
    out = cell.run_dir / EVAL_DIR / kind
    done = out / RESULT_FILES[kind]
    if not done.exists():
        data = cell.config.data.shards or cell.config.data.prepare.output
        evaluate_checkpoint(kind, cell.run_dir / "checkpoints", out=out, seed=cell.seed,
                            variant_specs=eval_variants(study, cell), data=data if kind != "passkey" else None,
                            **study.evaluate[kind])
    payload = json.loads(done.read_text())
    return payload["variants"] if "variants" in payload else {AS_TRAINED: payload}


def run_study(study: Study, train: Callable[[Study, Cell], None] = train_cell,
              evaluate: Callable[[Study, Cell, str], dict] = evaluate_cell,
              say: Callable[[str], None] = print) -> tuple:
    """Every cell trained and evaluated (what can be); returns ({(variant, seed): {kind: results}}, failures)."""
    kinds = [k for k in study.evaluate if k not in ("variants", "calibrate")]
    results: Dict[tuple, Dict[str, dict]] = {}
    failures: List[Failure] = []
    for i, cell in enumerate(study.cells, 1):
        say(f"study {study.name}: cell {i}/{len(study.cells)}: {cell.variant!r} seed {cell.seed} ({cell.run_dir})")
        step = "train"
        try:
            train(study, cell)
            for name in calibrations_for(study, cell.variant):
                step = f"calibrate {name!r}"
                calibrate_cell(study, cell, name)
            got = {}
            for kind in kinds:
                step = f"evaluate {kind}"
                got[kind] = evaluate(study, cell, kind)
            results[(cell.variant, cell.seed)] = got
        except Exception as e:          # noqa: BLE001 -- one cell's failure must not stop the others
            log = log_path(study, cell)
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(f"study: {step} failed:\n{traceback.format_exc()}")
            failures.append(Failure(cell.variant, cell.seed, step, str(log), f"{type(e).__name__}: {e}"))
            say(f"study {study.name}: {cell.variant!r} seed {cell.seed}: {step} failed ({e}); log: {log}")
    return results, failures


def failure_lines(failures: List[Failure]) -> List[str]:
    return [f"  {f.variant!r} seed {f.seed}: {f.step} failed: {f.error} (log: {f.log})" for f in failures]


def describe(study: Study) -> str:
    """What `longctx study --dry-run` prints: each cell, its command and how far it got."""
    lines = [f"study {study.name}: {len(study.variants)} variants x {len(study.seeds)} seeds = {len(study.cells)} "
             f"cells, baseline {study.baseline!r}, into {study.out}"]
    for cell in study.cells:
        state = ("trained" if (cell.run_dir / TRAINED).exists() else
                 "started (resumes)" if (cell.run_dir / "checkpoints").exists() else "to run")
        start = f" (continues {cell.start.variant!r})" if cell.start else ""
        lines.append(f"  {cell.variant!r} seed {cell.seed} [{state}]{start}: longctx run {cell.base} "
                     + " ".join(cell.overrides))
    return "\n".join(lines)


def main(path: str, dry_run: bool = False, say: Callable[[str], None] = print) -> int:
    from .spec import load_study
    from .summary import write_summary
    study = load_study(path)
    if dry_run:
        say(describe(study))
        return 0
    results, failures = run_study(study, say=say)
    written = write_summary(study, results, failures)
    say(f"study {study.name}: wrote {', '.join(str(p) for p in written)}")
    if failures:
        say("\n".join([f"study {study.name}: {len(failures)} of {len(study.cells)} cells failed "
                       "(run the same command again to retry them; finished cells are kept):",
                       *failure_lines(failures)]))
        return 1
    return 0

