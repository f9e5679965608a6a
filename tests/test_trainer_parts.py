"""The trainer's parts in-process, each with what it is handed (an engine that writes a file per
rank's share, a real tiny model): the checkpointer, the stage's mitigations, the evaluator."""
import json

import pytest
import torch

from longctx.data.tokenizer import ByteTokenizer
from longctx.pipeline.config import ConfigError, load_config
from longctx.pipeline.model import Mamba2Config, Mamba2LM
from longctx.pipeline.training.checkpoint import Checkpointer
from longctx.pipeline.training.curriculum import plan
from longctx.pipeline.training.evaluator import Evaluator
from longctx.pipeline.training.metrics import MetricsLogger
from longctx.pipeline.training.stage_mitigations import StageMitigations

MODEL = Mamba2Config(d_model=32, n_layer=2, vocab_size=257, d_state=16, headdim=16, chunk_size=16)


class FileEngine:
    """Saves like a DeepSpeed engine of one rank: its files under root/tag, the client state inside."""

    def __init__(self):
        self.loaded = []

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = f"{root}/{tag}"
        import os
        os.makedirs(d, exist_ok=True)
        torch.save(client_state, f"{d}/mp_rank_00_model_states.pt")

    def load_checkpoint(self, root, tag, load_optimizer_states, load_lr_scheduler_states):
        self.loaded.append(tag)
        return f"{root}/{tag}", torch.load(f"{root}/{tag}/mp_rank_00_model_states.pt", weights_only=False)


TWO_STAGES = """
    - {name: a, seq_len: 64, steps: 2, global_batch_tokens: 128}
    - {name: b, seq_len: 128, steps: 2, global_batch_tokens: 128, mitigations: {state_norm: {every: 32}}}"""


def _config(tmp_path, extra="", stages=TWO_STAGES):
    path = tmp_path / "c.yaml"
    path.write_text(f"""
run: {{dir: {tmp_path / 'run'}}}
model: {{d_model: 32, n_layer: 2, vocab_size: 257, d_state: 16, headdim: 16, chunk_size: 16}}
data: {{shards: {tmp_path / 'mds'}}}
curriculum:
  stages:{stages}
{extra}""")
    return load_config(str(path))


def test_checkpointer_saves_prunes_finds_and_loads(tmp_path):
    engine = FileEngine()
    ck = Checkpointer(engine, tmp_path / "checkpoints", is_rank0=True, barrier=lambda: None, keep_last=2,
                      model_config=MODEL, tokenizer_identity={"kind": "byte", "eos_id": 256})
    assert ck.to_resume("auto") is None
    for step in (2, 4, 6):
        ck.save(step, {"step": step})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000004", "step_0000006"]
    root, tag = ck.to_resume("auto")
    assert tag == "step_0000006" and ck.load(root, tag) == {"step": 6}
    d = tmp_path / "checkpoints" / "step_0000006"
    assert json.loads((d / "model_config.json").read_text())["d_model"] == 32
    assert json.loads((d / "trainer_state.json").read_text()) == {"step": 6}
    assert ck.to_resume("never") is None
    assert ck.to_resume(str(tmp_path / "checkpoints" / "step_0000004")) == (tmp_path / "checkpoints", "step_0000004")
    with pytest.raises(ConfigError, match="run.resume: .* is not a checkpoint directory"):
        ck.to_resume(str(tmp_path / "nowhere"))


