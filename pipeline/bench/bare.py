"""`longctx bench train --vs-bare`: the trainer against a bare PyTorch loop of the same model, shapes and
optimizer, on the same machine in the same invocation (the ratio is the figure to quote).

The trainer side is a real `longctx run` (DeepSpeed engine, loader, metrics, the per-step checks) of one
stage with no evaluation; its speed is the median of the step records' `tokens_per_s` (wall time from one
step's end to the next: loader, logging and checks included), warm-up steps left out. The bare side is
what a user would write by hand: gloo processes, random token rows, forward + backward per micro-batch,
one flat all-reduce of the gradients, clipping, AdamW, each step timed the same way; a stage with
`carry_state` starts each micro-batch from the previous one's detached final state, as truncated BPTT
written by hand would (the last rank's under sequence parallelism, sent to the group). Both run with the
threads per process `longctx run` gives its ranks (cores / processes).
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import load_config, model_config
from ..model import Mamba2LM
from ..training.loss import sequence_loss

WARMUP_STEPS = 3
BENCH_DOCUMENTS = 4000


def threads_per_process(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


def _bare_worker(rank, world, model_cfg, plan, steps, lr, clip, weight_decay, init_file, out_dir):
    from ..parallel import Groups
    from ..training.trainer import adamw
    torch.set_num_threads(threads_per_process(world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Mamba2LM(model_cfg).train()
        sp = Groups(world, rank).get(plan.seq_parallel) if plan.seq_parallel > 1 else None
        model.set_sequence_parallel(sp)                  # the model's own state passing, as the trainer runs it
        opt = adamw(model, lr, weight_decay)          # the trainer's optimizer
        seg = plan.seq_len // plan.seq_parallel
        g = torch.Generator().manual_seed(rank // plan.seq_parallel)
        ids = torch.randint(0, model_cfg.vocab_size, (steps, plan.grad_accum, plan.micro_batch, plan.seq_len + 1),
                            generator=g)
        cols = slice((rank % plan.seq_parallel) * seg, (rank % plan.seq_parallel + 1) * seg)
        # packed documents of 200 tokens: the state resets at each start, as in the trainer's rows
        seq_idx = (torch.arange(plan.seq_len)[cols] // 200).expand(plan.micro_batch, seg).contiguous().to(torch.int32)
        params = [p for p in model.parameters() if p.requires_grad]
        seconds, carried = [], None
        for s in range(steps):
            t0 = time.perf_counter()
            for m in range(plan.grad_accum):
                rows = ids[s, m]
                if plan.carry_state != "none":
                    model.enter_carried(carried)
                loss, _ = sequence_loss(model(rows[:, :-1][:, cols], seq_idx=seq_idx).logits, rows[:, 1:][:, cols], sp)
                if plan.carry_state != "none":
                    carried = model.carried_final()
                (loss / plan.grad_accum).backward()
            if world > 1:                                  # one flat all-reduce, the mean over every rank
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat)
                flat /= world
                offset = 0
                for p in params:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - t0)
        Path(out_dir, f"bare{rank}.json").write_text(json.dumps(seconds))
    finally:
        if world > 1:
            dist.destroy_process_group()


def bare_tokens_per_s(model_cfg, nproc: int, plan, steps: int, clip: float, weight_decay: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = (nproc, model_cfg, plan, steps, plan.lr, clip, weight_decay, f"{tmp}/init", tmp)
        if nproc == 1:
            _bare_worker(0, *args)
        else:
            mp.start_processes(_bare_worker, args=args, nprocs=nproc, start_method="spawn")
        per_rank = [json.loads(Path(tmp, f"bare{r}.json").read_text()) for r in range(nproc)]
    step_s = [max(r[s] for r in per_rank) for s in range(WARMUP_STEPS, steps)]
    return plan.global_batch_tokens / statistics.median(step_s)


def stage_override(stage: dict, steps: int) -> str:
    """The config's stage alone, `steps` long, at its peak learning rate throughout."""
    return "curriculum.stages=[" + json.dumps(dict(stage, steps=steps, warmup_steps=0, decay="constant")) + "]"


def trainer_tokens_per_s(config: str, run_dir: Path, shards: str, nproc: int, stage: dict, steps: int) -> float:
    """A real `longctx run` of one stage (no evaluation, no checkpoint but the last)."""
    overrides = [f"run.dir={run_dir}", "run.resume=never", f"data.shards={shards}", f"launch.local_procs={nproc}",
                 stage_override(stage, steps), "eval.every_checkpoint=false",
                 "checkpoint.every_steps=0"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_process(nproc)))
    subprocess.run([sys.executable, "-m", "longctx", "run", config, *overrides], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records[WARMUP_STEPS:])


def run_vs_bare(config: str, procs: List[int], steps: int = 20) -> List[dict]:
    """One row per (stage of the config, processes): the trainer's tokens/s and the bare loop's at the same
    plan (micro-batch, accumulation, sequence parallelism; a stage's seq_parallel is capped at the processes).
    The bare loop runs before and after the trainer; the ratio is against their mean (drift on a shared
    machine shows as the two bare figures differing)."""
    from ..training.curriculum import plan
    cfg = load_config(config)
    mcfg = model_config(cfg)
    runs = []                       # planned first: a stage that cannot run stops before any work
    for nproc in procs:
        for i, st in enumerate(cfg.curriculum.stages):
            stage = {k: v for k, v in dataclasses.asdict(st).items() if v is not None and v != {}}
            stage["seq_parallel"] = min(st.seq_parallel, nproc)
            runs.append((nproc, i, stage,
                         plan(load_config(config, [stage_override(stage, steps)]), nproc, mcfg.chunk_size, config)[0]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = f"{tmp}/mds"
        # the config's own documents, fewer: the steps timed read a few hundred of them
        documents = min(cfg.data.prepare.synthetic.documents or BENCH_DOCUMENTS, BENCH_DOCUMENTS)
        subprocess.run([sys.executable, "-m", "longctx", "prepare", config, f"data.prepare.output={shards}",
                        f"data.prepare.synthetic.documents={documents}"], check=True, stdout=subprocess.DEVNULL)
        for nproc, i, stage, p in runs:
            before = bare_tokens_per_s(mcfg, nproc, p, steps, cfg.train.grad_clip, cfg.train.weight_decay)
            trainer = trainer_tokens_per_s(config, Path(tmp, f"run-{nproc}-{i}"), shards, nproc, stage, steps)
            after = bare_tokens_per_s(mcfg, nproc, p, steps, cfg.train.grad_clip, cfg.train.weight_decay)
            bare = (before + after) / 2
            rows.append({"stage": stage["name"], "processes": nproc, "seq_len": p.seq_len,
                         "seq_parallel": p.seq_parallel, "micro_batch": p.micro_batch, "grad_accum": p.grad_accum,
                         "threads_per_process": threads_per_process(nproc), "trainer_tokens_per_s": trainer,
                         "bare_tokens_per_s": bare, "bare_before_after": [before, after],
                         "trainer_vs_bare": trainer / bare})
            print(json.dumps(rows[-1]), flush=True)
    return rows
