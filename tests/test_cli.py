"""The `longctx` console script, run as a user runs it."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from longctx.pipeline.model import Mamba2Config, Mamba2LM

SUBCOMMANDS = ["prepare", "train", "run", "eval", "launch", "export", "bench", "study"]


def longctx(*args, cwd=None):
    exe = shutil.which("longctx")
    cmd = [exe] if exe else [sys.executable, "-m", "longctx"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=cwd, timeout=300)


def test_console_script_is_installed():
    assert shutil.which("longctx"), "pip install -e . installs the `longctx` console script"


def test_top_level_help_lists_every_subcommand():
    r = longctx("--help")
    assert r.returncode == 0
    for name in SUBCOMMANDS:
        assert name in r.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name):
    r = longctx(name, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: longctx " + name in r.stdout


def test_export_converts_between_layouts(tmp_path):
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=1, vocab_size=40, d_state=8, headdim=8, chunk_size=8))
    model.save_pretrained(tmp_path / "src", format="mamba_ssm")
    r = longctx("export", str(tmp_path / "src"), str(tmp_path / "hf"), "--format", "hf")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mamba2"
    back = Mamba2LM.from_pretrained(tmp_path / "hf")
    assert torch.equal(back.backbone.embedding.weight, model.backbone.embedding.weight)
    # mamba_ssm's layout writes pytorch_model.bin as mamba_ssm does, model.safetensors on request
    r = longctx("export", str(tmp_path / "hf"), str(tmp_path / "ssm"), "--safetensors")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "ssm").iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(Mamba2LM.from_pretrained(tmp_path / "ssm").backbone.embedding.weight,
                       model.backbone.embedding.weight)


def test_export_of_a_missing_directory_is_a_clean_error(tmp_path):
    r = longctx("export", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert r.returncode == 1
    assert "no config.json" in r.stderr and "Traceback" not in r.stderr


def test_bench_kernels_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "k.json"
    r = longctx("bench", "kernels", "--lengths", "64,128", "--heads", "2", "--headdim", "8", "--d-state", "8",
                "--chunk-size", "32", "--repeats", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "naive" in r.stdout and "torch" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    torch_rows = [row for row in rows if row["backend"] == "torch" and row["device"] == "cpu"]
    assert [row["length"] for row in torch_rows] == [64, 128]
    for row in torch_rows:
        assert row["fwd_bwd_ms"] > 0 and row["speedup_vs_naive"] > 0
        assert row["max_rel_err_vs_naive"] < 1e-4


def test_bench_kernels_vs_minimal_times_both_scans_on_the_same_problem(tmp_path):
    out = tmp_path / "m.json"
    r = longctx("bench", "kernels", "--vs-minimal", "--lengths", "128,512", "--heads", "2", "--headdim", "8",
                "--d-state", "8", "--chunk-sizes", "32,64", "--repeats", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "vs minimal" in r.stdout
    rows = json.loads(out.read_text())
    assert [row["length"] for row in rows] == [128, 512]
    for row in rows:     # the transcription computes what our scan computes
        assert row["max_rel_err_vs_minimal"] < 1e-5
        assert set(row["ours_ms"]) == set(row["minimal_ms"]) == {"32", "64"} and row["vs_minimal"] > 0
    # growth over 4x the length: the two lengths timed in turn (512 against 128; 128 has no quarter)
    assert rows[0]["growth_vs_quarter"] is None and rows[1]["growth_vs_quarter"] > 0
    assert f"| {rows[1]['growth_vs_quarter']:.2f} |" in r.stdout


def test_bench_train_vs_bare_refuses_a_batch_that_does_not_split(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {d_model: 32, n_layer: 1, vocab_size: 257, d_state: 8, headdim: 8, chunk_size: 32}\n"
                   "tokenizer: {kind: byte}\n"
                   "curriculum: {stages: [{name: s, seq_len: 256, steps: 5, global_batch_tokens: 300}]}\n")
    r = longctx("bench", "train", "--vs-bare", "--config", str(cfg), "--procs", "2", "--out", str(tmp_path / "t.json"))
    assert r.returncode == 1 and "global_batch_tokens" in r.stderr and "Traceback" not in r.stderr


def test_config_errors_exit_non_zero_with_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {d_modle: 3}\n")
    r = longctx("train", str(cfg))
    assert r.returncode == 1
    assert "model.d_modle" in r.stderr


@pytest.mark.parametrize("recipe,nproc,sp", [("mamba2-370m-256k", 64, [1, 1, 2, 4, 8]),
                                              ("mamba2-130m-256k", 32, [1, 1, 1, 2, 4])])
def test_paper_scale_recipes_plan_to_256k_with_sequence_parallelism(recipe, nproc, sp, capsys):
    from pathlib import Path

    from tests.shared import longctx_here
    root = Path(__file__).resolve().parents[1]
    r = longctx_here(capsys, "run", f"configs/{recipe}.yaml", "--plan", "--nproc", nproc, cwd=root)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip().startswith("ctx")]
    assert [int(row[1]) for row in rows][-1] == 262144
    assert [int(row[7]) for row in rows] == sp
    assert f"world size {nproc}" in r.stdout
    bad = longctx_here(capsys, "run", f"configs/{recipe}.yaml", "--plan", "--nproc", 12, cwd=root)   # no split
    assert bad.returncode != 0 and "curriculum.stages[0] (ctx8k).global_batch_tokens" in bad.stderr


def test_every_shipped_config_loads_and_plans(monkeypatch):
    """configs/**/*.yaml: strict schema, a valid plan for their process count (a cluster recipe's nodes x GPUs,
    else its local processes); configs/studies/*.yaml: study files whose every cell loads and plans."""
    from pathlib import Path

    from longctx.pipeline.config import load_config, planning_chunk_size
    from longctx.pipeline.study.spec import load_study
    from longctx.pipeline.training.curriculum import plan
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)           # configs name models/ and other configs relative to the checkout
    studies = sorted(root.glob("configs/studies/*.yaml"))
    paths = sorted(set(root.glob("configs/**/*.yaml")) - set(studies))
    assert len(paths) >= 6 and studies
    for path in paths:
        cfg = load_config(path)
        cluster = cfg.launch.nodes * cfg.launch.gpus_per_node
        world = cluster if cluster > 1 else cfg.launch.local_procs
        assert plan(cfg, world, planning_chunk_size(cfg)[0], str(path)), path
    for path in studies:
        assert load_study(str(path)).cells, path


