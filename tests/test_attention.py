"""Attention layers (mamba_ssm's MHA) in hybrids and transformers: the layer against a float64 reference written
out here, packed documents, chunked prefill and decoding, the mamba_ssm directory layout, mitigations (the Mamba
layers' only), the config section, and what is refused for models with attention."""
import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from longctx.pipeline.config import ConfigError, load_config, model_config, validate_architecture
from longctx.pipeline.mitigations import MitigationsConfig, StateNormConfig, resolve
from longctx.pipeline.model import Mamba2Config, Mamba2LM, attention
from longctx.pipeline.model.attention import AttentionMixer
from longctx.pipeline.model.config import AttnConfig
from longctx.pipeline.model.formats import CheckpointError
from longctx.pipeline.model.mamba2 import parameter_count
from longctx.pipeline.model.mitigations import LayerMitigations, calibrate_state_norm
from tests.conftest import rel_err

# ----------------------------------------------------------------------------- the layer against a reference

LAYERS = {
    # GQA (2 key/value heads for 4), RoPE on half of each head (halves rotated), biases, head_dim from d_model
    "gqa_partial_rope": AttnConfig(num_heads=4, num_heads_kv=2, rotary_emb_dim=4),
    # MQA, its own head_dim, RoPE on every channel (pairs interleaved), no biases, a scale, the MLP branch, a conv
    "mqa_conv_mlp": AttnConfig(num_heads=4, num_heads_kv=1, head_dim=6, rotary_emb_dim=6, rotary_emb_base=500.0,
                               rotary_emb_interleaved=True, qkv_proj_bias=False, out_proj_bias=False,
                               softmax_scale=0.3, mlp_dim=40, d_conv=3),
    "no_rope": AttnConfig(num_heads=2),
    # position interpolation (rotary_scaling): the reference divides each distance by the factor
    "rope_interpolated": AttnConfig(num_heads=2, rotary_emb_dim=8, rotary_emb_base=100.0, rotary_scaling=2.5),
}
D_MODEL = 16


