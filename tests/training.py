"""A small 2-stage training config and the helpers the training tests share (local and SLURM runs)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

STEPS = (6, 4)
STEPS3 = (6, 4, 6)        # the three-stage run: a third stage at 256 tokens
THIRD_STAGE = "    - {name: longer, seq_len: 256, steps: 6, global_batch_tokens: 512, lr: 0.002}\n"


def write_config(tmp_path, name, zero=1, every=2, stages=2):
    """The run `name` in tmp_path, its data prepared in tmp_path/mds: where that is a link (the reference run's
    data, tests/conftest.py), the directory it links to: the manifest records its inputs by that path, and under
    another one prepare would record them again, writing into the shared data."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
run: {{name: {name}, dir: {tmp_path / name}, seed: 3}}
model: {{d_model: 32, n_layer: 2, vocab_size: 257, d_state: 16, headdim: 16, chunk_size: 16}}
tokenizer: {{kind: byte}}
data:
  prepare:
    output: {(tmp_path / 'mds').resolve()}
    heldout_fraction: 0.2
    synthetic: {{documents: 60, min_tokens: 300, max_tokens: 1500, seed: 1}}
train: {{micro_batch_size: 1, zero_stage: {zero}}}
curriculum:
  stages:
    - {{name: short, seq_len: 64, steps: {STEPS[0]}, global_batch_tokens: 512, lr: 0.004, warmup_steps: 1}}
    - {{name: long, seq_len: 128, steps: {STEPS[1]}, global_batch_tokens: 512, lr: 0.003, decay: linear,
        mitigations: {{decay_scale: 0.99}}}}
checkpoint: {{every_steps: {every}, keep_last: 2}}
eval: {{heldout_sequences: 2, passkey_lengths: [256, 512], passkey_samples: 1, length_max: 512, length_buckets: 6,
       figures: false, final: {{figures: true}}}}
""")
    if stages == 3:
        text = path.read_text()
        at = text.index("checkpoint:")
        path.write_text(text[:at] + THIRD_STAGE + text[at:])
    return path


def run_cmd(path, *extra, nproc=2):
    return [sys.executable, "-m", "longctx", "run", str(path), "--nproc", str(nproc), *extra]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(recs):
    return [{k: r.get(k) for k in ("step", "stage", "seq_len", "loss", "lr", "grad_norm", "tokens", "eval_loss")}
            for r in recs]


def session_pids(session, marker: bytes):
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != session:
                continue
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if marker in cmd:
            pids.append(int(pid))
    return pids


def assert_same_run(got, expect):
    got, expect = comparable(got), comparable(expect)
    assert [x["step"] for x in got] == [x["step"] for x in expect]
    for a, b in zip(got, expect):
        for k in ("loss", "lr", "grad_norm", "eval_loss"):
            if b[k] is None:
                assert a[k] is None, (a["step"], k)
            else:
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)




def sigkill_mid_stage(cmd, run_dir, after_steps: int = 3, stage_end: int = STEPS[0], ready=lambda: True) -> int:
    """Start `cmd` (a `longctx run`), SIGKILL its whole process group once `after_steps` steps are logged;
    the steps it had logged. Asserts the run died before step `stage_end` was logged (inside stage 0 by
    default). `ready()`: when the run's own metrics.jsonl is there (an earlier run's may be first)."""
    log = open(run_dir.parent / f"{run_dir.name}.kill-{after_steps}.log", "w+")
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ready() and metrics.exists() and len(metrics.read_text().splitlines()) >= after_steps:
            break
        time.sleep(0.02)
    if proc.poll() is not None:            # it ended by itself (refused to resume, failed): say why
        log.seek(0)
        raise AssertionError(f"the run ended with {proc.returncode} before the kill:\n{log.read()[-3000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    done = len(metrics.read_text().splitlines())
    assert after_steps <= done < stage_end, f"the run had logged {done} steps at the kill; it must die mid-stage"
    return done
