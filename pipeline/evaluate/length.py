"""Loss against position far past the training length, with the state carried: where collapse shows."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from longctx.data.stream import IGNORE


@torch.no_grad()
def per_token_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> np.ndarray:
    """Loss of every position of one long row (1, L), read in chunks with the recurrent state;
    NaN where the label is ignored."""
    model.eval()
    cache = model.init_cache(1)
    out = np.full(input_ids.shape[1], np.nan)
    for start in range(0, input_ids.shape[1], chunk):
        piece = input_ids[:, start:start + chunk]
        logits = model(piece, cache=cache).logits.float()
        lab = labels[:, start:start + chunk]
        loss = F.cross_entropy(logits.flatten(0, 1), lab.flatten().clamp_min(0), reduction="none")
        loss = torch.where(lab.flatten() == IGNORE, torch.nan, loss)
        out[start:start + piece.shape[1]] = loss.cpu().double().numpy()
    return out


def bucketize(losses: np.ndarray, buckets: int) -> dict:
    """Mean loss in log-spaced position buckets (position 1 .. L)."""
    L = len(losses)
    edges = np.unique(np.geomspace(1, L, buckets + 1).astype(int))
    edges[0] = 0
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        chunk = losses[lo:hi]
        chunk = chunk[np.isfinite(chunk)]
        if len(chunk):
            rows.append({"start": int(lo), "end": int(hi), "mean_loss": float(chunk.mean()), "tokens": int(len(chunk))})
    return {"buckets": rows}


MIN_POSITION = 64   # before this the context is too short to judge a model by


def collapse_point(rows, margin: float, min_position: int = MIN_POSITION) -> Optional[int]:
    """Start position of the first bucket whose loss exceeds the running minimum by `margin` nats.
    Buckets that end before `min_position` are ignored; the first one after them only sets the minimum."""
    best = np.inf
    for r in rows:
        if r["end"] <= min_position:
            continue
        if r["mean_loss"] > best + margin:
            return r["start"]
        best = min(best, r["mean_loss"])
    return None


def evaluate_length(model, input_ids, labels, buckets: int = 16, margin: float = 0.5, chunk: int = 4096,
                    train_length: Optional[int] = None, min_position: int = MIN_POSITION) -> dict:
    losses = per_token_loss(model, input_ids, labels, chunk)
    res = bucketize(losses, buckets)
    res.update(length=int(input_ids.shape[1]), margin=margin, train_length=train_length, min_position=min_position,
               collapse_point=collapse_point(res["buckets"], margin, min_position),
               mean_loss=float(np.nanmean(losses)))
    return res