def reference_mha(sd, a: AttnConfig, u, seq_idx):
    """mamba_ssm's MHA in float64, one number at a time: in_proj; the causal conv over q, k, v (not reading an
    earlier document); RoPE at each token's position in its own document (as if the document ran alone), divided by
    rotary_scaling (position interpolation); each
    query's softmax over the keys of its document up to itself; the gated MLP branch; out_proj."""
    sd = {k: v.double() for k, v in sd.items()}
    u = u.double()
    b, L, _ = u.shape
    h, hkv = a.num_heads, a.num_heads_kv or a.num_heads
    d = a.head_dim or D_MODEL // h
    proj = u @ sd["in_proj.weight"].T + sd.get("in_proj.bias", 0)
    qkv_dim = d * (h + 2 * hkv)
    qkv, mlp = proj[..., :qkv_dim], proj[..., qkv_dim:]
    if a.d_conv:
        w, bias = sd["conv1d.weight"][:, 0], sd["conv1d.bias"]
        conv = torch.zeros_like(qkv)
        for r in range(b):
            for t in range(L):
                conv[r, t] = bias
                for k in range(a.d_conv):
                    s = t - (a.d_conv - 1) + k
                    if s >= 0 and seq_idx[r, s] == seq_idx[r, t]:
                        conv[r, t] += w[:, k] * qkv[r, s]
        qkv = conv
    q = qkv[..., :h * d].reshape(b, L, h, d)
    k = qkv[..., h * d:(h + hkv) * d].reshape(b, L, hkv, d)
    v = qkv[..., (h + hkv) * d:].reshape(b, L, hkv, d)

    def rope(x, r, t):
        start = min(s for s in range(t + 1) if all(seq_idx[r, j] == seq_idx[r, t] for j in range(s, t + 1)))
        out, rd = x.clone(), a.rotary_emb_dim
        for i in range(rd // 2):
            theta = (t - start) / a.rotary_scaling * a.rotary_emb_base ** (-2 * i / rd)
            p0, p1 = (2 * i, 2 * i + 1) if a.rotary_emb_interleaved else (i, i + rd // 2)
            out[p0] = x[p0] * math.cos(theta) - x[p1] * math.sin(theta)
            out[p1] = x[p0] * math.sin(theta) + x[p1] * math.cos(theta)
        return out

    scale = a.softmax_scale or 1 / math.sqrt(d)
    att = torch.zeros(b, L, h, d, dtype=torch.float64)
    for r in range(b):
        for head in range(h):
            g = head // (h // hkv)                    # the key/value head this query head reads
            keys = [rope(k[r, s, g], r, s) for s in range(L)]
            for t in range(L):
                qt = rope(q[r, t, head], r, t)
                seen = [s for s in range(t + 1) if seq_idx[r, s] == seq_idx[r, t]]
                scores = [float(qt @ keys[s]) * scale for s in seen]
                top = max(scores)
                weights = [math.exp(x - top) for x in scores]
                for s, wgt in zip(seen, weights):
                    att[r, t, head] += wgt / sum(weights) * v[r, s, g]
    out = att.reshape(b, L, h * d)
    if mlp.shape[-1]:
        up, gate = mlp.chunk(2, dim=-1)
        out = torch.cat([out, up * gate * torch.sigmoid(gate)], dim=-1)
    return out @ sd["out_proj.weight"].T + sd.get("out_proj.bias", 0)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_attention_layer_equals_the_float64_reference(name, monkeypatch):
    a = LAYERS[name]
    layer = AttentionMixer(Mamba2Config(d_model=D_MODEL, n_layer=1, attn_layer_idx=[0], attn_cfg=a).validate(),
                           0).double()
    with torch.no_grad():
        for p in layer.parameters():           # away from the init (zero biases, small scores): every term counts
            p.normal_(0, 0.4)
    u = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 8, [0] * 13], dtype=torch.int32)    # row 0: two documents
    with torch.no_grad():
        ours = layer(u, seq_idx=seq_idx)
        ref = reference_mha(layer.state_dict(), a, u, seq_idx)
        one_document = layer(u)
    assert rel_err(ours, ref) <= 1e-12
    assert rel_err(one_document[1], ref[1]) <= 1e-12            # row 1 is one document either way
    assert rel_err(one_document[0, 5:], ref[0, 5:]) > 1e-3       # row 0's second document read the first
    monkeypatch.setattr(attention, "SCORES_PER_CALL", 50)         # a long prompt's queries, attended in blocks
    with torch.no_grad():
        assert rel_err(layer(u, seq_idx=seq_idx), ref) <= 1e-12


def test_state_dict_keys_are_mamba_ssms_mha():
    base = dict(d_model=D_MODEL, n_layer=1, attn_layer_idx=[0])
    plain = AttentionMixer(Mamba2Config(**base, attn_cfg=LAYERS["gqa_partial_rope"]), 0)
    full = AttentionMixer(Mamba2Config(**base, attn_cfg=LAYERS["mqa_conv_mlp"]), 0)
    assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == {
        "in_proj.weight": (4 * (4 + 2 * 2), 16), "in_proj.bias": (32,), "out_proj.weight": (16, 16),
        "out_proj.bias": (16,)}                  # q, k, v of 4 + 2 + 2 heads of 16 / 4 channels; no RoPE buffers
    qkv = 6 * (4 + 2 * 1)
    assert {k: tuple(v.shape) for k, v in full.state_dict().items()} == {
        "in_proj.weight": (qkv + 256, 16), "conv1d.weight": (qkv, 1, 3), "conv1d.bias": (qkv,),
        "out_proj.weight": (16, 4 * 6 + 128)}    # mlp_dim 40 rounded up to 256 (up and gate), as mamba_ssm


# ----------------------------------------------------------------------------- hybrids and transformers

