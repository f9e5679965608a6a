"""Passkey, loss-vs-position and state statistics: the harness on real tiny models and on known answers."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longctx.data.stream import PackedStream
from longctx.data.tokenizer import ByteTokenizer, HFTokenizer
from longctx.pipeline.evaluate import run as run_module
from longctx.pipeline.evaluate.length import bucketize, collapse_point, per_token_loss, position_mean
from longctx.pipeline.evaluate.passkey import (
    FILLER,
    PREFIX,
    QUESTION,
    build_prompt,
    evaluate_passkey,
    extract_key,
    needle,
)
from longctx.pipeline.evaluate.run import run_eval
from longctx.pipeline.evaluate.states import evaluate_states
from longctx.pipeline.mitigations import MitigationsConfig, resolve
from longctx.pipeline.model import Mamba2Config, Mamba2LM


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Mamba2LM(Mamba2Config(**{**dict(d_model=32, n_layer=2, vocab_size=257, d_state=16, headdim=16,
                                           chunk_size=16), **kw})).eval()


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([PREFIX, FILLER * 20, needle("12345"), QUESTION] * 5,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(str(path))


@pytest.mark.parametrize("which", ["byte", "bpe"])
@pytest.mark.parametrize("length,depth", [(300, 0.0), (1000, 0.5), (4096, 1.0), (777, 0.25)])
def test_prompt_has_the_exact_length_and_the_needle_at_its_depth(which, length, depth, bpe):
    tok = ByteTokenizer() if which == "byte" else bpe
    ids = build_prompt(tok, length, depth, "48213")
    assert len(ids) == length
    text = tok.decode(ids)
    assert text.startswith(PREFIX) and text.endswith(QUESTION)
    assert needle("48213") in text
    filler_before = text.index(needle("48213")) - len(PREFIX)
    filler_total = len(text) - len(PREFIX) - len(needle("48213")) - len(QUESTION)
    assert abs(filler_before / filler_total - depth) < 0.05
    with pytest.raises(ValueError, match="too short"):
        build_prompt(tok, 40, 0.5, "48213")


class EchoKey(torch.nn.Module):
    """A test double with Mamba2LM's generate(): it reads the needle's digits from the prompt
    (right=True) or answers a fixed wrong key, so the scoring is checked against known answers."""

    def __init__(self, tok, right=True):
        super().__init__()
        self.tok, self.right, self.w = tok, right, torch.nn.Parameter(torch.zeros(1))

    def generate(self, ids, max_new_tokens, chunk_len=4096, eos_id=None):
        rows = []
        for row in ids.tolist():
            key = extract_key(self.tok.decode(row).split("The passkey is ", 1)[1]) if self.right else "00000"
            rows.append(list(self.tok.encode(" " + key + "."))[:max_new_tokens])
        return torch.tensor(rows)


def test_scoring_against_known_answers():
    tok = ByteTokenizer()
    good = evaluate_passkey(EchoKey(tok), tok, [200, 400], [0.0, 1.0], samples=3)
    bad = evaluate_passkey(EchoKey(tok, right=False), tok, [200, 400], [0.0, 1.0], samples=3)
    assert good["mean_accuracy"] == 1.0 and bad["mean_accuracy"] == 0.0
    assert good["accuracy"] == {"200": {"0.0": 1.0, "1.0": 1.0}, "400": {"0.0": 1.0, "1.0": 1.0}}
    assert len(good["outputs"]) == 12 and len({o["key"] for o in good["outputs"]}) > 6    # seeded random keys
    assert extract_key("  4 8 2 1 3 and more 99") == "48213"


def test_real_model_decoding_does_not_depend_on_prefill_chunk():
    tok, m = ByteTokenizer(), tiny()
    a = evaluate_passkey(m, tok, [2000], [0.5], samples=2, prefill_chunk=128)
    b = evaluate_passkey(m, tok, [2000], [0.5], samples=2, prefill_chunk=4096)
    assert [o["output"] for o in a["outputs"]] == [o["output"] for o in b["outputs"]]


def test_per_token_loss_equals_full_forward_cross_entropy():
    m = tiny(1)
    x = torch.randint(0, 257, (1, 300))
    y = torch.randint(0, 257, (1, 300))
    y[0, 7] = -100
    got = per_token_loss(m, x, y, chunk=64)
    with torch.no_grad():
        ref = F.cross_entropy(m(x).logits[0].float(), y[0].clamp_min(0), reduction="none").numpy()
    assert np.isnan(got[7])
    keep = np.arange(300) != 7
    assert np.allclose(got[keep], ref[keep], rtol=1e-5, atol=1e-6)


def test_buckets_and_collapse_point_on_known_curves():
    flat = np.full(10000, 2.0)
    assert collapse_point(bucketize(flat, 12)["buckets"], 0.5) is None
    rising = flat.copy()
    rising[3000:] = 3.0
    rows = bucketize(rising, 12)["buckets"]
    point = collapse_point(rows, 0.5)
    assert point is not None and point <= 3000 and [r for r in rows if r["start"] == point][0]["end"] > 3000
    early = flat.copy()
    early[:10] = 9.0                      # a bad start (short context) is not a collapse
    assert collapse_point(bucketize(early, 12)["buckets"], 0.5) is None
    # a bump before the training length is judged only when min_position lets it in
    bump = flat.copy()
    bump[100:200] = 3.0
    assert collapse_point(bucketize(bump, 12)["buckets"], 0.5) is not None
    assert collapse_point(bucketize(bump, 12)["buckets"], 0.5, min_position=256) is None
    assert collapse_point(bucketize(rising, 12)["buckets"], 0.5, min_position=256) == point


class _Documents:
    """An in-memory held-out split: documents of random bytes, 20-200 tokens each (where one starts, the label
    is ignored)."""

    def __init__(self, n=40, seed=0):
        rng = np.random.default_rng(seed)
        self.docs = [rng.integers(0, 256, int(rng.integers(20, 200))) for _ in range(n)]

    def __len__(self):
        return len(self.docs)

    def tokens(self, i):
        return self.docs[i]


def _heldout():
    return PackedStream(_Documents(), ByteTokenizer().eos_id, shuffle=False)


def _length(model, **kw):
    return run_eval("length", model, ByteTokenizer(), "unused", lengths=[600], buckets=6, margin=0.3,
                    prefill_chunk=64, train_length=100, min_position=32, stream=_heldout(), write=False, **kw)


def test_one_sequence_is_the_single_row_evaluation_unchanged():
    """--sequences 1 (the default): the row, buckets, collapse point and mean loss of the one-row evaluation,
    `sequences: 1` added and no spread."""
    m = tiny(4)
    res = _length(m)["model"]
    row = _heldout().next_batch(1, 600)
    losses = per_token_loss(m, torch.as_tensor(row.input_ids), torch.as_tensor(row.labels), 64)
    assert np.isnan(losses).any()                                     # documents start inside the row
    buckets = bucketize(losses, 6)["buckets"]
    assert res == {"buckets": buckets, "length": 600, "margin": 0.3, "train_length": 100, "min_position": 32,
                   "collapse_point": collapse_point(buckets, 0.3, 32), "mean_loss": float(np.nanmean(losses)),
                   "sequences": 1}


def test_several_sequences_average_the_loss_position_by_position_before_bucketing():
    """Two rows: each bucket is the mean of the two rows' per-token losses (float64), a position whose label one
    row ignores taking the other's; `spread` is the standard deviation of the rows' own bucket means."""
    m = tiny(4)
    two = _length(m, sequences=2)["model"]
    stream = _heldout()                   # the two consecutive rows, each evaluated alone
    l0, l1 = (per_token_loss(m, torch.as_tensor(b.input_ids), torch.as_tensor(b.labels), 64)
              for b in (stream.next_batch(1, 600), stream.next_batch(1, 600)))
    assert (np.isnan(l0) != np.isnan(l1)).any()
    curve = np.where(np.isnan(l0), l1, np.where(np.isnan(l1), l0, (l0 + l1) / 2))
    assert [(b["start"], b["end"]) for b in two["buckets"]] == [
        (b["start"], b["end"]) for b in bucketize(l0, 6)["buckets"]]
    for b in two["buckets"]:
        at = slice(b["start"], b["end"])
        assert b["mean_loss"] == pytest.approx(np.nanmean(curve[at]), rel=1e-12)
        assert b["tokens"] == np.isfinite(l0[at]).sum() + np.isfinite(l1[at]).sum()
        assert b["spread"] == pytest.approx(abs(np.nanmean(l0[at]) - np.nanmean(l1[at])) / np.sqrt(2), rel=1e-9)
    assert two["sequences"] == 2 and two["mean_loss"] == pytest.approx(np.nanmean(np.r_[l0, l1]), rel=1e-12)
    assert two["collapse_point"] == collapse_point(two["buckets"], 0.3, 32)
    # a position no row has a label for stays out
    assert np.array_equal(position_mean(np.array([[1.0, np.nan, np.nan], [3.0, 5.0, np.nan]])), [2.0, 5.0, np.nan],
                          equal_nan=True)


def test_every_variant_reads_the_same_rows(monkeypatch):
    m, read = tiny(4), []
    real = run_module.per_token_loss
    monkeypatch.setattr(run_module, "per_token_loss", lambda model, x, y, chunk: read.append((x, y)) or real(
        model, x, y, chunk))
    decay = resolve(MitigationsConfig(decay_scale=0.5), m.config.n_layer, m.config.nheads)
    res = _length(m, sequences=2, variants={"as is": "as is", "decay": decay})
    assert [x.shape for x, _ in read] == [(1, 600)] * 4                 # each variant's two rows, one at a time
    for (x0, y0), (x1, y1) in zip(read[:2], read[2:]):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(read[0][0], read[1][0])
    assert res["as is"]["mean_loss"] != res["decay"]["mean_loss"]      # the variants ran as themselves


def test_eval_length_takes_sequences_and_refuses_what_it_does_not_know(tmp_path, capsys):
    from longctx.launch.cli import build_parser, main
    tiny(3).save_pretrained(tmp_path / "model")
    args = ["eval", "length", str(tmp_path / "model"), "--lengths", "300", "--buckets", "4", "--out",
            str(tmp_path / "len")]
    assert main(args + ["--sequences", "2"]) == 0
    res = json.loads((tmp_path / "len" / "loss_vs_position.json").read_text())
    assert res["sequences"] == 2 and all("spread" in b for b in res["buckets"])
    with pytest.raises(SystemExit):
        main(args + ["--rows", "2"])
    assert "unrecognized arguments: --rows" in capsys.readouterr().err
    assert main(args + ["--sequences", "0"]) == 1 and "--sequences must be >= 1" in capsys.readouterr().err
    assert main(["eval", "states", *args[2:], "--sequences", "2"]) == 1
    assert "--sequences names the rows loss against position averages; states has none" in capsys.readouterr().err
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["eval"]
    assert "--sequences N" in sub.format_help()


def test_state_norms_match_a_direct_reading():
    m = tiny(2)
    x = torch.randint(0, 257, (1, 500))
    res = evaluate_states(m, x, points=8, train_length=128)
    pos = res["positions"][3]
    cache = m.init_cache(1)
    with torch.no_grad():
        m(x[:, :pos], cache=cache)
    direct = [lc.ssm[0].square().sum((-2, -1)).sqrt().numpy() for lc in cache.layers]
    assert np.allclose(np.asarray(res["norms"][3]), np.asarray(direct), rtol=1e-5)
    assert len(res["top_heads"]) == 5 and all(len(h["top_channels"]) == 5 for h in res["top_heads"])


def test_eval_cli_on_a_mamba_ssm_directory_with_compare(tmp_path, capsys):
    from tests.shared import longctx_here
    tiny(3).save_pretrained(tmp_path / "model")
    r = longctx_here(capsys, "eval", "passkey", tmp_path / "model", "--lengths", "256,512", "--depths", "0,1",
                     "--samples", "2", "--out", tmp_path / "pk", "--compare", "--mitigations", "decay_scale=0.9",
                     "state_norm.every=64", "state_norm.multiplier=0.5", "--calibration-length", "256")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert set(res["variants"]) == {"without", "with mitigations"}
    assert (tmp_path / "pk" / "passkey.png").exists() and "| 512 |" in r.stdout
    for kind, name in (("length", "loss_vs_position"), ("states", "state_stats")):
        r = longctx_here(capsys, "eval", kind, tmp_path / "model", "--lengths", "2048", "--out", tmp_path / kind)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (tmp_path / kind / f"{name}.json").exists() and (tmp_path / kind / f"{name}.png").exists()


MEMORY_PROBE = """
import resource, sys, torch
from longctx.data.tokenizer import ByteTokenizer
from longctx.pipeline.evaluate.passkey import evaluate_passkey
from longctx.pipeline.model import Mamba2Config, Mamba2LM
torch.manual_seed(0)
m = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=257, d_state=16, headdim=16, chunk_size=64)).eval()
res = evaluate_passkey(m, ByteTokenizer(), [int(sys.argv[1])], [0.5], samples=1, prefill_chunk=2048)
assert len(res["outputs"]) == 1
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_eval_refuses_to_decode_a_non_byte_vocabulary_as_bytes(tmp_path):
    Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=400, d_state=16, headdim=16)).save_pretrained(
        tmp_path / "model")
    r = subprocess.run([sys.executable, "-m", "longctx", "eval", "passkey", str(tmp_path / "model"), "--lengths",
                        "256", "--out", str(tmp_path / "pk")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "vocabulary (400 ids) is not the byte vocabulary (257)" in r.stderr and "--tokenizer" in r.stderr
    assert not (tmp_path / "pk").exists()


def test_decoding_memory_does_not_grow_with_the_context():
    """Peak RSS of a whole passkey evaluation at 64K tokens within 1.3x of the same at 4K."""
    peak = {}
    for L in (4096, 65536):
        r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(L)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        peak[L] = int(r.stdout.split()[-1])
    assert peak[65536] <= 1.3 * peak[4096], peak


@pytest.mark.slow          # a few minutes of training; the demo's slow test checks retrieval end to end too
def test_a_tiny_model_trained_here_retrieves_passkeys_well_above_chance():
    """Trained on the passkey task at 192 tokens for a few hundred steps; chance is 1e-5."""
    import random
    torch.manual_seed(0)
    rng, tok, L = random.Random(0), ByteTokenizer(), 192
    model = Mamba2LM(Mamba2Config(d_model=64, n_layer=2, vocab_size=257, d_state=32, headdim=32, chunk_size=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(900):
        keys = [str(rng.randint(10000, 99999)) for _ in range(16)]
        x = torch.as_tensor(np.stack([np.concatenate([build_prompt(tok, L, rng.random(), k), tok.encode(f" {k}.")])
                                      for k in keys]))
        target = x[:, 1:].clone()
        target[:, :L - 1] = -100                          # learn the answer only
        loss = F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    res = evaluate_passkey(model.eval(), tok, [L], [0.0, 0.5, 1.0], samples=10, seed=123)
    assert res["mean_accuracy"] >= 0.3, res["mean_accuracy"]


def test_report_opens_with_a_table_per_length_for_each_variant(tmp_path):
    """report.md's first table: per evaluated length, passkey and loss for each variant, the training length
    marked; and the passkey heatmap is written with labelled cells."""
    from longctx.pipeline.evaluate.plots import passkey_heatmaps
    from longctx.pipeline.training.report import write_report
    run = tmp_path / "run"
    ev = run / "eval" / "step_0000010"
    ev.mkdir(parents=True)
    lengths = [256, 1024, 8192]

    def pk(accs):
        return {"lengths": lengths, "depths": [0.0, 1.0], "mean_accuracy": sum(accs) / 3,
                "accuracy": {str(L): {"0.0": a, "1.0": a} for L, a in zip(lengths, accs)},
                "per_length": {str(L): a for L, a in zip(lengths, accs)}}
    variants = {"as trained": pk([1.0, 0.95, 0.1]), "with mitigations": pk([0.5, 0.4, 0.3])}
    (ev / "passkey.json").write_text(json.dumps({"variants": variants}))
    buckets = [{"start": 0, "end": 300, "mean_loss": 0.5}, {"start": 300, "end": 2000, "mean_loss": 0.2},
               {"start": 2000, "end": 8192, "mean_loss": 0.9}]
    (ev / "loss_vs_position.json").write_text(json.dumps({"variants": {
        "as trained": {"buckets": buckets}, "with mitigations": {"buckets": buckets[:2]}}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "stage": 0, "stage_name": "s", "seq_len": 1024,
                                                   "loss": 1.0, "tokens": 100, "tokens_per_s": 50.0,
                                                   "passkey_accuracy": 0.68, "eval_seconds": 1.0}) + "\n")
    text = write_report(run, "plan").read_text()
    first = text.split("## Stages")[0]
    assert "| 1,024 (trained) | 0.95 | 0.40 | 0.200 | 0.200 |" in first
    assert "| 8,192 (8×) | 0.10 | 0.30 | 0.900 | - |" in first
    assert "| 256 | 1.00 | 0.50 | 0.500 | 0.500 |" in first
    assert "Continued from" not in first
    assert "Continued from `models/base` (model.from_pretrained)" in write_report(run, "plan", "models/base").read_text()
    passkey_heatmaps(variants, tmp_path / "p.png", train_length=1024)
    assert (tmp_path / "p.png").stat().st_size > 0


def test_an_evaluation_without_figures_writes_its_numbers_and_leaves_no_earlier_figure_beside_them(tmp_path):
    """eval.figures false (a checkpoint's evaluation in a run that draws them only at the end): the JSON is
    written, and a PNG an earlier attempt drew at the same step is removed, not left beside the new numbers."""
    model, tok = tiny(3), ByteTokenizer()
    run_eval("passkey", model, tok, tmp_path, lengths=[256], depths=[0.5], samples=1)
    assert (tmp_path / "passkey.png").stat().st_size > 0
    before = (tmp_path / "passkey.json").stat().st_mtime_ns
    run_eval("passkey", model, tok, tmp_path, lengths=[256], depths=[0.5], samples=1, figures=False)
    assert not (tmp_path / "passkey.png").exists()
    assert (tmp_path / "passkey.json").stat().st_mtime_ns >= before and json.loads((tmp_path / "passkey.json")
                                                                                .read_text())["outputs"]
