"""What a checkpoint's evaluation costs next to the training between two checkpoints, per stage, in tokens
read by the busiest rank (`longctx run --plan`). Evaluation tokens are forward-only (a third of a
training token's work or less), so the ratio is an upper bound on the time share; above
`WARN_ABOVE` the plan warns: on a large run the evaluation would cost about as much as training.
The run's last checkpoint, evaluated with `eval.final` when set, is priced on a line of its own against
the whole run's training: it runs once, however many checkpoints there are."""
from __future__ import annotations

from typing import List

from ..config import Config, EvalConfig, final_eval
from ..evaluate import niah
from ..evaluate.decoding import prompt_batches
from ..evaluate.passkey import NEW_TOKENS, PROMPTS_PER_BATCH
from .curriculum import StagePlan

WARN_ABOVE = 0.10


def eval_tokens(cfg: Config, p: StagePlan, world: int, ev: EvalConfig = None) -> int:
    """Tokens the busiest rank reads in one checkpoint's evaluation (with `ev`, by default the eval section):
    every rank reads the held-out sequences; passkey batches, niah batches, each loss-vs-position variant's rows
    (eval.length_sequences) and the state norms go round-robin over the ranks in that order, as evaluate/share.py
    hands them out (all on every rank under ZeRO-3). A niah prompt's new tokens are priced at its answer's
    characters (its most for any tokenizer)."""
    ev = ev or cfg.eval
    if not ev.every_checkpoint:
        return 0
    split = world if cfg.train.zero_stage < 3 else 1
    items: List[int] = []                  # token counts, in the order the evaluation hands them out
    # as trained, with eval.compare_mitigations, and each of eval.variants
    variants = 1 + bool(ev.compare_mitigations) + len(ev.variants)
    if "passkey" in ev.kinds:
        cases = [(L, None, None) for L in ev.passkey_lengths for _ in ev.passkey_depths
                 for _ in range(ev.passkey_samples)]
        batches = [sum(L + NEW_TOKENS for L, _, _ in b) for b in prompt_batches(cases, PROMPTS_PER_BATCH)]
        items += batches * variants
    if "niah" in ev.kinds:
        cases = niah.cases(ev.niah_tasks, ev.niah_lengths, ev.niah_samples)
        items += [sum(c.length + niah.new_tokens(c.task) for c in b)
                  for b in prompt_batches(cases, niah.PROMPTS_PER_BATCH)] * variants
    if "length" in ev.kinds:
        items += [ev.length_max] * (variants * ev.length_sequences)
    if "states" in ev.kinds:
        items.append(ev.length_max)
    shared = max(sum(items[r::split]) for r in range(split)) if items else 0
    heldout = ev.heldout_sequences * p.seq_len // p.seq_parallel if "heldout" in ev.kinds else 0
    return heldout + shared


def training_tokens_between(cfg: Config, p: StagePlan, world: int) -> int:
    every = cfg.checkpoint.every_steps
    steps = min(every, p.steps) if every else p.steps
    return steps * p.global_batch_tokens // world


def budget_lines(cfg: Config, plans: List[StagePlan], world: int) -> List[str]:
    """One line per stage and one for the final evaluation, and a warning line for each stage above
    WARN_ABOVE."""
    lines, warnings = [], []
    every = cfg.checkpoint.every_steps
    for p in plans:
        if p is plans[-1] and not (every and every < p.steps):
            lines.append(f"  stage {p.name}: its only checkpoint is the run's last (below)")
            continue
        ev, tr = eval_tokens(cfg, p, world), training_tokens_between(cfg, p, world)
        ratio = ev / max(tr, 1)
        lines.append(f"  stage {p.name}: evaluation {ev:,} tokens per rank per checkpoint, training {tr:,} tokens "
                     f"per rank between checkpoints ({ratio:.1%})")
        if ratio > WARN_ABOVE:
            warnings.append(f"warning: stage {p.name!r}: each checkpoint's evaluation reads {ratio:.0%} of the "
                            f"tokens trained between checkpoints (above {WARN_ABOVE:.0%}): shrink eval.passkey_* / "
                            "eval.niah_* / eval.length_max / eval.length_sequences, or checkpoint less often "
                            "(checkpoint.every_steps)")
    final = eval_tokens(cfg, plans[-1], world, final_eval(cfg.eval))
    run = sum(p.steps * p.global_batch_tokens for p in plans) // world
    lines.append(f"  the run's last checkpoint{' (eval.final)' if cfg.eval.final else ''}: evaluation {final:,} "
                 f"tokens per rank, once: {final / max(run, 1):.1%} of the run's {run:,} training tokens per rank")
    return ["evaluation per checkpoint (busiest rank):"] + lines + warnings