def hybrid(**kw):
    """Three layers, the middle one attention (GQA, partial RoPE, a conv, the MLP branch), each with a gated MLP."""
    base = dict(d_model=32, n_layer=3, vocab_size=61, d_state=8, headdim=8, chunk_size=8, d_intermediate=64,
                attn_layer_idx=[1], attn_cfg=AttnConfig(num_heads=4, num_heads_kv=2, rotary_emb_dim=4, d_conv=4,
                                                        mlp_dim=16, qkv_proj_bias=False))
    torch.manual_seed(0)
    return Mamba2LM(Mamba2Config(**{**base, **kw})).eval()


def transformer():
    """Every layer attention with a gated MLP, RoPE on every channel."""
    return hybrid(n_layer=2, attn_layer_idx=[0, 1], attn_cfg=AttnConfig(num_heads=4, rotary_emb_dim=8))


MODELS = {"hybrid": hybrid, "transformer": transformer}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_packed_documents_attend_as_each_document_alone(kind):
    model = MODELS[kind]()
    docs = [torch.randint(0, 61, (1, n)) for n in (9, 14, 5)]
    seq_idx = torch.cat([torch.full((1, d.shape[1]), i, dtype=torch.int32) for i, d in enumerate(docs)], 1)
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), seq_idx=seq_idx).logits
        alone = torch.cat([model(d).logits for d in docs], 1)
        flowing = model(torch.cat(docs, 1)).logits                 # no resets: later documents read earlier ones
    assert rel_err(packed, alone) <= 1e-5
    assert rel_err(flowing[:, 9:], alone[:, 9:]) > 1e-3


def test_prefill_with_documents_continues_the_document_across_calls():
    """A call's first document continues the one the previous call ended in (as the Mamba state does); later
    ones start afresh: chunks of 4 with documents starting at 6 and 11 (inside chunks) equal the whole row."""
    model = hybrid()
    ids = torch.randint(0, 61, (2, 20))
    seq_idx = torch.tensor([[0] * 6 + [1] * 5 + [2] * 9, [0] * 11 + [1] * 9], dtype=torch.int32)
    with torch.no_grad():
        full = model(ids, seq_idx=seq_idx).logits
        cache = model.init_cache(2)
        chunks = [model(ids[:, s:s + 4], seq_idx=seq_idx[:, s:s + 4], cache=cache).logits for s in range(0, 20, 4)]
    assert rel_err(torch.cat(chunks, 1), full) <= 1e-5
    assert cache.layers[1].seqlen == 20 and cache.layers[1].keys.shape[1] >= 20     # every key and value kept


def test_hybrid_decoding_with_mitigations_on_its_mamba_layers_equals_the_parallel_forward():
    model = hybrid()
    ids = torch.randint(0, 61, (1, 36))
    with torch.no_grad():
        plain = model(ids).logits
        model.set_mitigations(resolve(MitigationsConfig(decay_scale=0.9, window=7), 3, model.config.nheads,
                                      attention=[1]))
        full = model(ids).logits
        assert rel_err(full, plain) > 1e-4
        cache = model.init_cache(1)
        model.prefill(ids[:, :25], cache, chunk_len=10)
        for t in range(25, 36):
            assert rel_err(model.step(ids[:, t], cache), full[:, t]) <= 1e-5


def test_a_hybrid_trains_its_attention_layers():
    model = hybrid().train()
    ids = torch.randint(0, 61, (2, 17))
    seq_idx = torch.tensor([[0] * 8 + [1] * 9] * 2, dtype=torch.int32)
    model(ids, seq_idx=seq_idx).logits.float().logsumexp(-1).mean().backward()
    mixer = model.backbone.layers[1].mixer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.parameters())


# ----------------------------------------------------------------------------- the mamba_ssm layout

