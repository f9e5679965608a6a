import pytest

from longctx.pipeline.config import Config, ConfigError, load_config, to_yaml

GOOD = """
run: {name: demo}
model: {d_model: 64, n_layer: 2, vocab_size: 256, d_state: 16, headdim: 16}
train: {micro_batch_size: 2, zero_stage: 2, deepspeed: {zero_optimization: {overlap_comm: true}}}
curriculum:
  stages:
    - {name: short, seq_len: 256, steps: 10, global_batch_tokens: 1024}
    - {name: long, seq_len: 1024, tokens: 20480, global_batch_tokens: 2048, decay: wsd}
"""


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_loads_yaml_with_overrides_and_interpolation(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["train.micro_batch_size=4", "model.n_layer=3"])
    assert isinstance(cfg, Config)
    assert cfg.run.dir == "runs/demo"
    assert cfg.train.micro_batch_size == 4 and cfg.model.n_layer == 3
    assert cfg.train.deepspeed == {"zero_optimization": {"overlap_comm": True}} and cfg.train.zero_stage == 2
    assert [s.name for s in cfg.curriculum.stages] == ["short", "long"]
    assert cfg.curriculum.stages[1].tokens == 20480
    assert "seq_len: 1024" in to_yaml(cfg)


@pytest.mark.parametrize("text,overrides,match", [
    ("model: {d_modle: 3}\n", [], r"c.yaml: key 'model.d_modle'"),
    ("", ["train.bogus=1"], r"override 'train.bogus=1': key 'train.bogus'"),
    ("", ["train.micro_batch_size=many"], "train.micro_batch_size"),
    ("", ["justakey"], "expected key=value"),
    ("model: [unclosed\n", [], "cannot parse YAML"),
    ("model: {dtype: fp8}\n", [], "model.dtype"),
    ("model: {d_model: 64, headdim: 48}\n", [], r"model: .*multiple of headdim"),
    ("tokenizer: {kind: hf}\n", [], "tokenizer.path"),
    ("curriculum: {stages: [{name: a, seq_len: 256, global_batch_tokens: 512}]}\n", [], "exactly one of steps or tokens"),
    ("curriculum: {stages: [{name: a, seq_len: 256, steps: 1, global_batch_tokens: 300}]}\n", [],
     r"stages\[0\] \(a\).global_batch_tokens"),
])
def test_errors_name_the_file_and_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), overrides)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text,match", [
    ("model: {n_layer: 2}\nmitigations: {decay_scale: [0.9, 0.9, 0.9]}\n", "mitigations.decay_scale"),
    ("curriculum: {stages: [{name: a, seq_len: 256, steps: 1, global_batch_tokens: 256, mitigations: {windw: 4}}]}\n",
     r"stages\[0\] \(a\).mitigations"),
])
def test_mitigation_errors_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_list_index_overrides(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["curriculum.stages.1.seq_len=2048", "curriculum.stages.0.lr=1e-4",
                                              "mitigations.decay_scale=[0.9, 1.0]", "model.n_layer=2"])
    assert cfg.curriculum.stages[1].seq_len == 2048 and cfg.curriculum.stages[0].lr == 1e-4
    assert cfg.mitigations.decay_scale == [0.9, 1.0]
    with pytest.raises(ConfigError, match="curriculum.stages.5.seq_len"):
        load_config(write(tmp_path, GOOD), ["curriculum.stages.5.seq_len=4"])
    with pytest.raises(ConfigError, match="stages.0.bogus"):
        load_config(write(tmp_path, GOOD), ["curriculum.stages.0.bogus=4"])


def test_docs_configuration_reference_is_generated_from_the_dataclasses():
    from pathlib import Path

    from longctx.pipeline.config_reference import END, START, reference
    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert START in page and END in page
    body = page.split(START, 1)[1].split(END, 1)[0].strip()
    assert body == reference(), ("docs/configuration.md is stale: paste the output of "
                                 "python -m longctx.pipeline.config_reference between its markers")
    for key in ("curriculum.stages", "eval.compare_mitigations", "mitigations.state_norm.every", "`seq_parallel`"):
        assert key in body


