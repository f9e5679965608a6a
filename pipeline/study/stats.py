"""Confidence intervals for a study's results: a mean over seeds and prompts, and a variant's paired difference
from the baseline, each with a 95% bootstrap interval.

The bootstrap is hierarchical, because both sources of spread are real: each replicate draws the seeds with
replacement (another training run, another data order), then within each drawn seed its prompts with replacement
(other keys, other depths), and takes the mean of the drawn prompts. A paired difference draws the same seeds and
the same prompt indices for the variant and the baseline, which saw the same prompts: what it measures is the
variant's effect, not the prompts' difficulty. With one seed the interval covers only the prompts' spread,
and `n_seeds` says so."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Sequence

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
METHOD = (f"{LEVEL:.0%} percentile bootstrap, {REPLICATES} replicates: seeds drawn with replacement, then each drawn "
          "seed's prompts; paired differences draw the same seeds and prompts for both sides")


@dataclass
class Estimate:
    mean: float
    ci_low: float
    ci_high: float
    n: int                  # prompts (or sequences) in all
    n_seeds: int

    def as_dict(self) -> dict:
        return asdict(self)


def _check(by_seed: Dict[int, Sequence[float]], what: str) -> Dict[int, np.ndarray]:
    if not by_seed:
        raise ValueError(f"{what}: no seeds to estimate from")
    out = {}
    for seed, values in by_seed.items():
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"{what}: seed {seed} has no values")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: seed {seed} has a value that is not finite")
        out[seed] = arr
    return out


def _replicates(per_seed: Sequence[np.ndarray], rng: np.random.Generator, replicates: int) -> np.ndarray:
    """Means of `replicates` hierarchical resamples: seeds with replacement, then each seed's values."""
    k = len(per_seed)
    means = np.empty(replicates)
    for r in range(replicates):
        drawn = [per_seed[i] for i in rng.integers(0, k, size=k)]
        means[r] = np.concatenate([v[rng.integers(0, v.size, size=v.size)] for v in drawn]).mean()
    return means


def _interval(point: float, means: np.ndarray, n: int, n_seeds: int) -> Estimate:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(mean=float(point), ci_low=float(low), ci_high=float(high), n=n, n_seeds=n_seeds)


def estimate(by_seed: Dict[int, Sequence[float]], seed: int = 0, replicates: int = REPLICATES,
             what: str = "estimate") -> Estimate:
    """The mean of every value (each a prompt's score, 0/1 or a fraction) over every seed, with its interval."""
    values = _check(by_seed, what)
    per_seed = [values[s] for s in sorted(values)]
    point = float(np.concatenate(per_seed).mean())
    means = _replicates(per_seed, np.random.default_rng(seed), replicates)
    return _interval(point, means, sum(v.size for v in per_seed), len(per_seed))


def paired_difference(variant: Dict[int, Sequence[float]], baseline: Dict[int, Sequence[float]], seed: int = 0,
                      replicates: int = REPLICATES, what: str = "difference") -> Estimate:
    """variant - baseline, prompt by prompt: both must hold the same seeds, and per seed the same number of
    prompts in the same order (the same prompts)."""
    a, b = _check(variant, what), _check(baseline, f"{what} (baseline)")
    if sorted(a) != sorted(b):
        raise ValueError(f"{what}: the variant has seeds {sorted(a)}, the baseline {sorted(b)}: a paired difference "
                         "needs the same seeds")
    for s in a:
        if a[s].size != b[s].size:
            raise ValueError(f"{what}: seed {s} has {a[s].size} prompts in the variant and {b[s].size} in the "
                             "baseline: a paired difference needs the same prompts")
    return estimate({s: a[s] - b[s] for s in a}, seed=seed, replicates=replicates, what=what)
