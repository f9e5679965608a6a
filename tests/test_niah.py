"""RULER-style needle-in-a-haystack evaluation (pipeline/evaluate/niah.py): prompts of exactly the asked length
for bytes and BPE, the needles where they are said to be and the answers right by construction, the scoring on
known answers, and the evaluation through the CLI, a checkpoint's Evaluator and two ranks."""
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.data.tokenizer import ByteTokenizer, HFTokenizer
from longctx.pipeline.config import DEFAULT_EVAL_KINDS, EVAL_KINDS, NIAH_TASKS, ConfigError, final_eval
from longctx.pipeline.evaluate import haystack as hs
from longctx.pipeline.evaluate import niah
from longctx.pipeline.evaluate.niah import (
    TASKS,
    build_prompt,
    case_plan,
    check_prompts,
    depths,
    evaluate_niah,
    new_tokens,
    string_match_all,
)
from longctx.pipeline.evaluate.share import EVERYTHING, from_distributed
from longctx.pipeline.model import Mamba2Config, Mamba2LM

pytestmark = pytest.mark.timeout(300)

NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\. ")
VAR = re.compile(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\. ")


def tiny(seed=0):
    torch.manual_seed(seed)
    return Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=257, d_state=16, headdim=16, chunk_size=16)).eval()


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE learned on niah's own text, so that its merges cross the segment boundaries."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    rng = random.Random(0)
    text = ["".join(hs.NOISE_UNITS) * 5] + [hs.sentence(rng) for _ in range(200)]
    text += [case_plan(t, 4096, 0.5, 0, i).tail for t in TASKS for i in range(3)]
    text += [TASKS["multikey_3"].needle(hs.uuid_string(rng), hs.uuid_string(rng)) for _ in range(20)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text * 3, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(str(path))


def _tok(which, bpe):
    return ByteTokenizer() if which == "byte" else bpe


def _fixed(tok, task, length, depth=0.5, seed=0, sample=0):
    """The tokens of a prompt's parts other than the haystack (instruction, needles, question), and its plan."""
    plan = case_plan(task, length, depth, seed, sample)
    return sum(len(tok.encode(t)) for t in [plan.head, plan.tail] + [n for n, _ in plan.needles]), plan


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["byte", "bpe"])
@pytest.mark.parametrize("task", list(TASKS))
def test_every_prompt_has_exactly_the_asked_length(which, task, bpe):
    tok = _tok(which, bpe)
    for length in (1000, 1537, 4096):
        for sample, depth in enumerate((0.0, 0.37, 1.0)):
            plan = case_plan(task, length, depth, 0, sample)
            ids = build_prompt(tok, task, length, depth, 0, sample).ids
            assert len(ids) == length and ids.dtype == np.int64
            text = tok.decode(ids)
            assert text.startswith(plan.head) and text.endswith(plan.tail)
            assert all(needle in text for needle, _ in plan.needles)
    # around the shortest prompt (its haystack 0, 1, 2... tokens): exact, or refused naming the task and the
    # tokens it needs; with no haystack at all the prompt is the instruction, the needles and the question
    smallest, edge = _fixed(tok, task, 1000)[0], set()
    for length in range(smallest - 15, smallest + 15):
        fixed, plan = _fixed(tok, task, length)
        edge.add(fixed <= length)
        if fixed > length:
            with pytest.raises(ValueError, match=f"niah task {task}: length {length} is too short: .* at least "
                                                 f"{fixed} tokens"):
                build_prompt(tok, task, length, 0.5)
            continue
        ids = build_prompt(tok, task, length, 0.5).ids
        assert len(ids) == length
        if fixed == length:
            assert tok.decode(ids) == plan.head + "".join(n for n, _ in plan.needles) + plan.tail
    assert edge == {True, False}


def test_too_short_lengths_fail_in_the_startup_check_without_building_a_haystack():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"niah task multiquery: length 500 is too short: .* at least 6\d\d tokens"):
        check_prompts(tok, ["single_1", "multiquery"], [4096, 500], samples=2)
    check_prompts(tok, list(TASKS), [1024], samples=3)
    with pytest.raises(ValueError, match="unknown niah task 'needle': choose from single_1, single_2"):
        check_prompts(tok, ["needle"], [1024], samples=1)


