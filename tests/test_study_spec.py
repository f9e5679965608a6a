"""A study file: variants x seeds over a base config; every mistake named by its key before any cell trains."""
from pathlib import Path

import pytest

from longctx.pipeline.config import ConfigError
from longctx.pipeline.study.spec import EVALUATE_KEYS, folder, load_study

pytestmark = pytest.mark.timeout(120)

BASE = """
model: {d_model: 32, n_layer: 2, vocab_size: 257, d_state: 16, headdim: 16, chunk_size: 16}
data: {shards: /nowhere/mds}
curriculum: {stages: [{name: a, seq_len: 64, steps: 2, global_batch_tokens: 128},
                      {name: b, seq_len: 128, steps: 2, global_batch_tokens: 256}]}
"""

STUDY = """
study: carry
base: {base}
overrides: [eval.passkey_samples=3]
seeds: [0, 1, 2]
variants:
  none: []
  state passing: [curriculum.stages.1.carry_state=batch]
baseline: none
evaluate:
  passkey: {{lengths: [64, 256], depths: [0, 1], samples: 8}}
  length: {{lengths: [1024]}}
  variants: {{decay 0.9: {{decay_scale: 0.9}}}}
out: {out}
"""


def write(tmp_path, text=STUDY, **fields):
    (tmp_path / "base.yaml").write_text(BASE)
    values = {"base": tmp_path / "base.yaml", "out": tmp_path / "out", **fields}
    path = tmp_path / "study.yaml"
    path.write_text(text.format(**values))
    return str(path)


def test_a_study_is_every_variant_at_every_seed_each_its_own_run_directory(tmp_path):
    study = load_study(write(tmp_path))
    assert (study.name, study.seeds, study.baseline) == ("carry", [0, 1, 2], "none")
    assert [(c.variant, c.seed) for c in study.cells] == [(v, s) for v in ("none", "state passing") for s in (0, 1, 2)]
    cell = study.cells[4]
    assert cell.run_dir == tmp_path / "out" / "cells" / "state-passing" / "seed-1"
    assert cell.config.run.seed == 1 and Path(cell.config.run.dir) == cell.run_dir
    assert cell.config.curriculum.stages[1].carry_state == "batch" and cell.config.eval.passkey_samples == 3
    assert study.cells[0].config.curriculum.stages[1].carry_state == "none"
    assert study.evaluate["passkey"]["samples"] == 8


