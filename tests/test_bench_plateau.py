"""`longctx bench train --plateau`: the passkey digits told apart by place, and the command on prepared shards."""
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longctx.data.config import DataConfig, PrepareConfig, TokenizerConfig
from longctx.data.prepare import prepare
from longctx.data.stream import PackedStream
from longctx.data.synthetic import SyntheticConfig, make_document, passkey_document
from longctx.pipeline.bench.plateau import PLACES, digit_places
from tests.shared import longctx_here

LONGCTX = [sys.executable, "-m", "longctx"]
REPO = Path(__file__).resolve().parent.parent


class _Texts:
    """A DocumentSource over in-memory texts (byte tokens)."""

    def __init__(self, texts):
        self.docs = [np.frombuffer(t.encode(), dtype=np.uint8).astype(np.int64) for t in texts]

    def __len__(self):
        return len(self.docs)

    def tokens(self, i):
        return self.docs[i]


def _keys(text: str):
    """The passkey of a synthetic task: the digits after its needle's "The passkey is "."""
    start = text.index("The passkey is ") + len("The passkey is ")
    return text[start:start + 5]


@pytest.mark.timeout(60)
def test_each_digit_of_a_key_is_told_by_its_place_and_a_key_cut_from_its_context_is_left_out():
    rng = random.Random(3)
    texts = [passkey_document(rng, n) for n in (150, 230, 120, 280)] + [make_document(rng, 300)]
    batch = PackedStream(_Texts(texts), 256, shuffle=False).next_batch(5, 256)
    place = digit_places(batch.input_ids, batch.labels, batch.seq_idx)
    found = {}                           # (row, document) -> {place: the digits there}
    for r, t in zip(*np.nonzero(place >= 0)):
        places, name = found.setdefault((r, int(batch.seq_idx[r, t])), {}), PLACES[place[r, t]]
        places[name] = places.get(name, "") + chr(batch.labels[r, t])
    # every place of a task read whole holds its five-digit key; the first task starts row 0 whole
    assert found[0, 0] == {name: _keys(texts[0]) for name in PLACES}
    whole = [v for v in found.values() if len(v) == 3]
    assert len(whole) >= 3 and all(len(set(v.values())) == 1 and len(next(iter(v.values()))) == 5 for v in whole)
    assert all(0 <= batch.labels[r, t] - ord("0") <= 9 for r, t in zip(*np.nonzero(place >= 0)))
    # make_document's passkey has all three places; the digits of its facts ("The value of amber is 123.") none
    doc = make_document(random.Random(4), 400)
    key = _keys(doc)
    assert f"The passkey is {key}. Remember it. {key} is the passkey." in doc and "The value of " in doc
    row = PackedStream(_Texts([doc]), 256, shuffle=False).next_batch(1, len(doc))
    row_place = digit_places(row.input_ids, row.labels, row.seq_idx)
    for index in range(3):
        assert "".join(chr(c) for c in row.labels[row_place == index]) == key, PLACES[index]
    digits = (row.labels >= ord("0")) & (row.labels <= ord("9"))
    assert (digits & (row_place < 0)).sum() == digits.sum() - 15 > 0      # every digit but the key's three copies
    # a row that starts inside a key's context cannot tell its place: those digits are left out, not guessed
    inside = texts[0].index("Remember it.") + 5
    cut = PackedStream(_Texts(texts[:1]), 256, shuffle=False)
    cut.offset = inside                  # the stream's position: inside the first document
    row = cut.next_batch(1, len(texts[0]) - inside)
    row_place = digit_places(row.input_ids, row.labels, row.seq_idx)
    assert (row_place == PLACES.index("answer")).sum() == 5
    assert (row_place == PLACES.index("repeat")).sum() == 0
    # a row that starts inside the question's "? " reads "The passkey is 12345." like a needle: left out, not
    # counted as the key itself; from the "?" on, it is the answer
    question = texts[0].index("? The passkey is")
    for skipped, want in ((2, -1), (1, -1), (0, PLACES.index("answer"))):
        cut = PackedStream(_Texts(texts[:1]), 256, shuffle=False)
        cut.offset = question + skipped
        row = cut.next_batch(1, len(texts[0]) - question - skipped)
        got = digit_places(row.input_ids, row.labels, row.seq_idx)
        assert set(got[(row.labels >= ord("0")) & (row.labels <= ord("9"))].tolist()) == {want}, skipped


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("plateau")
    prepare(DataConfig(prepare=PrepareConfig(output=str(root / "mds"), num_workers=1, heldout_fraction=0.1,
                                             synthetic=SyntheticConfig(documents=200, min_tokens=100, max_tokens=300,
                                                                       passkey_fraction=1.0, seed=5))),
            TokenizerConfig())
    return root / "mds"


@pytest.mark.timeout(300)
def test_bench_plateau_trains_the_first_stage_and_reports_the_loss_at_each_place(tmp_path, shards):
    out = tmp_path / "plateau.json"
    # --steps past the stage's end stops at it: the override of the stage's steps reached the run
    r = subprocess.run(LONGCTX + ["bench", "train", "--plateau", "--steps", "9", "--out", str(out),
                                  f"data.shards={shards}", "curriculum.stages[0].steps=5", "curriculum.stages[0].warmup_steps=2",
                                  "train.betas=[0.9,0.999]"],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [row["step"] for row in rows] == [5]
    assert rows[0]["loss"] > 0 and all(rows[0][name] > 0 for name in PLACES)
    assert "step 5" in r.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, message", [
    (["kernels", "run.seed=1"], "apply to `bench train --plateau` only"),
    (["train", "--plateau", "--vs-bare"], "separate benchmarks"),
    (["train", "--plateau", "tokenizer.kind=hf", "tokenizer.path=/nowhere/tokenizer.json"],
     "tokenizer.kind is 'hf'; bench train --plateau needs tokenizer.kind=byte"),
    (["train", "--plateau", "train.precision=bf16"], "needs train.precision=fp32"),
    (["train", "--plateau", "curriculum.stages[0].carry_state=document"],
     "needs curriculum.stages[0].carry_state=none"),
    (["train", "--plateau", "--steps", "0"], "--steps must be positive"),
])
def test_bench_refuses_what_it_would_ignore_or_get_wrong_naming_it(args, message, capsys):
    shards = ["data.shards=/nowhere/mds"] if args[0] == "train" else []     # refused before any data is read
    r = longctx_here(capsys, "bench", *args, *shards, cwd=REPO)              # refused before it benchmarks
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
