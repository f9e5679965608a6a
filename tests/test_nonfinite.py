"""Non-finite steps are exact: a micro-batch whose loss is not finite on one rank of a 2-process run is left
out on every rank, and the step equals the step over the other micro-batches alone (checked against a
plain PyTorch replay of that step from the checkpoint before it); a step whose every micro-batch was left
out changes neither parameters nor optimizer state."""
import json
import subprocess
import sys

import pytest
import torch

from longctx.data.stream import PackedStream, open_splits, rank_share
from longctx.pipeline.config import load_config
from longctx.pipeline.model import Mamba2Config, Mamba2LM
from longctx.pipeline.training.curriculum import learning_rate, plan
from longctx.pipeline.training.loss import sequence_loss
from longctx.pipeline.training.trainer import param_groups
from tests.shared import shards_once

MARK = ord("#")          # the one byte whose embedding row is NaN: it appears in a single document


@pytest.fixture(scope="session")
def marked_shards(tmp_path_factory):
    """30 short documents, one of them (the 8th) holding the marked byte, prepared once for the session's runs
    (both workers': tests/shared.py) on a Ray of its own; the runs only read them."""
    import random

    from longctx.data.config import DataConfig, PrepareConfig, TokenizerConfig
    from longctx.data.prepare import prepare
    def make(root):
        rng = random.Random(0)
        with open(root / "docs.jsonl", "w") as f:
            for i in range(30):
                text = "".join(rng.choice("abcdefgh ") for _ in range(50))
                f.write(json.dumps({"text": text[:20] + "#" + text[20:] if i == 7 else text}) + "\n")
        prepare(DataConfig(prepare=PrepareConfig(inputs=[str(root / "docs.jsonl")], output=str(root / "mds"),
                                                 heldout_fraction=0)), TokenizerConfig())
    return shards_once(tmp_path_factory, "nonfinite-data", make) / "mds"


