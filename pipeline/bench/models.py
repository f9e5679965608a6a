"""`longctx bench models --study STUDY.yaml`: what each variant's model in a study costs per token, side by side
(a comparison of architectures reports its cost beside its accuracy). For each variant's config at the study's
first seed, with fresh weights (the cost does not depend on them), in this one process:

- training tokens/s: forward + backward + AdamW on one micro-batch of its first stage's shape;
- decoding at each length L: a prompt of L - 16 tokens prefilled, then 16 single-token steps: tokens/s of those
  steps, and the bytes of the decoding state then held (a Mamba layer's state is the same at every length, an
  attention layer keeps the keys and values of every token read).
"""
from __future__ import annotations

import time
from typing import Dict, List, Sequence

import torch

from ..config import Config, model_config
from ..model import Mamba2LM
from ..model.inference import AttentionCache
from .train import median_step_seconds

DECODE_STEPS = 16            # timed single-token steps after the prefill, per length


def state_bytes(cache) -> int:
    """Bytes a decoding cache holds for the tokens read so far (an attention layer's buffers grow by doubling:
    only the first `seqlen` rows count)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, AttentionCache):
            held = [layer.keys[:, :layer.seqlen], layer.values[:, :layer.seqlen], layer.docs[:, :layer.seqlen]]
            held += [layer.conv_tail] if layer.conv_tail is not None else []
        else:
            held = [layer.conv_tail, layer.ssm]
        total += sum(t.numel() * t.element_size() for t in held)
    return total


def training_tokens_per_s(model: Mamba2LM, batch: int, seq_len: int, repeats: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))
    return batch * seq_len / median_step_seconds(model, ids, repeats)


@torch.no_grad()
def decoding(model: Mamba2LM, length: int) -> dict:
    model.eval()
    cache = model.init_cache(1)
    model.prefill(torch.randint(0, model.config.vocab_size, (1, length - DECODE_STEPS)), cache)
    token = torch.randint(0, model.config.vocab_size, (1, 1))
    t0 = time.perf_counter()
    for _ in range(DECODE_STEPS):
        model.step(token, cache)
    return {"decode_tokens_per_s": DECODE_STEPS / (time.perf_counter() - t0), "state_bytes": state_bytes(cache)}


def run_models_bench(configs: Dict[str, Config], lengths: Sequence[int], repeats: int = 3) -> List[dict]:
    """configs: name -> a run config (a study's variant at its first seed)."""
    rows = []
    for variant, cfg in configs.items():
        torch.manual_seed(0)
        model = Mamba2LM(model_config(cfg))
        stage, batch = cfg.curriculum.stages[0], cfg.train.micro_batch_size
        row = {"variant": variant, "parameters": sum(p.numel() for p in model.parameters()),
               "layers": "".join("A" if i in (model.config.attn_layer_idx or []) else "M"
                                 for i in range(model.config.n_layer)),
               "train_seq_len": stage.seq_len, "train_batch": batch,
               "train_tokens_per_s": training_tokens_per_s(model, batch, stage.seq_len, repeats)}
        for length in lengths:
            timed = decoding(model, length)
            row[f"decode_tokens_per_s@{length}"] = timed["decode_tokens_per_s"]
            row[f"state_bytes@{length}"] = timed["state_bytes"]
        rows.append(row)
    return rows
