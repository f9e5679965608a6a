"""`longctx calibrate` (per-layer scales on the decay or on A fitted to the held-out loss) and the side-by-side
harness `longctx eval ... --variants`."""
import json
import math

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
from tests.shared import longctx_here, shards_once
from tests.test_evaluate import tiny
from tests.test_model import small_model


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
def data(tmp_path_factory):
    return shards_once(tmp_path_factory, "calibrate", lambda root: prepare(DataConfig(prepare=PrepareConfig(
        output=str(root / "mds"), heldout_fraction=0.5, num_workers=1,
        synthetic=SyntheticConfig(documents=60, min_tokens=200, max_tokens=900, seed=2))), TokenizerConfig())) / "mds"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("param, key", [("decay", "decay_scale"), ("A", "a_scale")])
def test_calibrate_lowers_the_heldout_loss_and_the_scales_load_with_the_model(tmp_path, data, param, key, capsys):
    _sharp(5).save_pretrained(tmp_path / "model")
    out = tmp_path / f"cal-{param}"
    r = longctx_here(capsys, "calibrate", tmp_path / "model", "--length", "512", "--data", data, "--param", param,
                     "--samples", "4", "--batch", "4", "--steps", "8", "--lr", "0.02", "--out", out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["heldout_loss_after"] < rec["heldout_loss_before"]
    loaded = Mamba2LM.from_pretrained(out)
    for i, m in enumerate(loaded.mitigations):
        assert getattr(m, key) == pytest.approx([rec["scales"][i][0]] * loaded.config.nheads)
    # the losses reported are the model's as loaded and as saved on held-out sequences the fit did not read
    assert "4 held-out sequences not fitted on" in r.stdout and rec["split"] in r.stdout
    test = _test_rows(data, tmp_path, 4, 512)
    assert _loss64(tmp_path / "model", test) == pytest.approx(rec["heldout_loss_before"], rel=1e-5)
    assert _loss64(out, test) == pytest.approx(rec["heldout_loss_after"], rel=1e-5)


def _sharp(seed):
    """A tiny random model with 10x its (tied) embedding: sharper logits, so that the scales move the loss by
    ~1e-3 (on tiny() alone by ~1e-5, too close to float32 rounding to tell a scale dropped)."""
    model = tiny(seed)
    with torch.no_grad():
        model.backbone.embedding.weight.mul_(10)
    return model


def _test_rows(data, tmp_path, samples: int, length: int):
    """The sequences `calibrate --samples N` reports on: the N after the fit's N in the held-out stream (seed 0)."""
    rows = PackedStream(DocumentSource(heldout_of(str(data)), str(tmp_path / "rows")), 256, seed=0).next_batch(
        2 * samples, length)
    return torch.as_tensor(rows.input_ids[samples:]), torch.as_tensor(rows.labels[samples:])


def _loss64(directory, rows) -> float:
    """The float64 reference: the loss of the model saved in `directory`, with its saved scales, on `rows`."""
    model = Mamba2LM.from_pretrained(directory).double().eval()
    with torch.no_grad():
        return float(lm_loss(model(rows[0]).logits, rows[1]))


@pytest.mark.timeout(300)
def test_calibrating_a_calibrated_model_composes_with_its_scales(tmp_path, data):
    """The second fit multiplies the first's a_scale (both effects kept), and its loss "before" is the model as
    loaded (the first fit's "after" on the same held-out sequences), not the model at scale 1."""
    from longctx.pipeline.evaluate.calibrate import calibrate
    _sharp(5).save_pretrained(tmp_path / "model")
    opts = dict(length=512, data=str(data), param="A", samples=4, batch=4, steps=8, lr=0.2, log=print)
    first = calibrate(tmp_path / "model", out=tmp_path / "once", **opts)
    second = calibrate(tmp_path / "once", out=tmp_path / "twice", **opts)
    assert second["heldout_loss_before"] == pytest.approx(first["heldout_loss_after"], rel=1e-6)
    assert abs(second["heldout_loss_before"] - first["heldout_loss_before"]) > 1e-4    # not the model at scale 1
    loaded = Mamba2LM.from_pretrained(tmp_path / "twice")
    for i, m in enumerate(loaded.mitigations):
        product = first["scales"][i][0] * second["scales"][i][0]
        assert m.a_scale == pytest.approx([product] * loaded.config.nheads, rel=1e-6)
    assert abs(math.log(second["scales"][0][0])) > 1e-3             # the second fit changed something too
    assert _loss64(tmp_path / "twice", _test_rows(data, tmp_path, 4, 512)) == pytest.approx(
        second["heldout_loss_after"], rel=1e-5)


@pytest.mark.timeout(300)
def test_calibrate_per_head_on_a_model_with_its_own_decay(tmp_path, data):
    """--per-head fits one decay_scale per layer x head; each multiplies the model's own per-head decay_scale,
    and the model saved gives the reported loss on the sequences not fitted on."""
    from longctx.pipeline.evaluate.calibrate import calibrate
    model = _sharp(5)
    h = model.config.nheads
    own = [1.0 - 0.05 * k for k in range(h)]
    model.set_mitigations([LayerMitigations(decay_scale=own) for _ in model.backbone.layers])
    model.save_pretrained(tmp_path / "model")
    rec = calibrate(tmp_path / "model", out=tmp_path / "cal", length=512, data=str(data), param="decay",
                    per_head=True, samples=4, batch=2, steps=8, lr=0.05, log=lambda _: None)
    assert rec["per_head"] and all(len(row) == h for row in rec["scales"])
    assert all(0 < v <= 1 for row in rec["scales"] for v in row)
    assert len({round(v, 6) for v in rec["scales"][0]}) == h         # one scale per head, fitted apart
    loaded = Mamba2LM.from_pretrained(tmp_path / "cal")
    for i, m in enumerate(loaded.mitigations):
        assert m.decay_scale == pytest.approx([o * f for o, f in zip(own, rec["scales"][i])], rel=1e-6)
    test = _test_rows(data, tmp_path, 4, 512)
    assert _loss64(tmp_path / "model", test) == pytest.approx(rec["heldout_loss_before"], rel=1e-5)
    assert _loss64(tmp_path / "cal", test) == pytest.approx(rec["heldout_loss_after"], rel=1e-5)


@pytest.mark.timeout(120)
def test_calibrate_refuses_a_heldout_split_too_small_to_report_out_of_sample(tmp_path, data):
    from longctx.pipeline.evaluate.calibrate import calibrate
    tiny(5).save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=r"fewer than 2 x --samples = 80 sequences of 512 tokens"):
        calibrate(tmp_path / "model", out=tmp_path / "cal", length=512, data=str(data), samples=40, log=print)
    assert not (tmp_path / "cal" / "calibration.json").exists()


