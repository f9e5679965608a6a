"""A base model that is missing, damaged, of other shapes or of another tokenizer is refused before any work,
naming the file and the command that makes it again (`model.from_pretrained_recipe`)."""
import hashlib
import json
from pathlib import Path

import pytest

from longctx.data.tokenizer import ByteTokenizer, identity
from longctx.pipeline.config import ConfigError, load_config
from longctx.pipeline.model import Mamba2Config, Mamba2LM
from longctx.pipeline.training.preflight import check_model

pytestmark = pytest.mark.timeout(300)

RECIPE = "bash models/tiny/make.sh"
ARCH = dict(d_model=32, n_layer=2, vocab_size=257, d_state=16, headdim=16, chunk_size=16)


def make_base(path, **arch):
    Mamba2LM(Mamba2Config(**{**ARCH, **arch})).save_pretrained(path, safe_serialization=True)
    (path / "tokenizer_info.json").write_text(json.dumps(identity(ByteTokenizer())))
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def config(tmp_path, base, digest, *overrides):
    path = tmp_path / "c.yaml"
    path.write_text(f"""
run: {{dir: {tmp_path / 'run'}}}
model: {{from_pretrained: {base}, from_pretrained_sha256: '{digest}', from_pretrained_recipe: '{RECIPE}'}}
data: {{prepare: {{output: {tmp_path / 'mds'}, synthetic: {{documents: 50, min_tokens: 50, max_tokens: 60}}}}}}
curriculum: {{stages: [{{name: a, seq_len: 64, steps: 2, global_batch_tokens: 128}}]}}
""")
    return path, load_config(str(path), list(overrides))


@pytest.fixture
def base(tmp_path):
    return tmp_path / "base", make_base(tmp_path / "base")


def test_the_base_it_pins_passes(tmp_path, base):
    check_model(config(tmp_path, *base)[1], "c.yaml")


def test_a_missing_base_is_refused_by_longctx_run_before_any_data_is_prepared(tmp_path, capsys):
    from tests.shared import longctx_here
    path, _ = config(tmp_path, tmp_path / "nowhere", "0" * 64)
    r = longctx_here(capsys, "run", path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{tmp_path / 'nowhere'}/config.json is not there" in r.stderr
    assert f"make it again with `{RECIPE}`" in r.stderr
    assert not (tmp_path / "mds").exists() and not (tmp_path / "run").exists()


def test_a_damaged_weights_file_is_refused_naming_it_and_both_digests(tmp_path, base):
    weights = base[0] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF                       # one byte of the last tensor: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="model.from_pretrained: .*") as e:
        check_model(config(tmp_path, *base)[1], "c.yaml")
    message = str(e.value)
    assert str(weights) in message and base[1] in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message and RECIPE in message


def test_weights_of_other_shapes_than_their_config_are_refused_naming_the_tensor(tmp_path):
    base = tmp_path / "base"
    make_base(base, d_state=8)
    config_json = json.loads((base / "config.json").read_text())
    config_json["ssm_cfg"]["d_state"] = 16     # the config of another model beside these weights
    (base / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(ConfigError, match=r"backbone\.layers\.0\.mixer\.\S+ in .* has shape \[.*\], but its "
                                          r"config\.json implies \[.*\].*" + RECIPE):
        check_model(config(tmp_path, base, "")[1], "c.yaml")


def test_a_base_trained_with_another_tokenizer_is_refused(tmp_path, base):
    other = {**identity(ByteTokenizer()), "kind": "hf", "name": "other/tokenizer.json", "sha256": "ab" * 32}
    (base[0] / "tokenizer_info.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"was trained with the tokenizer other/tokenizer.json .* this run's is "
                                          r"byte .*" + RECIPE):
        check_model(config(tmp_path, base[0], "")[1], "c.yaml")


@pytest.mark.parametrize("overrides,match", [
    (["model.from_pretrained_sha256=ABC"], "must be 64 lowercase hex digits"),
    (["model.from_pretrained=", "model.from_pretrained_sha256=" + "a" * 64, "model.from_pretrained_recipe="],
     "model.from_pretrained_sha256: is set, but model.from_pretrained is empty"),
])
def test_the_pin_itself_is_checked(tmp_path, base, overrides, match):
    with pytest.raises(ConfigError, match=match):
        config(tmp_path, *base, *overrides)


def test_the_committed_demo_base_is_the_one_configs_demo_pins(monkeypatch):
    """models/demo-base is whole, of its config's shapes and the byte tokenizer, and byte for byte the file
    configs/demo.yaml pins and its README names."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(str(root / "configs" / "demo.yaml"))
    assert cfg.model.from_pretrained == "models/demo-base"
    monkeypatch.chdir(root)                 # the config names the base relative to the checkout
    check_model(cfg, "configs/demo.yaml")
    assert cfg.model.from_pretrained_sha256 in (root / "models" / "demo-base" / "README.md").read_text()
    assert (root / "models" / "demo-base" / "model.safetensors").stat().st_size < 2 * 2**20