@pytest.mark.parametrize("change,match", [
    (("seeds: [0, 1, 2]", "seeds: [0, 1, 2]\nsamples: 4"), r"study.yaml: samples: unknown key; a study file has"),
    (("baseline: none", "baseline: nothing"), r"baseline: 'nothing' is not one of the variants \(none, state passing\)"),
    (("seeds: [0, 1, 2]", "seeds: [0, 0]"), r"seeds: repeats a seed"),
    (("seeds: [0, 1, 2]", "seeds: []"), r"seeds: must be a non-empty list of integers"),
    (("  none: []", "  none: [no_equals_sign]"), r"variants.none: must be a list of key=value overrides"),
    (("  none: []", "  none: []\n  state-passing: []"), r"would share the folder 'state-passing': rename one"),
    (("  length: {{lengths: [1024]}}", "  length: {{lenghts: [1024]}}"), r"evaluate.length.lenghts: unknown key; length takes"),
    (("  length: {{lengths: [1024]}}", "  perplexity: {{lengths: [1024]}}"), r"evaluate.perplexity: unknown evaluation"),
    (("out: ", "output: "), r"output: unknown key"),
    (("  none: []", "  none: [curriculum.stages.1.lr=fast]"), r"variant 'none', seed 0: .*lr"),
    (("  none: []", "  none: [curriculum.stages.1.carry_state=sideways]"),
     r"variant 'none', seed 0: .*carry_state: must be one of none, batch, document"),
])
def test_mistakes_are_named_by_their_key_before_any_cell_runs(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        load_study(write(tmp_path, STUDY.replace(*change)))


def test_evaluate_length_takes_sequences_and_every_key_reaches_the_evaluation(tmp_path):
    import inspect

    from longctx.pipeline.evaluate.any_checkpoint import evaluate_checkpoint
    rows = STUDY.replace("length: {{lengths: [1024]}}", "length: {{lengths: [1024], sequences: 4}}")
    assert load_study(write(tmp_path, rows)).evaluate["length"] == {"lengths": [1024], "sequences": 4}
    with pytest.raises(ConfigError, match=r"evaluate.length.sequence: unknown key; length takes .*sequences"):
        load_study(write(tmp_path, rows.replace("sequences", "sequence")))
    # the runner hands a kind's settings to evaluate_checkpoint as keyword arguments
    parameters = inspect.signature(evaluate_checkpoint).parameters
    assert all(set(keys) <= set(parameters) for keys in EVALUATE_KEYS.values() if keys)


@pytest.mark.parametrize("change,match", [
    (("  none: []", "  none: {{overrides: [], start: x}}"), r"variants.none.start: unknown key; a variant has base, from, overrides"),
    (("  none: []", "  none: {{from: state passing}}"),
     r"variants.none.from: 'state passing' is not a variant listed before 'none' \(none is\)"),
    (("  state passing: [curriculum.stages.1.carry_state=batch]", "  state passing: {{from: none}}"),
     r"variants.state passing.from: 'none' trains 4 steps and 'state passing' 4 in all: continuing it would train "
     r"nothing"),
    (("  none: []", "  none: {{base: 3}}"), r"variants.none.base: must be the path of a run config"),
    (("  variants: {{decay", "  calibrate: {{cal: {{length: 512}}}}\n  variants: {{decay"),
     r"evaluate.calibrate.cal.param: is missing"),
    (("  variants: {{decay", "  calibrate: {{cal: {{param: A, length: 512, epochs: 3}}}}\n  variants: {{decay"),
     r"evaluate.calibrate.cal.epochs: unknown key; a calibration takes param, length"),
    (("  variants: {{decay", "  calibrate: {{cal: {{param: A, length: 512, variants: [nobody]}}}}\n  variants: {{decay"),
     r"evaluate.calibrate.cal.variants: 'nobody' is not one of the variants"),
    (("  variants: {{decay", "  calibrate: {{decay 0.9: {{param: A, length: 512}}}}\n  variants: {{decay"),
     r"evaluate.calibrate.decay 0.9: is also the name of an evaluation variant"),
    (("{{decay_scale: 0.9}}", "{{decay_scale: 0.9, variants: [nobody]}}"),
     r"evaluate.variants.decay 0.9.variants: 'nobody' is not one of the variants"),
    (("{{decay_scale: 0.9}}", "0.9"), r"evaluate.variants.decay 0.9: must map `longctx eval --variants` keys"),
])
def test_variants_with_their_own_base_or_start_and_calibrations_are_checked(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        load_study(write(tmp_path, STUDY.replace(*change)))


def test_an_evaluation_variant_can_apply_to_some_variants_cells_only(tmp_path):
    """A transformer's RoPE interpolation has no meaning for a Mamba-2 beside it in the study."""
    from longctx.pipeline.study.runner import eval_variants
    text = STUDY.replace("{{decay_scale: 0.9}}", "{{decay_scale: 0.9}}, PI x4: {{rotary_scaling: 4, variants: [none]}}")
    study = load_study(write(tmp_path, text))
    cells = {(c.variant, c.seed): c for c in study.cells}
    assert eval_variants(study, cells["none", 0]) == ["as trained=", "decay 0.9=decay_scale=0.9",
                                                      "PI x4=rotary_scaling=4"]
    assert eval_variants(study, cells["state passing", 0]) == ["as trained=", "decay 0.9=decay_scale=0.9"]


def test_a_variant_can_continue_an_earlier_one_from_another_base(tmp_path):
    (tmp_path / "longer.yaml").write_text(BASE.replace("steps: 2, global_batch_tokens: 256}]",
                                                       "steps: 2, global_batch_tokens: 256}, "
                                                       "{name: c, seq_len: 128, steps: 3, global_batch_tokens: 256}]"))
    text = STUDY.replace("  state passing: [curriculum.stages.1.carry_state=batch]",
                         f"  longer: {{{{base: {tmp_path / 'longer.yaml'}, from: none}}}}").replace("base: {base}\n", "")
    study = load_study(write(tmp_path, text.replace("seeds: [0, 1, 2]", "seeds: [0, 1, 2]\nbase: {base}")))
    cells = {(c.variant, c.seed): c for c in study.cells}
    assert cells["longer", 1].start is cells["none", 1] and cells["none", 1].start is None
    assert cells["longer", 1].base == str(tmp_path / "longer.yaml") and len(cells["longer", 1].config.curriculum.stages) == 3
    with pytest.raises(ConfigError, match=r"base: is missing, and variant 'none' names no base of its own"):
        load_study(write(tmp_path, text))


def test_a_missing_key_or_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"baseline: is missing"):
        load_study(write(tmp_path, STUDY.replace("baseline: none\n", "")))
    with pytest.raises(ConfigError, match=r"no such study file"):
        load_study(str(tmp_path / "absent.yaml"))


def test_variant_names_become_safe_folder_names():
    assert folder("(b) state passing") == "b-state-passing"
    assert folder("decay 0.9") == "decay-0.9"
    assert folder("../../etc") == "..-..-etc"