def test_stage_mitigations_calibrate_once_and_survive_a_checkpoint(tmp_path):
    cfg = _config(tmp_path)
    torch.manual_seed(0)
    model = Mamba2LM(MODEL)
    prompts = []

    def prompt(seq_len):
        prompts.append(seq_len)
        return torch.randint(0, 256, (1, seq_len))

    mit = StageMitigations(cfg, model, prompt)
    plans = plan(cfg, 1, MODEL.chunk_size)
    assert mit.of(plans[0]) is None                                  # stage a: nothing configured
    layers = mit.of(plans[1])
    assert prompts == [128] and len(layers) == 2                      # calibrated at the stage's length, once
    assert all(m.state_norm_every == 32 and len(m.state_norm_threshold) == MODEL.nheads for m in layers)
    assert mit.of(plans[1]) is layers and prompts == [128]
    again = StageMitigations(cfg, model, prompt)
    again.load_state_dict(json.loads(json.dumps(mit.state_dict())))   # through trainer_state.json
    assert again.of(plans[1]) == layers and prompts == [128]          # the resumed run does not recalibrate


def test_evaluator_runs_the_configured_kinds_and_writes_them(tmp_path):
    cfg = _config(tmp_path, "eval: {kinds: [states, passkey, length], passkey_lengths: [256], passkey_samples: 1, "
                            "passkey_depths: [0.5], length_max: 256, length_buckets: 4, length_sequences: 2}")
    torch.manual_seed(0)
    model = Mamba2LM(MODEL).train()
    mit = StageMitigations(cfg, model, lambda n: torch.randint(0, 256, (1, n)))
    ev = Evaluator(cfg, model, ByteTokenizer(), None, mit, lambda batch: None, torch.device("cpu"), write=True)
    record = {}
    p = plan(cfg, 1, MODEL.chunk_size)[0]
    ev.evaluate(p, 5, record, MetricsLogger(tmp_path / "run", active=False))
    out = tmp_path / "run" / "eval" / "step_0000005"
    assert {"passkey_accuracy", "collapse_point", "max_state_norm", "eval_seconds"} <= set(record)
    assert "eval_loss" not in record                                   # heldout was not asked for
    assert {"passkey.json", "loss_vs_position.json", "state_stats.json"} <= {f.name for f in out.iterdir()}
    assert json.loads((out / "loss_vs_position.json").read_text())["sequences"] == 2
    assert model.training and model.sequence_parallel is None


def test_the_plan_prices_each_row_of_the_loss_against_position(tmp_path):
    """eval.length_sequences rows of eval.length_max tokens per variant, handed out over the ranks one by one."""
    from longctx.pipeline.training.eval_budget import eval_tokens
    cfg = _config(tmp_path, "eval: {kinds: [length], length_max: 1000, length_sequences: 3, "
                            "variants: {decay: {decay_scale: 0.9}}}")
    p = plan(cfg, 1, MODEL.chunk_size)[0]
    assert eval_tokens(cfg, p, 1) == 2 * 3 * 1000
    assert eval_tokens(cfg, p, 4) == 2 * 1000          # 6 rows over 4 ranks: the busiest reads 2
    cfg.eval.length_sequences = 1
    assert eval_tokens(cfg, p, 1) == 2 * 1000


def test_the_runs_last_checkpoint_is_evaluated_with_eval_final(tmp_path):
    cfg = _config(tmp_path, "eval: {kinds: [passkey], passkey_lengths: [256], passkey_samples: 1, passkey_depths: [0.5], "
                            "final: {passkey_lengths: [256, 512], passkey_samples: 3}}")
    model = Mamba2LM(MODEL).train()
    mit = StageMitigations(cfg, model, lambda n: torch.randint(0, 256, (1, n)))
    ev = Evaluator(cfg, model, ByteTokenizer(), None, mit, lambda batch: None, torch.device("cpu"), write=True)
    p = plan(cfg, 1, MODEL.chunk_size)[0]
    for step, final in ((5, False), (6, True), (7, False)):
        ev.evaluate(p, step, {}, MetricsLogger(tmp_path / "run", active=False), final=final)
    prompts = {step: json.loads((tmp_path / "run" / "eval" / f"step_000000{step}" / "passkey.json").read_text())
               for step in (5, 6, 7)}
    assert [(r["lengths"], r["samples"], len(r["outputs"])) for r in prompts.values()] == [
        ([256], 1, 1), ([256, 512], 3, 6), ([256], 1, 1)]


