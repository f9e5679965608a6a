"""Greedy decoding of generated prompts, shared by the retrieval evaluations (passkey, niah): cases go in
batches that are the same whatever the number of ranks, the ranks decode the batches round-robin
(share.py) and every rank gets every output back, in order."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .share import RankShare

BATCH_TOKENS = 65536     # prompt tokens per batch: long prompts go alone, so ranks can share them evenly


def prompt_batches(cases: List[tuple], batch_size: int, batch_tokens: int = BATCH_TOKENS) -> List[List[tuple]]:
    """Consecutive cases (tuples whose first item is the prompt length) in batches of at most `batch_size`
    prompts and `batch_tokens` prompt tokens (at least one prompt each). The same on every rank, whatever the
    number of ranks."""
    batches: List[List[tuple]] = []
    for c in cases:
        last = batches[-1] if batches else None
        if last is not None and len(last) < batch_size and sum(x[0] for x in last) + c[0] <= batch_tokens:
            last.append(c)
        else:
            batches.append([c])
    return batches


def generate_stacked(model, prompts: Sequence[np.ndarray], new_tokens: Sequence[int], device,
                     prefill_chunk: int) -> List[List[int]]:
    """Each prompt's greedy new tokens (at most its `new_tokens`), in the prompts' order. Prompts of one length
    are stacked into one `generate` call (groups in order of first appearance) decoding the group's largest
    count; each row is then cut to its own: greedy decoding's first n tokens do not depend on how many follow."""
    groups: dict = {}
    for i, ids in enumerate(prompts):
        groups.setdefault(len(ids), []).append(i)
    rows: List[Optional[List[int]]] = [None] * len(prompts)
    for members in groups.values():
        ids = torch.as_tensor(np.stack([prompts[i] for i in members]).astype(np.int64), device=device)
        new = model.generate(ids, max_new_tokens=max(new_tokens[i] for i in members), chunk_len=prefill_chunk)
        for i, row in zip(members, new.tolist()):
            rows[i] = row[: new_tokens[i]]
    return rows


def decode_shared(model, batches: List[list], decode: Callable[[list], List[dict]], share: RankShare,
                  between_batches: Optional[Callable[[], None]] = None) -> List[dict]:
    """Every batch's outputs (`decode(batch)` -> a list), in batch order, the model in eval mode meanwhile.
    `between_batches` runs before each round on every rank (the trainer's stop check, a collective; it may
    raise); each rank decodes its share of the batches and every rank gets all outputs."""
    decoded = {}
    was_training = model.training
    model.eval()
    try:
        for round_ in range(share.rounds(len(batches))):
            if between_batches is not None:
                between_batches()
            i = share.item(round_)
            if 0 <= i < len(batches):
                decoded[i] = decode(batches[i])
    finally:
        model.train(was_training)
    return [o for batch in share.gather(decoded, len(batches)) for o in batch]
