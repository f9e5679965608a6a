"""`longctx study`: every cell an ordinary run, evaluated and summarized with intervals; a failed cell reported
with its log while the others go on; finished cells and evaluations kept when the study runs again."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.pipeline.study.runner import Failure, run_study
from longctx.pipeline.study.spec import load_study
from longctx.pipeline.study.summary import summarize
from tests.shared import longctx_here

ROOT = Path(__file__).resolve().parents[1]

BASE = """
run: {{dir: {tmp}/unused}}
model: {{d_model: 32, n_layer: 1, vocab_size: 257, d_state: 16, headdim: 16, chunk_size: 16}}
data:
  prepare:
    output: {tmp}/mds
    synthetic: {{documents: 300, min_tokens: 60, max_tokens: 200, passkey_fraction: 1.0, seed: 0}}
train: {{micro_batch_size: 2}}
curriculum: {{stages: [{{name: a, seq_len: 64, steps: 3, global_batch_tokens: 128, lr: 0.003}}]}}
eval: {{every_checkpoint: false}}
launch: {{local_procs: 1}}
"""
# the same first stage, then one more: what a variant continuing `plain` trains
LONGER = BASE.replace("lr: 0.003}}]}}", "lr: 0.003}}, {{name: b, seq_len: 64, steps: 2, global_batch_tokens: 128}}]}}")

STUDY = """
study: tiny
base: {tmp}/base.yaml
seeds: [0, 1]
variants:
  plain: []
  no data: [data.shards={tmp}/nowhere]
  continued: {{base: {tmp}/longer.yaml, from: plain}}
baseline: plain
evaluate:
  passkey: {{lengths: [256, 512], depths: [0, 1], samples: 2}}
  length: {{lengths: [256], buckets: 4}}
  variants: {{decay 0.9: {{decay_scale: 0.9}}}}
  calibrate: {{cal: {{param: decay, length: 128, samples: 2, batch: 2, steps: 2, variants: [continued]}}}}
