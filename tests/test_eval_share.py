"""Evaluation split over ranks (evaluate/share.py): 2 gloo ranks give exactly one process's results, and
`longctx run --plan` prices each checkpoint's evaluation against the training between checkpoints."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.data.tokenizer import ByteTokenizer
from longctx.pipeline.evaluate import passkey as passkey_module
from longctx.pipeline.evaluate.passkey import prompt_batches
from longctx.pipeline.evaluate.run import run_eval
from longctx.pipeline.evaluate.share import EVERYTHING, RankShare, from_distributed
from longctx.pipeline.mitigations import MitigationsConfig, resolve
from longctx.pipeline.model import Mamba2Config, Mamba2LM
from tests.shared import longctx_here

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(300)


def _model():
    torch.manual_seed(0)
    return Mamba2LM(Mamba2Config(d_model=64, n_layer=2, vocab_size=257, d_state=16, headdim=32, chunk_size=32)).eval()


def _evaluate(share, stop_checks=None):
    """Passkey (5 batches: more than the ranks, not a multiple of them), loss-vs-position with two variants of
    3 rows each, state norms: everything a checkpoint's evaluation runs."""
    tok, model = ByteTokenizer(), _model()
    layers = resolve(MitigationsConfig(decay_scale=0.9), model.config.n_layer, model.config.nheads)

    def between():
        if stop_checks is not None:             # a collective, as the trainer's stop check is
            t = torch.ones(1)
            dist.all_reduce(t)
            stop_checks.append(float(t))
    common = dict(write=False, seed=3, prefill_chunk=64, share=share)
    passkey = run_eval("passkey", model, tok, "unused", lengths=[200, 300], depths=[0.0, 0.5, 1.0], samples=6,
                       should_stop=between, variants={"as trained": "as is", "mitigated": layers}, **common)
    length = run_eval("length", model, tok, "unused", lengths=[256], buckets=4, train_length=64, sequences=3,
                      variants={"as trained": "as is", "mitigated": layers}, **common)
    states = run_eval("states", model, tok, "unused", lengths=[256], **common)
    return {"passkey": passkey, "length": length, "states": {k: {"norms": v["norms"]} for k, v in states.items()}}


def _rank(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        checks, decoded = [], []
        real = passkey_module._decode_batch
        passkey_module._decode_batch = lambda *a, **k: decoded.append(1) or real(*a, **k)
        result = _evaluate(from_distributed(dist, zero_stage=1), checks)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"result": result, "stop_checks": len(checks), "batches": len(decoded)}, f, default=float)
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_evaluation_and_equal_one_process(tmp_path):
    # one thread, as each rank: with two, some kernels split their sums otherwise (float32 norms differ in the
    # last bits on some CPUs), which is the thread count's doing, not the sharing's
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = json.loads(json.dumps(_evaluate(EVERYTHING), default=float))
    finally:
        torch.set_num_threads(threads)
    mp.start_processes(_rank, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["result"] == one          # every rank holds every result, equal to one process's
    # the stop check ran the same number of times on both ranks (else the collective would hang)
    assert ranks[0]["stop_checks"] == ranks[1]["stop_checks"] > 0
    # each rank decoded its share of the passkey batches: 2 variants x 5 batches, split 5 / 5
    assert [r["batches"] for r in ranks] == [5, 5]


def test_the_round_robin_hands_each_item_to_one_rank_and_moves_on():
    shares = [RankShare(r, 3, None) for r in range(3)]
    for items in (1, 4, 7):
        owned = sorted(i for s in shares for i in s.mine(items))
        assert owned == list(range(items))
        assert all(s.rounds(items) == shares[0].rounds(items) for s in shares)
        by_round = sorted(s.item(k) for s in shares for k in range(s.rounds(items)) if 0 <= s.item(k) < items)
        assert by_round == list(range(items))
        for s in shares:                   # what gather does after a kind: the next kind starts further on
            s.offset = (s.offset + items) % s.world
    # after 1 + 4 + 7 = 12 items the next item goes to rank 0 again; after 1 item, to rank 1
    assert [s.owner(0) for s in shares] == [0, 0, 0]
    assert RankShare(0, 3, None, offset=1).owner(0) == 1


def test_prompt_batches_put_long_prompts_alone_and_keep_short_ones_together():
    cases = [(L, 0.0, "k") for L in (1000, 1000, 1000, 40000, 40000, 100000)]
    assert [len(b) for b in prompt_batches(cases, batch_size=8, batch_tokens=65536)] == [4, 1, 1]
    assert [len(b) for b in prompt_batches(cases, batch_size=2, batch_tokens=65536)] == [2, 2, 1, 1]


def _plan(capsys, *overrides, config="configs/demo-from-scratch.yaml"):
    r = longctx_here(capsys, "run", config, "--plan", *overrides, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_plan_prices_the_evaluation_and_warns_above_ten_percent(capsys):
    quiet = _plan(capsys, "eval.passkey_lengths=[256,1024]", "eval.length_max=1024")
    assert "evaluation per checkpoint" in quiet and "warning" not in quiet
    # the demo from scratch evaluates to 8x its length at each stage's end: its point, and priced as such
    assert "warning: stage 'short'" in _plan(capsys)
    loud = _plan(capsys, "checkpoint.every_steps=10", "eval.passkey_lengths=[4096]", "eval.passkey_samples=8")
    assert "warning: stage 'short'" in loud and "checkpoint.every_steps" in loud


def test_the_runs_last_evaluation_is_priced_once_against_the_whole_run(capsys):
    """The demo glances at each stage's end and evaluates thoroughly once, at the end (eval.final)."""
    demo = _plan(capsys, config="configs/demo.yaml")
    assert "warning" not in demo, demo
    assert "stage long: its only checkpoint is the run's last (below)" in demo
    final = re.search(r"the run's last checkpoint \(eval.final\): evaluation ([\d,]+) tokens per rank, once: "
                      r"[\d.]+% of the run's ([\d,]+) training tokens per rank", demo)
    assert final, demo
    # stage mid's checkpoint is priced with the light settings, the last with eval.final's
    light = int(re.search(r"stage mid: evaluation ([\d,]+) tokens", demo).group(1).replace(",", ""))
    assert int(final.group(1).replace(",", "")) > 20 * light


@pytest.mark.parametrize("recipe,nproc", [("configs/mamba2-370m-256k.yaml", 64), ("configs/mamba2-130m-256k.yaml", 32)])
def test_shipped_recipes_evaluate_within_the_budget(recipe, nproc, capsys):
    r = longctx_here(capsys, "run", recipe, "--plan", "--nproc", nproc, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "evaluation per checkpoint" in r.stdout and "warning" not in r.stdout, r.stdout
