"""`longctx bench train`: training tokens/s (forward + backward + AdamW step) of one process, for a tiny
and a 130M-shaped Mamba-2, on CPU and (when present) on a GPU with model FLOPs utilization."""
from __future__ import annotations

import statistics
import time
from typing import List

import torch

from ..model import Mamba2Config, Mamba2LM
from ..training.loss import lm_loss

SHAPES = {
    "tiny": Mamba2Config(d_model=256, n_layer=4, vocab_size=257, d_state=64, headdim=64, chunk_size=256),
    "130m": Mamba2Config(d_model=768, n_layer=24, vocab_size=50277, d_state=128, headdim=64, chunk_size=256,
                         pad_vocab_size_multiple=16),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # dense bf16


def model_flops_per_token(model: Mamba2LM) -> float:
    """6 x parameters (matmuls, forward + backward); the scan's own FLOPs are left out, so MFU is a floor."""
    return 6.0 * sum(p.numel() for p in model.parameters())


def median_step_seconds(model: Mamba2LM, ids: torch.Tensor, repeats: int) -> float:
    """Median seconds of a training step (forward, backward, AdamW) on the rows `ids` (b, l + 1), after one
    untimed step (allocation, first-call work). The model is put in training mode."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cuda = ids.device.type == "cuda"

    def step():
        loss = lm_loss(model(ids[:, :-1]).logits, ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_shape(name: str, device: str, seq_len: int, repeats: int, dtype=torch.float32) -> dict:
    torch.manual_seed(0)
    model = Mamba2LM(SHAPES[name]).to(device=device, dtype=dtype)
    ids = torch.randint(0, SHAPES[name].vocab_size, (1, seq_len + 1), device=device)
    s = median_step_seconds(model, ids, repeats)
    row = {"shape": name, "device": device if device == "cpu" else torch.cuda.get_device_name(),
           "dtype": str(dtype)[6:], "seq_len": seq_len, "params": sum(p.numel() for p in model.parameters()),
           "step_s": s, "tokens_per_s": seq_len / s}
    if device == "cuda":
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in row["device"]), None)
        row["mfu"] = None if peak is None else model_flops_per_token(model) * row["tokens_per_s"] / (peak * 1e12)
    return row


def run_train_bench(seq_len: int = 2048, repeats: int = 3) -> List[dict]:
    rows = [bench_shape(name, "cpu", seq_len if name == "tiny" else min(seq_len, 1024), repeats) for name in SHAPES]
    if torch.cuda.is_available():
        rows += [bench_shape(name, "cuda", 8192, repeats, torch.bfloat16) for name in SHAPES]
    return rows