def test_calibrate_refuses_bad_arguments_naming_them(tmp_path, data, capsys):
    tiny(5).save_pretrained(tmp_path / "model")
    r = longctx_here(capsys, "calibrate", tmp_path / "model", "--length", "256", "--data", data, "--steps", "0",
                     "--out", tmp_path / "x")
    assert r.returncode != 0 and "--steps" in r.stderr


def test_variants_run_side_by_side_on_the_same_prompts(tmp_path, capsys):
    tiny(3).save_pretrained(tmp_path / "model")
    tiny(4).save_pretrained(tmp_path / "other")
    common = ["--lengths", "256,512", "--depths", "0,1", "--samples", "1"]
    r = longctx_here(capsys, "eval", "passkey", tmp_path / "model", *common, "--out", tmp_path / "pk", "--variants",
                     "as is=", "half=decay_scale=0.5,window=64", f"other=checkpoint={tmp_path / 'other'}")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "pk" / "passkey.json").read_text())["variants"]
    assert list(res) == ["as is", "half", "other"]
    assert (tmp_path / "pk" / "passkey.png").exists()
    table = (tmp_path / "pk" / "table.md").read_text()
    assert "| length | as is | half | other |" in table and table in r.stdout + "\n"
    alone = longctx_here(capsys, "eval", "passkey", tmp_path / "other", *common, "--out", tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert res["other"]["outputs"] == json.loads((tmp_path / "alone" / "passkey.json").read_text())["outputs"]
    assert res["half"]["outputs"] != res["as is"]["outputs"]


@pytest.mark.parametrize("variants, message", [
    (["a=decay=0.9"], "unknown key 'decay' in variant 'a'"),
    (["a=", "a=window=8"], "the name 'a' is given twice"),
    (["big=checkpoint={big}"], "has a vocabulary of 400 ids"),
])
def test_variants_that_cannot_run_are_named(tmp_path, variants, message, capsys):
    tiny(3).save_pretrained(tmp_path / "model")
    tiny(3, vocab_size=400).save_pretrained(tmp_path / "big")
    r = longctx_here(capsys, "eval", "passkey", tmp_path / "model", "--lengths", "256", "--out", tmp_path / "pk",
                     "--variants", *[v.format(big=tmp_path / "big") for v in variants])
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]