@pytest.mark.parametrize("safe", [False, True])
def test_a_hybrid_round_trips_through_a_mamba_ssm_directory(tmp_path, safe):
    model = hybrid()
    model.save_pretrained(tmp_path / "m", safe_serialization=safe)
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    # every MHA argument; rotary_scaling (ours, not MHA's) only where it is not 1
    assert raw["attn_layer_idx"] == [1] and raw["attn_cfg"] == {
        k: v for k, v in asdict(model.config.attn_cfg).items() if k != "rotary_scaling"}
    assert raw["attn_cfg"]["causal"] is True and raw["ssm_cfg"]["layer"] == "Mamba2"
    loaded = Mamba2LM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    assert isinstance(loaded.backbone.layers[1].mixer, AttentionMixer)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert {k for k in a if k.startswith("backbone.layers.1.mixer.")} == {
        f"backbone.layers.1.mixer.{k}" for k in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "out_proj.weight",
                                                 "out_proj.bias")}
    ids = torch.randint(0, 61, (2, 23))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_rotary_scaling_is_written_only_when_it_is_not_one_and_loads_back(tmp_path):
    """Not a mamba_ssm key (MHA would refuse it): a directory carries it only when the model needs it."""
    model = hybrid(attn_cfg=AttnConfig(num_heads=4, rotary_emb_dim=4, rotary_scaling=4.0))
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["attn_cfg"]["rotary_scaling"] == 4.0
    loaded = Mamba2LM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.attn_cfg.rotary_scaling == 4.0
    ids = torch.randint(0, 61, (1, 40))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        plain = hybrid(attn_cfg=AttnConfig(num_heads=4, rotary_emb_dim=4))      # same weights (same seed)
        assert rel_err(plain(ids).logits, model(ids).logits) > 1e-4            # the scaling changes the model
    with pytest.raises(ValueError, match=r"rotary_scaling \(2.0\) interpolates RoPE's positions, but rotary_emb_dim "
                                         r"is 0"):
        AttnConfig(num_heads=4, rotary_scaling=2.0).validate(32)
    with pytest.raises(ValueError, match=r"rotary_scaling must be positive, got 0"):
        AttnConfig(num_heads=4, rotary_emb_dim=4, rotary_scaling=0).validate(32)


def test_a_mamba2attn_style_config_loads_with_mamba_ssms_defaults(tmp_path):
    """What state-spaces' hybrids ship: attn_cfg with some keys only; the rest take MHA's defaults (biases on)."""
    model = hybrid(attn_cfg=AttnConfig(num_heads=4, rotary_emb_dim=4, d_conv=4, qkv_proj_bias=True))
    model.save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["attn_cfg"] = {"causal": True, "num_heads": 4, "rotary_emb_dim": 4, "d_conv": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    loaded = Mamba2LM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.attn_cfg == model.config.attn_cfg
    ids = torch.randint(0, 61, (1, 19))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("attn_cfg,match", [
    ({"num_heads": 4, "rotary_emb_dim": 4}, r"attn_cfg.causal is false \(mamba_ssm's default"),
    ({"causal": True, "num_heads": 4, "window_size": 8}, r"unknown attn_cfg keys \['window_size'\]"),
    ({"causal": True}, r"attention layers \[1\] but attn_cfg has no num_heads"),
])
def test_hybrid_configs_that_cannot_load_are_named_errors(tmp_path, attn_cfg, match):
    hybrid().save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**raw, "attn_cfg": attn_cfg}))
    with pytest.raises(CheckpointError, match=match):
        Mamba2LM.from_pretrained(tmp_path / "m")