STAGE = "curriculum: {stages: [{name: a, seq_len: 256, steps: 1, global_batch_tokens: 256}]}\n"


@pytest.mark.parametrize("text,match", [
    ("eval: {kinds: [heldout, passkeys]}\n", r"eval.kinds: unknown evaluation 'passkeys'.*heldout, passkey, niah, length, states"),
    ("eval: {passkey_depths: [0.0, 1.5]}\n", r"eval.passkey_depths: 1.5 is outside \[0, 1\]"),
    ("eval: {passkey_depths: [-0.1]}\n", r"eval.passkey_depths: -0.1 is outside \[0, 1\]"),
    ("mitigations: {decay_scale: 1.5}\n", r"mitigations.decay_scale: 1.5 is outside \(0, 1\]"),
    ("mitigations: {decay_scale: 0}\n", r"mitigations.decay_scale: 0 is outside \(0, 1\]"),
    ("mitigations: {input_scale: 2.0}\n", r"mitigations.input_scale: 2.0 is outside \(0, 1\]"),
    ("mitigations: {input_scale: true}\n", r"mitigations.input_scale: True is not a number"),
    ("mitigations: {decay_scale: [0.9, yes]}\n", r"mitigations.decay_scale\[1\]: True is not a number"),
    ("mitigations: {decay_scale: fast}\n", r"mitigations.decay_scale: 'fast' is not a number"),
    ("eval: {compare_mitigations: {decay_scale: 3}}\n", r"eval.compare_mitigations.decay_scale: 3 is outside"),
    ("curriculum: {stages: [{name: a, seq_len: 256, steps: 1, global_batch_tokens: 256, "
     "mitigations: {input_scale: 0}}]}\n", r"stages\[0\] \(a\).mitigations.input_scale: 0 is outside"),
    ("checkpoint: {every_steps: -1}\n", r"checkpoint.every_steps: must be >= 0 \(0: only at stage ends\), got -1"),
    ("checkpoint: {keep_last: -2}\n", r"checkpoint.keep_last: must be >= 0 \(0 keeps every checkpoint\), got -2"),
    ("eval: {heldout_sequences: 0}\n", r"eval.heldout_sequences: must be >= 1, got 0"),
    ("model: {dtype: bf16}\n", r"key 'model.dtype'"),
    ("train: {precision: bf16, zero_stage: 0}\n", r"train.precision: bf16 with train.zero_stage=0: .* in bf16"),
    # ranges: each crashed after a stage of training, reported NaN, or meant nothing (audit, issue 31 item 5)
    ("eval: {prefill_chunk: 0}\n", r"eval.prefill_chunk: must be >= 1 \(tokens per forward\), got 0"),
    ("eval: {passkey_samples: 0}\n", r"eval.passkey_samples: must be >= 1"),
    ("eval: {length_buckets: 0}\n", r"eval.length_buckets: must be >= 1"),
    ("eval: {length_max: 0}\n", r"eval.length_max: must be >= 2"),
    ("eval: {length_sequences: 0}\n", r"eval.length_sequences: must be >= 1 \(rows of eval.length_max tokens"),
    ("eval: {passkey_lengths: []}\n", r"eval.passkey_lengths: is empty while eval.kinds has passkey"),
    ("eval: {passkey_lengths: [0]}\n", r"eval.passkey_lengths: 0 is not a prompt length"),
    ("eval: {collapse_margin: -5}\n", r"eval.collapse_margin: must be > 0 .*got -5"),
    ("train: {max_bad_steps: -1}\n", r"train.max_bad_steps: must be >= 1 .*got -1"),
    ("train: {max_bad_steps: 0}\n", r"train.max_bad_steps: must be >= 1"),
    ("train: {grad_clip: -1}\n", r"train.grad_clip: must be >= 0 \(0: no clipping\), got -1"),
    ("train: {betas: [0.9, 1.5]}\n", r"train.betas: must be two numbers in \[0, 1\)"),
    ("launch: {master_port: 0}\n", r"launch.master_port: must be >= 1"),
    ("launch: {master_port: 70000}\n", r"launch.master_port: must be a TCP port"),
    ("run: {log_every: 0}\n", r"run.log_every: must be >= 1 \(steps between step lines in a log\), got 0"),
    # the last checkpoint's settings: named under eval.final, and checked as the eval section is
    ("eval: {final: {passkey_sample: 40}}\n", r"eval.final.passkey_sample: Key 'passkey_sample' not in 'EvalConfig'"),
    ("eval: {final: {passkey_samples: many}}\n", r"eval.final.passkey_samples: Value 'many' .* Integer"),
    ("eval: {final: {every_checkpoint: false}}\n", r"eval.final.every_checkpoint: cannot differ at the last"),
    ("eval: {final: {passkey_depths: [2.0]}}\n", r"\(eval.final on top of eval\): eval.passkey_depths: 2.0 is outside"),
    ("eval: {final: {compare_mitigations: {decay_scale: 3}}}\n",
     r"\(eval.final on top of eval\): eval.compare_mitigations.decay_scale: 3 is outside"),
])
def test_values_that_mean_nothing_are_errors(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text + (STAGE if "curriculum" not in text else "")))


