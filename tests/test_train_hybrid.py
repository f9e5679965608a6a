"""A tiny hybrid (a Mamba-2 layer, then an attention layer, each with a gated MLP) trains end to end with the real
trainer on one process: DeepSpeed, packed documents with resets, a checkpoint, every evaluation at it; the
checkpoint loads back as the same hybrid and exports in the mamba_ssm layout."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_calibrate import data  # noqa: F401  (fixture: small prepared shards, train and held out)

STEPS = 6


def _worker(rank, port, path):
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    from longctx.pipeline.config import load_config
    from longctx.pipeline.training.trainer import Trainer
    trainer = Trainer(load_config(path), path)
    assert trainer.run() == 0
    trainer.close()


@pytest.mark.timeout(300)
def test_a_tiny_hybrid_trains_evaluates_and_exports(tmp_path, data):  # noqa: F811
    path = tmp_path / "hybrid.yaml"
    path.write_text(f"""
run: {{name: hybrid, dir: {tmp_path / 'run'}, seed: 2}}
model: {{d_model: 32, n_layer: 2, vocab_size: 257, d_state: 16, headdim: 16, chunk_size: 16, d_intermediate: 64,
        attn_layer_idx: [1], attn_cfg: {{num_heads: 4, num_heads_kv: 2, rotary_emb_dim: 8, d_conv: 4}}}}
data: {{shards: {data}}}
mitigations: {{decay_scale: [0.99, null]}}
curriculum: {{stages: [{{name: a, seq_len: 64, steps: {STEPS}, global_batch_tokens: 128, lr: 0.01}}]}}
eval: {{kinds: [heldout, passkey, length, states], heldout_sequences: 1, passkey_lengths: [256], passkey_samples: 1,
       passkey_depths: [0.5], length_max: 256, length_buckets: 4}}
""")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(path)), nprocs=1, start_method="spawn")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"] - 0.2                       # it learns
    assert {"eval_loss", "passkey_accuracy", "collapse_point", "max_state_norm"} <= set(records[-1])

    from longctx.pipeline.model.attention import AttentionMixer
    from longctx.pipeline.model.load import load_any
    from longctx.pipeline.model.mamba2 import Mamba2LM
    model = load_any(tmp_path / "run").eval()                                   # the training checkpoint
    assert model.config.attn_layer_idx == [1] and isinstance(model.backbone.layers[1].mixer, AttentionMixer)
    assert model.mitigations[0].decay_scale and model.mitigations[1] is None     # the stage's, on the Mamba layer
    model.save_pretrained(tmp_path / "export")
    again = Mamba2LM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, 257, (1, 40))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
