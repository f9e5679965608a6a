"""State statistics: ||h||_F per layer and head along the sequence, and the heads and channels that explode."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

EXPLODE_FACTOR = 10.0


@torch.no_grad()
def evaluate_states(model, input_ids: torch.Tensor, points: int = 32, train_length: Optional[int] = None,
                    top: int = 5) -> dict:
    """Read one row (1, L) in log-spaced steps with the recurrent state; record every head's state norm. Only the
    Mamba layers have a state: `layers` names them (an attention layer's keys and values are no fixed-size state);
    a model without Mamba layers is not read, and its result has no norms."""
    model.eval()
    L = input_ids.shape[1]
    stops = np.unique(np.geomspace(min(64, L), L, points).astype(int))
    layers = [i for i in range(model.config.n_layer) if i not in model.config.attention_layers]
    if not layers:
        return {"positions": [int(s) for s in stops], "layers": [], "norms": [], "top_heads": [],
                "growth_factor_threshold": EXPLODE_FACTOR, "max_norm_per_layer": []}
    cache = model.init_cache(1)
    done, norms = 0, []
    for stop in stops:
        model(input_ids[:, done:stop], cache=cache)
        done = stop
        norms.append([cache.layers[i].ssm[0].float().square().sum((-2, -1)).sqrt().cpu().numpy() for i in layers])
    norms = np.asarray(norms)                                    # (points, Mamba layers, heads)
    ref_i = int(np.searchsorted(stops, train_length)) if train_length else len(stops) // 4
    ref_i = min(ref_i, len(stops) - 1)
    growth = norms[-1] / np.maximum(norms[ref_i], 1e-12)           # (layers, heads)
    order = np.dstack(np.unravel_index(np.argsort(-growth, axis=None), growth.shape))[0][:top]
    exploding = []
    for row, head in order:
        layer = layers[row]
        channels = cache.layers[layer].ssm[0, head].float().square().sum(-1).sqrt().cpu().numpy()   # per headdim row
        exploding.append({"layer": int(layer), "head": int(head), "growth": float(growth[row, head]),
                          "final_norm": float(norms[-1, row, head]),
                          "exploding": bool(growth[row, head] > EXPLODE_FACTOR),
                          "top_channels": [int(c) for c in np.argsort(-channels)[:top]]})
    return {"positions": [int(s) for s in stops], "layers": layers, "norms": norms.tolist(),
            "reference_position": int(stops[ref_i]),
            "growth_factor_threshold": EXPLODE_FACTOR, "top_heads": exploding,
            "max_norm_per_layer": norms.max(axis=2).tolist()}