def _by_hand_length_losses(directory, layers, length, buckets):
    """Bucketed loss of the model saved in `directory` with `layers` set by hand (its own replaced), in float64
    and one full forward: the reference for what `longctx eval length` reports (float32, read in chunks) on its
    synthetic row."""
    from longctx.data.tokenizer import ByteTokenizer
    from longctx.pipeline.evaluate.length import bucketize
    from longctx.pipeline.evaluate.run import long_text_row
    model = Mamba2LM.from_pretrained(directory).double().eval()
    model.set_mitigations(layers)
    x, y = long_text_row(ByteTokenizer(), length, seed=0)
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(x).logits[0], y[0], reduction="none").numpy()
    return [b["mean_loss"] for b in bucketize(losses, buckets)["buckets"]]


@pytest.mark.timeout(300)
def test_variants_and_mitigations_compose_with_the_models_own_scales(tmp_path):
    """A model saved with a calibrated a_scale keeps it under a variant that sets only a window (and under
    --mitigations / --compare); a variant that sets a_scale replaces it, a_scale=1 removes it."""
    from longctx.pipeline.evaluate.any_checkpoint import evaluate_checkpoint
    model = _sharp(6)
    h, n = model.config.nheads, model.config.n_layer
    own = [0.02 * (1 + k) for k in range(h)]        # per head, as `calibrate --per-head` saves it
    model.set_mitigations([LayerMitigations(a_scale=own) for _ in range(n)])
    model.save_pretrained(tmp_path / "cal")
    opts = dict(lengths=[1024], buckets=4, min_position=64)

    def losses(result):
        return [b["mean_loss"] for b in result["buckets"]]

    def expect(**fields):
        reference = _by_hand_length_losses(tmp_path / "cal", [LayerMitigations(**fields) for _ in range(n)], 1024, 4)
        return pytest.approx(reference, rel=1e-5)

    res = evaluate_checkpoint("length", tmp_path / "cal", out=tmp_path / "v", **opts, variant_specs=[
        "as is=", "window=window=64", "replaced=a_scale=2.0,window=64", "removed=a_scale=1"])
    assert losses(res["as is"]) == expect(a_scale=own)
    assert losses(res["window"]) == expect(a_scale=own, window=64)
    assert losses(res["replaced"]) == expect(a_scale=[2.0] * h, window=64)
    assert losses(res["removed"]) == expect()
    assert losses(res["window"]) != expect(window=64)     # the checkpoint's own scale changes the loss here

    res = evaluate_checkpoint("length", tmp_path / "cal", out=tmp_path / "c", **opts, mitigations=["window=64"],
                              compare=True)
    assert losses(res["without"]) == expect(a_scale=own)
    assert losses(res["with mitigations"]) == expect(a_scale=own, window=64)
