"""Stuffed Mamba's two laws, fitted on a study whose variants span state sizes x training lengths (`laws:` in
the study file; configs/studies/capacity-law.yaml).

- T_forget: the shortest training length at which the model learns to forget. Per state size and seed, the
  shortest training length T of the grid at which no collapse shows within `horizon` x T (and none at any
  longer T of the grid either: a later collapse would make the earlier success luck). The paper finds it grows
  linearly with the state size: fitted as T_forget = a + b * state.
- Capacity: the longest passkey length retrieved with accuracy >= `passkey_threshold`, per state size and seed,
  by the model trained at the grid's longest length for that state size. The paper finds it grows exponentially
  with the state size: fitted as log2(capacity) = a + b * state.

The state size is the SSM state's elements per layer (nheads x headdim x d_state), read from each cell's config;
the training length is its last stage's seq_len. A fit's interval is a percentile bootstrap over seeds (the seeds
drawn with replacement, each state size's values averaged over the drawn seeds, the line fitted again). Values
the grid cannot pin (every length collapsed: T_forget above the grid; no length retrieved: capacity below it)
are left out of the fit and counted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from .stats import LEVEL, REPLICATES

DEFAULTS = {"horizon": 8, "passkey_threshold": 0.9}


@dataclass
class CellOutcome:
    state: int                      # SSM state elements per layer
    d_state: int
    train_length: int
    seed: int
    collapse_point: Optional[int]   # None: no collapse within the evaluated length
    eval_length: int                # how far the loss against position was read
    passkey: Dict[int, float]       # length -> accuracy


def collapses_within(cell: CellOutcome, horizon: int) -> bool:
    if cell.eval_length < horizon * cell.train_length and cell.collapse_point is None:
        raise ValueError(f"d_state {cell.d_state}, trained at {cell.train_length}, seed {cell.seed}: the loss was "
                         f"read to {cell.eval_length} tokens, short of {horizon} x the training length; evaluate "
                         "`length` at least that far")
    return cell.collapse_point is not None and cell.collapse_point < horizon * cell.train_length


def t_forget(cells: Sequence[CellOutcome], horizon: int) -> Optional[int]:
    """The cells of one state size and seed: the shortest training length from which on none collapses
    (None: even the longest collapses)."""
    found = None
    for cell in sorted(cells, key=lambda c: -c.train_length):
        if collapses_within(cell, horizon):
            break
        found = cell.train_length
    return found


def capacity(passkey: Dict[int, float], threshold: float) -> Optional[int]:
    """The longest length whose accuracy reaches the threshold (None: none does)."""
    good = [length for length, acc in passkey.items() if acc >= threshold]
    return max(good) if good else None


def fit_line(x: Sequence[float], y: Sequence[float]) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(np.unique(x)) < 2:
        raise ValueError("a line needs values at two state sizes or more")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual ** 2).sum() / total if total > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2)}


def fit_over_seeds(values: Dict[int, Dict[int, float]], transform=lambda v: v, seed: int = 0,
                   replicates: int = REPLICATES) -> Optional[dict]:
    """values: state -> seed -> value. The line through each state's mean over seeds, and the slope's
    percentile interval from resampling the seeds."""
    states = sorted(s for s in values if values[s])
    if len(states) < 2:
        return None
    xs = np.array(states, float)
    means = [np.mean([transform(v) for v in values[s].values()]) for s in states]
    fit = fit_line(xs, means)
    seeds = sorted({sd for s in states for sd in values[s]})
    rng = np.random.default_rng(seed)
    slopes = []
    for _ in range(replicates):
        drawn = rng.choice(seeds, size=len(seeds))
        ys, keep = [], []
        for i, s in enumerate(states):
            got = [transform(values[s][d]) for d in drawn if d in values[s]]
            if got:
                ys.append(np.mean(got))
                keep.append(xs[i])
        if len(set(keep)) >= 2:
            slopes.append(fit_line(keep, ys)["slope"])
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(slopes, [tail, 100 - tail])
    return {**fit, "slope_ci": [float(low), float(high)], "points": {str(int(s)): float(m) for s, m in zip(xs, means)}}


def laws(cells: Sequence[CellOutcome], horizon: int = DEFAULTS["horizon"],
         passkey_threshold: float = DEFAULTS["passkey_threshold"]) -> dict:
    """Per state size and seed: T_forget and capacity; both fits; what the grid could not pin."""
    by: Dict[tuple, List[CellOutcome]] = {}
    for c in cells:
        by.setdefault((c.state, c.seed), []).append(c)
    forget: Dict[int, Dict[int, float]] = {}
    cap: Dict[int, Dict[int, float]] = {}
    per_state: Dict[str, dict] = {}
    unpinned = {"t_forget_above_grid": [], "t_forget_at_or_below_grid": [], "capacity_below_grid": [],
                "capacity_at_or_above_grid": []}
    for (state, seed), group in sorted(by.items()):
        row = per_state.setdefault(str(state), {"d_state": group[0].d_state, "t_forget": {}, "capacity": {}})
        t = t_forget(group, horizon)
        row["t_forget"][str(seed)] = t
        if t is None:
            unpinned["t_forget_above_grid"].append({"state": state, "seed": seed})
        elif t == min(c.train_length for c in group):      # a bound: it may be shorter than the grid reaches
            unpinned["t_forget_at_or_below_grid"].append({"state": state, "seed": seed})
        else:
            forget.setdefault(state, {})[seed] = t
        longest = max(group, key=lambda c: c.train_length)
        k = capacity(longest.passkey, passkey_threshold) if longest.passkey else None
        row["capacity"][str(seed)] = k
        if longest.passkey:
            if k is None:
                unpinned["capacity_below_grid"].append({"state": state, "seed": seed})
            elif k == max(longest.passkey):      # a bound: it may retrieve further than was asked
                unpinned["capacity_at_or_above_grid"].append({"state": state, "seed": seed})
            else:
                cap.setdefault(state, {})[seed] = k
    return {"horizon": horizon, "passkey_threshold": passkey_threshold, "per_state": per_state,
            "t_forget_fit": fit_over_seeds(forget),
            "log2_capacity_fit": fit_over_seeds(cap, transform=np.log2), "unpinned": unpinned}


def _fit_line_md(name: str, fit: Optional[dict], unit: str) -> str:
    if fit is None:
        return f"- {name}: fewer than two state sizes pinned by the grid, no line."
    return (f"- {name} = {fit['intercept']:.4g} + {fit['slope']:.4g} x state ({unit}); slope 95% interval "
            f"[{fit['slope_ci'][0]:.4g}, {fit['slope_ci'][1]:.4g}] (bootstrap over seeds), R^2 of the means "
            f"{fit['r2']:.3f}")


def markdown(result: dict, seeds: Sequence[int]) -> List[str]:
    lines = ["## The capacity laws", "",
             f"T_forget: the shortest training length from which no collapse shows within {result['horizon']}x "
             f"(`-`: every length of the grid collapsed; `<= T`: not even the grid's shortest length T "
             f"collapsed). Capacity: the longest passkey length with accuracy >= {result['passkey_threshold']} at "
             f"the grid's longest training length (`-`: none; `>= L`: the longest length asked). Bounds are left "
             f"out of the fits.", "",
             "| state (elements per layer) | d_state | " + " | ".join(f"T_forget seed {s}" for s in seeds) + " | "
             + " | ".join(f"capacity seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * (2 * len(seeds))]
    # where the grid gave a bound, not a value: (what, state, seed) -> its sign
    signs = {(what, u["state"], u["seed"]): sign
             for what, key, sign in (("t_forget", "t_forget_at_or_below_grid", "<= "),
                                     ("capacity", "capacity_at_or_above_grid", ">= "))
             for u in result["unpinned"].get(key, [])}

    def shown(what, state, seed, value):
        return "-" if value is None else f"{signs.get((what, state, seed), '')}{value:,}"
    for state, row in sorted(result["per_state"].items(), key=lambda kv: int(kv[0])):
        shown_row = ([shown("t_forget", int(state), s, row["t_forget"].get(str(s))) for s in seeds]
                     + [shown("capacity", int(state), s, row["capacity"].get(str(s))) for s in seeds])
        lines.append(f"| {int(state):,} | {row['d_state']} | " + " | ".join(shown_row) + " |")
    lines += ["", _fit_line_md("T_forget", result["t_forget_fit"], "tokens"),
              _fit_line_md("log2(capacity)", result["log2_capacity_fit"], "log2 tokens"), ""]
    return lines
