"""Synthetic long documents: filler prose with facts to retrieve (passkeys, key-value pairs).

Deterministic by seed. Lengths are in characters, which is tokens for the byte tokenizer
and an upper bound for subword tokenizers. The documents are written as jsonl and go
through `longctx prepare` like any other input, so the demo and the tests exercise the
real path.
"""
from __future__ import annotations

import hashlib
import json
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


@dataclass
class SyntheticConfig:
    documents: int = 0        # 0: no synthetic input
    min_tokens: int = 512
    max_tokens: int = 4096
    seed: int = 0


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


def write_jsonl(cfg: SyntheticConfig, directory: str) -> str:
    """Write the documents (once: the file name encodes the settings) and return its path."""
    if cfg.documents <= 0 or cfg.min_tokens <= 0 or cfg.max_tokens < cfg.min_tokens:
        raise ValueError("data.prepare.synthetic: need documents > 0 and 0 < min_tokens <= max_tokens, got "
                         f"{cfg.documents}, {cfg.min_tokens}, {cfg.max_tokens}")
    tag = hashlib.sha1(json.dumps([cfg.documents, cfg.min_tokens, cfg.max_tokens, cfg.seed, 1]).encode()).hexdigest()[:12]
    path = os.path.join(directory, f"synthetic-{tag}.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(cfg.seed)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        for _ in range(cfg.documents):
            f.write(json.dumps({"text": make_document(rng, rng.randint(cfg.min_tokens, cfg.max_tokens))}) + "\n")
    os.replace(tmp, path)
    return path