out: {tmp}/study
"""


def study_cmd(tmp, *flags):
    return subprocess.run([sys.executable, "-m", "longctx", "study", str(tmp / "study.yaml"), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_a_study_trains_evaluates_and_summarizes_each_cell_and_reports_the_failed_ones(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text(BASE.format(tmp=tmp_path))
    (tmp_path / "longer.yaml").write_text(LONGER.format(tmp=tmp_path))
    (tmp_path / "study.yaml").write_text(STUDY.format(tmp=tmp_path))
    # the dry run and the second run through the entry point in this process; the first as a user runs it
    dry = longctx_here(capsys, "study", tmp_path / "study.yaml", "--dry-run", cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
    assert "3 variants x 2 seeds = 6 cells" in dry.stdout and dry.stdout.count("[to run]") == 6
    assert dry.stdout.count("(continues 'plain')") == 2

    r = study_cmd(tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "study"
    assert "2 of 6 cells failed" in r.stdout
    for seed in (0, 1):        # the failing variant names its log, which holds the run's own error
        log = out / "logs" / f"no-data-seed-{seed}.log"
        assert f"'no data' seed {seed}: train failed" in r.stdout and str(log) in r.stdout
        assert "no DONE marker" in log.read_text() or "data.shards" in log.read_text()
    results = json.loads((out / "results.json").read_text())
    passkey = results["summary"]["plain"]["passkey"]
    assert set(passkey) == {"256", "512"}
    for e in passkey.values():        # 2 seeds x 2 depths x 2 keys per length
        assert e["n"] == 8 and e["n_seeds"] == 2 and e["ci_low"] <= e["mean"] <= e["ci_high"]
    # the calibration is an evaluation variant of the cells it names only
    assert set(results["summary"]) == {"plain", "plain + decay 0.9", "continued", "continued + decay 0.9",
                                       "continued + cal"}
    assert set(results["summary"]["plain"]) == {"passkey", "loss", "collapsed"}
    assert set(results["collapse_points"]["plain"]) == {"0", "1"}
    diff = results["differences"]["plain + decay 0.9"]["passkey"]["256"]
    assert diff["n_seeds"] == 2 and diff["ci_low"] <= diff["mean"] <= diff["ci_high"]
    assert [f["variant"] for f in results["failed"]] == ["no data", "no data"]
    md = (out / "results.md").read_text()
    assert "## passkey: difference from `plain`" in md and "## Failed cells" in md
    assert (out / "passkey.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0
    for seed in (0, 1):
        cell = out / "cells" / "plain" / f"seed-{seed}"
        assert (cell / "study_trained.json").exists() and (cell / "study-eval" / "passkey" / "passkey.json").exists()
        assert json.loads((cell / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
        # `continued` resumed from plain's last checkpoint: it trained stage b's two steps only
        continued = out / "cells" / "continued" / f"seed-{seed}"
        steps = [json.loads(line)["step"] for line in (continued / "metrics.jsonl").read_text().splitlines()
                 if '"step"' in line]
        assert steps and min(steps) == 4 and max(steps) == 5, steps
        assert f"run.resume={cell / 'checkpoints'}/" in (out / "logs" / f"continued-seed-{seed}.log").read_text()
        assert json.loads((continued / "study-calibrate" / "cal" / "calibration.json").read_text())

    # again: the finished cells are neither trained nor evaluated again; the failed ones are retried
    before = {p: p.stat().st_mtime_ns for p in (out / "cells" / "plain").rglob("passkey.json")}
    again = longctx_here(capsys, "study", tmp_path / "study.yaml", cwd=ROOT)
    assert again.returncode == 1
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (out / "logs" / "plain-seed-0.log").read_text().count("$ ") == 1
    assert (out / "logs" / "no-data-seed-0.log").read_text().count("$ ") == 2
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]


def _passkey(correct_by_length):
    return {"outputs": [{"length": L, "correct": c} for L, cs in correct_by_length.items() for c in cs]}


def test_the_summary_pairs_each_variant_with_the_baseline_on_the_same_seeds(tmp_path):
    """Synthetic per-cell results through run_study's bookkeeping: a cell whose evaluation fails is reported and
    drops out of the paired difference (n_seeds shows it)."""
    (tmp_path / "base.yaml").write_text(BASE.format(tmp=tmp_path))
    (tmp_path / "study.yaml").write_text(STUDY.format(tmp=tmp_path).replace("no data: [data.shards=", "other: [data.shards=")
                                         .replace("  length: {lengths: [256], buckets: 4}\n", "")
                                         .replace("  variants: {decay 0.9: {decay_scale: 0.9}}\n", "")
                                         .replace(f"  continued: {{base: {tmp_path}/longer.yaml, from: plain}}\n", "")
                                         .split("  calibrate:")[0] + f"out: {tmp_path}/study\n")
    study = load_study(str(tmp_path / "study.yaml"))
    scores = {("plain", 0): [1, 0, 1, 1], ("plain", 1): [0, 0, 1, 1], ("other", 0): [1, 1, 1, 1]}

    def evaluate(study, cell, kind):
        if (cell.variant, cell.seed) not in scores:
            raise RuntimeError("evaluation crashed")
        return {"as trained": _passkey({64: scores[(cell.variant, cell.seed)]})}

    results, failures = run_study(study, train=lambda s, c: None, evaluate=evaluate, say=lambda line: None)
    assert failures == [Failure("other", 1, "evaluate passkey", str(tmp_path / "study" / "logs" / "other-seed-1.log"),
                                "RuntimeError: evaluation crashed")]
    assert "evaluation crashed" in Path(failures[0].log).read_text()
    payload = summarize(study, results)
    assert payload["summary"]["plain"]["passkey"]["64"]["mean"] == pytest.approx(5 / 8)
    assert payload["summary"]["other"]["passkey"]["64"]["n_seeds"] == 1
    d = payload["differences"]["other"]["passkey"]["64"]
    assert d["n_seeds"] == 1 and d["mean"] == pytest.approx(1 - 3 / 4)      # seed 0 only: 4/4 against 3/4


def test_niah_results_are_summarized_per_task_from_each_prompts_score():
    from longctx.pipeline.study.summary import scores
    prompts = [{"task": "vt", "length": 1024, "score": 0.4, "correct": False},
               {"task": "vt", "length": 1024, "score": 1.0, "correct": True},
               {"task": "single_1", "length": 4096, "score": 0.0, "correct": False}]
    assert scores("niah", {"prompts": prompts}) == {"niah vt": {1024: [0.4, 1.0]}, "niah single_1": {4096: [0.0]}}
