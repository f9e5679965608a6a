"""`longctx bench models --study`: each variant's model, its training and decoding tokens/s and the decoding
state it holds at each length."""
import json
import subprocess
import sys

import pytest

from tests.test_study_spec import write

pytestmark = pytest.mark.timeout(300)

STUDY = """
study: sizes
base: {base}
seeds: [0, 1]
variants:
  mamba: []
  transformer: [model.n_layer=2, "model.attn_layer_idx=[0,1]", model.attn_cfg.num_heads=2, model.attn_cfg.num_heads_kv=1,
                model.attn_cfg.head_dim=8, model.attn_cfg.rotary_emb_dim=8]
  hybrid: ["model.attn_layer_idx=[1]", model.attn_cfg.num_heads=2, model.attn_cfg.head_dim=8]
baseline: mamba
out: {out}
"""


def test_a_mamba_state_is_fixed_and_an_attention_cache_grows_with_every_token(tmp_path):
    out = tmp_path / "models.json"
    r = subprocess.run([sys.executable, "-m", "longctx", "bench", "models", "--study", write(tmp_path, STUDY),
                        "--lengths", "64,192", "--repeats", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    assert [rows[v]["layers"] for v in ("mamba", "transformer", "hybrid")] == ["MM", "AA", "MA"]
    for row in rows.values():
        assert row["train_tokens_per_s"] > 0 and row["decode_tokens_per_s@192"] > 0
        assert (row["train_seq_len"], row["train_batch"]) == (64, 1)
    # d_model 32 (64 inner channels), d_state 16, headdim 16 (4 heads), conv 4: per Mamba layer the fp32 state
    # (4, 16, 16) and the conv tail (3, 64 + 2 * 16), whatever the length
    mamba_layer = (4 * 16 * 16 + 3 * (64 + 2 * 16)) * 4
    assert rows["mamba"]["state_bytes@64"] == rows["mamba"]["state_bytes@192"] == 2 * mamba_layer
    # per attention layer and token: a key and a value of the key-value heads (fp32) and the document id (int64)
    per_token = {"transformer": 2 * (2 * 1 * 8 * 4 + 8), "hybrid": 2 * 2 * 8 * 4 + 8}
    for v, each in per_token.items():
        assert rows[v]["state_bytes@192"] - rows[v]["state_bytes@64"] == 128 * each
    assert rows["hybrid"]["state_bytes@64"] == mamba_layer + 64 * per_token["hybrid"]
