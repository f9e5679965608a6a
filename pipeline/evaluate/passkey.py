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

from .decoding import BATCH_TOKENS, decode_shared, generate_stacked, prompt_batches
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


def _decode_batch(model, tok, group, device, prefill_chunk: int, max_new_tokens: int) -> List[dict]:
    """Greedy outputs of one batch of (length, depth, key) cases, length by length (in order of first
    appearance: the order the outputs have always had, also when `lengths` repeats one)."""
    first: dict = {}
    for c in group:
        first.setdefault(c[0], len(first))
    group = sorted(group, key=lambda c: first[c[0]])
    prompts = [build_prompt(tok, L, d, k) for L, d, k in group]
    rows = generate_stacked(model, prompts, [max_new_tokens] * len(group), device, prefill_chunk)
    outputs = []
    for (L, d, key), row in zip(group, rows):
        text = tok.decode(row)
        outputs.append({"length": L, "depth": d, "key": key, "output": text, "correct": extract_key(text) == key})
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
    # _decode_batch looked up at each call: tests count the batches each rank decodes by replacing it
    outputs = decode_shared(model, batches, lambda b: _decode_batch(model, tok, b, device, prefill_chunk,
                                                                    max_new_tokens), share, between_batches)
    acc = {str(L): {str(d): float(np.mean([o["correct"] for o in outputs if o["length"] == L and o["depth"] == d]))
                    for d in depths} for L in lengths}
    return {"lengths": list(lengths), "depths": list(depths), "samples": samples, "seed": seed,
            "accuracy": acc, "mean_accuracy": float(np.mean([o["correct"] for o in outputs])),
            "per_length": {str(L): float(np.mean([o["correct"] for o in outputs if o["length"] == L]))
                           for L in lengths},
            "outputs": outputs}
