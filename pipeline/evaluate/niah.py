"""RULER-style needle-in-a-haystack tasks (Hsieh et al. 2024, arXiv 2404.06654), written here from the task
definitions; nothing is downloaded.

A needle is "One of the special magic {numbers|uuids} for {key} is: {value}."; the question ("What are all the
special magic ...", RULER's wording) asks for the values of one key (or of several: multiquery) and the prompt
ends with the answer's opening words, so the values come next. Tasks (RULER's names without the niah_ prefix):

- single_1: one needle in noise (the grass is green... repeated); word key, 7-digit number.
- single_2 / single_3: one needle in prose (haystack.py's synthetic essays); number / uuid value.
- multikey_1: prose, 4 needles with different keys, one asked for (3 distractors).
- multikey_2: the haystack is all distractor needles (word keys, numbers); multikey_3: the same with uuid
  keys and uuid values.
- multivalue: prose, one key with 4 values, all asked for.
- multiquery: prose, 4 keys asked for at once, all their values.
- vt (variable tracking): in noise, "VAR ABCDE = 12345." and then 4 hops "VAR FGHIJ = VAR ABCDE."; asked for
  every variable assigned the value, the answer is the chain's 5 names.

Each prompt has exactly the requested number of tokens, for any tokenizer: it is built from token-id
segments (instruction, haystack units, needles, question with the answer's opening), and only the haystack
is cut. The needle asked for (vt: the chain's first statement) lies at `depth` of the haystack (at the unit
boundary nearest that fraction of its tokens); the others at seeded random depths (vt: the later hops
evenly after it, in order). Depths are spread evenly over the samples of a length. A prompt is a function of
(seed, task, length, sample).

Scoring is RULER's string_match_all: a prompt scores the fraction of its expected strings found in the
output (case-insensitive); it is `correct` when all are found; the accuracy of a task at a length is the
mean of its prompts' scores (not of `correct`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from . import haystack as hs
from .decoding import BATCH_TOKENS, decode_shared, generate_stacked, prompt_batches
from .share import EVERYTHING, RankShare

SCORING = ("string_match_all: a prompt's score is the fraction of its expected strings found in the output "
           "(case-insensitive), correct when all are; an accuracy is the mean of the scores")


@dataclass
class Plan:
    """One prompt's text before tokenization: instruction, needles with their depths (in text order where
    depths tie), question with the answer's opening, the expected strings, and the endless haystack units."""
    head: str
    needles: List[Tuple[str, float]]
    tail: str
    expected: List[str]
    haystack: Iterator[str] = field(repr=False)


