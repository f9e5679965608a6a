"""Synthetic long documents: filler prose with facts to retrieve (passkeys, key-value pairs).

Deterministic by seed. Lengths are in characters, which is tokens for the byte tokenizer
and an upper bound for subword tokenizers. The documents are written as jsonl and go
through `longctx prepare` like any other input, so the demo and the tests exercise the
real path.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
          "A river runs past the old mill and the miller counts the sacks of grain. ",
          "Clouds drift over the hills while the shepherd walks his flock home. ",
          "The library keeps its oldest books in a room without windows. ",
          "Every morning the baker opens the shop before the town wakes up. ")
KEYS = ("amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
        "kestrel", "lagoon", "meadow", "nectar", "orchid", "pebble", "quartz", "raven", "saffron", "tundra")


# The passkey prompt of docs/ARCHITECTURE.md §6 (the paper's); the evaluation builds its prompts from these.
PASSKEY_PREFIX = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it."
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The passkey is"


def passkey_needle(key: str) -> str:
    return f"The passkey is {key}. Remember it. {key} is the passkey."


@dataclass
class SyntheticConfig:
    documents: int = 0        # 0: no synthetic input
    min_tokens: int = 512     # document length range, in characters (= tokens for the byte tokenizer)
    max_tokens: int = 4096
    seed: int = 0             # the documents are a function of the settings
    passkey_fraction: float = 0.0   # share of documents that are passkey tasks in the evaluation's format
    length_distribution: str = "uniform"   # uniform | log (log-uniform: many short documents, a few long ones)


def make_document(rng: random.Random, length: int) -> str:
    """Filler of `length` characters with one passkey line and a few key-value facts at random depths;
    the passkey is asked for at the end, so a model can learn retrieval from it."""
    passkey = rng.randint(10000, 99999)
    facts = [f"The passkey is {passkey}. Remember it. {passkey} is the passkey. "]
    for key in rng.sample(KEYS, k=rng.randint(1, 3)):
        facts.append(f"The value of {key} is {rng.randint(100, 999)}. ")
    question = f"What is the pass key? The passkey is {passkey}."
    budget = max(0, length - sum(map(len, facts)) - len(question))
    filler, parts = rng.choice(FILLER), []
    while sum(map(len, parts)) < budget:
        parts.append(filler if rng.random() < 0.8 else rng.choice(FILLER))
    body = "".join(parts)[:budget]
    for fact in facts:                                          # insert at random depths, on sentence-ish cuts
        cut = rng.randint(0, len(body))
        body = body[:cut] + fact + body[cut:]
    return body + question


def passkey_document(rng: random.Random, length: int) -> str:
    """A passkey retrieval task of about `length` characters, answered: the evaluation's prompt
    (prefix, filler with the needle at a random depth, question) followed by " KEY."."""
    key = str(rng.randint(10000, 99999))
    head, middle = PASSKEY_PREFIX + "\n", "\n" + passkey_needle(key) + "\n"
    tail = "\n" + PASSKEY_QUESTION + " " + key + "."
    budget = max(0, length - len(head) - len(middle) - len(tail))
    filler = " ".join([PASSKEY_FILLER] * (budget // len(PASSKEY_FILLER) + 2))[:budget]
    cut = rng.randint(0, budget)
    return head + filler[:cut] + middle + filler[cut:] + tail


def _length(rng: random.Random, cfg: SyntheticConfig) -> int:
    if cfg.length_distribution == "log":
        return int(round(math.exp(rng.uniform(math.log(cfg.min_tokens), math.log(cfg.max_tokens)))))
    return rng.randint(cfg.min_tokens, cfg.max_tokens)


def write_jsonl(cfg: SyntheticConfig, directory: str) -> str:
    """Write the documents (once: the file name encodes the settings) and return its path."""
    if cfg.documents <= 0 or cfg.min_tokens <= 0 or cfg.max_tokens < cfg.min_tokens:
        raise ValueError("data.prepare.synthetic: need documents > 0 and 0 < min_tokens <= max_tokens, got "
                         f"{cfg.documents}, {cfg.min_tokens}, {cfg.max_tokens}")
    if cfg.length_distribution not in ("uniform", "log"):
        raise ValueError("data.prepare.synthetic.length_distribution must be 'uniform' or 'log', got "
                         f"{cfg.length_distribution!r}")
    if not 0.0 <= cfg.passkey_fraction <= 1.0:
        raise ValueError(f"data.prepare.synthetic.passkey_fraction must lie in [0, 1], got {cfg.passkey_fraction}")
    settings = [cfg.documents, cfg.min_tokens, cfg.max_tokens, cfg.seed, 1]
    if cfg.passkey_fraction or cfg.length_distribution != "uniform":
        settings += [cfg.passkey_fraction, cfg.length_distribution]
    tag = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:12]
    path = os.path.join(directory, f"synthetic-{tag}.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(cfg.seed)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        for _ in range(cfg.documents):
            kind = passkey_document if cfg.passkey_fraction and rng.random() < cfg.passkey_fraction else make_document
            f.write(json.dumps({"text": kind(rng, _length(rng, cfg))}) + "\n")
    os.replace(tmp, path)
    return path
