"""Mamba2LM: mamba_ssm checkpoints, Hugging Face layout, recurrent inference."""
import json

import pytest
import torch

from longctx.pipeline.model import Mamba2Config, Mamba2LM
from longctx.pipeline.model.formats import CheckpointError
from tests import mamba_ssm_reference as ref
from tests.conftest import rel_err

# config.json dicts in mamba_ssm's MambaConfig form (what state-spaces/mamba2-* ship)
MAMBA_SSM_CONFIGS = {
    "plain": dict(d_model=64, d_intermediate=0, n_layer=2, vocab_size=250,
                  ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16},
                  attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                  pad_vocab_size_multiple=16, tie_embeddings=True),
    "groups_mlp_dssm": dict(d_model=48, d_intermediate=100, n_layer=2, vocab_size=97,
                            ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "d_ssm": 64,
                                     "chunk_size": 8, "D_has_hdim": True, "dt_limit": [0.001, 0.5]},
                            rms_norm=True, residual_in_fp32=True, pad_vocab_size_multiple=8, tie_embeddings=False),
    "layernorm_ungated": dict(d_model=32, n_layer=1, vocab_size=64,
                              ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "rmsnorm": False,
                                       "chunk_size": 4, "d_conv": 3, "ngroups": 4},
                              rms_norm=False, residual_in_fp32=False, tie_embeddings=True),
}


def write_mamba_ssm_dir(path, cfg, sd, weights="pytorch_model.bin"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight" or not cfg.get(
            "tie_embeddings", True)}, str(path / weights))
    else:
        torch.save(sd, path / weights)


@pytest.mark.parametrize("name", sorted(MAMBA_SSM_CONFIGS))
def test_mamba_ssm_checkpoint_loads_exactly_and_matches_reference_logits(tmp_path, name):
    cfg = MAMBA_SSM_CONFIGS[name]
    sd = ref.random_state_dict(cfg)
    write_mamba_ssm_dir(tmp_path / "ckpt", cfg, sd)
    model = Mamba2LM.from_pretrained(tmp_path / "ckpt").eval()
    # no missing or unexpected keys: our state dict is exactly mamba_ssm's
    assert set(model.state_dict()) == set(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    ids = torch.randint(0, cfg["vocab_size"], (2, 29))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = ref.forward(sd, cfg, ids)
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) <= 1e-5


def test_safetensors_mamba_ssm_directory_loads(tmp_path):
    cfg = MAMBA_SSM_CONFIGS["plain"]
    sd = ref.random_state_dict(cfg, seed=3)
    write_mamba_ssm_dir(tmp_path / "st", cfg, sd, weights="model.safetensors")
    model = Mamba2LM.from_pretrained(tmp_path / "st")
    assert torch.equal(model.lm_head.weight, sd["backbone.embedding.weight"])