def test_prompts_are_a_function_of_the_seed():
    tok = ByteTokenizer()
    for task in TASKS:
        a, b = build_prompt(tok, task, 2048, 0.5, 7, 1), build_prompt(tok, task, 2048, 0.5, 7, 1)
        assert np.array_equal(a.ids, b.ids) and a.expected == b.expected
        other_seed, other_sample = build_prompt(tok, task, 2048, 0.5, 8, 1), build_prompt(tok, task, 2048, 0.5, 7, 2)
        assert not set(other_seed.expected) & set(a.expected) and not set(other_sample.expected) & set(a.expected)
    # and the same in another process, whatever its hash seed (string hashing is salted per process)
    probe = ("from longctx.data.tokenizer import ByteTokenizer; from longctx.pipeline.evaluate.niah import build_prompt;"
             "import hashlib; print(hashlib.sha256(build_prompt(ByteTokenizer(), 'multikey_2', 3000, 0.25, 5, 0)"
             ".ids.tobytes()).hexdigest())")
    here = hashlib.sha256(build_prompt(tok, "multikey_2", 3000, 0.25, 5, 0).ids.tobytes()).hexdigest()
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == here


def _haystack_position(text: str, plan, needle: str) -> float:
    """Where `needle` lies in the haystack (bytes): haystack characters before it over all of them."""
    at = text.index(needle)
    others = sum(len(n) for n, _ in plan.needles if text.index(n) < at)
    haystack = len(text) - len(plan.head) - len(plan.tail) - sum(len(n) for n, _ in plan.needles)
    return (at - len(plan.head) - others) / haystack


@pytest.mark.parametrize("task", [t for t in TASKS if t != "vt"])
def test_the_answer_is_in_the_prompt_at_its_depth_and_right_by_construction(task):
    tok, spec = ByteTokenizer(), TASKS[task]
    for sample, depth in enumerate(depths(5)):
        p = build_prompt(tok, task, 4096, depth, 3, sample)
        plan = case_plan(task, 4096, depth, 3, sample)
        text = tok.decode(p.ids)
        query = re.search(r"\nWhat are all the special magic \w+ for (.*) mentioned in the provided text\?", text).group(1)
        asked = re.split(r", and |, ", query)
        assert len(asked) == spec.num_queries and p.expected == plan.expected
        needles = NEEDLE.findall(text)
        assert {kind for kind, _, _ in needles} == {spec.values}
        found = [(k, v) for _, k, v in needles if k in asked]
        # every value of every key asked for, in the order of the keys asked for, and no other needle has one
        assert sorted(v for _, v in found) == sorted(p.expected)
        per_key = spec.num_values
        assert [sorted(v for key, v in found if key == k) for k in asked] == [
            sorted(p.expected[i * per_key:(i + 1) * per_key]) for i in range(len(asked))]
        assert len(found) == spec.num_queries * spec.num_values
        if spec.haystack != "needles":
            assert len(needles) == spec.num_keys * spec.num_values      # the distractors and nothing else
        else:
            assert len(needles) > 20                                    # a haystack of distractors
        if spec.values == "uuids":
            assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
                       for v in p.expected)
        else:
            assert all(re.fullmatch(r"[1-9]\d{6}", v) for v in p.expected)
        # the needle asked for (its first value) lies at the depth, within a haystack unit
        first = spec.needle(asked[0], p.expected[0])
        assert abs(_haystack_position(text, plan, first) - depth) < 0.05, (depth, task)


def test_variable_tracking_chains_every_name_to_the_value():
    tok = ByteTokenizer()
    for sample, depth in enumerate(depths(4)):
        p = build_prompt(tok, "vt", 3000, depth, 1, sample)
        text = tok.decode(p.ids)
        value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
        statements = VAR.findall(text)
        assert len(statements) == 5 and statements[0] == (p.expected[0], value)
        bound = {}
        for name, source in statements:           # in text order: each hop copies one already assigned
            bound[name] = bound[source[4:]] if source.startswith("VAR ") else source
        assert [n for n, v in bound.items() if v == value] == p.expected and len(set(p.expected)) == 5
        assert f"{len(p.expected)} variables are assigned the value {value}" in text
        plan = case_plan("vt", 3000, depth, 1, sample)
        assert abs(_haystack_position(text, plan, plan.needles[0][0]) - depth) < 0.02
        positions = [text.index(n) for n, _ in plan.needles]
        assert positions == sorted(positions)


