"""2-process DeepSpeed training on CPU through `longctx run`: stages, resume after SIGKILL, ZeRO-3, export."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from longctx.data.stream import PackedStream, open_splits
from longctx.data.streaming_shm import host_registry_lock
from longctx.pipeline.model import Mamba2LM
from longctx.pipeline.parallel.shm import mapped_paths, release_stale_streaming_shm
from longctx.pipeline.training.loss import lm_loss
from longctx.pipeline.training.trainer import EVAL_SEED_OFFSET
from tests.training import (
    STEPS,
    STEPS3,
    assert_same_run,
    records,
    run_cmd,
    session_pids,
    sigkill_mid_stage,
    write_config,
)


def test_two_stages_loss_falls_and_stage_switches_at_the_right_step(uninterrupted):
    tmp, recs = uninterrupted
    assert [r["step"] for r in recs] == list(range(1, sum(STEPS) + 1))
    assert [r["seq_len"] for r in recs] == [64] * STEPS[0] + [128] * STEPS[1]
    assert [r["stage"] for r in recs] == [0] * STEPS[0] + [1] * STEPS[1]
    assert recs[-1]["tokens"] == 512 * sum(STEPS)
    assert np.mean([r["loss"] for r in recs[-3:]]) < recs[0]["loss"] - 0.3
    assert all(np.isfinite(r["grad_norm"]) for r in recs)
    assert [r["step"] for r in recs if "eval_loss" in r] == [2, 4, 6, 8, 10]
    ckpts = tmp / "full" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000010"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_0000008", "step_0000010"]
    assert (tmp / "full" / "report.md").exists() and (tmp / "full" / "loss.png").exists()
    assert list((tmp / "full" / "tensorboard").glob("events.out.tfevents.*"))
    last_eval = tmp / "full" / "eval" / "step_0000010"
    assert json.loads((last_eval / "heldout.json").read_text())["seq_len"] == 128
    for name in ("passkey.json", "passkey.png", "loss_vs_position.json", "loss_vs_position.png", "state_stats.json"):
        assert (last_eval / name).exists(), name
    # eval.figures: false with final: {figures: true}: earlier evaluations write their numbers, not their figures
    assert sorted(p.name for p in (tmp / "full" / "eval" / "step_0000008").iterdir()) == [
        "heldout.json", "loss_vs_position.json", "passkey.json", "state_stats.json"]
    passkey = json.loads((last_eval / "passkey.json").read_text())
    assert set(passkey["accuracy"]) == {"256", "512"} and len(passkey["outputs"]) == 6
    assert recs[-1]["passkey_accuracy"] == passkey["mean_accuracy"]
    assert 0 < sum(r.get("eval_seconds", 0) for r in recs)


def _inode(path):
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


@pytest.mark.timeout(1200)
def test_sigkill_in_every_stage_then_resume_reproduces_the_uninterrupted_run(uninterrupted3):
    """A three-stage run SIGKILLed in stage 0, then (resumed) in stage 1, then in stage 2, and resumed to its
    end: each resume continues from a checkpoint in the stage it died in (past finished stages for the last
    two: those were refused as if a finished stage's steps had changed) to the uninterrupted run's losses."""
    tmp, full = uninterrupted3
    cfg = write_config(tmp, "killed", stages=3)
    # mosaicml-streaming's, by inode: a name given back may be taken again, meanwhile, by another test's reader
    registrations = lambda: {(p, _inode(p)) for p in glob.glob("/dev/shm/[0-9][0-9][0-9][0-9][0-9][0-9]_*")}
    # a killed run's are mapped by no process; a live reader's, of another test running meanwhile, are
    unmapped = lambda found: {(p, ino) for p, ino in found if p not in mapped_paths()}
    with host_registry_lock():
        release_stale_streaming_shm()      # earlier leftovers: the killed run might reuse their names
    before = registrations()
    sigkill_mid_stage(run_cmd(cfg), tmp / "killed")
    leaked = unmapped(registrations() - before)          # what the killed ranks' readers leave
    assert leaked
    live = open_splits(str(tmp / "mds"))[0]    # a reader still going on this host (another job's, to the run)
    before = registrations() - leaked
    ends = np.cumsum(STEPS3)
    # killed with step 9 / 13 logged: checkpoint 8 / 12 (in stage 1 / 2) is complete, as metrics log first
    for after, stage_end in ((ends[0] + 3, ends[1]), (ends[1] + 3, ends[2])):
        sigkill_mid_stage(run_cmd(cfg), tmp / "killed", after_steps=after, stage_end=stage_end)
        leaked |= unmapped(registrations() - before)
    r = subprocess.run(run_cmd(cfg), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not leaked & registrations()      # those files removed before the shards were opened again
    assert re.search(r"resumed from \S+ at step 1[2-5]\b", r.stdout), r.stdout[-3000:]
    assert glob.glob(f"/dev/shm/{live.ds._shm_prefix_int:06}_locals") and live.tokens(0).size   # kept
    assert_same_run(records(tmp / "killed"), full)


@pytest.mark.timeout(900)
def test_resume_never_sets_the_earlier_run_aside_and_auto_then_continues_the_new_run(uninterrupted):
    """run.resume=never in the directory of a finished run, SIGKILLed at step 3, then the same command with
    auto: it continues the new run (the old one's checkpoints 8 and 10 stayed in place, kept by pruning over
    the new run's, and auto continued the old weights), and the old run is kept whole beside it."""
    tmp, full = uninterrupted
    run = tmp / "again"
    shutil.copytree(tmp / "full", run)
    cfg = write_config(tmp, "again")
    # ready once the old run's metrics are set aside: previous/<id>/ is made first, then the files move into it
    # one by one, and until then metrics.jsonl is still the old run's (all 10 steps)
    sigkill_mid_stage(run_cmd(cfg, "run.resume=never"), run,
                      ready=lambda: any((run / "previous").glob("*/metrics.jsonl")))
    [old] = (run / "previous").iterdir()
    assert {p.name for p in old.iterdir()} >= {"checkpoints", "metrics.jsonl", "eval", "tensorboard", "report.md",
                                                "loss.png", "run.json"}
    assert (old / "checkpoints" / "step_0000010" / "COMPLETE.json").exists() and records(old) == full
    new_id = json.loads((run / "run.json").read_text())["run_id"]
    assert new_id != json.loads((old / "run.json").read_text())["run_id"]
    assert json.loads((run / "checkpoints" / "step_0000002" / "trainer_state.json").read_text())["run_id"] == new_id
    r = subprocess.run(run_cmd(cfg), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"resumed from \S+step_0000002 at step 2\b", r.stdout), r.stdout[-3000:]
    assert_same_run(records(run), full)
    # the old run continued on purpose from its step 8 (run.resume=PATH): the new run is set aside first, so
    # neither is pruned for the other nor mixed into the other's checkpoint folders
    r = subprocess.run(run_cmd(cfg, f"run.resume={old / 'checkpoints' / 'step_0000008'}"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"this directory's run {new_id} is now in" in r.stdout
    assert json.loads((run / "run.json").read_text())["run_id"] == json.loads((old / "run.json").read_text())["run_id"]
    assert len(list((run / "previous").iterdir())) == 2
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*"))] == ["step_0000010"]
    assert_same_run(records(run), full[8:])


def test_zero3_run_and_export_round_trip(uninterrupted, tmp_path):
    tmp, full = uninterrupted
    cfg = write_config(tmp, "zero3", zero=3)
    r = subprocess.run(run_cmd(cfg), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = records(tmp / "zero3")
    assert len(recs) == sum(STEPS) and recs[-1]["loss"] < recs[0]["loss"]
    # ZeRO-3 and ZeRO-1 optimize the same model from the same data: same first losses
    assert recs[0]["loss"] == pytest.approx(full[0]["loss"], rel=1e-5)

    from longctx.launch.cli import main
    for run in ("zero3", "full"):
        out = tmp_path / f"export-{run}"
        # `longctx export` in this process (its command line in a fresh one: tests/test_cli.py)
        assert main(["export", str(tmp / run / "checkpoints"), "--format", "mamba_ssm", "--out", str(out)]) == 0
        # the run's tokenizer record travels with the export: a run continuing it refuses another tokenizer
        assert (out / "tokenizer_info.json").read_text() == (
            tmp / run / "checkpoints" / "step_0000008" / "tokenizer_info.json").read_text()
        model = Mamba2LM.from_pretrained(out).eval()
        assert model.mitigations is not None and model.mitigations[0].decay_scale[0] == pytest.approx(0.99)
        # the exported weights give the held-out loss the trainer logged at its last checkpoint
        prev = json.loads((tmp / run / "checkpoints" / "step_0000008" / "trainer_state.json").read_text())
        stream = PackedStream(open_splits(str(tmp / "mds"))[1], 256, seed=3 + EVAL_SEED_OFFSET)
        stream.load_state_dict(prev["eval_loader"])
        batch = stream.next_batch(2, 128)
        with torch.no_grad():
            loss = lm_loss(model(torch.as_tensor(batch.input_ids), seq_idx=torch.as_tensor(batch.seq_idx)).logits,
                           torch.as_tensor(batch.labels))
        logged = records(tmp / run)[-1]["eval_loss"]
        assert float(loss) == pytest.approx(logged, rel=1e-5)


def test_plan_flag_prints_the_stage_table(uninterrupted):
    tmp, _ = uninterrupted
    r = subprocess.run(run_cmd(write_config(tmp, "plan"), "--plan"), capture_output=True, text=True)
    assert r.returncode == 0
    assert "short" in r.stdout and "long" in r.stdout and "10 steps" in r.stdout
    assert not (tmp / "plan").exists()


SLOW_EVAL = "eval.passkey_samples=300"     # ~1 minute of passkey decoding per checkpoint: longer than the grace


@pytest.mark.timeout(1200)
# SIGTERM to the whole process group is what schedulers send (and the SLURM tests do for real); the launcher
# alone (a person's kill) runs with the slow tests
@pytest.mark.parametrize("target", [pytest.param("launcher", marks=pytest.mark.slow), "process group"])
def test_preemption_checkpoints_first_and_resumes_to_the_uninterrupted_run(uninterrupted, target):
    """SIGTERM as a cluster sends it: to DeepSpeed's launcher (which SIGKILLs its ranks 30 s later), or to the
    whole process group of `longctx run`, while the checkpoint's evaluation takes longer than that grace.
    The checkpoint of the step reached is written first; the run exits 143; resuming (with a quick
    evaluation: an allowed change) runs the put-off evaluation and ends equal to the uninterrupted run."""
    tmp, full = uninterrupted
    name = "term-" + target.replace(" ", "-")
    cfg = write_config(tmp, name)
    proc = subprocess.Popen(run_cmd(cfg, SLOW_EVAL), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp / name / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.02)
    time.sleep(2)                    # step 2 is due for the slow evaluation: it is training it or evaluating it now
    t0 = time.time()
    if target == "launcher":
        launchers = session_pids(proc.pid, b"deepspeed.launcher.launch")
        assert len(launchers) == 1
        os.kill(launchers[0], signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    stop_seconds = time.time() - t0
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM: checkpoint written at step" in out, out[-3000:]
    assert stop_seconds < 30, f"the stop took {stop_seconds:.0f} s: past the launcher's grace"
    ckpts = tmp / name / "checkpoints"
    reached = int((ckpts / "latest").read_text().split("_")[1])
    assert 2 <= reached < sum(STEPS)
    assert (ckpts / f"step_{reached:07d}" / "COMPLETE.json").exists()
    r = subprocess.run(run_cmd(cfg), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "eval.passkey_samples: 300 -> 1" in r.stdout
    assert_same_run(records(tmp / name), full)


def test_a_dead_rank_ends_the_run_naming_it_and_the_next_run_resumes(uninterrupted):
    """SIGKILL to one rank (what the out-of-memory killer or a lost node does): the other rank and the
    launcher end within a bounded time (gloo sees the closed connection; DeepSpeed's launcher terminates
    the rest), `longctx run` exits non-zero naming the rank, and the same command resumes."""
    tmp, full = uninterrupted
    cfg = write_config(tmp, "dead")
    proc = subprocess.Popen(run_cmd(cfg), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp / "dead" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    rank1 = [pid for pid in session_pids(proc.pid, b"longctx.launch.cli")
             if b"RANK=1" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    t0 = time.time()
    out, err = proc.communicate(timeout=300)
    ended = time.time() - t0
    assert proc.returncode != 0
    assert ended < 60, f"the run took {ended:.0f} s to end after a rank died"
    assert f"rank 1 (pid {rank1[0]} on" in err and "died without finishing" in err, err[-3000:]
    r = subprocess.run(run_cmd(cfg), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert_same_run(records(tmp / "dead"), full)


def test_resume_with_another_architecture_is_refused_naming_the_field(uninterrupted):
    import shutil
    tmp, _ = uninterrupted
    shutil.copytree(tmp / "full", tmp / "changed")
    cfg = write_config(tmp, "changed")
    # a check of the config against the checkpoint, which every rank makes alike: one rank is enough (the launcher
    # naming each failed rank of several: test_a_dead_rank_ends_the_run_naming_it_and_the_next_run_resumes)
    r = subprocess.run(run_cmd(cfg, "model.d_state=32", nproc=1), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "cannot resume: model.d_state changed since the checkpoint (it has 16, this run 32)" in r.stdout + r.stderr
    assert "rank 0" in r.stderr and "failed: ConfigError" in r.stderr


def test_non_finite_losses_stop_the_run_with_a_clear_message(uninterrupted, tmp_path):
    tmp, _ = uninterrupted
    from longctx.pipeline.model import Mamba2Config
    broken = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=257, d_state=16, headdim=16, chunk_size=16))
    with torch.no_grad():
        broken.backbone.norm_f.weight.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "nan-model")
    cfg = write_config(tmp, "nan")
    # every rank's loss is NaN alike (the weights are): one rank is enough (a NaN on one rank's micro-batch only,
    # over two: tests/test_nonfinite.py)
    r = subprocess.run(run_cmd(cfg, f"model.from_pretrained={tmp_path / 'nan-model'}", "train.max_bad_steps=2",
                               nproc=1), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "2 steps in a row had a non-finite loss" in r.stdout + r.stderr       # N means N
    assert len(records(tmp / "nan")) == 2


def test_train_runs_as_a_single_process_without_a_launcher(uninterrupted):
    tmp, _ = uninterrupted
    cfg = write_config(tmp, "single")
    r = subprocess.run([sys.executable, "-m", "longctx", "train", str(cfg), "curriculum.stages.1.steps=1",
                        "curriculum.stages.0.steps=2", "eval.compare_mitigations.decay_scale=0.5",
                        "eval.variants={half input: {input_scale: 0.5}}", "train.document_resets=false"],
                       capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    recs = records(tmp / "single")
    assert [x["seq_len"] for x in recs] == [64, 64, 128]
    # loss against position as trained and with eval.compare_mitigations on top of the stage's
    curves = json.loads((tmp / "single" / "eval" / "step_0000003" / "loss_vs_position.json").read_text())["variants"]
    assert set(curves) == {"as trained", "with mitigations", "half input"}
    assert len({c["mean_loss"] for c in curves.values()}) == 3
    assert "collapse_point_mitigated" in recs[-1] and set(recs[-1]["collapse_point_variants"]) == {"half input"}
    passkey = json.loads((tmp / "single" / "eval" / "step_0000003" / "passkey.json").read_text())["variants"]
    assert recs[-1]["passkey_accuracy_variants"] == {"half input": passkey["half input"]["mean_accuracy"]}


def test_sequence_parallel_run_equals_one_process(uninterrupted):
    """Stage 0 data-parallel over 2 ranks, stage 1 sequence-parallel over them (seq_parallel: 2): the losses,
    gradient norms and held-out losses of one process running the same global batches."""
    tmp, _ = uninterrupted
    cfg = write_config(tmp, "sp")
    common = ["eval.kinds=[heldout]", "checkpoint.every_steps=3"]
    two = subprocess.run(run_cmd(cfg, "curriculum.stages.1.seq_parallel=2", *common),
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "x SP 2" in two.stdout
    one = subprocess.run([sys.executable, "-m", "longctx", "run", str(cfg), "--nproc", "1", "run.dir=" + str(tmp / "sp1"),
                          *common], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    a, b = records(tmp / "sp"), records(tmp / "sp1")
    assert len(a) == len(b) == sum(STEPS) and [r["seq_len"] for r in a] == [r["seq_len"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "eval_loss"):
            if y.get(key) is not None:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=0), (key, x["step"])
    assert sum(r.get("eval_loss") is not None for r in a) >= 2