def test_matches_hugging_face_mamba2_implementation(tmp_path):
    """The transformers Mamba2ForCausalLM (torch path) is a second independent implementation."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")
    cfg = Mamba2Config(d_model=64, n_layer=2, vocab_size=100, d_state=16, headdim=16, chunk_size=16,
                       pad_vocab_size_multiple=8)
    model = Mamba2LM(cfg).eval()
    model.save_pretrained(tmp_path / "hf", format="hf")
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 100, (2, 41))
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf(ids).logits) <= 1e-5


@pytest.mark.parametrize("fmt,safe", [("mamba_ssm", False), ("mamba_ssm", True), ("hf", True), ("hf", False)])
@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip(tmp_path, fmt, safe, tied):
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8, chunk_size=8,
                                  tie_embeddings=tied, dt_limit=(0.0, 3.0)))
    model.save_pretrained(tmp_path / "m", format=fmt, safe_serialization=safe)
    loaded = Mamba2LM.from_pretrained(tmp_path / "m")
    assert loaded.config.dt_limit == (0.0, 3.0)
    assert loaded.config.tie_embeddings == tied
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == tied
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if fmt == "hf":
        raw = json.loads((tmp_path / "m" / "config.json").read_text())
        assert raw["model_type"] == "mamba2" and raw["hidden_size"] == 32
        # re-saving in the other layout round-trips too
        loaded.save_pretrained(tmp_path / "m2", format="mamba_ssm")
        assert torch.equal(Mamba2LM.from_pretrained(tmp_path / "m2").lm_head.weight, model.lm_head.weight)


def test_hf_layout_refuses_what_it_cannot_express(tmp_path):
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=1, vocab_size=50, d_state=8, headdim=8, d_intermediate=64))
    with pytest.raises(CheckpointError, match="d_intermediate"):
        model.save_pretrained(tmp_path / "x", format="hf")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad,match", [
    ({"ssm_cfg": {}}, "Mamba-2 checkpoints only"),
    ({"attn_layer_idx": [1]}, r"attention layers \[1\] but attn_cfg has no num_heads"),   # hybrids: test_attention
    ({"bogus_key": 1}, "bogus_key"),
])
def test_unsupported_checkpoints_are_named_errors(tmp_path, bad, match):
    cfg = {**MAMBA_SSM_CONFIGS["plain"], **bad}
    write_mamba_ssm_dir(tmp_path / "c", cfg, ref.random_state_dict(MAMBA_SSM_CONFIGS["plain"]))
    with pytest.raises(CheckpointError, match=match):
        Mamba2LM.from_pretrained(tmp_path / "c")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    cfg = MAMBA_SSM_CONFIGS["plain"]
    sd = ref.random_state_dict(cfg)
    sd.pop("backbone.layers.1.mixer.D")
    write_mamba_ssm_dir(tmp_path / "c", cfg, sd)
    with pytest.raises(CheckpointError, match="layers.1.mixer.D"):
        Mamba2LM.from_pretrained(tmp_path / "c")
    with pytest.raises(CheckpointError, match="no config.json"):
        Mamba2LM.from_pretrained(tmp_path)


def small_model(**kw):
    base = dict(d_model=48, n_layer=2, vocab_size=61, d_state=8, headdim=12, ngroups=2, chunk_size=8,
                d_intermediate=64)
    return Mamba2LM(Mamba2Config(**{**base, **kw})).eval()


def test_decode_step_by_step_equals_parallel_forward():
    model = small_model()
    ids = torch.randint(0, 61, (3, 30))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.init_cache(3)
        steps = torch.stack([model.step(ids[:, t], cache) for t in range(30)], dim=1)
    assert cache.seqlen == 30
    assert rel_err(steps, full) <= 1e-5


@pytest.mark.parametrize("kind", ["mamba2", "hybrid", "transformer"])   # the latter two: tests/test_attention.py
@pytest.mark.parametrize("chunk_len", [1, 7, 16, 100])
def test_chunked_prefill_then_decode_equals_full_forward(chunk_len, kind):
    from tests.test_attention import MODELS
    model = small_model() if kind == "mamba2" else MODELS[kind]()
    ids = torch.randint(0, 61, (2, 45))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.init_cache(2)
        last = model.prefill(ids[:, :40], cache, chunk_len=chunk_len)
        assert rel_err(last, full[:, 39]) <= 1e-5
        for t in range(40, 45):
            assert rel_err(model.step(ids[:, t], cache), full[:, t]) <= 1e-5


def test_greedy_generate_equals_repeated_full_forward():
    model = small_model()
    ids = torch.randint(0, 61, (2, 12))
    new = model.generate(ids, max_new_tokens=6, chunk_len=5)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq).logits[:, -1, :61].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(new, seq[:, 12:])


def test_document_boundaries_reset_conv_and_state():
    """A packed row with seq_idx equals each document fed alone (conv and SSM both reset)."""
    model = small_model()
    a, b = torch.randint(0, 61, (1, 13)), torch.randint(0, 61, (1, 19))
    seq_idx = torch.tensor([[0] * 13 + [1] * 19], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), seq_idx=seq_idx).logits
        alone = torch.cat([model(a).logits, model(b).logits], 1)
    assert rel_err(packed, alone) <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients():
    model = small_model().train()
    ids = torch.randint(0, 61, (2, 24))
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.enable_gradient_checkpointing(on)
        model(ids).logits.float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert rel_err(grads[1][n], grads[0][n]) <= 1e-5, n


def test_bf16_model_runs_and_pads_vocabulary():
    model = small_model(pad_vocab_size_multiple=16).to(torch.bfloat16)
    assert model.lm_head.weight.shape[0] == 64
    out = model(torch.randint(0, 61, (1, 9))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