def test_registries_agree_with_the_config_and_the_command_line():
    """Each name the config or the CLI accepts is defined once, where it is looked up."""
    from longctx.launch.cli import build_parser
    from longctx.launch.render import TARGETS
    from longctx.pipeline.config import EVAL_KINDS
    from longctx.pipeline.evaluate.run import KINDS
    ev = Evaluator(None, None, None, None, None, None, None, write=False)
    assert tuple(ev.kinds) == EVAL_KINDS
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(next(a for a in sub["eval"]._actions if a.dest == "kind").choices) == set(KINDS)
    assert set(next(a for a in sub["launch"]._actions if a.dest == "target").choices) == set(TARGETS)


def _checkpointer(tmp_path, engine=None, keep_last=0):
    return Checkpointer(engine or FileEngine(), tmp_path / "checkpoints", is_rank0=True, barrier=lambda: None,
                        keep_last=keep_last, model_config=MODEL, tokenizer_identity={"kind": "byte", "eos_id": 256},
                        metrics_file=tmp_path / "metrics.jsonl")


def _saved(tmp_path, steps=(2, 4)):
    ck = _checkpointer(tmp_path)
    for step in steps:
        ck.save(step, {"step": step})
    return ck, tmp_path / "checkpoints"


@pytest.mark.parametrize("damage,reason", [
    ("truncate", r"step_0000004: mp_rank_00_model_states.pt is \d+ bytes, the marker says \d+"),
    ("delete", r"step_0000004: mp_rank_00_model_states.pt is missing"),
    ("no_marker", r"step_0000004: no COMPLETE.json \(the save did not finish\)"),
    ("torn_marker", r"step_0000004: COMPLETE.json is unreadable"),
    ("latest_missing", None),
    ("latest_garbage", r"latest names 'no such thing'"),
])
def test_resume_takes_the_newest_complete_checkpoint(tmp_path, capsys, damage, reason):
    ck, root = _saved(tmp_path)
    d = root / "step_0000004"
    shard = d / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "delete":
        shard.unlink()
    elif damage == "no_marker":
        (d / "COMPLETE.json").unlink()
    elif damage == "torn_marker":
        (d / "COMPLETE.json").write_text('{"files": {"mp_rank')
    elif damage == "latest_missing":
        (root / "latest").unlink()
    else:
        (root / "latest").write_text("no such thing")
    found = ck.to_resume("auto")
    warned = capsys.readouterr().out
    if damage.startswith("latest"):
        assert found == (root, "step_0000004")             # the newest complete one, found without `latest`
    else:
        assert found == (root, "step_0000002")
    if reason:
        import re
        assert re.search(reason, warned), warned
        assert "skipped" in warned


def test_no_complete_checkpoint_but_metrics_refuses_to_start_over(tmp_path):
    ck, root = _saved(tmp_path, steps=(2,))
    (root / "step_0000002" / "COMPLETE.json").unlink()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl .*2 steps.* no complete checkpoint.*run.resume=never"):
        ck.to_resume("auto")
    assert ck.to_resume("never") is None
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'         # never erased by the refusal


def test_failed_pruning_is_reported(tmp_path, capsys, monkeypatch):
    import shutil
    ck = _checkpointer(tmp_path, keep_last=1)
    ck.save(2, {"step": 2})

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(shutil, "rmtree", refuse)
    ck.save(4, {"step": 4})
    out = capsys.readouterr().out
    assert "could not remove old checkpoint" in out and "step_0000002" in out and "Permission denied" in out
    assert ck.to_resume("auto") == (tmp_path / "checkpoints", "step_0000004")


