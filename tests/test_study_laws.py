"""Stuffed Mamba's laws from a state-size x training-length study: T_forget, capacity, and their fits."""
import json

import pytest

from longctx.pipeline.config import ConfigError
from longctx.pipeline.study.laws import CellOutcome, capacity, fit_over_seeds, laws, t_forget
from longctx.pipeline.study.runner import run_study
from longctx.pipeline.study.spec import load_study
from longctx.pipeline.study.summary import markdown, summarize

pytestmark = pytest.mark.timeout(120)


def cell(T, collapse, d_state=16, seed=0, eval_length=4096, passkey=None):
    return CellOutcome(state=128 * d_state, d_state=d_state, train_length=T, seed=seed, collapse_point=collapse,
                       eval_length=eval_length, passkey=passkey or {})


def test_t_forget_is_the_shortest_length_from_which_on_nothing_collapses_within_the_horizon():
    assert t_forget([cell(64, 300), cell(128, None), cell(256, None)], horizon=8) == 128
    # a collapse past 8x the training length is not one: the 64-token model holds to 512
    assert t_forget([cell(64, 600), cell(128, None), cell(256, None)], horizon=8) == 64
    # a collapse at a longer length makes an earlier success luck: nothing pinned
    assert t_forget([cell(64, None), cell(128, None), cell(256, 1500)], horizon=8) is None
    assert t_forget([cell(64, 200), cell(128, 500), cell(256, None)], horizon=8) == 256
    with pytest.raises(ValueError, match=r"trained at 256, seed 0: the loss was read to 1024 tokens, short of 8 x"):
        t_forget([cell(256, None, eval_length=1024)], horizon=8)


def test_capacity_is_the_longest_length_retrieved_at_the_threshold():
    assert capacity({256: 1.0, 512: 0.95, 1024: 0.5, 2048: 0.0}, 0.9) == 512
    assert capacity({256: 0.5}, 0.9) is None


def test_fits_recover_a_linear_t_forget_and_an_exponential_capacity():
    states = [1024, 2048, 4096]
    line = fit_over_seeds({s: {0: 0.25 * s, 1: 0.25 * s, 2: 0.25 * s} for s in states})
    assert line["slope"] == pytest.approx(0.25) and line["r2"] == pytest.approx(1.0)
    assert line["slope_ci"] == pytest.approx([0.25, 0.25])
    expo = fit_over_seeds({s: {0: 2 ** (s / 512), 1: 2 ** (s / 512)} for s in states},
                          transform=__import__("numpy").log2)
    assert expo["slope"] == pytest.approx(1 / 512)
    # noisy seeds widen the interval around the slope
    noisy = fit_over_seeds({s: {0: 0.25 * s + 100, 1: 0.25 * s - 100, 2: 0.25 * s} for s in states})
    assert noisy["slope_ci"][0] < 0.25 < noisy["slope_ci"][1] or noisy["slope_ci"][0] <= 0.25 <= noisy["slope_ci"][1]
    assert fit_over_seeds({1024: {0: 5.0}}) is None


def test_laws_counts_what_the_grid_cannot_pin():
    cells = [cell(T, None if T >= 128 * d // 16 else 100, d_state=d, seed=s,
                  passkey={256: 1.0, 512: 1.0 if d >= 32 else 0.2, 1024: 0.0})
             for d in (16, 32, 64) for T in (64, 128, 256) for s in (0, 1)]
    out = laws(cells)
    assert out["per_state"][str(128 * 16)]["t_forget"] == {"0": 128, "1": 128}
    assert out["per_state"][str(128 * 32)]["t_forget"] == {"0": 256, "1": 256}
    assert out["per_state"][str(128 * 64)]["t_forget"] == {"0": None, "1": None}      # 512 needed, grid ends at 256
    assert len(out["unpinned"]["t_forget_above_grid"]) == 2
    assert out["t_forget_fit"]["slope"] == pytest.approx(128 / (128 * 16))
    assert out["per_state"][str(128 * 16)]["capacity"] == {"0": 256, "1": 256}
    assert out["log2_capacity_fit"]["points"] == {"2048": 8.0, "4096": 9.0, "8192": 9.0}