class _RunsCode:
    """What a malicious checkpoint file holds: unpickling it runs code (here: it writes `marker`)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _training_checkpoint(root, files):
    """checkpoints/step_0000001 as our trainer writes it (complete), with DeepSpeed's files as given."""
    from dataclasses import asdict
    d = root / "checkpoints" / "step_0000001"
    d.mkdir(parents=True)
    config = Mamba2Config(d_model=32, n_layer=1, vocab_size=257, d_state=8, headdim=8, chunk_size=8)
    (d / "model_config.json").write_text(json.dumps(asdict(config)))
    (d / "trainer_state.json").write_text(json.dumps({"step": 1, "stage": 0}))
    for name, obj in files.items():
        torch.save(obj, d / name)
    (d / "COMPLETE.json").write_text(json.dumps({"step": 1, "files": {p.name: p.stat().st_size for p in d.iterdir()}}))
    return root


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where, command", [
    ("mp_rank_00_model_states.pt", ["export", "{src}", "{tmp}/out"]),                  # ZeRO 0: load.py reads it
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", ["eval", "passkey", "{src}", "--out", "{tmp}/ev"]),  # ZeRO 1-3
    ("pytorch_model.bin", ["calibrate", "{src}", "--length", "64", "--data", "{tmp}", "--out", "{tmp}/cal"]),
])
def test_a_checkpoint_file_that_would_run_code_is_refused_unrun(tmp_path, where, command):
    """eval, export and calibrate read checkpoints users hand them: a pickle that would run code is refused,
    named, and nothing of it runs."""
    import pickle
    marker = tmp_path / "ran"
    evil = _RunsCode(marker)
    if where == "pytorch_model.bin":            # a mamba_ssm directory, its weights a raw pickle
        src = tmp_path / "model"
        Mamba2LM(Mamba2Config(d_model=32, n_layer=1, vocab_size=257, d_state=8, headdim=8)).save_pretrained(
            src, safe_serialization=False)
        (src / where).write_bytes(pickle.dumps(evil))
    elif where.startswith("zero"):              # ZeRO: DeepSpeed's zero_to_fp32 reads the model states, then this
        states = {"module": {}, "buffer_names": [], "param_shapes": [{}], "shared_params": {}, "ds_version": "0.19.8"}
        src = _training_checkpoint(tmp_path / "run", {"mp_rank_00_model_states.pt": states, where: evil})
    else:
        src = _training_checkpoint(tmp_path / "run", {where: evil})
    r = longctx(*[a.format(src=src, tmp=tmp_path) for a in command])
    assert not marker.exists(), f"unpickling {where} ran its code"
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "refused to unpickle" in r.stderr and where in r.stderr, r.stderr[-2000:]
    assert ("raw pickle" if where == "pytorch_model.bin" else "builtins.exec") in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