def _identity(tmp_path, *overrides, world=2):
    from longctx.pipeline.training.compatibility import run_identity
    cfg = _config(tmp_path, "eval: {passkey_lengths: [256]}")
    from longctx.pipeline.config import load_config as load
    cfg = load(str(tmp_path / "c.yaml"), ["curriculum.stages.0.global_batch_tokens=512",
                                          "curriculum.stages.1.global_batch_tokens=512", *overrides])
    from longctx.pipeline.config import model_config
    return run_identity(cfg, model_config(cfg), {"name": "byte", "sha256": "x"}, "60:abc", world,
                        plan(cfg, world, MODEL.chunk_size))


@pytest.mark.parametrize("overrides,world,match", [
    (["model.d_state=32", "model.headdim=16"], 2, r"model.d_state changed since the checkpoint \(it has 16, this run 32\)"),
    (["train.zero_stage=2"], 2, r"train.zero_stage changed .*it has 1, this run 2"),
    (["train.precision=bf16"], 2, r"train.precision changed"),
    ([], 4, r"the world size changed .*it has 2, this run 4.*ZeRO stage 1 partitions"),
    (["curriculum.stages.0.seq_len=32"], 2, r"curriculum.stages\[0\].seq_len changed .*it has 64, this run 32"),
    (["curriculum.stages.0.steps=3"], 2, r"curriculum.stages\[0\].steps changed .*the stage is finished"),
])
def test_resume_refuses_what_the_checkpoint_cannot_continue_under(tmp_path, overrides, world, match):
    from longctx.pipeline.training.compatibility import check_resume
    saved = _identity(tmp_path, "train.zero_stage=1")
    with pytest.raises(ConfigError, match=match):
        check_resume(saved, _identity(tmp_path, "train.zero_stage=1", *overrides, world=world), 3, "c.yaml")


def test_resume_allows_and_reports_other_changes(tmp_path):
    from longctx.pipeline.training.compatibility import check_resume
    saved = _identity(tmp_path)
    now = _identity(tmp_path, "eval.passkey_samples=7", "curriculum.stages.1.seq_len=256",
                    "curriculum.stages.1.global_batch_tokens=1024", "checkpoint.every_steps=5", world=4)
    notes = check_resume(saved, now, 2, "c.yaml")                        # stage b not started: free to change
    assert "eval.passkey_samples: 2 -> 7" in notes and "checkpoint.every_steps: 0 -> 5" in notes
    assert "curriculum.stages.1.seq_len: 128 -> 256" in notes and "world size 2 -> 4" in notes
    with pytest.raises(ConfigError, match=r"tokenizer changed"):
        check_resume(saved, {**saved, "tokenizer": {"name": "other"}}, 2, "c.yaml")
    with pytest.raises(ConfigError, match=r"the shards\) changed .*data re-prepared"):
        check_resume(saved, {**saved, "dataset": "60:def"}, 2, "c.yaml")


def test_a_checkpoint_older_than_a_model_field_resumes_with_its_default(tmp_path):
    """A checkpoint written before a field existed (attn_cfg.rotary_scaling, attn_layer_idx) does not record it; it
    was made with the default, so the run resumes under a newer longctx (it was refused as 'model.attn_cfg changed',
    the whole section compared) and only a value other than the default is refused, naming the field."""
    from longctx.pipeline.training.compatibility import check_resume
    saved = _identity(tmp_path)
    del saved["model"]["attn_cfg"]["rotary_scaling"], saved["model"]["attn_layer_idx"]
    assert check_resume(saved, _identity(tmp_path), 3, "c.yaml") == []
    with_rope = _identity(tmp_path, "model.attn_cfg.rotary_emb_dim=8")
    del with_rope["model"]["attn_cfg"]["rotary_scaling"]
    with pytest.raises(ConfigError, match=r"model.attn_cfg.rotary_scaling changed since the checkpoint "
                                          r"\(it has 1.0, this run 2.0\)"):
        check_resume(with_rope, _identity(tmp_path, "model.attn_cfg.rotary_emb_dim=8",
                                          "model.attn_cfg.rotary_scaling=2"), 3, "c.yaml")
    with pytest.raises(ConfigError, match=r"model.attn_cfg.num_heads changed .*it has 0, this run 2"):
        check_resume(_identity(tmp_path), _identity(tmp_path, "model.attn_cfg.num_heads=2"), 3, "c.yaml")


