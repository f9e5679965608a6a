"""What rank 0 shows of each optimizer step: one live line per stage when `longctx run` draws it on a
terminal, else a step line every `run.log_every` steps and at each stage's last step. Only the console is
thinned: metrics.jsonl and TensorBoard keep every step (metrics.py)."""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Callable, Deque, Optional, Sequence, TextIO, Tuple

if TYPE_CHECKING:        # `longctx run` reads the constants below: it need not import torch for them
    from .curriculum import StagePlan

# How the rank knows that the user's output is a terminal. The ranks are children of DeepSpeed's launcher,
# itself a child of `longctx run`, which reads their output through pipes (launch/console.py) to keep
# third-party noise out: the rank's own stdout is never a terminal there. So `longctx run` says it: it
# sets CONSOLE_ENV to LIVE when its own stdout is a terminal, and draws the live line from the rank's
# LIVE_PREFIX lines. Unset or anything else (`longctx train` by hand, `longctx node` under SLURM or a
# hostfile, whose output goes to a log, `longctx run` into a file or a pipe): step lines at run.log_every.
# The rank never draws on a terminal itself: only a process that sees every line written to the
# console can keep a line rewritten in place from being mixed with the others.
CONSOLE_ENV = "LONGCTX_CONSOLE"
LIVE = "live"
# The live protocol, one line each: LIVE_PREFIX + text replaces the live line by `text`; LIVE_PREFIX alone
# ends it, leaving it on screen (a stage's last step). A carriage return, so that read raw (a debugger
# attached to a rank) it still shows as the line it is.
LIVE_PREFIX = "\r"

# Updates the recent rate is measured over: enough to smooth one slow step or a checkpoint's evaluation,
# few enough to follow a stage that runs slower than the one before.
RATE_WINDOW = 32


def live_console() -> bool:
    """Whether `longctx run` draws this rank's progress as a live line on a terminal."""
    return os.environ.get(CONSOLE_ENV) == LIVE


def duration(seconds: Optional[float]) -> str:
    """`m:ss`, `h:mm:ss` or `Nd hh:mm:ss`; `?` when not known yet."""
    if seconds is None:
        return "?"
    s = max(0, round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h:02d}:{m:02d}:{s:02d}"
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def tokens_left(plans: Sequence[StagePlan], stage: int, step: int) -> Tuple[int, int]:
    """(tokens left in `stage`, tokens left in the run) once global optimizer step `step` is done."""
    plan = plans[stage]
    in_stage = max(0, plan.last_step - step) * plan.global_batch_tokens
    return in_stage, in_stage + sum(p.tokens for p in plans[stage + 1:])


class RecentRate:
    """Tokens per second over the last `window` updates, by the wall clock: evaluations, checkpoints and data
    waits included, since the ETA is how long the user waits. In tokens, not steps: a stage's steps may carry
    more tokens than another's, and Mamba's cost per token does not grow with the sequence length."""

    def __init__(self, window: int = RATE_WINDOW):
        self.points: Deque[Tuple[float, int]] = deque(maxlen=window)

    def add(self, now: float, tokens: int) -> None:
        self.points.append((now, tokens))

    def per_second(self) -> Optional[float]:
        if len(self.points) < 2:
            return None
        (t0, n0), (t1, n1) = self.points[0], self.points[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 and n1 > n0 else None


class Progress:
    """Rank 0's console view of the steps MetricsLogger records (every record logged comes here)."""

    def __init__(self, plans: Sequence[StagePlan], log_every: int, live: bool, out: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.plans, self.log_every, self.live = list(plans), log_every, live
        self.out = out
        self.clock = clock
        self.rate = RecentRate()

    def line(self, record: dict) -> str:
        plan = self.plans[record["stage"]]
        step = record["step"]
        # the first step of a process has no recent rate yet: its own (measured from the step's start) stands in
        rate = self.rate.per_second() or record["tokens_per_s"]
        stage_left, run_left = tokens_left(self.plans, record["stage"], step)

        def eta(tokens: int) -> str:
            return duration(tokens / rate if rate else None)

        loss = "skipped" if record["loss"] is None else format(record["loss"], ".4f")
        # what matters first: a terminal narrower than the line cuts the live line's end (console.py)
        return (f"{plan.name} {step - plan.first_step}/{plan.steps}  loss {loss}  "
                f"{record['tokens_per_s']:,.0f} tok/s  ETA {eta(stage_left)} stage, {eta(run_left)} run  "
                f"step {step}/{self.plans[-1].last_step}  lr {record['lr']:.2e}")

    def show(self, record: dict) -> None:
        self.rate.add(self.clock(), record["tokens"])
        last = record["step"] == self.plans[record["stage"]].last_step
        if self.live:
            text = LIVE_PREFIX + self.line(record) + "\n" + (LIVE_PREFIX + "\n" if last else "")
        elif last or record["step"] % self.log_every == 0:
            text = self.line(record) + "\n"
        else:
            return
        out = self.out or sys.stdout      # looked up when written: tests and callers may swap sys.stdout
        out.write(text)
        out.flush()