@pytest.mark.parametrize("key,value,reported,use", [
    ("train_batch_size", 64, "train_batch_size", r"curriculum.stages\[\].global_batch_tokens"),
    ("train_micro_batch_size_per_gpu", 2, "train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ("gradient_accumulation_steps", 4, "gradient_accumulation_steps", r"curriculum.stages\[\].global_batch_tokens"),
    ("zero_optimization.stage", 3, "zero_optimization.stage", "train.zero_stage"),
    ("bf16.enabled", True, "bf16.enabled", "train.precision"),
    ("fp16", {"enabled": True}, "fp16.enabled", "train.precision"),
    ("gradient_clipping", 0.5, "gradient_clipping", "train.grad_clip"),
    # a scalar in place of the section that holds a planned key: DeepSpeed reads `false` as stage 0
    ("zero_optimization", False, "zero_optimization", "train.zero_stage"),
    ("zero_optimization", True, "zero_optimization", "train.zero_stage"),
    ("bf16", True, "bf16", "train.precision"),
    ("torch_autocast", {"enabled": True}, "torch_autocast.enabled", "train.precision"),
    ("scheduler", {"type": "WarmupLR"}, "scheduler.type", r"curriculum.stages\[\].lr"),
    ("optimizer", {"type": "Adam"}, "optimizer.type", "train.weight_decay"),
    # grad_accum_dtype makes DeepSpeed drive a BF16_Optimizer, which the trainer's overflow check cannot read
    ("data_types", {"grad_accum_dtype": "fp32"}, "data_types.grad_accum_dtype", "train.precision"),
])
def test_deepspeed_keys_that_override_the_plan_are_refused(tmp_path, key, value, reported, use):
    import json
    with pytest.raises(ConfigError, match=rf"train.deepspeed.{reported}: .* set {use}.* instead"):
        load_config(write(tmp_path, STAGE), [f"train.deepspeed.{key}={json.dumps(value)}"])
    cfg = load_config(write(tmp_path, STAGE), ['train.deepspeed.zero_optimization.overlap_comm=true',
                                               'train.deepspeed.fp16.loss_scale_window=500'])
    assert cfg.train.deepspeed == {"zero_optimization": {"overlap_comm": True}, "fp16": {"loss_scale_window": 500}}


@pytest.mark.parametrize("recipe", ["configs/mamba2-370m-256k.yaml", "configs/mamba2-130m-256k.yaml"])
def test_docs_state_the_recipes_checkpoint_passkey_grid_as_the_recipe_has_it(recipe):
    """The docs once promised passkey up to 1M at every checkpoint where the recipe's grid stops at 512K."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(str(root / recipe))
    page = " ".join((root / "docs" / "guides" / "cluster.md").read_text().split())
    claim = re.search(r"passkey from (\d+)K up to (\d+)K tokens \(2× the final length\) at every checkpoint", page)
    assert claim, "docs/guides/cluster.md's paragraph on the paper-scale recipes states their checkpoint passkey grid"
    lengths = cfg.eval.passkey_lengths
    assert (int(claim.group(1)) * 1024, int(claim.group(2)) * 1024) == (min(lengths), max(lengths))
    assert max(lengths) == 2 * cfg.curriculum.stages[-1].seq_len
