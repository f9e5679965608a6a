"""`longctx export` writes the tokenizer with the model: transformers' AutoTokenizer and AutoModelForCausalLM load
the exported directory alone, and `generate` on it reproduces `longctx eval passkey`'s outputs prompt for prompt."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longctx.data.hf_tokenizer import byte_level_tokenizer
from longctx.data.tokenizer import ByteTokenizer
from tests.shared import longctx_here

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["plain ascii", "  two spaces\n\ttab", "é ü ß 漢字 🎉", "The pass key is 12345. Remember it.", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_the_byte_level_tokenizer_is_the_byte_tokenizer(text):
    tok, ours = byte_level_tokenizer(), ByteTokenizer()
    ids = tok.encode(text).ids
    assert ids == [int(i) for i in ours.encode(text)]
    assert tok.decode(ids) == ours.decode(ids) == text
    assert tok.token_to_id("<|endoftext|>") == ours.eos_id == 256 and tok.get_vocab_size() == ours.vocab_size


def test_an_export_loads_in_transformers_alone_and_generates_what_longctx_eval_decodes(tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")
    out = tmp_path / "hf"
    r = longctx_here(capsys, "export", ROOT / "models" / "demo-base", out, "--format", "hf")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "tokenizer_info.json"} <= {
        p.name for p in out.iterdir()}
    e = longctx_here(capsys, "eval", "passkey", out, "--lengths", "256", "--depths", "0,0.5,1", "--samples", "2",
                     "--seed", "3", "--out", tmp_path / "eval")
    assert e.returncode == 0, e.stderr[-3000:]
    ours = json.loads((tmp_path / "eval" / "passkey.json").read_text())["outputs"]

    alone = tmp_path / "elsewhere"            # nothing of longctx's beside it: what another tool sees
    shutil.copytree(out, alone)
    (alone / "tokenizer_info.json").unlink()
    tok = transformers.AutoTokenizer.from_pretrained(alone)
    model = transformers.AutoModelForCausalLM.from_pretrained(alone).eval()
    from longctx.pipeline.evaluate.passkey import build_prompt
    for o in ours:
        ids = build_prompt(ByteTokenizer(), o["length"], o["depth"], o["key"])
        text = ByteTokenizer().decode(ids)
        encoded = tok(text, return_tensors="pt").input_ids
        assert encoded[0].tolist() == ids.tolist()
        with torch.no_grad():
            new = model.generate(encoded, max_new_tokens=8, do_sample=False)[0, encoded.shape[1]:]
        assert tok.decode(new, skip_special_tokens=True) == o["output"], (o, tok.decode(new))
    assert sum(o["correct"] for o in ours) >= 4           # a model that retrieves: the outputs mean something


def test_a_runs_own_tokenizer_json_goes_with_its_export(tmp_path):
    """A run with a Hugging Face tokenizer: its tokenizer.json travels with the export and AutoTokenizer encodes
    as the run did."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from longctx.data.tokenizer import HFTokenizer, identity
    from longctx.pipeline.model import Mamba2Config, Mamba2LM
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(["some text to learn from, and more text"] * 10,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "<|endoftext|>"]))
    src = tmp_path / "src"
    Mamba2LM(Mamba2Config(d_model=32, n_layer=1, vocab_size=64, d_state=8, headdim=8, chunk_size=8)).save_pretrained(src)
    bpe.save(str(src / "tokenizer.json"))
    ours = HFTokenizer(str(src / "tokenizer.json"))
    (src / "tokenizer_info.json").write_text(json.dumps(identity(ours)))
    r = subprocess.run([sys.executable, "-m", "longctx", "export", str(src), str(tmp_path / "hf"), "--format", "hf"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "more text to learn"
    assert tok(text).input_ids == [int(i) for i in ours.encode(text)]
    assert tok.eos_token_id == ours.eos_id
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == ours.eos_id
