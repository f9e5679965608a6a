"""Passkey retrieval (docs/ARCHITECTURE.md §6): a 5-digit key hidden at a depth of filler text; greedy decoding
with the recurrent state must produce it."""
from __future__ import annotations

import random
import re
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from longctx.data.synthetic import PASSKEY_FILLER as FILLER
from longctx.data.synthetic import PASSKEY_PREFIX as PREFIX
from longctx.data.synthetic import PASSKEY_QUESTION as QUESTION
from longctx.data.synthetic import passkey_needle as needle

from .share import EVERYTHING, RankShare


def build_prompt(tok, length: int, depth: float, key: str) -> np.ndarray:
    """Token ids of exactly `length` tokens: prefix, filler with the needle after `depth` of it, question."""
    head = tok.encode(PREFIX + "\n")
    middle = tok.encode("\n" + needle(key) + "\n")
    tail = tok.encode("\n" + QUESTION)
    budget = length - len(head) - len(middle) - len(tail)
    if budget < 0:
        raise ValueError(f"passkey length {length} is too short: the prompt needs at least "
                         f"{length - budget} tokens without filler")
    lines = budget // max(1, len(tok.encode(FILLER + " "))) + 2
    filler = tok.encode(" ".join([FILLER] * lines))
    while len(filler) < budget:              # subword merges across lines can make repeats shorter
        lines *= 2
        filler = tok.encode(" ".join([FILLER] * lines))
    filler = filler[:budget]
    cut = int(round(depth * budget))
    ids = np.concatenate([head, filler[:cut], middle, filler[cut:], tail]).astype(np.int64)
    assert len(ids) == length
    return ids


BATCH_TOKENS = 65536     # prompt tokens per batch: long prompts go alone, so ranks can share them evenly


def prompt_batches(cases: List[tuple], batch_size: int, batch_tokens: int = BATCH_TOKENS) -> List[List[tuple]]:
    """Consecutive (length, depth, key) cases in batches of at most `batch_size` prompts and `batch_tokens`
    prompt tokens (at least one prompt each). The same on every rank, whatever the number of ranks."""
    batches: List[List[tuple]] = []
    for c in cases:
        last = batches[-1] if batches else None
        if last is not None and len(last) < batch_size and sum(x[0] for x in last) + c[0] <= batch_tokens:
            last.append(c)
        else:
            batches.append([c])
    return batches


def _decode_batch(model, tok, group, device, prefill_chunk: int, max_new_tokens: int) -> List[dict]:
    """Greedy outputs of one batch of (length, depth, key) cases, decoded length by length."""
    by_len, outputs = {}, []
    for c in group:
        by_len.setdefault(c[0], []).append(c)
    for L, cs in by_len.items():
        ids = torch.as_tensor(np.stack([build_prompt(tok, L, d, k) for _, d, k in cs]), device=device)
        new = model.generate(ids, max_new_tokens=max_new_tokens, chunk_len=prefill_chunk)
        for (L_, d, key), row in zip(cs, new.tolist()):
            text = tok.decode(row)
            outputs.append({"length": L_, "depth": d, "key": key, "output": text,
                            "correct": extract_key(text) == key})
    return outputs


def extract_key(text: str) -> str:
    return "".join(re.findall(r"\d", text))[:5]


PROMPTS_PER_BATCH, NEW_TOKENS = 8, 8    # evaluate_passkey's defaults (eval_budget prices the trainer's calls by them)


@torch.no_grad()
def evaluate_passkey(model, tok, lengths: Sequence[int], depths: Sequence[float], samples: int, seed: int = 0,
                     prefill_chunk: int = 4096, batch_size: int = PROMPTS_PER_BATCH, max_new_tokens: int = NEW_TOKENS,
                     batch_tokens: int = BATCH_TOKENS, between_batches: Optional[Callable[[], None]] = None,
                     share: RankShare = EVERYTHING) -> dict:
    """Accuracy per (length, depth) and every sample's output. `between_batches` is called before each
    batch of prompts (the trainer's stop check, a collective; it may raise). With a `share`, each rank
    decodes its batches and every rank gets all outputs."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    cases = [(L, d, str(rng.randint(10000, 99999))) for L in lengths for d in depths for _ in range(samples)]
    batches = prompt_batches(cases, batch_size, batch_tokens)
    decoded = {}
    was_training = model.training
    model.eval()
    try:
        for round_ in range(share.rounds(len(batches))):
            if between_batches is not None:
                between_batches()
            i = share.item(round_)
            if 0 <= i < len(batches):
                decoded[i] = _decode_batch(model, tok, batches[i], device, prefill_chunk, max_new_tokens)
    finally:
        model.train(was_training)
    outputs: List[dict] = [o for batch in share.gather(decoded, len(batches)) for o in batch]
    acc = {str(L): {str(d): float(np.mean([o["correct"] for o in outputs if o["length"] == L and o["depth"] == d]))
                    for d in depths} for L in lengths}
    return {"lengths": list(lengths), "depths": list(depths), "samples": samples, "seed": seed,
            "accuracy": acc, "mean_accuracy": float(np.mean([o["correct"] for o in outputs])),
            "per_length": {str(L): float(np.mean([o["correct"] for o in outputs if o["length"] == L]))
                           for L in lengths},
            "outputs": outputs}
