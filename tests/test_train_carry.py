"""Training from a carried state (curriculum.stages[].carry_state) through `longctx run`: the state passes
from micro-step to micro-step, survives a SIGKILL through its checkpoint, and is the same split over two
sequence-parallel ranks as in one process."""
import subprocess
import sys

import pytest

from tests.shared import shared_once
from tests.training import STEPS, assert_same_run, records, run_cmd, sigkill_mid_stage, write_config

BATCH_THEN_DOCUMENT = ["curriculum.stages.0.carry_state=batch", "curriculum.stages.1.carry_state=document",
                       "curriculum.stages.1.mitigations={}", "eval.kinds=[heldout]"]


def _run(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{what}:\n" + r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="session")
def carried(uninterrupted, tmp_path_factory):
    """The uninterrupted 2-process run with stage 0 in State Passing (DP 2) and stage 1 in document lanes: run once
    for both workers (tests/shared.py), on the reference run's data, and linked into this worker's directory
    (the tests only read it, and write their own runs beside it)."""
    tmp, plain = uninterrupted
    with shared_once(tmp_path_factory, "carried") as (shared, make):
        if make:
            (shared / "mds").symlink_to((tmp / "mds").resolve(), target_is_directory=True)
            _run(run_cmd(write_config(shared, "carried"), *BATCH_THEN_DOCUMENT), "carried run")
    (tmp / "carried").symlink_to(shared / "carried", target_is_directory=True)
    return tmp, shared / "carried.yaml", records(tmp / "carried"), plain


def test_the_carried_state_changes_training_from_the_first_step(carried):
    tmp, _, recs, plain = carried
    assert [r["step"] for r in recs] == list(range(1, sum(STEPS) + 1))
    # step 1's first micro-batch starts from zeros, the others from carried states: another loss than plain's
    assert recs[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-6)
    ckpt = tmp / "carried" / "checkpoints" / "step_0000010"
    assert sorted(p.name for p in ckpt.glob("rank_state_*.pt")) == ["rank_state_00000.pt", "rank_state_00001.pt"]


def test_sigkill_then_resume_carries_the_saved_states_on(carried):
    """Killed mid-stage 0 (State Passing): resumed, the run continues from its checkpoint's carried states to
    the uninterrupted run's losses (from zero states it would differ)."""
    tmp, _, full, _ = carried
    cfg = write_config(tmp, "carried_killed")
    sigkill_mid_stage(run_cmd(cfg, *BATCH_THEN_DOCUMENT), tmp / "carried_killed")
    r = _run(run_cmd(cfg, *BATCH_THEN_DOCUMENT), "resumed run")
    assert "resumed from" in r.stdout
    assert_same_run(records(tmp / "carried_killed"), full)


def test_document_lanes_and_state_passing_split_over_two_ranks_equal_one_process(carried):
    """Stage 1 in document lanes and stage 0 in State Passing, both with one data-parallel replica: sequence
    parallel over 2 ranks (the carried state enters the first rank, leaves the last) = one process."""
    tmp, cfg, _, _ = carried
    common = [*BATCH_THEN_DOCUMENT, "checkpoint.every_steps=5", "train.document_resets=false"]
    two = _run(run_cmd(cfg, "run.dir=" + str(tmp / "carried_sp"), "curriculum.stages.0.seq_parallel=2",
                       "curriculum.stages.1.seq_parallel=2", *common), "SP 2")
    assert "x SP 2" in two.stdout
    _run([sys.executable, "-m", "longctx", "run", str(cfg), "--nproc", "1", "run.dir=" + str(tmp / "carried_1"),
          *common], "one process")
    a, b = records(tmp / "carried_sp"), records(tmp / "carried_1")
    assert len(a) == len(b) == sum(STEPS)
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "eval_loss"):
            if y.get(key) is not None:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=0), (key, x["step"])