def test_a_length_at_the_edge_of_the_grid_is_a_bound_left_out_of_the_fit():
    """Nothing collapsed even at the grid's shortest length: T_forget is at most that, not that; a passkey
    retrieved at the longest length asked: capacity is at least that. Fitted as values, a grid too coarse for
    the effect would read as a flat law."""
    from longctx.pipeline.study.laws import markdown as laws_markdown
    cells = [cell(T, None if d == 16 or T >= 128 else 100, d_state=d, seed=s,
                  passkey={256: 1.0, 512: 1.0 if d == 16 else 0.0})
             for d in (16, 32, 64) for T in (64, 128, 256) for s in (0, 1)]
    out = laws(cells)
    assert out["per_state"][str(128 * 16)]["t_forget"] == {"0": 64, "1": 64}
    assert {(u["state"], u["seed"]) for u in out["unpinned"]["t_forget_at_or_below_grid"]} == {(2048, 0), (2048, 1)}
    assert out["t_forget_fit"]["points"] == {"4096": 128.0, "8192": 128.0}         # the bound left out
    assert {(u["state"], u["seed"]) for u in out["unpinned"]["capacity_at_or_above_grid"]} == {(2048, 0), (2048, 1)}
    assert out["log2_capacity_fit"]["points"] == {"4096": 8.0, "8192": 8.0}
    table = "\n".join(laws_markdown(out, [0, 1]))
    assert "| 2,048 | 16 | <= 64 | <= 64 | >= 512 | >= 512 |" in table
    assert "| 4,096 | 32 | 128 | 128 | 256 | 256 |" in table

STUDY = """
study: laws
base: {base}
seeds: [0, 1]
variants:
  d16 T64: [model.d_state=16, curriculum.stages.0.seq_len=64]
  d16 T128: [model.d_state=16, curriculum.stages.0.seq_len=128]
  d32 T64: [model.d_state=32, curriculum.stages.0.seq_len=64]
  d32 T128: [model.d_state=32, curriculum.stages.0.seq_len=128]
baseline: d16 T64
evaluate:
  passkey: {{lengths: [256, 512, 1024], depths: [0, 1], samples: 2}}
  length: {{lengths: [1024], margin: 0.2}}
laws: {{horizon: 8}}
out: {out}
"""
BASE = """
model: {d_model: 32, n_layer: 1, vocab_size: 257, d_state: 16, headdim: 16, chunk_size: 16}
data: {shards: /nowhere/mds}
curriculum: {stages: [{name: a, seq_len: 64, steps: 2, global_batch_tokens: 128}]}
"""


def test_a_study_with_laws_fits_them_from_its_cells(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(base=tmp_path / "base.yaml", out=tmp_path / "out"))
    study = load_study(str(path))
    # d_state 16 forgets by 128 tokens in both seeds, d_state 32 only at 128 in seed 0
    collapse = {("d16 T64", 0): 300, ("d16 T64", 1): 300, ("d32 T64", 0): 300, ("d32 T64", 1): 300,
                ("d32 T128", 1): 900}

    def evaluate(study, c, kind):
        if kind == "length":
            return {"as trained": {"length": 1024, "collapse_point": collapse.get((c.variant, c.seed)),
                                   "buckets": [{"end": 1024, "mean_loss": 1.0}]}}
        ok = 1 if c.config.model.d_state == 32 else 0
        return {"as trained": {"outputs": [{"length": 256, "correct": 1}, {"length": 512, "correct": ok},
                                           {"length": 1024, "correct": 0}]}}

    results, failures = run_study(study, train=lambda s, c: None, evaluate=evaluate, say=lambda line: None)
    assert not failures
    payload = summarize(study, results)
    got = payload["laws"]["per_state"]        # state: (expand 2 x d_model 32) x d_state elements per layer
    assert got["1024"]["t_forget"] == {"0": 128, "1": 128} and got["1024"]["d_state"] == 16
    assert got["2048"]["t_forget"] == {"0": 128, "1": None}
    assert got["2048"]["capacity"] == {"0": 512, "1": 512} and got["1024"]["capacity"] == {"0": 256, "1": 256}
    assert payload["laws"]["unpinned"]["t_forget_above_grid"] == [{"state": 2048, "seed": 1}]
    md = markdown(payload, [])
    assert "## The capacity laws" in md and "log2(capacity) = " in md
    json.dumps(payload)       # results.json holds it


def test_laws_need_both_evaluations(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(base=tmp_path / "base.yaml", out=tmp_path / "out")
                    .replace("  passkey: {lengths: [256, 512, 1024], depths: [0, 1], samples: 2}\n", ""))
    with pytest.raises(ConfigError, match=r"laws: needs evaluate.passkey"):
        load_study(str(path))
    path.write_text(STUDY.format(base=tmp_path / "base.yaml", out=tmp_path / "out").replace("horizon: 8", "horizn: 8"))
    with pytest.raises(ConfigError, match=r"laws.horizn: unknown key; laws takes horizon, passkey_threshold"):
        load_study(str(path))