def test_string_match_all_on_hand_written_outputs():
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all(" 1234567, 7654321 and 11", ["1234567", "7654321", "1111111", "2222222"]) == 0.5
    assert string_match_all("nothing here", ["1234567"]) == 0.0
    assert string_match_all(" ABCDE-ff", ["abcde-FF"]) == 1.0          # case-insensitive, as RULER's
    assert string_match_all(" varx, VARY", ["VARX", "VARY", "VARZ"]) == pytest.approx(2 / 3)


class Reader(torch.nn.Module):
    """A test double with Mamba2LM's generate(): it answers from the prompt, as a perfect reader would (the
    values of the keys asked for; vt: the chain resolved), or only the first of them (`first_only`). Its answer
    is cut to max_new_tokens, so a budget too small for the answer shows as a lower score."""

    def __init__(self, tok, first_only=False):
        super().__init__()
        self.tok, self.first_only, self.w = tok, first_only, torch.nn.Parameter(torch.zeros(1))

    def answer(self, text: str) -> list:
        if "VAR " in text:
            value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
            bound = {}
            for name, source in VAR.findall(text):
                bound[name] = bound[source[4:]] if source.startswith("VAR ") else source
            return [n for n, v in bound.items() if v == value]
        query = re.search(r"\nWhat are all the special magic \w+ for (.*) mentioned in the provided text\?", text).group(1)
        values = {}
        for _, k, v in NEEDLE.findall(text):
            values.setdefault(k, []).append(v)
        return [v for k in re.split(r", and |, ", query) for v in values[k]]

    def generate(self, ids, max_new_tokens, chunk_len=4096, eos_id=None):
        rows = []
        for row in ids.tolist():
            found = self.answer(self.tok.decode(row))
            found = found[:1] if self.first_only else found
            text = " " + (found[0] if len(found) == 1 else ", ".join(found[:-1]) + ", and " + found[-1]) + "."
            rows.append([int(i) for i in self.tok.encode(text)][:max_new_tokens])
        width = max(map(len, rows))       # rows padded with end-of-text, which decodes to nothing
        return torch.tensor([r + [self.tok.eos_id] * (width - len(r)) for r in rows])


def test_scoring_is_the_mean_fraction_of_expected_strings_found():
    tok, lengths = ByteTokenizer(), [800, 1000]
    good = evaluate_niah(Reader(tok), tok, list(TASKS), lengths, samples=2)
    assert good["mean_accuracy"] == 1.0 and all(p["correct"] and p["score"] == 1.0 for p in good["prompts"])
    part = evaluate_niah(Reader(tok, first_only=True), tok, list(TASKS), lengths, samples=2)
    share = {t: 1 / (TASKS[t].num_queries * TASKS[t].num_values) if t != "vt" else 1 / 5 for t in TASKS}
    for t in TASKS:
        assert part["per_task"][t] == {str(L): pytest.approx(share[t]) for L in lengths}
        assert all(p["correct"] == (share[t] == 1.0) for p in part["prompts"] if p["task"] == t)
    assert part["mean_accuracy"] == pytest.approx(np.mean(list(share.values())))
    assert part["per_depth"]["multivalue"]["800"] == {"0.0": 0.25, "1.0": 0.25}
    assert "string_match_all" in part["scoring"]
    # answers are decoded within their budget (the whole answer fits, for every task)
    assert all(len(tok.encode(p["output"])) <= new_tokens(p["task"]) for p in good["prompts"])


def test_evaluate_niah_on_a_real_model_records_every_prompt():
    tok, model = ByteTokenizer(), tiny().train()
    res = evaluate_niah(model, tok, ["single_1", "vt"], [450, 520], samples=2, prefill_chunk=128)
    assert set(res) >= {"tasks", "lengths", "depths", "samples", "seed", "scoring", "per_task", "per_depth",
                        "per_length", "mean_accuracy", "prompts"}
    assert res["depths"] == [0.0, 1.0] and len(res["prompts"]) == 8
    for p in res["prompts"]:
        assert set(p) == {"task", "length", "depth", "prompt_tokens", "expected", "output", "score", "correct"}
        assert p["prompt_tokens"] == p["length"] and 0 <= p["score"] <= 1
    # a prefill chunk of another size reads the same prompts: the same outputs
    again = evaluate_niah(model, tok, ["single_1", "vt"], [450, 520], samples=2, prefill_chunk=4096)
    assert [p["output"] for p in again["prompts"]] == [p["output"] for p in res["prompts"]]
    assert model.training                       # put back as it was