def test_the_hugging_face_layout_refuses_a_hybrid_naming_why(tmp_path):
    with pytest.raises(CheckpointError, match=r"Hugging Face Mamba2 layout has no attention layers.*layers \[1\].*"
                                              r"format='mamba_ssm'"):
        hybrid().save_pretrained(tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


def test_a_training_checkpoints_model_config_comes_back():
    config = hybrid().config
    assert Mamba2Config.from_dict(json.loads(json.dumps(asdict(config)))) == config
    old = {k: v for k, v in json.loads(json.dumps(asdict(Mamba2Config()))).items() if not k.startswith("attn")}
    assert Mamba2Config.from_dict(old) == Mamba2Config()      # written before attention existed


def test_longctx_eval_passkey_decodes_a_hybrid_export(tmp_path, capsys):
    from tests.shared import longctx_here
    hybrid(vocab_size=257).save_pretrained(tmp_path / "m")
    r = longctx_here(capsys, "eval", "passkey", tmp_path / "m", "--lengths", "256", "--samples", "1", "--depths",
                     "0.5", "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "eval" / "passkey.json").read_text())
    assert len(result["outputs"]) == 1


def test_the_state_evaluation_of_a_transformer_has_no_state_to_read(tmp_path, capsys):
    from longctx.pipeline.evaluate.any_checkpoint import evaluate_checkpoint
    hybrid(n_layer=2, attn_layer_idx=[0, 1], vocab_size=257).save_pretrained(tmp_path / "t")
    result = evaluate_checkpoint("states", tmp_path / "t", lengths=[128], out=tmp_path / "states")
    assert result["model"]["layers"] == [] and result["model"]["norms"] == []
    assert "| max final ||h|| | - |" in capsys.readouterr().out
    hybrid(vocab_size=257).save_pretrained(tmp_path / "h")
    result = evaluate_checkpoint("states", tmp_path / "h", lengths=[128], out=tmp_path / "states-h")
    assert result["model"]["layers"] == [0, 2] and len(result["model"]["norms"][-1]) == 2   # its Mamba layers'


def test_a_rotary_scaling_variant_is_the_model_made_with_that_scaling(tmp_path):
    """`longctx eval --variants "PI x4=rotary_scaling=4"` (position interpolation at evaluation): logits equal the
    same weights in a model whose config has the scaling, the model itself unchanged; refused without RoPE or
    without attention layers, naming the variant."""
    from longctx.pipeline.evaluate.any_checkpoint import evaluate_checkpoint
    from longctx.pipeline.model.attention import with_rotary_scaling
    model = transformer()
    made = hybrid(n_layer=2, attn_layer_idx=[0, 1], attn_cfg=AttnConfig(num_heads=4, rotary_emb_dim=8,
                                                                         rotary_scaling=4.0))
    made.load_state_dict(model.state_dict())
    ids = torch.randint(0, 61, (2, 40))
    scaled = with_rotary_scaling(model, 4.0)
    assert torch.equal(scaled(ids).logits, made(ids).logits)
    assert not torch.allclose(model(ids).logits, made(ids).logits)          # the original is left as it was
    assert scaled.config.attn_cfg.rotary_scaling == 4.0 and model.config.attn_cfg.rotary_scaling == 1.0
    with pytest.raises(ValueError, match="this model has none"):
        with_rotary_scaling(hybrid(attn_layer_idx=[]), 2.0)
    with pytest.raises(ValueError, match="have no RoPE"):
        with_rotary_scaling(hybrid(attn_cfg=AttnConfig(num_heads=4)), 2.0)
    hybrid(n_layer=2, attn_layer_idx=[0, 1], vocab_size=257, attn_cfg=AttnConfig(num_heads=4, rotary_emb_dim=8)
           ).save_pretrained(tmp_path / "t")
    result = evaluate_checkpoint("passkey", tmp_path / "t", lengths=[256], depths=[0.5], samples=2,
                                 out=tmp_path / "pk", variant_specs=["as trained=", "PI x2=rotary_scaling=2"])
    assert set(result) == {"as trained", "PI x2"}
    hybrid(attn_layer_idx=[], vocab_size=257).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"--variants 'PI x2': rotary_scaling interpolates .* this model has none"):
        evaluate_checkpoint("passkey", tmp_path / "m", lengths=[256], samples=1, out=tmp_path / "pk2",
                            variant_specs=["PI x2=rotary_scaling=2"])


# ----------------------------------------------------------------------------- mitigations: the Mamba layers' only

def test_mitigations_skip_attention_layers_and_refuse_to_name_one():
    layers = resolve(MitigationsConfig(decay_scale=0.9, window=5), 3, 4, attention=[1])
    assert [m.active for m in layers] == [True, False, True]
    ok = resolve(MitigationsConfig(decay_scale=[0.9, None, [0.8, 0.9, 1.0, 1.0]], a_scale=[1.2, 1, 1]), 3, 4,
                 attention=[1])
    assert ok[1] == LayerMitigations() and ok[0].decay_scale == [0.9] * 4 and ok[2].a_scale is None
    with pytest.raises(ValueError, match=r"mitigations.decay_scale\[1\]: layer 1 is an attention layer"):
        resolve(MitigationsConfig(decay_scale=[0.9, 0.9, 0.9]), 3, 4, attention=[1])
    with pytest.raises(ValueError, match=r"state_norm.thresholds\[1\]: layer 1 is an attention layer.*give null"):
        resolve(MitigationsConfig(state_norm=StateNormConfig(every=8, thresholds=[0.1, 0.1, 0.1])), 3, 4,
                attention=[1])
    with pytest.raises(ValueError, match=r"decay_scale\[0\]: expected a number"):     # null only where attention
        resolve(MitigationsConfig(decay_scale=[None, None, 0.9]), 3, 4, attention=[1])


def test_the_model_refuses_mitigations_and_carried_state_on_attention_layers():
    model = hybrid()
    with pytest.raises(ValueError, match="layer 1 is an attention layer: mitigations apply to the Mamba layers only"):
        model.set_mitigations([LayerMitigations(), LayerMitigations(window=4), LayerMitigations()])
    with pytest.raises(ValueError, match="carried state is not supported for models with attention layers .*: an "
                                         "attention layer has no fixed-size state"):
        model.enter_carried(None)
    model.set_carried(None)


def test_a_transformer_is_unchanged_by_mitigations_and_a_hybrid_calibrates_its_mamba_layers(tmp_path):
    model = transformer()
    ids = torch.randint(0, 61, (1, 30))
    with torch.no_grad():
        plain = model(ids).logits
        model.set_mitigations(resolve(MitigationsConfig(decay_scale=0.5, input_scale=0.5, window=3), 2,
                                      model.config.nheads, attention=[0, 1]))
        assert model.mitigations is None and torch.equal(model(ids).logits, plain)
    model = hybrid()
    model.set_mitigations(resolve(MitigationsConfig(decay_scale=0.95), 3, model.config.nheads, attention=[1]))
    thresholds = calibrate_state_norm(model, ids, multiplier=2.0, every=8)
    assert thresholds.shape == (3, model.config.nheads)
    assert thresholds[1].isnan().all() and (thresholds[[0, 2]] > 0).all()
    layers = model.mitigations
    assert layers[1] is None and all(layers[i].state_norm_every == 8 and layers[i].decay_scale for i in (0, 2))
    model.save_pretrained(tmp_path / "m")                        # the mitigations file keeps a slot per layer
    assert Mamba2LM.from_pretrained(tmp_path / "m").mitigations == layers


# ----------------------------------------------------------------------------- the config

def _write(tmp_path, extra_model="", stage_extra=""):
    path = tmp_path / "c.yaml"
    path.write_text(f"""
model: {{d_model: 32, n_layer: 2, vocab_size: 257, d_state: 16, headdim: 16, chunk_size: 16, d_intermediate: 64,
        attn_layer_idx: [1], attn_cfg: {{num_heads: 4, rotary_emb_dim: 8}}{extra_model}}}
data: {{shards: {tmp_path / 'mds'}}}
curriculum:
  stages:
    - {{name: a, seq_len: 64, steps: 2, global_batch_tokens: 128{stage_extra}}}
""")
    return str(path)


def test_attn_cfg_is_a_typed_section_with_overrides(tmp_path):
    cfg = load_config(_write(tmp_path), ["model.attn_cfg.num_heads=2", "model.attn_cfg.num_heads_kv=1"])
    assert cfg.model.attn_cfg == AttnConfig(num_heads=2, num_heads_kv=1, rotary_emb_dim=8)
    with pytest.raises(ConfigError, match=r"model.attn_cfg.num_head\b.*not in 'AttnConfig'"):
        load_config(_write(tmp_path), ["model.attn_cfg.num_head=2"])
    with pytest.raises(ConfigError, match=r"attn_cfg.num_heads_kv \(3\) must divide num_heads \(4\)"):
        load_config(_write(tmp_path), ["model.attn_cfg.num_heads_kv=3"])
    with pytest.raises(ConfigError, match=r"attn_layer_idx \[1, 2\] must name distinct layers in \[0, n_layer = 2\)"):
        load_config(_write(tmp_path), ["model.attn_layer_idx=[1,2]"])


@pytest.mark.parametrize("override,match", [
    ("curriculum.stages.0.carry_state=document", r"stages\[0\] \(a\).carry_state: document with attention layers"
                                                 r".*no fixed-size state to carry"),
    ("mitigations.a_scale=[1.1,1.2]", r"mitigations.a_scale\[1\]: layer 1 is an attention layer"),
    ("eval.variants={v: {input_scale: [0.9, 0.8]}}", r"mitigations.input_scale\[1\]: layer 1 is an attention layer"),
])
def test_the_config_refuses_what_attention_layers_do_not_do(tmp_path, override, match):
    # sequence parallelism is both kinds' (attention gathers the earlier ranks' keys and values)
    load_config(_write(tmp_path), ["mitigations.a_scale=[1.1,null]", "curriculum.stages.0.seq_parallel=2"])
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path), [override])


