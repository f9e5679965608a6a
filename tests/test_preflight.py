"""Shards, tokenizer and model must belong together: checked before DeepSpeed starts, with the key to fix."""
import json

import pytest

from longctx.data.config import DataConfig, PrepareConfig, TokenizerConfig
from longctx.data.prepare import prepare
from longctx.pipeline.config import ConfigError, load_config
from longctx.pipeline.model import Mamba2Config, Mamba2LM
from longctx.pipeline.training.preflight import preflight
from tests.shared import shards_once


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    def make(root):
        with open(root / "docs.jsonl", "w") as f:
            for i in range(20):
                f.write(json.dumps({"text": f"document {i} with \u00ff bytes " * 20}) + "\n")
        manifest = prepare(DataConfig(prepare=PrepareConfig(inputs=[str(root / "docs.jsonl")], output=str(root / "mds"),
                                                            num_workers=2, heldout_fraction=0.3)), TokenizerConfig())
        assert manifest["max_token_id"] == 0xc3         # the largest byte: \u00ff is c3 bf in UTF-8
    return shards_once(tmp_path_factory, "preflight", make)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["some text to learn from"] * 10, trainers.BpeTrainer(
        vocab_size=60, special_tokens=["[UNK]", "<|endoftext|>"]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def config(tmp_path, shards, *overrides):
    path = tmp_path / "c.yaml"
    path.write_text(f"""
run: {{dir: {tmp_path / 'run'}}}
model: {{d_model: 32, n_layer: 2, vocab_size: 257, d_state: 16, headdim: 16, chunk_size: 16}}
data: {{shards: {shards / 'mds'}}}
curriculum: {{stages: [{{name: a, seq_len: 64, steps: 2, global_batch_tokens: 128}}]}}
""")
    return path, load_config(str(path), list(overrides))


def test_matching_shards_tokenizer_and_model_pass(tmp_path, shards):
    preflight(config(tmp_path, shards)[1], "c.yaml")


@pytest.mark.parametrize("overrides,match", [
    (["model.vocab_size=150"], r"hold token id 195, but the model's vocabulary has 150 ids \(model.vocab_size\)"),
    (["tokenizer.kind=hf", "tokenizer.path=BPE"], r"were tokenized with byte .* this run's tokenizer is"),
])
def test_mismatches_are_refused_naming_the_key(tmp_path, shards, bpe, overrides, match):
    overrides = [o.replace("BPE", str(bpe)) for o in overrides]
    with pytest.raises(ConfigError, match=match):
        preflight(config(tmp_path, shards, *overrides)[1], "c.yaml")


def test_incomplete_or_old_shards_are_refused(tmp_path, shards):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(shards / "mds", copy / "mds")
    (copy / "mds" / "DONE").unlink()
    with pytest.raises(ConfigError, match=r"no DONE marker, so `longctx prepare` did not finish"):
        preflight(config(tmp_path, copy)[1], "c.yaml")
    (copy / "mds" / "DONE").write_text("")
    manifest = json.loads((copy / "mds" / "manifest.json").read_text())
    del manifest["max_token_id"]
    (copy / "mds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="records no max_token_id"):
        preflight(config(tmp_path, copy)[1], "c.yaml")


def test_pretrained_model_must_agree_with_the_config_and_tokenizer(tmp_path, shards):
    Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=400, d_state=16, headdim=16)).save_pretrained(
        tmp_path / "bpe-model")
    Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=257, d_state=16, headdim=16)).save_pretrained(
        tmp_path / "byte-model")
    with pytest.raises(ConfigError, match=r"tokenizer.kind=byte, but .*bpe-model has a vocabulary of 400 ids"):
        preflight(config(tmp_path, shards, f"model.from_pretrained={tmp_path / 'bpe-model'}", "model.vocab_size=400",
                         "model.chunk_size=256")[1], "c.yaml")
    with pytest.raises(ConfigError, match=r"model.chunk_size: 16 contradicts .*byte-model, which has 256"):
        preflight(config(tmp_path, shards, f"model.from_pretrained={tmp_path / 'byte-model'}")[1], "c.yaml")
    preflight(config(tmp_path, shards, f"model.from_pretrained={tmp_path / 'byte-model'}",
                     "model.chunk_size=256")[1], "c.yaml")


def test_longctx_run_refuses_before_launching_anything(tmp_path, shards, capsys):
    from tests.shared import longctx_here
    path, _ = config(tmp_path, shards)
    r = longctx_here(capsys, "run", path, "model.vocab_size=150")
    assert r.returncode == 1
    assert "model.vocab_size" in r.stderr and "hold token id 195" in r.stderr
    assert "launch:" not in r.stdout and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_shards_without_heldout_documents_are_refused_only_when_the_run_reads_them(tmp_path, shards):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(shards / "mds", copy / "mds")
    manifest = json.loads((copy / "mds" / "manifest.json").read_text())
    manifest["splits"]["heldout"]["documents"] = 0
    (copy / "mds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="hold no held-out document .* raise data.prepare.heldout_fraction"):
        preflight(config(tmp_path, copy)[1], "c.yaml")
    preflight(config(tmp_path, copy, "eval.every_checkpoint=false")[1], "c.yaml")     # nothing reads them
    with pytest.raises(ConfigError, match="hold no held-out document"):                 # a calibrated state norm
        preflight(config(tmp_path, copy, "eval.every_checkpoint=false", "mitigations.state_norm.every=64")[1],
                  "c.yaml")
    # a state norm calibrated for a variant the passkey evaluation compares (it trained a stage, then failed)
    passkey_only = ("eval.kinds=[passkey]", "eval.passkey_lengths=[256]")
    preflight(config(tmp_path, copy, *passkey_only)[1], "c.yaml")                       # prompts are synthetic
    for variant in ("eval.compare_mitigations.state_norm.every=64", "eval.variants={sn: {state_norm: {every: 64}}}"):
        with pytest.raises(ConfigError, match="hold no held-out document"):
            preflight(config(tmp_path, copy, *passkey_only, variant)[1], "c.yaml")
    preflight(config(tmp_path, copy, *passkey_only, "eval.variants={sn: {state_norm: {every: 64, thresholds: [9.0, 9.0]}}}"
                     )[1], "c.yaml")                                                    # given thresholds: none read
    manifest["splits"]["train"]["documents"] = 0
    (copy / "mds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="hold no training document: every one of the 20 documents is held out"):
        preflight(config(tmp_path, copy, "eval.every_checkpoint=false")[1], "c.yaml")


def test_shards_of_an_older_longctx_are_refused_with_how_to_prepare_again(tmp_path, shards):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(shards / "mds", copy / "mds")
    manifest = json.loads((copy / "mds" / "manifest.json").read_text())
    manifest["format"] = "longctx-mds-v2"
    (copy / "mds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"older longctx \(longctx-mds-v2\), without a held-out split.*"
                                          r"longctx prepare CONFIG data.prepare.output=NEW"):
        preflight(config(tmp_path, copy)[1], "c.yaml")
