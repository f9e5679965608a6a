"""Precision and ZeRO as they are used: every combination trains 10 steps on 2 processes with the real
trainer and is compared step by step with the fp32 / ZeRO-0 run.

Tolerances (relative, on the step's loss and gradient norm):
- fp32, any ZeRO stage, with or without activation checkpointing: 1e-5 (the same arithmetic, reduced in
  another order);
- bf16 (the shipped recipes' precision), ZeRO 1-3: loss 5e-3, gradient norm 5e-2 over 10 steps at lr 3e-3
  (measured: loss within 8.9e-4; 1.1e-3 over 20 steps, the length this test ran before). bf16 at ZeRO 0 is refused by the config: DeepSpeed accumulates its
  gradients in bf16, and its loss drifted 1.8% above fp32 in 20 steps;
- fp16 with loss scaling: DeepSpeed's CPU accelerator has no fp16, so it runs only where two CUDA
  devices are (skipped here with that reason): loss 1e-2, gradient norm 5e-2.
"""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from longctx.data.config import DataConfig, PrepareConfig, SyntheticConfig, TokenizerConfig
from longctx.data.prepare import prepare

STEPS = 10               # the loss falls ~0.9 nats in these (the test asks 0.3)
FP32_VARIANTS = ["fp32-z1", "fp32-z2", "fp32-z3", "fp32-z0-ac", "fp32-z3-ac"]
BF16_VARIANTS = ["bf16-z1", "bf16-z2", "bf16-z3", "bf16-z2-ac"]    # bf16 at ZeRO 0 is refused (test_config)
FP16_VARIANTS = ["fp16-z0", "fp16-z1", "fp16-z2", "fp16-z3"]
TOLERANCE = {"fp32": (1e-5, 1e-5), "bf16": (5e-3, 5e-2), "fp16": (1e-2, 5e-2)}    # (loss, grad_norm)


def _config(root, shards, name):
    precision, zero, *ac = name.split("-")
    path = root / f"{name}.yaml"
    path.write_text(f"""
run: {{name: {name}, dir: {root / name}, seed: 4}}
model: {{d_model: 32, n_layer: 2, vocab_size: 257, d_state: 16, headdim: 16, chunk_size: 16}}
data: {{shards: {shards}}}
train: {{micro_batch_size: 1, zero_stage: {zero[1]}, precision: {precision}, activation_checkpointing: {bool(ac)}}}
curriculum: {{stages: [{{name: a, seq_len: 64, steps: {STEPS}, global_batch_tokens: 256, lr: 0.003}}]}}
eval: {{every_checkpoint: false}}
""")
    return str(path)


def _worker(rank, world, port, configs, device):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    from longctx.pipeline.config import load_config
    from longctx.pipeline.training.trainer import Trainer
    last = None
    for path in configs:                   # one process pair runs every variant: no start-up per run
        last = Trainer(load_config(path), path)
        assert last.run() == 0
    last.close()


def _run_variants(root, shards, names, device="cpu"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    configs = [_config(root, shards, n) for n in ["fp32-z0"] + names]
    mp.start_processes(_worker, args=(2, port, configs, device), nprocs=2, start_method="spawn")
    return {n: [json.loads(line) for line in (root / n / "metrics.jsonl").read_text().splitlines()]
            for n in ["fp32-z0"] + names}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    prepare(DataConfig(prepare=PrepareConfig(output=str(root / "mds"), num_workers=2,
                                             synthetic=SyntheticConfig(documents=40, min_tokens=300, max_tokens=1200,
                                                                       seed=2))), TokenizerConfig())
    return root / "mds"


def _compare(runs, names):
    base = runs["fp32-z0"]
    assert len(base) == STEPS and all(r["loss"] is not None for r in base)
    for name in names:
        loss_tol, norm_tol = TOLERANCE[name.split("-")[0]]
        got = runs[name]
        assert [r["step"] for r in got] == [r["step"] for r in base], name
        for a, b in zip(got, base):
            assert a["loss"] == pytest.approx(b["loss"], rel=loss_tol), (name, a["step"], "loss")
            if a["grad_norm"] is not None and b["grad_norm"] is not None:
                assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=norm_tol), (name, a["step"], "grad_norm")
        assert got[-1]["loss"] < got[0]["loss"] - 0.3, name     # and it learns


@pytest.mark.timeout(1200)
def test_fp32_and_bf16_under_every_zero_stage_follow_the_fp32_zero0_run(tmp_path, shards):
    names = FP32_VARIANTS + BF16_VARIANTS
    runs = _run_variants(tmp_path, shards, names)
    _compare(runs, names)
    assert all(r["grad_norm"] is not None for n in ("fp32-z1", "bf16-z2") for r in runs[n])


@pytest.mark.gpu
@pytest.mark.timeout(1200)
@pytest.mark.skipif(torch.cuda.device_count() < 2,       # before the fixture: no data prepared for a skip
                    reason="fp16 needs CUDA: DeepSpeed's CPU accelerator has no fp16, and 2 processes need 2 GPUs "
                           f"(found {torch.cuda.device_count()})")
def test_fp16_with_loss_scaling_under_every_zero_stage(tmp_path, shards):
    runs = _run_variants(tmp_path, shards, FP16_VARIANTS, device="cuda")
    _compare(runs, FP16_VARIANTS)