def test_a_pretrained_hybrid_is_checked_against_the_run(tmp_path):
    """With model.from_pretrained the architecture is the checkpoint's: the preflight applies the same checks."""
    path = _write(tmp_path, stage_extra=", carry_state: batch")
    plain = load_config(path, ["model.attn_layer_idx=[]"])                       # a pure Mamba model may
    with pytest.raises(ConfigError, match=r"carry_state: batch with attention layers \(model.attn_layer_idx \[1\]\)"):
        validate_architecture(plain, hybrid(n_layer=2).config, path)


def test_run_plan_counts_the_parameters_of_each_kind(tmp_path, capsys):
    from longctx.launch.cli import main
    assert main(["run", _write(tmp_path), "--plan", "--nproc", "1"]) == 0
    cfg = load_config(_write(tmp_path))
    model = Mamba2LM(model_config(cfg))
    counts = parameter_count(model.config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["attention"] == sum(p.numel() for p in model.backbone.layers[1].mixer.parameters()) > 0
    out = capsys.readouterr().out
    assert f"model: {counts['total']:,} parameters; 2 layers: 1 Mamba-2" in out
    assert f"1 attention at [1] ({counts['attention']:,} in their mixers)" in out


def test_shapes_only_has_the_real_models_parameters_and_does_not_import_dynamo():
    """The launcher counts parameters, and a pretrained model's weights are checked, on the meta device: there
    an initialisation computes nothing, yet ran as torch's Python reference ops, which import torch._dynamo
    (~1.5 s of the launcher's start). In a fresh process: this one may have imported it already."""
    code = """
import json, sys
from longctx.pipeline.model.mamba2 import shapes_only
from tests.test_attention import hybrid
config = hybrid().config
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules,
                  "shapes": {k: list(v.shape) for k, v in shapes_only(config).state_dict().items()},
                  "meta": all(p.is_meta for p in shapes_only(config).parameters())}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["shapes"] == {k: list(v.shape) for k, v in hybrid().state_dict().items()}
    assert got["meta"] and not got["dynamo"], "building the model on the meta device imported torch._dynamo"
