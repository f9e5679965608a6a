"""Loss against position far past the training length, with the state carried: where collapse shows.

One row of concatenated documents is dominated by where its documents start (a document's first tokens have a
high loss): several rows (`sequences`), each read on its own, are averaged position by position before bucketing,
and each bucket records how much the rows' own means spread."""
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


def position_mean(losses: np.ndarray) -> np.ndarray:
    """The mean over rows of (N, L) losses at each position, NaNs (ignored labels) left out; NaN where no row has
    a label. One row: that row itself."""
    finite = np.isfinite(losses)
    count = finite.sum(axis=0)
    total = np.where(finite, losses, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def bucketize(losses: np.ndarray, buckets: int) -> dict:
    """Mean loss in log-spaced position buckets (position 1 .. L) of one row (L,), or of the position-wise mean
    of several rows (N, L); `tokens` counts the labelled tokens of every row. With several rows each bucket also
    has `spread`: the standard deviation (ddof 1) over rows of each row's own mean in the bucket (None when fewer
    than two rows have a label there)."""
    rows = np.atleast_2d(losses)
    curve = position_mean(rows)
    L = rows.shape[1]
    edges = np.unique(np.geomspace(1, L, buckets + 1).astype(int))
    edges[0] = 0
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        chunk = curve[lo:hi]
        chunk = chunk[np.isfinite(chunk)]
        if len(chunk):
            bucket = {"start": int(lo), "end": int(hi), "mean_loss": float(chunk.mean()),
                      "tokens": int(np.isfinite(rows[:, lo:hi]).sum())}
            if len(rows) > 1:
                means = [r[np.isfinite(r)].mean() for r in rows[:, lo:hi] if np.isfinite(r).any()]
                bucket["spread"] = float(np.std(means, ddof=1)) if len(means) > 1 else None
            out.append(bucket)
    return {"buckets": out}


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


def summarize(losses: np.ndarray, buckets: int = 16, margin: float = 0.5, train_length: Optional[int] = None,
              min_position: int = MIN_POSITION) -> dict:
    """The loss-vs-position result of per-token losses (N, L): buckets of their position-wise mean, the collapse
    point on those, `sequences` (N) and `mean_loss` over every labelled token."""
    losses = np.atleast_2d(losses)
    res = bucketize(losses, buckets)
    res.update(length=int(losses.shape[1]), margin=margin, train_length=train_length, min_position=min_position,
               collapse_point=collapse_point(res["buckets"], margin, min_position),
               mean_loss=float(np.nanmean(losses)), sequences=int(losses.shape[0]))
    return res

