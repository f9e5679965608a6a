"""The context-length curriculum: stages planned against the world size, and the LR schedule.

A stage keeps tokens per optimizer step at `global_batch_tokens`: sequences per step =
global_batch_tokens / seq_len, split over the data-parallel ranks in micro-batches of
`train.micro_batch_size` sequences, the rest by gradient accumulation. The learning rate
continues across stages: each stage warms up from where the previous one ended.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

from ..config import Config, ConfigError
from ..mitigations import merge_overrides
from ..model.carry import CARRY_MODES
from ..model.config import Mamba2Config
from ..model.mamba2 import parameter_count
from ..model.mitigations import STATE_NORM_UNSUPPORTED
from ..schedule import DECAYS, end_lr


@dataclass(frozen=True)
class StagePlan:
    index: int
    name: str
    seq_len: int
    steps: int
    first_step: int              # global step at which the stage starts
    global_batch_tokens: int
    sequences_per_step: int
    seq_parallel: int
    data_parallel: int
    micro_batch: int             # sequences per rank per micro-step
    grad_accum: int
    lr: float
    warmup_steps: int
    decay: str
    min_lr_ratio: float
    max_doc_tokens: int = 0      # > 0: longer documents are passed over in this stage
    carry_state: str = "none"    # none | batch | document (pipeline/model/carry.py)

    @property
    def tokens(self) -> int:
        return self.steps * self.global_batch_tokens

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps


def plan(cfg: Config, world_size: int, chunk_size: int, where: str = "<config>") -> List[StagePlan]:
    """Validate the curriculum against the world size and the model; errors name the field."""
    stages = cfg.curriculum.stages
    if not stages:
        raise ConfigError(f"{where}: curriculum.stages is empty: give at least one stage")
    if world_size < 1:
        raise ConfigError(f"{where}: world size must be >= 1, got {world_size}")
    micro = cfg.train.micro_batch_size
    if micro < 1:
        raise ConfigError(f"{where}: train.micro_batch_size must be >= 1, got {micro}")
    plans, step = [], 0
    for i, st in enumerate(stages):
        key = f"curriculum.stages[{i}] ({st.name})"

        def fail(field, msg):
            raise ConfigError(f"{where}: {key}.{field}: {msg}")

        if st.seq_parallel < 1:
            fail("seq_parallel", f"must be >= 1, got {st.seq_parallel}")
        if st.seq_parallel > 1 and merge_overrides(cfg.mitigations, st.mitigations, key).state_norm.every:
            fail("seq_parallel", f"{st.seq_parallel} with state norm on: {STATE_NORM_UNSUPPORTED}")
        if world_size % st.seq_parallel:
            fail("seq_parallel", f"world size {world_size} is not divisible by seq_parallel {st.seq_parallel}")
        if st.seq_len % (st.seq_parallel * chunk_size):
            fail("seq_len", f"{st.seq_len} must be a multiple of seq_parallel x chunk_size "
                            f"({st.seq_parallel} x {chunk_size})")
        if st.global_batch_tokens % st.seq_len:
            fail("global_batch_tokens", f"{st.global_batch_tokens} is not a multiple of seq_len {st.seq_len}")
        seqs = st.global_batch_tokens // st.seq_len
        dp = world_size // st.seq_parallel
        if seqs % (dp * micro):
            fail("global_batch_tokens", f"{seqs} sequences per step do not split into {dp} data-parallel ranks x "
                                        f"micro-batches of {micro} (train.micro_batch_size)")
        steps = st.steps if st.steps is not None else math.ceil(st.tokens / st.global_batch_tokens)
        if steps < 1:
            fail("steps" if st.steps is not None else "tokens", "the stage must have at least one step")
        if st.lr <= 0:
            fail("lr", f"must be positive, got {st.lr}")
        if not 0 <= st.warmup_steps <= steps:
            fail("warmup_steps", f"must lie in [0, {steps}] (the stage's steps), got {st.warmup_steps}")
        if not 0 <= st.min_lr_ratio <= 1:
            fail("min_lr_ratio", f"must lie in [0, 1], got {st.min_lr_ratio}")
        if st.max_doc_tokens < 0:
            fail("max_doc_tokens", f"must be >= 0 (0: every document), got {st.max_doc_tokens}")
        if st.carry_state not in CARRY_MODES:
            fail("carry_state", f"must be one of {', '.join(CARRY_MODES)}, got {st.carry_state!r}")
        if st.carry_state != "none" and merge_overrides(cfg.mitigations, st.mitigations, key).window:
            fail("carry_state", f"{st.carry_state} with a sliding window: the window reads only the last tokens, "
                                "never a carried state; use carry_state: none in that stage, or no window")
        plans.append(StagePlan(i, st.name, st.seq_len, steps, step, st.global_batch_tokens, seqs, st.seq_parallel,
                               dp, micro, seqs // (dp * micro), st.lr, st.warmup_steps, st.decay, st.min_lr_ratio,
                               st.max_doc_tokens, st.carry_state))
        step += steps
    return plans


def stage_at(plans: List[StagePlan], step: int) -> StagePlan:
    """The stage that optimizer step `step` (0-based) belongs to."""
    for stage in plans:
        if step < stage.last_step:
            return stage
    return plans[-1]


def learning_rate(plans: List[StagePlan], step: int) -> float:
    """LR of optimizer step `step`: warmup from the previous stage's final LR (0 for the first),
    then the stage's decay from lr to lr * min_lr_ratio over the rest of the stage."""
    stage = stage_at(plans, step)
    t = step - stage.first_step
    start = 0.0 if stage.index == 0 else _end_lr(plans[stage.index - 1])
    if t < stage.warmup_steps:
        return start + (stage.lr - start) * (t + 1) / stage.warmup_steps
    span = max(1, stage.steps - stage.warmup_steps)
    return DECAYS[stage.decay](stage.lr, stage.lr * stage.min_lr_ratio, (t - stage.warmup_steps) / span)


def _end_lr(stage: StagePlan) -> float:
    return end_lr(stage.decay, stage.lr, stage.min_lr_ratio)


def format_model(arch: Mamba2Config) -> str:
    """The plan's first line: the model's parameters and its layers by kind (a hybrid's, a transformer's)."""
    counts, attention = parameter_count(arch), sorted(arch.attn_layer_idx)
    kinds = f"{arch.n_layer - len(attention)} Mamba-2 ({counts['mamba']:,} in their mixers)"
    if attention:
        kinds += f", {len(attention)} attention at {attention} ({counts['attention']:,} in their mixers)"
    return f"model: {counts['total']:,} parameters; {arch.n_layer} layers: {kinds}"


def format_plan(plans: List[StagePlan], world_size: int) -> str:
    head = ("stage", "seq_len", "steps", "tokens", "seqs/step", "micro", "accum", "SP", "DP", "lr", "warmup", "decay")
    rows = [head] + [(stage.name, stage.seq_len, stage.steps, f"{stage.tokens:,}", stage.sequences_per_step,
                      stage.micro_batch, stage.grad_accum, stage.seq_parallel, stage.data_parallel, f"{stage.lr:g}",
                      stage.warmup_steps, stage.decay)
                     for stage in plans]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(str(v).rjust(w) for v, w in zip(r, widths)) for r in rows]
    steps, total = sum(stage.steps for stage in plans), sum(stage.tokens for stage in plans)
    return "\n".join(lines + [f"world size {world_size}; {steps} steps, {total:,} tokens"])
