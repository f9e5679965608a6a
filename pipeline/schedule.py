"""Learning-rate decays by name: each maps the fraction of a stage's post-warmup steps done
to the LR between the stage's `lr` and its floor (`lr * min_lr_ratio`)."""
from __future__ import annotations

import math
from typing import Callable, Dict

WSD_DECAY_FRACTION = 0.2   # warmup-stable-decay: the last 20% of a stage's steps decay


def _wsd(lr: float, floor: float, frac: float) -> float:
    decay_start = 1 - WSD_DECAY_FRACTION
    return lr if frac < decay_start else lr - (lr - floor) * (frac - decay_start) / WSD_DECAY_FRACTION


DECAYS: Dict[str, Callable[[float, float, float], float]] = {
    "cosine": lambda lr, floor, frac: floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * frac)),
    "linear": lambda lr, floor, frac: lr - (lr - floor) * frac,
    "wsd": _wsd,
    "constant": lambda lr, floor, frac: lr,
}


def end_lr(decay: str, lr: float, min_lr_ratio: float) -> float:
    """The LR a stage ends at (where the next stage's warmup starts): the floor, unless it is constant."""
    return lr if decay == "constant" else lr * min_lr_ratio
