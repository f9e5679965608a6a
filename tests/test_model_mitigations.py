"""Mitigations applied by the model: parallel forward, chunked prefill and decoding agree; config and calibration."""
import pytest
import torch

from longctx.pipeline.config import load_config
from longctx.pipeline.mitigations import MitigationsConfig, StateNormConfig, merge_overrides, resolve
from longctx.pipeline.model import Mamba2Config, Mamba2LM
from longctx.pipeline.model.mitigations import MITIGATIONS_FILE, LayerMitigations, calibrate_state_norm
from tests.conftest import rel_err

N_LAYER, NHEADS = 2, 8


def model():
    torch.manual_seed(0)
    return Mamba2LM(Mamba2Config(d_model=48, n_layer=N_LAYER, vocab_size=61, d_state=8, headdim=12, ngroups=2,
                                 chunk_size=8, d_intermediate=64)).eval()


SETTINGS = {
    "decay_scale": MitigationsConfig(decay_scale=[0.9, [0.8, 0.9, 0.95, 1.0, 1.0, 1.0, 0.99, 0.97]]),
    "input_scale": MitigationsConfig(input_scale=0.6),
    "state_norm": MitigationsConfig(state_norm=StateNormConfig(every=8, thresholds=[0.05, 0.1])),
    "window": MitigationsConfig(window=11),
    "window_longer_than_chunk_len": MitigationsConfig(window=23),
    "all": MitigationsConfig(decay_scale=0.95, input_scale=0.8, window=9,
                             state_norm=StateNormConfig(every=16, thresholds=[0.05, 0.1])),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("chunk_len", [1, 7, 16])
def test_prefill_and_decode_equal_parallel_forward_with_mitigations(name, chunk_len):
    m = model()
    ids = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        plain = m(ids).logits
        m.set_mitigations(resolve(SETTINGS[name], N_LAYER, NHEADS))
        full = m(ids).logits
        assert rel_err(full, plain) > 1e-4          # the mitigation changes the model
        cache = m.init_cache(2)
        last = m.prefill(ids[:, :30], cache, chunk_len=chunk_len)
        assert rel_err(last, full[:, 29]) <= 1e-5
        for t in range(30, 40):
            assert rel_err(m.step(ids[:, t], cache), full[:, t]) <= 1e-5


def test_window_decoding_memory_is_bounded_by_the_window():
    m = model()
    m.set_mitigations(resolve(MitigationsConfig(window=5), N_LAYER, NHEADS))
    cache = m.init_cache(1)
    with torch.no_grad():
        m.prefill(torch.randint(0, 61, (1, 300)), cache, chunk_len=64)
    for lc in cache.layers:
        assert all(t.shape[1] == 5 for t in lc.ring)


def test_mitigations_train():
    m = model().train()
    m.set_mitigations(resolve(SETTINGS["all"], N_LAYER, NHEADS))
    m(torch.randint(0, 61, (2, 33))).logits.logsumexp(-1).mean().backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_resolve_shapes_and_errors():
    layers = resolve(MitigationsConfig(decay_scale=0.9, input_scale=[1.0, 0.5], window=4), N_LAYER, NHEADS)
    assert layers[0].decay_scale == [0.9] * NHEADS and layers[0].input_scale is None
    assert layers[1].input_scale == [0.5] * NHEADS and layers[1].window == 4
    assert not any(m.active for m in resolve(MitigationsConfig(), N_LAYER, NHEADS))
    with pytest.raises(ValueError, match=r"mitigations.decay_scale: 1.2 is outside \(0, 1\]"):
        resolve(MitigationsConfig(decay_scale=1.2), N_LAYER, NHEADS)
    with pytest.raises(ValueError, match=r"mitigations.input_scale\[1\]: expected a number or a list of 8"):
        resolve(MitigationsConfig(input_scale=[1.0, [0.5, 0.5]]), N_LAYER, NHEADS)
    with pytest.raises(ValueError, match="decay_scale: expected a number, a list of 2"):
        resolve(MitigationsConfig(decay_scale=[0.9, 0.9, 0.9]), N_LAYER, NHEADS)
    with pytest.raises(ValueError, match="no thresholds"):
        resolve(MitigationsConfig(state_norm=StateNormConfig(every=8)), N_LAYER, NHEADS)


def test_calibration_measures_the_state_norm_and_bounds_it(tmp_path):
    m = model()
    prompt = torch.randint(0, 61, (3, 64))
    thresholds = calibrate_state_norm(m, prompt, multiplier=0.5)
    cache = m.init_cache(3)
    with torch.no_grad():
        m.prefill(prompt, cache)
    measured = torch.stack([lc.ssm.square().sum((-2, -1)).sqrt().mean(0) for lc in cache.layers])
    assert thresholds.shape == (N_LAYER, NHEADS)
    assert rel_err(thresholds, 0.5 * measured) <= 1e-6
    assert m.mitigations is None                     # not installed without `every`

    calibrate_state_norm(m, prompt, multiplier=0.5, every=16)
    cache = m.init_cache(3)
    with torch.no_grad():
        m.prefill(torch.randint(0, 61, (3, 128)), cache, chunk_len=48)   # ends on a norm position
    for i, lc in enumerate(cache.layers):
        assert (lc.ssm.square().sum((-2, -1)).sqrt() <= thresholds[i] * (1 + 1e-5)).all()

    # stored with the model: inference after reload reproduces it
    ids = torch.randint(0, 61, (1, 50))
    with torch.no_grad():
        before = m(ids).logits
    m.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / MITIGATIONS_FILE).exists()
    again = Mamba2LM.from_pretrained(tmp_path / "m")
    assert again.mitigations[0].state_norm_threshold == pytest.approx(thresholds[0].tolist())
    with torch.no_grad():
        assert rel_err(again(ids).logits, before) <= 1e-6


def test_config_section_and_stage_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {n_layer: 2}\nmitigations: {decay_scale: [0.9, 1.0], window: 128, state_norm: {every: 256, multiplier: 0.8}}\n")
    cfg = load_config(p, ["mitigations.input_scale=0.5"])
    assert cfg.mitigations.window == 128 and cfg.mitigations.input_scale == 0.5
    assert cfg.mitigations.state_norm.multiplier == 0.8
    staged = merge_overrides(cfg.mitigations, {"window": 0, "decay_scale": 0.95})
    assert staged.window == 0 and staged.decay_scale == 0.95 and staged.state_norm.every == 256
    with pytest.raises(ValueError, match="stage.mitigations: .*windw"):
        merge_overrides(cfg.mitigations, {"windw": 3})


def test_set_mitigations_checks_layers_and_thresholds():
    m = model()
    with pytest.raises(ValueError, match="for 1 layers"):
        m.set_mitigations([LayerMitigations(window=3)])
    with pytest.raises(ValueError, match="8 thresholds"):
        m.set_mitigations([LayerMitigations(state_norm_every=8, state_norm_threshold=[1.0])] * 2)
