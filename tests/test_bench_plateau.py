"""`longctx bench train --plateau`: the passkey digits told apart by place, and the command on prepared shards."""
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from longctx.data.config import DataConfig, PrepareConfig, TokenizerConfig
from longctx.data.prepare import prepare
from longctx.data.stream import PackedStream
from longctx.data.synthetic import SyntheticConfig, make_document, passkey_document
from longctx.pipeline.bench.plateau import PLACES, digit_places

LONGCTX = [sys.executable, "-m", "longctx"]


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
    for r in range(place.shape[0]):
        for t in np.flatnonzero(place[r] >= 0):
            digits = found.setdefault((r, int(batch.seq_idx[r, t])), {}).setdefault(PLACES[place[r, t]], "")
            found[r, int(batch.seq_idx[r, t])][PLACES[place[r, t]]] = digits + chr(batch.labels[r, t])
    # every place of a task read whole holds its five-digit key; the first task starts row 0 whole
    assert found[0, 0] == {name: _keys(texts[0]) for name in PLACES}
    whole = [v for v in found.values() if len(v) == 3]
    assert len(whole) >= 3 and all(len(set(v.values())) == 1 and len(next(iter(v.values()))) == 5 for v in whole)
    # digits that are no passkey's (make_document's "The value of amber is 123.") have no place
    fact_digits = sum(1 for r in range(place.shape[0]) for t in range(place.shape[1])
                      if 48 <= batch.labels[r, t] <= 57 and place[r, t] < 0)
    assert fact_digits > 0
    # a row that starts inside a key's context cannot tell its place: those digits are left out, not guessed
    inside = texts[0].index("Remember it.") + 5
    cut = PackedStream(_Texts(texts[:1]), 256, shuffle=False)
    cut.offset = inside                  # the stream's position: inside the first document
    row = cut.next_batch(1, len(texts[0]) - inside)
    row_place = digit_places(row.input_ids, row.labels, row.seq_idx)
    assert (row_place == PLACES.index("answer")).sum() == 5
    assert (row_place == PLACES.index("repeat")).sum() == 0


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("plateau")
    prepare(DataConfig(prepare=PrepareConfig(output=str(root / "mds"), num_workers=1, heldout_fraction=0.1,
                                             synthetic=SyntheticConfig(documents=200, min_tokens=100, max_tokens=300,
                                                                       passkey_fraction=1.0, seed=5))),
            TokenizerConfig())
    return root / "mds"


@pytest.mark.timeout(300)
def test_bench_plateau_trains_the_first_stage_and_reports_the_loss_at_each_place(tmp_path, shards):
    out = tmp_path / "plateau.json"
    r = subprocess.run(LONGCTX + ["bench", "train", "--plateau", "--steps", "6", "--out", str(out),
                                  f"data.shards={shards}", "train.betas=[0.9,0.999]"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [row["step"] for row in rows] == [6]
    assert rows[0]["loss"] > 0 and all(rows[0][name] > 0 for name in PLACES)
    assert "step 6" in r.stdout


@pytest.mark.timeout(120)
def test_bench_refuses_overrides_it_would_ignore_and_a_tokenizer_it_cannot_read(tmp_path, shards):
    r = subprocess.run(LONGCTX + ["bench", "kernels", "run.seed=1"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "apply to `bench train --plateau` only" in r.stderr
    r = subprocess.run(LONGCTX + ["bench", "train", "--plateau", f"data.shards={shards}", "tokenizer.kind=hf",
                                  "tokenizer.path=/nonexistent/tokenizer.json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "needs tokenizer.kind=byte" in r.stderr
