"""`longctx bench train --plateau`: how soon a config's first stage learns to copy a passkey.

A small model trained on passkey documents sits on a loss plateau until it learns to copy the key (the demo's
stage `short`: ~1,000 steps of its 1,600), and how soon it leaves that plateau, not the speed of a step, sets
how long the demo must train. This trains the stage in one process (the trainer's model, optimizer, learning
rate schedule, clipping, stage mitigations and packed rows; fp32, rows from zero states, no DeepSpeed, no
evaluation) and reports, every `every` steps, the
loss and the loss on the key's digits at each of its three places in a task of `longctx.data.synthetic`:

    first   "The passkey is 12345."        the key itself: unpredictable, ln 10 per digit at best
    repeat  "Remember it. 12345 is ..."    a copy ~20 tokens later, inside the needle
    answer  "What is the pass key? The passkey is 12345."   the copy the evaluation asks for

While the model cannot copy, all three sit at ~ln 10 = 2.30; `repeat` falls first, then `answer`. Config
overrides (`train.betas=[0.9,0.999]`, `model.d_state=64`, `run.seed=1`, ...) change one thing at a time.
Byte tokenizer only: the digits are its bytes 0x30-0x39.
"""
from __future__ import annotations

import dataclasses
import random
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from longctx.data.stream import IGNORE, PackedStream, open_splits

from ..config import Config

PLACES = ("first", "repeat", "answer")
# the text right before each place (the byte tokenizer's inputs); the answer's is checked first, as it ends
# like the first's
_BEFORE = ((2, b"? The passkey is "), (1, b"Remember it. "), (0, b"The passkey is "))
# for each place, the lengths of the other places' texts that end like its own (the answer's ends like the key's):
# its text tells the place only where those were seen not to be there
_ENDED_LIKE = {index: [len(other) for _, other in _BEFORE if len(other) > len(before) and other.endswith(before)]
               for index, before in _BEFORE}
_DIGIT_LO, _DIGIT_HI = ord("0"), ord("9")


def digit_places(input_ids: np.ndarray, labels: np.ndarray, seq_idx: np.ndarray) -> np.ndarray:
    """Per label position: 0/1/2 (PLACES) for a digit of a key at that place, -1 elsewhere, and -1 for a key
    whose preceding text the row cut off (its place cannot be told)."""
    place = np.full(labels.shape, -1, dtype=np.int64)
    digit = (labels >= _DIGIT_LO) & (labels <= _DIGIT_HI)
    for r in range(labels.shape[0]):
        t = 0
        while t < labels.shape[1]:
            if not digit[r, t]:
                t += 1
                continue
            end = t
            while end < labels.shape[1] and digit[r, end]:
                end += 1
            for index, before in _BEFORE:          # inputs up to t are the text before the label at t
                start = t + 1 - len(before)
                if start >= 0 and np.all(seq_idx[r, start:t + 1] == seq_idx[r, t]) and \
                        bytes(input_ids[r, start:t + 1].astype(np.uint8)) == before:
                    if seq_idx[r, 0] == seq_idx[r, t] and any(t + 1 - n < 0 for n in _ENDED_LIKE[index]):
                        break                      # the row's start cut off a longer text this one may end
                    place[r, t:end] = index
                    break
            t = end
    return place


def run_plateau(cfg: Config, where: str, steps: Optional[int] = None, every: int = 100) -> List[Dict]:
    """Train the first stage of `cfg` for `steps` steps (default and at most the stage's) on its prepared
    shards; one record per `every` steps (means over them). What the bench does not do as the trainer does
    (a carried state, mixed precision) is refused, naming the key."""
    from longctx.data.tokenizer import load_tokenizer

    from ..training.curriculum import plan
    from ..training.preflight import preflight
    from ..training.stage_mitigations import StageMitigations
    from ..training.trainer import EVAL_SEED_OFFSET, adamw, build_model
    stage = cfg.curriculum.stages[0]
    for key, value, wanted in (("tokenizer.kind", cfg.tokenizer.kind, "byte"),
                               ("train.precision", cfg.train.precision, "fp32"),
                               ("curriculum.stages[0].carry_state", stage.carry_state, "none")):
        if value != wanted:
            raise ValueError(f"{where}: {key} is {value!r}; bench train --plateau needs {key}={wanted} (it reads the "
                             "passkey digits as bytes, trains in fp32 and starts every row from a zero state)")
    if steps is not None and steps <= 0:
        raise ValueError(f"bench train --plateau: --steps must be positive, got {steps}")
    tok = load_tokenizer(cfg.tokenizer)
    shards = preflight(cfg, where, tok)            # the shards exist and were made with this tokenizer
    # the first stage alone: later stages may need more processes (sequence parallelism) than this one
    alone = dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, stages=[stage]))
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg).train()
    first = plan(alone, 1, model.config.chunk_size, where)[0]
    steps = first.steps if steps is None else min(steps, first.steps)
    optimizer = adamw(model, first.lr, cfg.train.weight_decay, tuple(cfg.train.betas))
    with tempfile.TemporaryDirectory() as cache:
        train, heldout = open_splits(shards, cfg.data.cache_dir or cache)
        stream = PackedStream(train, tok.eos_id, seed=cfg.run.seed)
        # the stage's mitigations, as the trainer sets them (state-norm thresholds calibrated on held-out rows)
        calibration = PackedStream(heldout or train, tok.eos_id, seed=cfg.run.seed + EVAL_SEED_OFFSET)
        model.set_mitigations(StageMitigations(cfg, model, lambda n: torch.as_tensor(
            calibration.next_batch(1, n).input_ids)).of(first))
        return _train(model, optimizer, stream, [first], steps, cfg, every)


def _train(model, optimizer, stream, plans, steps: int, cfg: Config, every: int) -> List[Dict]:
    from ..training.curriculum import learning_rate
    first = plans[0]
    window: Dict[str, list] = {"loss": [], **{p: [] for p in PLACES}}
    records, started = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(plans, step)
        batch = stream.next_batch(first.sequences_per_step, first.seq_len, first.max_doc_tokens)
        ids, labels = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.labels)
        seq_idx = torch.from_numpy(batch.seq_idx) if cfg.train.document_resets else None
        token_loss = F.cross_entropy(model(ids, seq_idx=seq_idx).logits.float().flatten(0, 1), labels.flatten(),
                                     ignore_index=IGNORE, reduction="none").view(labels.shape)
        loss = token_loss.sum() / (labels != IGNORE).sum()
        loss.backward()
        if cfg.train.grad_clip > 0:              # 0: no clipping, as DeepSpeed reads it
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window["loss"].append(float(loss))
        place = digit_places(batch.input_ids, batch.labels, batch.seq_idx)
        per_token = token_loss.detach().numpy()
        for index, name in enumerate(PLACES):
            if (place == index).any():
                window[name].append(float(per_token[place == index].mean()))
        if (step + 1) % every == 0 or step + 1 == steps:
            records.append({"step": step + 1, **{k: float(np.mean(v)) if v else None for k, v in window.items()},
                            "seconds": time.perf_counter() - started})
            print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in records[-1].items()),
                  flush=True)
            window = {k: [] for k in window}
    return records
