"""`longctx calibrate` (per-layer scales on the decay or on A fitted to the held-out loss) and the side-by-side
harness `longctx eval ... --variants`."""
import json
import subprocess
import sys

import pytest
import torch

from longctx.data.config import DataConfig, PrepareConfig, SyntheticConfig, TokenizerConfig
from longctx.data.prepare import prepare
from longctx.data.splits import heldout_of
from longctx.data.stream import DocumentSource, PackedStream
from longctx.pipeline.model import Mamba2LM
from longctx.pipeline.model.mitigations import LayerMitigations
from longctx.pipeline.training.loss import lm_loss
from tests.conftest import rel_err
from tests.test_evaluate import tiny
from tests.test_model import small_model

LONGCTX = [sys.executable, "-m", "longctx"]


def _scaled(model, a_scale, decay_scale=None):
    h = model.config.nheads
    model.set_mitigations([LayerMitigations(a_scale=[a_scale * (1 + 0.1 * k) for k in range(h)],
                                            decay_scale=decay_scale and [decay_scale] * h)
                           for _ in model.backbone.layers])
    return model


@pytest.mark.parametrize("decay_scale", [None, 0.9])
def test_scales_on_a_apply_alike_in_the_parallel_forward_chunked_prefill_and_decoding(decay_scale):
    torch.manual_seed(0)
    model = _scaled(small_model(), 0.6, decay_scale)
    ids = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.init_cache(2)
        prefilled = model.prefill(ids[:, :25], cache, chunk_len=7)
        steps = torch.stack([model.step(ids[:, t], cache) for t in range(25, 40)], dim=1)
        plain = _scaled(small_model(), 1.0, decay_scale)
        plain.load_state_dict(model.state_dict())
        unscaled = plain(ids).logits
    assert rel_err(prefilled, full[:, 24]) <= 1e-5
    assert rel_err(steps, full[:, 25:]) <= 1e-5
    assert rel_err(unscaled, full) > 1e-3          # the scale is not a no-op


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("calibrate")
    prepare(DataConfig(prepare=PrepareConfig(output=str(root / "mds"), heldout_fraction=0.5, num_workers=1,
                                             synthetic=SyntheticConfig(documents=60, min_tokens=200, max_tokens=900,
                                                                       seed=2))), TokenizerConfig())
    return root / "mds"


@pytest.mark.parametrize("param, key", [("decay", "decay_scale"), ("A", "a_scale")])
def test_calibrate_lowers_the_heldout_loss_and_the_scales_load_with_the_model(tmp_path, data, param, key):
    tiny(5).save_pretrained(tmp_path / "model")
    out = tmp_path / f"cal-{param}"
    r = subprocess.run(LONGCTX + ["calibrate", str(tmp_path / "model"), "--length", "512", "--data", str(data),
                                  "--param", param, "--samples", "4", "--batch", "4", "--steps", "8", "--lr", "0.02",
                                  "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["heldout_loss_after"] < rec["heldout_loss_before"]
    loaded = Mamba2LM.from_pretrained(out)
    for i, m in enumerate(loaded.mitigations):
        assert getattr(m, key) == pytest.approx([rec["scales"][i][0]] * loaded.config.nheads)
    # the loaded model's loss on the calibration's held-out sequences is the loss the fit reported
    rows = PackedStream(DocumentSource(heldout_of(str(data)), str(tmp_path / "c")), 256, seed=0).next_batch(4, 512)
    with torch.no_grad():
        loss = lm_loss(loaded(torch.as_tensor(rows.input_ids)).logits, torch.as_tensor(rows.labels))
    assert float(loss) == pytest.approx(rec["heldout_loss_after"], rel=1e-5)


def test_calibrate_refuses_bad_arguments_naming_them(tmp_path, data):
    tiny(5).save_pretrained(tmp_path / "model")
    r = subprocess.run(LONGCTX + ["calibrate", str(tmp_path / "model"), "--length", "256", "--data", str(data),
                                  "--steps", "0", "--out", str(tmp_path / "x")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "--steps" in r.stderr


def test_variants_run_side_by_side_on_the_same_prompts(tmp_path):
    tiny(3).save_pretrained(tmp_path / "model")
    tiny(4).save_pretrained(tmp_path / "other")
    common = ["--lengths", "256,512", "--depths", "0,1", "--samples", "1"]
    r = subprocess.run(LONGCTX + ["eval", "passkey", str(tmp_path / "model"), *common, "--out", str(tmp_path / "pk"),
                                  "--variants", "as is=", "half=decay_scale=0.5,window=64",
                                  f"other=checkpoint={tmp_path / 'other'}"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "pk" / "passkey.json").read_text())["variants"]
    assert list(res) == ["as is", "half", "other"]
    assert (tmp_path / "pk" / "passkey.png").exists()
    table = (tmp_path / "pk" / "table.md").read_text()
    assert "| length | as is | half | other |" in table and table in r.stdout + "\n"
    alone = subprocess.run(LONGCTX + ["eval", "passkey", str(tmp_path / "other"), *common, "--out",
                                      str(tmp_path / "alone")], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert res["other"]["outputs"] == json.loads((tmp_path / "alone" / "passkey.json").read_text())["outputs"]
    assert res["half"]["outputs"] != res["as is"]["outputs"]


@pytest.mark.parametrize("variants, message", [
    (["a=decay=0.9"], "unknown key 'decay' in variant 'a'"),
    (["a=", "a=window=8"], "the name 'a' is given twice"),
    (["big=checkpoint={big}"], "has a vocabulary of 400 ids"),
])
def test_variants_that_cannot_run_are_named(tmp_path, variants, message):
    tiny(3).save_pretrained(tmp_path / "model")
    tiny(3, vocab_size=400).save_pretrained(tmp_path / "big")
    r = subprocess.run(LONGCTX + ["eval", "passkey", str(tmp_path / "model"), "--lengths", "256", "--out",
                                  str(tmp_path / "pk"), "--variants", *[v.format(big=tmp_path / "big") for v in variants]],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
