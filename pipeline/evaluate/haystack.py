"""The text of the needle-in-a-haystack prompts (niah.py): haystacks, keys and values, all drawn from a
`random.Random` so that a prompt is a function of its seed, and nothing is downloaded.

RULER's haystacks are a noise sentence repeated and Paul Graham's essays; in place of the essays, which
cannot be fetched here, prose is written from an embedded vocabulary and sentence templates: grammatical,
varied, essay-like sentences in paragraphs, with no digits in them (a number in the haystack could be read
as a needle's value). Every haystack is an endless run of units (sentences, needles) that end in white
space, so that a needle put between two units reads as a sentence of its own.
"""
from __future__ import annotations

import random
import re
import string
import uuid
from typing import Callable, Iterator

from longctx.data.synthetic import PASSKEY_FILLER

# RULER's noise: the passkey filler line (the same sentences), one sentence per unit so that needles land
# between sentences
NOISE_UNITS = tuple(s.strip() + " " for s in re.findall(r"[^.]+\.", PASSKEY_FILLER))

# keys are "adjective-noun" words, as RULER's word keys are (1,600 of them: a long haystack of distractor
# needles repeats keys, never the one asked for)
KEY_ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
                  "lively", "mellow", "narrow", "odd", "plain", "quick", "rapid", "shiny", "tidy", "upper", "vivid",
                  "wary", "young", "zesty", "bold", "crisp", "damp", "early", "fancy", "grand", "hasty", "idle",
                  "jagged", "kind", "loud", "mighty", "noble", "pale", "rough")
KEY_NOUNS = ("anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "hammer", "island", "jacket",
             "kettle", "lantern", "marble", "needle", "orchard", "pepper", "quiver", "rocket", "saddle", "thimble",
             "umbrella", "valley", "walrus", "yarn", "zipper", "beacon", "cactus", "dolphin", "feather", "glacier",
             "harbor", "igloo", "jigsaw", "koala", "ladder", "meadow", "nugget", "otter", "parrot", "rabbit")


def word_key(rng: random.Random) -> str:
    return f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"


def uuid_string(rng: random.Random) -> str:
    """A version-4 UUID drawn from `rng` (uuid.uuid4 reads the OS's randomness: not reproducible)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def variable_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


DRAW = {"words": word_key, "uuids": uuid_string, "numbers": number}     # by RULER's type names
CHARS = {"numbers": 7, "uuids": 36, "names": 5}     # characters of a value of each kind (answers are sized by them)


def distinct(draw: Callable[[random.Random], str], rng: random.Random, n: int, taken=()) -> list:
    """`n` different draws, none of them in `taken`."""
    out: list = []
    while len(out) < n:
        x = draw(rng)
        if x not in out and x not in taken:
            out.append(x)
    return out


def noise() -> Iterator[str]:
    while True:
        yield from NOISE_UNITS


# -- synthetic prose -------------------------------------------------------------------------------------
PEOPLE = ("founders", "writers", "engineers", "students", "investors", "painters", "teachers", "programmers",
          "scientists", "gardeners", "readers", "builders", "editors", "doctors", "architects", "musicians")
THINGS = ("idea", "essay", "startup", "project", "question", "habit", "language", "city", "company", "problem",
          "design", "experiment", "garden", "library", "tool", "map", "argument", "product", "draft", "theory")
THINGS_PLURAL = ("ideas", "essays", "startups", "projects", "questions", "habits", "languages", "cities",
                 "companies", "problems", "designs", "experiments", "tools", "maps", "arguments", "drafts")
ADJECTIVES = ("good", "new", "old", "simple", "strange", "ambitious", "careful", "quiet", "useful", "difficult",
              "small", "obvious", "surprising", "patient", "honest", "unusual", "ordinary", "elegant", "risky",
              "modest", "clever", "awkward", "valuable", "rare")
VERBS = ("notice", "build", "write", "question", "ignore", "discover", "explain", "rewrite", "measure", "admire",
         "borrow", "test", "imagine", "defend", "abandon", "polish", "study", "share")
ADVERBS = ("slowly", "rarely", "often", "usually", "eventually", "quietly", "deliberately", "almost always",
           "seldom", "gradually", "sometimes")
TIMES = ("at first", "in the long run", "for years", "by the end", "most of the time", "after a while",
         "in the beginning", "sooner or later", "every morning", "over a long summer")
REASONS = ("curiosity", "money", "status", "habit", "fear", "ambition", "boredom", "luck", "pride", "necessity")
OPENERS = ("Because", "Although", "When", "If", "Once", "Unless", "While")
# {a_adj}: an adjective with its article; {Cap...}: capitalised
TEMPLATES = (
    "{People} {adverb} {verb} {a_adj} {thing}.",
    "{Opener} {people} {verb} {a_adj} {thing}, they {adverb} {verb2} it {time}.",
    "The {adj} {thing} is {adverb} the one that {people} {verb} {time}.",
    "Most {people} {verb} {things} out of {reason}, not out of {reason2}.",
    "It is {adj} to {verb} {a_adj} {thing} {time}, and {adj2} to {verb2} one.",
    "What {people} {verb} {time} is {adverb} {a_adj} {thing}.",
    "{Time}, {a_adj} {thing} looks {adj2} to the {people} who {verb} it.",
    "There is no {adj} way to {verb} {a_adj} {thing}; you have to {verb2} it.",
    "{A_adj} {thing} that {people} {verb} is worth more than {things} they {verb2}.",
    "Ask {people} why they {verb} {things}, and they will talk about {reason}.",
    "The {people} I know {adverb} {verb} their {things} before they {verb2} them.",
    "Nobody plans to {verb} {a_adj} {thing}; it happens {time}, out of {reason}.",
    "{Things} are {adverb} more {adj} than they look, which is why {people} {verb} them.",
    "I used to think {people} {verb} {things} out of {reason}, but {time} I saw it was {reason2}.",
)


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def sentence(rng: random.Random) -> str:
    pick = rng.choice
    adj, adj2 = rng.sample(ADJECTIVES, 2)
    verb, verb2 = rng.sample(VERBS, 2)
    reason, reason2 = rng.sample(REASONS, 2)
    slots = dict(people=pick(PEOPLE), thing=pick(THINGS), things=pick(THINGS_PLURAL), adj=adj, adj2=adj2,
                 a_adj=_article(pick(ADJECTIVES)), verb=verb, verb2=verb2, adverb=pick(ADVERBS), time=pick(TIMES),
                 reason=reason, reason2=reason2, opener=pick(OPENERS))
    slots.update({k[0].upper() + k[1:]: v[0].upper() + v[1:] for k, v in list(slots.items())})
    return pick(TEMPLATES).format(**slots)


def prose(rng: random.Random) -> Iterator[str]:
    """Sentences in paragraphs of 3 to 7 (a paragraph's last sentence ends in a blank line)."""
    while True:
        n = rng.randint(3, 7)
        for i in range(n):
            yield sentence(rng) + ("\n\n" if i == n - 1 else " ")


HAYSTACKS = {"noise": lambda rng: noise(), "prose": prose}      # "needles" (distractors) is niah.py's
