"""Synthetic documents: deterministic, in range, and passkey tasks in the evaluation's own format."""
import json
import random
import re

import numpy as np
import pytest

from longctx.data.synthetic import SyntheticConfig, passkey_document, write_jsonl
from longctx.data.tokenizer import ByteTokenizer
from longctx.pipeline.evaluate.passkey import FILLER, PREFIX, QUESTION, build_prompt, needle


def test_passkey_documents_are_the_evaluation_prompt_followed_by_the_answer():
    rng = random.Random(3)
    for length in (150, 400, 1000):
        doc = passkey_document(rng, length)
        key = re.search(r"The passkey is (\d{5})\. Remember it", doc).group(1)
        assert doc.startswith(PREFIX + "\n") and needle(key) in doc
        assert doc.endswith("\n" + QUESTION + " " + key + ".")
        assert len(doc) == length or (length < 250 and len(doc) > length)     # short ones: no filler
        filler = doc.replace(PREFIX, "").replace(needle(key), "").replace(QUESTION + " " + key + ".", "")
        assert set(filler.replace("\n", "")) <= set(FILLER)
    # the evaluation's prompt is a prefix of a document of the same layout
    tok = ByteTokenizer()
    prompt = tok.decode(build_prompt(tok, 300, 0.0, "12345"))
    assert prompt.startswith(PREFIX + "\n") and prompt.endswith("\n" + QUESTION)


@pytest.mark.parametrize("distribution", ["uniform", "log"])
def test_lengths_fraction_and_determinism(tmp_path, distribution):
    cfg = SyntheticConfig(documents=400, min_tokens=250, max_tokens=2500, seed=5, passkey_fraction=0.5,
                          length_distribution=distribution)
    path = write_jsonl(cfg, str(tmp_path / "a"))
    docs = [json.loads(line)["text"] for line in open(path)]
    assert len(docs) == 400 and docs == [json.loads(line)["text"] for line in open(write_jsonl(cfg, str(tmp_path / "b")))]
    lengths = np.array([len(d) for d in docs])
    assert lengths.min() >= 250 and lengths.max() <= 2500 + 200     # facts are inserted into prose documents
    passkeys = sum(d.startswith(PREFIX) for d in docs)
    assert 150 < passkeys < 250
    short = np.mean(lengths < 790)                                    # geometric vs arithmetic midpoint
    assert (short > 0.4) if distribution == "log" else (short < 0.35)
    with pytest.raises(ValueError, match="length_distribution"):
        write_jsonl(SyntheticConfig(documents=1, length_distribution="zipf"), str(tmp_path))