def _listing(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


@dataclass(frozen=True)
class NeedleTask:
    haystack: str                  # noise | prose | needles (distractor needles only)
    keys: str = "words"            # words | uuids
    values: str = "numbers"        # numbers | uuids
    num_keys: int = 1              # needles with different keys; the first num_queries are asked for
    num_values: int = 1            # values per key, all asked for
    num_queries: int = 1

    def needle(self, key: str, value: str) -> str:
        return f"One of the special magic {self.values} for {key} is: {value}. "

    def plan(self, rng: random.Random, depth: float) -> Plan:
        keys = hs.distinct(hs.DRAW[self.keys], rng, self.num_keys)
        values = [hs.distinct(hs.DRAW[self.values], rng, self.num_values) for _ in keys]
        # the first value of the first key asked for at `depth`, every other needle anywhere
        needles = [(self.needle(k, v), depth if (i, j) == (0, 0) else rng.random())
                   for i, (k, vs) in enumerate(zip(keys, values)) for j, v in enumerate(vs)]
        query = _listing(keys[: self.num_queries])
        head = (f"Some special magic {self.values} are hidden within the following text. Make sure to memorize "
                f"them: you will be asked about them afterwards.\n")
        tail = (f"\nWhat are all the special magic {self.values} for {query} mentioned in the provided text? "
                f"The special magic {self.values} for {query} mentioned in the provided text are")
        expected = [v for vs in values[: self.num_queries] for v in vs]
        if self.haystack == "needles":
            haystack = self._distractors(rng, set(keys))
        else:
            haystack = hs.HAYSTACKS[self.haystack](rng)
        return Plan(head, needles, tail, expected, haystack)

    def _distractors(self, rng: random.Random, asked: set) -> Iterator[str]:
        while True:
            yield self.needle(hs.distinct(hs.DRAW[self.keys], rng, 1, asked)[0], hs.DRAW[self.values](rng))

    def answer_size(self) -> int:
        """Characters of the longest answer the prompt asks for (" V1, V2, and V3."): an upper bound on its
        tokens for any tokenizer whose tokens cover at least one character, exact for bytes."""
        return len(" " + _listing(["x" * hs.CHARS[self.values]] * (self.num_queries * self.num_values)) + ".")


@dataclass(frozen=True)
class VariableTracking:
    hops: int = 4                  # assignments after the first: the chain has hops + 1 variables

    def plan(self, rng: random.Random, depth: float) -> Plan:
        names = hs.distinct(hs.variable_name, rng, self.hops + 1)
        value = hs.number(rng, 5)
        statements = [f"VAR {names[0]} = {value}. "] + [f"VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
        # in order: each hop comes after the one it copies, the first at `depth`, the rest evenly up to the end
        needles = [(s, depth + (1 - depth) * i / self.hops) for i, s in enumerate(statements)]
        head = "Memorize and track the chain of variable assignments hidden in the following text.\n"
        tail = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
                f"According to the chain of variable assignments in the text above, {len(names)} variables are "
                f"assigned the value {value}, they are:")
        return Plan(head, needles, tail, names, hs.noise())

    def answer_size(self) -> int:
        return len(" " + _listing(["X" * hs.CHARS["names"]] * (self.hops + 1)) + ".")


TASKS = {"single_1": NeedleTask("noise"),
         "single_2": NeedleTask("prose"),
         "single_3": NeedleTask("prose", values="uuids"),
         "multikey_1": NeedleTask("prose", num_keys=4),
         "multikey_2": NeedleTask("needles"),
         "multikey_3": NeedleTask("needles", keys="uuids", values="uuids"),
         "multivalue": NeedleTask("prose", num_values=4),
         "multiquery": NeedleTask("prose", num_keys=4, num_queries=4),
         "vt": VariableTracking()}      # in the order of config.NIAH_TASKS, which eval.niah_tasks is checked against


def check_tasks(tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown niah task {unknown[0]!r}: choose from {', '.join(TASKS)}")


def new_tokens(task: str) -> int:
    """Tokens decoded per prompt of `task`: room for the whole answer (every value asked for)."""
    return TASKS[task].answer_size()


def depths(samples: int) -> List[float]:
    """The needle depths of a length's samples: evenly over [0, 1] (the middle for one sample)."""
    return [0.5] if samples == 1 else [round(i / (samples - 1), 4) for i in range(samples)]


def case_plan(task: str, length: int, depth: float, seed: int, sample: int) -> Plan:
    check_tasks([task])
    # a string seed: hashed with sha512 by random.Random, the same in every process (not PYTHONHASHSEED's)
    return TASKS[task].plan(random.Random(f"niah/{seed}/{task}/{length}/{sample}"), depth)


class Prompt(NamedTuple):
    ids: np.ndarray
    expected: List[str]


def _fixed_parts(tok, task: str, length: int, plan: Plan) -> Tuple[list, int]:
    """The token ids of the instruction, the question and each needle, and the haystack's budget: the tokens
    left for it (a ValueError when there are none to make the prompt `length` long)."""
    head, tail, *needles = tok.encode_batch([plan.head, plan.tail] + [text for text, _ in plan.needles])
    budget = length - len(head) - len(tail) - sum(map(len, needles))
    if budget < 0:
        raise ValueError(f"niah task {task}: length {length} is too short: its prompt needs at least "
                         f"{length - budget} tokens without any haystack")
    return [head, tail, needles], budget


def _haystack(tok, units: Iterator[str], budget: int, chunk: int = 256) -> Tuple[List[np.ndarray], bool]:
    """Haystack units' token ids up to `budget` tokens in all, and whether the last one was cut to fit. Units
    are encoded one by one (a needle then sits between whole units), each distinct text once."""
    pieces: List[np.ndarray] = []
    total, seen = 0, {}
    while total < budget:
        texts = list(islice(units, chunk))
        if not texts:        # every haystack is endless; a finite one would otherwise loop here forever
            raise ValueError(f"the haystack ran out {budget - total} tokens short of {budget}")
        new = [t for t in dict.fromkeys(texts) if t not in seen]
        seen.update(zip(new, tok.encode_batch(new)))
        for t in texts:
            ids = seen[t][: budget - total]
            pieces.append(ids)
            total += len(ids)
            if total >= budget:
                return pieces, len(ids) < len(seen[t])
    return pieces, False


def build_prompt(tok, task: str, length: int, depth: float, seed: int = 0, sample: int = 0) -> Prompt:
    """Exactly `length` token ids: instruction, haystack with the needles at their depths, question."""
    plan = case_plan(task, length, depth, seed, sample)
    (head, tail, needles), budget = _fixed_parts(tok, task, length, plan)
    pieces, cut = _haystack(tok, plan.haystack, budget)
    ends = np.cumsum([0] + [len(p) for p in pieces])        # unit boundaries, in haystack tokens
    if cut:                  # never after the cut unit's stump: a needle begins a sentence
        ends = ends[:-1]
    at: dict = {}
    for ids, (_, d) in zip(needles, plan.needles):
        at.setdefault(int(np.argmin(np.abs(ends - d * budget))), []).append(ids)
    parts = [head]
    for b in range(len(pieces) + 1):
        parts += at.get(b, [])
        if b < len(pieces):
            parts.append(pieces[b])
    ids = np.concatenate(parts + [tail]).astype(np.int64)
    assert len(ids) == length
    return Prompt(ids, plan.expected)


def check_prompts(tok, tasks: Sequence[str], lengths: Sequence[int], samples: int, seed: int = 0) -> None:
    """Raises the ValueError building any prompt of the evaluation would (a length too short for a task),
    without tokenizing a haystack: the trainer runs it at startup."""
    check_tasks(tasks)
    for task in tasks:
        for length in lengths:
            for sample, depth in enumerate(depths(samples)):
                _fixed_parts(tok, task, length, case_plan(task, length, depth, seed, sample))


def string_match_all(output: str, expected: Sequence[str]) -> float:
    """RULER's string_match_all: the fraction of the expected strings found in the output, case-insensitive."""
    text = output.lower()
    return sum(e.lower() in text for e in expected) / len(expected)


class Case(NamedTuple):
    length: int          # first: prompt_batches reads the prompt length there
    task: str
    depth: float
    sample: int


def cases(tasks: Sequence[str], lengths: Sequence[int], samples: int) -> List[Case]:
    return [Case(L, t, d, i) for t in tasks for L in lengths for i, d in enumerate(depths(samples))]


def _decode_batch(model, tok, batch: List[Case], device, prefill_chunk: int, seed: int) -> List[dict]:
    prompts = [build_prompt(tok, c.task, c.length, c.depth, seed, c.sample) for c in batch]
    rows = generate_stacked(model, [p.ids for p in prompts], [new_tokens(c.task) for c in batch], device,
                            prefill_chunk)
    outputs = []
    for c, p, row in zip(batch, prompts, rows):
        text = tok.decode(row)
        score = string_match_all(text, p.expected)
        outputs.append({"task": c.task, "length": c.length, "depth": c.depth, "prompt_tokens": len(p.ids),
                        "expected": p.expected, "output": text, "score": score, "correct": score == 1.0})
    return outputs


PROMPTS_PER_BATCH = 8     # as passkey's (eval_budget prices the trainer's calls by it)


@torch.no_grad()
def evaluate_niah(model, tok, tasks: Sequence[str], lengths: Sequence[int], samples: int, seed: int = 0,
                  prefill_chunk: int = 4096, batch_size: int = PROMPTS_PER_BATCH, batch_tokens: int = BATCH_TOKENS,
                  between_batches: Optional[Callable[[], None]] = None, share: RankShare = EVERYTHING) -> dict:
    """Accuracy per task and length (the mean string_match_all score, SCORING), per task, length and depth,
    and every prompt with its output. `between_batches` runs before each batch of prompts (the trainer's stop
    check); with a `share`, each rank decodes its batches and every rank gets all outputs."""
    check_tasks(tasks)
    if samples < 1 or not lengths or not tasks:
        raise ValueError(f"niah: give at least one task, one length and one sample (got {len(tasks)} tasks, "
                         f"{len(lengths)} lengths, {samples} samples)")
    device = next(model.parameters()).device
    batches = prompt_batches(cases(tasks, lengths, samples), batch_size, batch_tokens)
    # _decode_batch looked up at each call: tests count the batches each rank decodes by replacing it
    prompts = decode_shared(model, batches, lambda b: _decode_batch(model, tok, b, device, prefill_chunk, seed),
                            share, between_batches)

    def mean(**match) -> float:
        return float(np.mean([p["score"] for p in prompts if all(p[k] == v for k, v in match.items())]))
    return {"tasks": list(tasks), "lengths": list(lengths), "depths": depths(samples), "samples": samples,
            "seed": seed, "scoring": SCORING,
            "per_task": {t: {str(L): mean(task=t, length=L) for L in lengths} for t in tasks},
            "per_depth": {t: {str(L): {str(d): mean(task=t, length=L, depth=d) for d in depths(samples)}
                              for L in lengths} for t in tasks},
            "per_length": {str(L): mean(length=L) for L in lengths},
            "mean_accuracy": mean(), "prompts": prompts}