def test_eval_niah_cli_writes_json_table_and_heatmaps_with_variants(tmp_path, capsys):
    from tests.shared import longctx_here
    tiny(3).save_pretrained(tmp_path / "model")
    out = tmp_path / "niah"
    r = longctx_here(capsys, "eval", "niah", tmp_path / "model", "--tasks", "single_1,vt", "--lengths", "450,500",
                     "--samples", "2", "--out", out, "--prefill-chunk", "256", "--variants", "as is=",
                     "decay=decay_scale=0.9")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "niah.json").read_text())["variants"]
    assert list(res) == ["as is", "decay"]
    for v in res.values():
        assert set(v["per_task"]) == {"single_1", "vt"} and set(v["per_task"]["vt"]) == {"450", "500"}
        assert len(v["prompts"]) == 8
    # the same prompts for both variants
    assert [p["expected"] for p in res["as is"]["prompts"]] == [p["expected"] for p in res["decay"]["prompts"]]
    table = (out / "table.md").read_text()
    assert table.startswith("| task | length | as is | decay |") and "| vt | 500 |" in table
    assert (out / "niah_single_1.png").stat().st_size > 0 and (out / "niah_vt.png").stat().st_size > 0
    # one model: niah.json is its result, table.md is task x length
    r = longctx_here(capsys, "eval", "niah", tmp_path / "model", "--tasks", "single_1", "--lengths", "450",
                     "--samples", "1", "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "niah.json").read_text())
    assert one["per_task"]["single_1"]["450"] == one["prompts"][0]["score"] and one["depths"] == [0.5]
    assert (tmp_path / "one" / "table.md").read_text().splitlines()[:3] == [
        "| task | 450 |", "|---|---|", f"| single_1 | {one['per_task']['single_1']['450']:.2f} |"]
    assert "| task | 450 |" in r.stdout


@pytest.mark.parametrize("argv,message", [
    (["niah", "CKPT", "--depths", "0,1"], "niah spreads its needle depths evenly over --samples"),
    (["passkey", "CKPT", "--tasks", "vt"], "--tasks names niah's tasks; passkey has none"),
    (["niah", "CKPT", "--tasks", "single_1,needle"], "unknown niah task 'needle': choose from single_1"),
])
def test_eval_niah_refuses_what_it_cannot_do_before_loading(argv, message, capsys):
    from longctx.launch.cli import main
    assert main(["eval", *argv]) == 1
    assert message in capsys.readouterr().err


ONE_STAGE = """
    - {name: a, seq_len: 64, steps: 2, global_batch_tokens: 128}"""


def _config(tmp_path, extra):
    from tests.test_trainer_parts import _config as config  # the same small model and shards
    return config(tmp_path, extra, stages=ONE_STAGE)


def test_config_niah_keys_their_checks_and_eval_final(tmp_path):
    assert EVAL_KINDS.index("niah") == EVAL_KINDS.index("passkey") + 1 and tuple(TASKS) == NIAH_TASKS
    cfg = _config(tmp_path, "")
    assert cfg.eval.kinds == list(DEFAULT_EVAL_KINDS) == ["heldout", "passkey", "length", "states"]
    assert (cfg.eval.niah_tasks, cfg.eval.niah_lengths, cfg.eval.niah_samples) == (
        ["single_1", "multikey_1", "multivalue", "multiquery", "vt"], [1024, 4096], 2)
    final = final_eval(_config(tmp_path, "eval: {kinds: [niah], final: {niah_tasks: [vt], niah_samples: 5}}").eval)
    assert (final.niah_tasks, final.niah_samples, final.kinds) == (["vt"], 5, ["niah"])
    for extra, match in [
        ("eval: {niah_tasks: [single_1, needle]}", r"eval.niah_tasks: unknown task 'needle': choose from single_1, "),
        ("eval: {final: {niah_tasks: [multikey_9]}}", r"\(eval.final on top of eval\): eval.niah_tasks: unknown task "
                                                      r"'multikey_9'"),
        ("eval: {niah_samples: 0}", r"eval.niah_samples: must be >= 1"),
        ("eval: {kinds: [niah], niah_lengths: []}", r"eval.niah_lengths: is empty while eval.kinds has niah"),
        ("eval: {niah_lengths: [0]}", r"eval.niah_lengths: 0 is not a prompt length"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _config(tmp_path, extra)


def test_trainer_startup_check_refuses_a_niah_length_too_short(tmp_path):
    from longctx.pipeline.training.trainer import check_passkey_prompts
    tok = ByteTokenizer()
    check_passkey_prompts(_config(tmp_path, "eval: {niah_lengths: [300]}"), tok, "c.yaml")   # niah not asked for
    with pytest.raises(ConfigError, match=r"c.yaml: eval.final.niah_lengths: niah task \w+: length 300 is too short"):
        check_passkey_prompts(_config(tmp_path, "eval: {kinds: [niah], niah_tasks: [single_1, vt], niah_lengths: "
                                                "[4096], final: {niah_lengths: [300]}}"), tok, "c.yaml")


class Scalars:
    """What the Evaluator hands TensorBoard, recorded."""

    def __init__(self):
        self.scalars, self.images = {}, []

    def scalar(self, tag, value, step):
        self.scalars[tag] = value

    def image(self, tag, png, step):
        self.images.append((tag, png.name))


def test_evaluator_runs_niah_at_a_checkpoint(tmp_path):
    from longctx.pipeline.training.curriculum import plan
    from longctx.pipeline.training.eval_budget import eval_tokens
    from longctx.pipeline.training.evaluator import Evaluator
    from longctx.pipeline.training.stage_mitigations import StageMitigations
    cfg = _config(tmp_path, "eval: {kinds: [niah], niah_tasks: [single_1, vt], niah_lengths: [450], niah_samples: 2,"
                            " variants: {decay: {decay_scale: 0.9}}}")
    model = tiny().train()
    mit = StageMitigations(cfg, model, lambda n: torch.randint(0, 256, (1, n)))
    ev = Evaluator(cfg, model, ByteTokenizer(), None, mit, lambda batch: None, torch.device("cpu"), write=True)
    record, metrics = {}, Scalars()
    stage = plan(cfg, 1, 16)[0]
    ev.evaluate(stage, 5, record, metrics)
    out = tmp_path / "run" / "eval" / "step_0000005"
    res = json.loads((out / "niah.json").read_text())["variants"]
    assert record["niah_accuracy"] == res["as trained"]["mean_accuracy"]
    assert record["niah_accuracy_variants"] == {"decay": res["decay"]["mean_accuracy"]}
    assert {"eval/niah_single_1_450", "eval/niah_vt_450", "eval/niah_decay_vt_450"} <= set(metrics.scalars)
    assert metrics.scalars["eval/niah_vt_450"] == res["as trained"]["per_task"]["vt"]["450"]
    assert {"niah.json", "table.md", "niah_single_1.png", "niah_vt.png"} <= {f.name for f in out.iterdir()}
    assert [t for t, _ in metrics.images] == ["eval/niah_single_1", "eval/niah_vt"]
    assert "passkey_accuracy" not in record and model.training
    # priced as run: per prompt its tokens and its answer's, for each variant (as trained and decay)
    assert eval_tokens(cfg, stage, 1) == 2 * 2 * (450 + new_tokens("single_1") + 450 + new_tokens("vt"))


def _rank(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        decoded, real = [], niah._decode_batch
        niah._decode_batch = lambda *a, **k: decoded.append(1) or real(*a, **k)
        res = evaluate_niah(tiny(), ByteTokenizer(), ["single_1", "vt"], [450, 500], samples=3, seed=4,
                            prefill_chunk=128, batch_size=2, share=from_distributed(dist, zero_stage=1))
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"result": res, "batches": len(decoded)}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_prompts_and_equal_one_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)         # as each rank: the thread count can change float sums' last bits
    try:
        one = evaluate_niah(tiny(), ByteTokenizer(), ["single_1", "vt"], [450, 500], samples=3, seed=4,
                            prefill_chunk=128, batch_size=2, share=EVERYTHING)
    finally:
        torch.set_num_threads(threads)
    mp.start_processes(_rank, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["result"] == json.loads(json.dumps(one))      # every rank holds every prompt, as one process
    assert [r["batches"] for r in ranks] == [3, 3]              # 12 prompts in 6 batches of 2, shared