def _setup(tmp_path, shards, name, global_batch_tokens, mark_value=float("nan"), zero=0):
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=257, d_state=16, headdim=16, chunk_size=16,
                                  tie_embeddings=False))
    with torch.no_grad():
        model.backbone.embedding.weight[MARK] = mark_value
    model.save_pretrained(tmp_path / "model")
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
run: {{name: {name}, dir: {tmp_path / name}, seed: 9}}
model: {{from_pretrained: {tmp_path / 'model'}}}
data: {{shards: {shards}}}
train: {{micro_batch_size: 1, zero_stage: {zero}, max_bad_steps: 5, grad_clip: 0}}
curriculum: {{stages: [{{name: a, seq_len: 64, steps: 6, global_batch_tokens: {global_batch_tokens}, lr: 0.003}}]}}
checkpoint: {{every_steps: 1, keep_last: 0}}
eval: {{every_checkpoint: false}}
""")
    r = subprocess.run([sys.executable, "-m", "longctx", "run", str(cfg), "--nproc", "2"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in recs if r["skipped_micro_batches"]]
    assert skipped, "no step met the marked document"
    return cfg, tmp_path / name / "checkpoints", skipped[0], recs


def _states(ckpts, step):
    """Model and optimizer state after `step` (0: the pretrained model, a fresh optimizer), loader position."""
    if step == 0:
        model = Mamba2LM.from_pretrained(ckpts.parent.parent / "model")
        return {"module": model.state_dict(), "optimizer": None}, None
    d = ckpts / f"step_{step:07d}"
    trainer = json.loads((d / "trainer_state.json").read_text())
    states = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    if states["optimizer"] is None and (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists():
        states["optimizer"] = [torch.load(d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", map_location="cpu",
                                          weights_only=False)["optimizer_state_dict"] for r in range(2)]
    return states, trainer["loader"]


@pytest.mark.timeout(900)
def test_a_non_finite_micro_batch_is_left_out_and_the_step_is_exact(tmp_path, marked_shards):
    cfg_path, ckpts, step, recs = _setup(tmp_path, marked_shards, "partial", global_batch_tokens=384)   # 3 micro-batches per rank
    assert recs[step - 1]["skipped_micro_batches"] == 1 and recs[step - 1]["loss"] is not None
    assert step >= 2, "the step must have optimizer history, or AdamW's first step hides the gradient's scale"
    cfg = load_config(str(cfg_path))
    plans = plan(cfg, 2, 16)
    p = plans[0]
    assert p.grad_accum == 3 and p.data_parallel == 2
    before, loader = _states(ckpts, step - 1)
    model = Mamba2LM.from_pretrained(cfg.model.from_pretrained)
    model.load_state_dict(before["module"])
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=p.lr, betas=tuple(cfg.train.betas))
    if before["optimizer"] is not None:
        opt.load_state_dict(before["optimizer"])
    for g in opt.param_groups:
        g["lr"] = learning_rate(plans, step - 1)
    stream = PackedStream(open_splits(str(marked_shards))[0], 256, seed=9)
    if loader is not None:
        stream.load_state_dict(loader)
    batch = stream.next_batch(p.sequences_per_step, p.seq_len)
    shares = [rank_share(batch, r, 2) for r in range(2)]
    micro = [[s.rows(m, m + 1) for s in shares] for m in range(3)]        # [micro-batch][rank]
    bad = [m for m in range(3) if any((torch.as_tensor(rows.input_ids) == MARK).any() for rows in micro[m])]
    assert len(bad) == 1
    kept = [m for m in range(3) if m not in bad]
    for m in kept:                     # the world average of each rank's mean over the kept micro-batches
        for rows in micro[m]:
            logits = model(torch.as_tensor(rows.input_ids), seq_idx=torch.as_tensor(rows.seq_idx)).logits
            loss, _ = sequence_loss(logits, torch.as_tensor(rows.labels), None)
            (loss / (len(kept) * 2)).backward()
    assert cfg.train.grad_clip == 0      # no clipping, which would hide the gradient's scale too
    opt.step()
    after = _states(ckpts, step)[0]["module"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-7, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.timeout(900)
def test_a_step_whose_micro_batches_were_all_left_out_changes_nothing(tmp_path, marked_shards):
    _, ckpts, step, recs = _setup(tmp_path, marked_shards, "all", global_batch_tokens=128)             # 1 micro-batch per rank
    assert step >= 2
    assert recs[step - 1]["loss"] is None and recs[step - 1]["skipped_micro_batches"] == 1
    (before, _), (after, _) = _states(ckpts, step - 1), _states(ckpts, step)
    for name, value in before["module"].items():
        assert torch.equal(value.nan_to_num(), after["module"][name].nan_to_num()), name
    if before["optimizer"] is None:                                 # the first step: AdamW never stepped
        assert not after["optimizer"]["state"]
    else:
        for key, state in before["optimizer"]["state"].items():
            for k, v in state.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["optimizer"]["state"][key][k])), (key, k)
    assert recs[step]["loss"] is not None                      # and training goes on after it


def _same(a, b) -> bool:
    """Nested optimizer states equal, tensors bit for bit (but the LR, which the schedule sets every step)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a if k != "lr")
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if hasattr(a, "__dict__"):                  # DeepSpeed's loss scaler: an object without __eq__
        return type(a) is type(b) and _same(vars(a), vars(b))
    return a == b


HUGE = 3e38    # an embedding row this large: the norms square it to inf, the loss stays finite, the gradient is NaN


@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero", [0, 2])
def test_a_finite_loss_with_a_non_finite_gradient_is_a_bad_step_that_changes_nothing(tmp_path, zero, marked_shards):
    """Left as a good step, ZeRO 0's AdamW wrote NaN into the weights (and DeepSpeed's ZeRO optimizer skips such
    a step on its own in fp32 while the run logged it as good): the step counts as bad like a non-finite loss."""
    _, ckpts, step, recs = _setup(tmp_path, marked_shards, f"grad{zero}", global_batch_tokens=128, mark_value=HUGE, zero=zero)
    assert step >= 2
    assert recs[step - 1]["loss"] is None and recs[step - 1]["skipped_micro_batches"] == 1
    (before, _), (after, _) = _states(ckpts, step - 1), _states(ckpts, step)
    for name, value in before["module"].items():
        assert torch.equal(value, after["module"][name]), name
    assert all(torch.isfinite(v).all() for v in after["module"].values())
    assert _same(before["optimizer"], after["optimizer"])       # the moments and step counts as they were
    assert all(r["loss"] is not None for r in recs[step:])          # and training goes on after it
