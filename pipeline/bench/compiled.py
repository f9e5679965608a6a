"""`longctx bench train --compile`: what `train.compile` buys on this machine, per stage of a config.

One process, the stage's micro-batch of rows (each rank's segment under sequence parallelism), forward +
backward of the config's model. The first compiled step is timed alone (the compile it pays); then eager and
compiled steps are timed in turn, a block of each per round, and the ratio is of their medians, so drift of a
shared machine falls on both sides alike.
"""
from __future__ import annotations

import statistics
import time
from typing import List

import torch

from ..config import load_config, model_config
from ..model import Mamba2LM
from ..training.curriculum import plan
from ..training.loss import lm_loss

ROUNDS = 3


def _step(model, ids, seq_idx):
    lm_loss(model(ids[:, :-1], seq_idx=seq_idx).logits, ids[:, 1:]).backward()
    model.zero_grad(set_to_none=True)


def _block_ms(model, ids, seq_idx, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(model, ids, seq_idx)
    return (time.perf_counter() - t0) / steps * 1e3


def run_compile_bench(config: str, steps: int = 10) -> List[dict]:
    cfg = load_config(config)
    mcfg = model_config(cfg)
    rows = []
    world = max([cfg.launch.local_procs or 1] + [st.seq_parallel for st in cfg.curriculum.stages])
    for p in plan(cfg, world, mcfg.chunk_size, config):     # each rank's shapes on the config's own world
        torch.manual_seed(0)
        model = Mamba2LM(mcfg).train()
        seg = p.seq_len // p.seq_parallel
        ids = torch.randint(0, mcfg.vocab_size, (p.micro_batch, seg + 1))
        seq_idx = (torch.arange(seg) // 200).to(torch.int32).expand(p.micro_batch, seg).contiguous()
        _block_ms(model, ids, seq_idx, 2)                      # eager warm-up
        failure = model.compile_blocks()
        if failure:
            raise RuntimeError(f"torch.compile cannot build kernels here: {failure}")
        compiled = [layer.compiled_forward for layer in model.backbone.layers]
        t0 = time.perf_counter()
        _step(model, ids, seq_idx)
        first_s = time.perf_counter() - t0
        _block_ms(model, ids, seq_idx, 2)                      # compiled warm-up (the backward's first run)
        eager_ms, compiled_ms = [], []
        for _ in range(ROUNDS):
            for layer in model.backbone.layers:
                layer.compiled_forward = None
            eager_ms.append(_block_ms(model, ids, seq_idx, steps))
            for layer, fn in zip(model.backbone.layers, compiled):
                layer.compiled_forward = fn
            compiled_ms.append(_block_ms(model, ids, seq_idx, steps))
        e, c = statistics.median(eager_ms), statistics.median(compiled_ms)
        rows.append({"stage": p.name, "rows": p.micro_batch, "tokens_per_row": seg, "threads": torch.get_num_threads(),
                     "first_compiled_step_s": first_s, "eager_ms": e, "compiled_ms": c, "compiled_speedup": e / c})
        print(rows[-1], flush=True)
    return rows