def _three_stage_identity(tmp_path, steps=(2, 2, 3)):
    from longctx.pipeline.config import model_config
    from longctx.pipeline.training.compatibility import run_identity
    cfg = _config(tmp_path, stages="".join(
        f"\n    - {{name: {name}, seq_len: {seq_len}, steps: {n}, global_batch_tokens: 512}}"
        for name, seq_len, n in zip("abc", (64, 128, 256), steps)))
    return run_identity(cfg, model_config(cfg), {"name": "byte", "sha256": "x"}, "60:abc", 2,
                        plan(cfg, 2, MODEL.chunk_size))


def test_a_checkpoint_in_any_stage_of_a_three_stage_run_resumes_under_the_same_config(tmp_path):
    """Every step of every stage, finished stages included (a checkpoint past the first stage was refused as if
    its finished stages' steps had changed)."""
    from longctx.pipeline.training.compatibility import check_resume
    saved = _three_stage_identity(tmp_path)
    assert [s["first_step"] for s in saved["stages"]] == [0, 2, 4]
    for step in range(1, 8):
        assert check_resume(saved, _three_stage_identity(tmp_path), step, "c.yaml") == []
    # the stage the checkpoint is in may not shrink below the steps it has done; a finished one may not change
    with pytest.raises(ConfigError, match=r"stages\[2\].steps changed .*it has 3, this run 1\): 2 of its steps"):
        check_resume(saved, _three_stage_identity(tmp_path, (2, 2, 1)), 6, "c.yaml")
    with pytest.raises(ConfigError, match=r"stages\[1\].steps changed .*the stage is finished"):
        check_resume(saved, _three_stage_identity(tmp_path, (2, 3, 3)), 5, "c.yaml")
    assert check_resume(saved, _three_stage_identity(tmp_path, (2, 2, 9)), 6, "c.yaml") == [
        "curriculum.stages.2.steps: 3 -> 9"]             # the current stage may grow


def test_never_starts_one_run_per_slurm_job_and_a_requeued_job_continues_it(monkeypatch):
    """The rendered job script passes its overrides again on every requeue: run.resume=never there would set the
    pre-empted run aside and start over at each one."""
    from longctx.pipeline.training.run_dir import resume_mode
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resume_mode("never") == "never" and resume_mode("auto") == "auto"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resume_mode("never") == "never"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert resume_mode("never") == "auto" and resume_mode("/x/step_0000004") == "/x/step_0000004"


def test_a_checkpoint_of_another_run_is_not_resumed_by_auto(tmp_path):
    from longctx.pipeline.training.run_dir import check_run_id, recorded_run_id, set_aside, start_run
    run = tmp_path / "run"
    assert set_aside(run) is None and recorded_run_id(run) is None
    mine = start_run(run)
    ckpt = run / "checkpoints" / "step_0000004"
    check_run_id(run, ckpt, mine, "auto")
    check_run_id(run, ckpt, None, "auto")                 # written by an older longctx: no id to compare
    with pytest.raises(ConfigError, match=rf"written by run other, but .*run.json says this directory holds run "
                                          rf"{mine}: it is another run's checkpoint. Give it as run.resume="):
        check_run_id(run, ckpt, "other", "auto")
    check_run_id(run, ckpt, "other", str(ckpt))           # named by path: the user's choice
    ckpt.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "cache").mkdir()
    moved = set_aside(run)
    assert moved.parent == run / "previous" and moved.name.endswith(f"-{mine}")
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoints", "metrics.jsonl", "run.json"]
    assert sorted(p.name for p in run.iterdir()) == ["cache", "previous"]        # the data cache stays
