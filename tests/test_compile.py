"""`train.compile`: each block's training forward through torch.compile equals eager, keeps the state-dict keys,
leaves evaluation eager, and falls back to eager where compiling fails (a node whose C++ compiler is broken)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from longctx.pipeline.training.loss import lm_loss
from tests.training import records, run_cmd, write_config

CONFIG = dict(d_model=32, n_layer=2, vocab_size=257, d_state=16, headdim=16, chunk_size=16)


def train_steps(model, steps=3):
    """Losses and final parameters of a few AdamW steps on fixed rows with two documents each."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 257, (steps, 2, 65), generator=g)
    seq_idx = (torch.arange(64) >= 40).to(torch.int32).expand(2, 64).contiguous()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for rows in ids:
        loss = lm_loss(model(rows[:, :-1], seq_idx=seq_idx).logits, rows[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def run_script(body: str, env=None) -> subprocess.CompletedProcess:
    """`body` in a fresh interpreter: inductor imports triton in compiled mode, which would stop the Triton
    interpreter tests that share the suite's process from running there."""
    script = "import torch\nfrom longctx.pipeline.model import Mamba2Config, Mamba2LM\n" \
             f"from tests.test_compile import CONFIG, train_steps\n{textwrap.dedent(body)}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=500,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(600)
def test_compiled_blocks_train_like_eager_and_keep_the_state_dict():
    r = run_script("""
        import pytest
        import torch._dynamo.utils
        torch.manual_seed(0)
        eager = Mamba2LM(Mamba2Config(**CONFIG)).train()
        compiled = Mamba2LM(Mamba2Config(**CONFIG)).train()
        compiled.load_state_dict(eager.state_dict())
        keys = list(compiled.state_dict())
        assert compiled.compile_blocks() is None
        assert all(layer.compiled_forward is not None for layer in compiled.backbone.layers)
        want, want_params = train_steps(eager)
        got, got_params = train_steps(compiled)
        assert got == pytest.approx(want, rel=1e-5), (got, want)
        for a, b in zip(got_params, want_params):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert list(compiled.state_dict()) == keys        # checkpoints and exports see the plain model
        # evaluation (no training mode) and decoding stay eager: a compiled frame would count a call
        torch._dynamo.utils.counters.clear()
        compiled.eval()
        with torch.no_grad():
            compiled(torch.randint(0, 257, (1, 40)))
            compiled.generate(torch.randint(0, 257, (1, 8)), max_new_tokens=2)
        assert torch._dynamo.utils.counters["frames"]["total"] == 0, dict(torch._dynamo.utils.counters["frames"])
        print("COMPILED-OK")
    """)
    assert r.returncode == 0 and "COMPILED-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.timeout(600)
def test_a_block_that_cannot_compile_runs_eagerly(tmp_path):
    """A `g++` that fails (as on a node with a broken toolchain) ahead of the real one on PATH: inductor cannot
    build its kernels, compile_blocks says why, and the blocks train exactly as without compile (before the
    toolchain check, the forward fell back but the lazily compiled backward raised at the first step)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "g++").write_text("#!/bin/sh\necho 'g++: broken toolchain' >&2\nexit 1\n")
    (bin_dir / "g++").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))     # no kernel compiled earlier is reused
    r = run_script("""
        torch.manual_seed(0)
        eager = Mamba2LM(Mamba2Config(**CONFIG)).train()
        compiled = Mamba2LM(Mamba2Config(**CONFIG)).train()
        compiled.load_state_dict(eager.state_dict())
        reason = compiled.compile_blocks()
        print("REASON", reason)
        assert reason is not None and "compiler" in reason.lower(), reason
        assert all(layer.compiled_forward is None for layer in compiled.backbone.layers)
        want, want_params = train_steps(eager)
        got, got_params = train_steps(compiled)
        assert got == want, (got, want)
        assert all(torch.equal(a, b) for a, b in zip(got_params, want_params))
        print("EAGER-FALLBACK-OK")
    """, env)
    assert r.returncode == 0 and "EAGER-FALLBACK-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_compiled_run_equals_the_eager_run(tmp_path):
    """`longctx run ... train.compile=true` through the launcher, both stages: the same losses as without."""
    cfg = write_config(tmp_path, "eager")
    common = ["eval.kinds=[heldout]"]
    eager = subprocess.run(run_cmd(cfg, *common), capture_output=True, text=True, timeout=600)
    assert eager.returncode == 0, eager.stdout[-3000:] + eager.stderr[-3000:]
    comp = subprocess.run(run_cmd(cfg, *common, "train.compile=true", f"run.dir={tmp_path / 'compiled'}"),
                          capture_output=True, text=True, timeout=900)
    assert comp.returncode == 0, comp.stdout[-3000:] + comp.stderr[-3000:]
    a, b = records(tmp_path / "eager"), records(tmp_path / "compiled")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), x["step"]


@pytest.mark.timeout(600)
def test_compiled_blocks_under_sequence_parallelism_do_not_recompile_every_step():
    """Two gloo processes, each block compiled, the sequence split over both (state passing): after the first
    steps nothing compiles again. The collectives' byte counter, traced, had changed at every call, so each
    step failed dynamo's guards and recompiled until its limit sent the blocks back to eager."""
    r = run_script("""
        import tempfile
        import torch.distributed as dist
        import torch.multiprocessing as mp
        import torch._dynamo.utils
        from longctx.pipeline.parallel import Groups
        from longctx.pipeline.training.loss import sequence_loss

        def worker(rank, init_file):
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
            torch.manual_seed(0)
            model = Mamba2LM(Mamba2Config(**CONFIG)).train()
            sp = Groups(2, rank).get(2)
            model.set_sequence_parallel(sp)
            assert model.compile_blocks() is None
            g = torch.Generator().manual_seed(0)
            compiled_after = []
            for step in range(12):
                ids = torch.randint(0, 257, (2, 65), generator=g)
                cols = slice(32 * rank, 32 * rank + 32)
                loss, _ = sequence_loss(model(ids[:, :-1][:, cols]).logits, ids[:, 1:][:, cols], sp)
                loss.backward()
                model.zero_grad()
                compiled_after.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            assert compiled_after[-1] == compiled_after[2], compiled_after
            print("NO-RECOMPILE", rank, compiled_after[-1], flush=True)
            dist.destroy_process_group()

        if __name__ == "__main__":
            with tempfile.TemporaryDirectory() as tmp:
                mp.start_processes(worker, args=(f"{tmp}/init",), nprocs=2, start_method="fork")
    """)
    assert r.returncode == 0 and r.stdout.count("NO-RECOMPILE") == 2, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.timeout(300)
def test_sequence_parallelism_set_after_compiling_runs_its_collectives_eagerly():
    """The trainer compiles the blocks once, then sets each stage's sequence parallelism (the test above sets it
    first): either way the model has its SequenceParallel keep the collectives eager, and only under compiled
    blocks."""
    r = run_script("""
        from longctx.pipeline.parallel.sequence import SequenceParallel
        names = ("all_gather", "all_reduce", "broadcast_from_last")
        eager = lambda: [getattr(getattr(SequenceParallel, n), "runs_eagerly", False) for n in names]
        model = Mamba2LM(Mamba2Config(**CONFIG)).train()
        model.set_sequence_parallel(SequenceParallel(group=None, rank=0, size=2))
        assert eager() == [False] * 3, eager()
        model.set_sequence_parallel(None)
        assert model.compile_blocks() is None
        assert eager() == [False] * 3, eager()
        model.set_sequence_parallel(SequenceParallel(group=None, rank=0, size=2))
        assert eager() == [True] * 3, eager()
        print("EAGER")
    """)
    assert r.returncode == 0 and "EAGER" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.timeout(120)
def test_the_model_and_sequence_parallelism_import_without_dynamo():
    """train.compile's eager collectives are marked when blocks are compiled, not at import: marking them
    imports dynamo, which had added seconds to the start of every process (eval, export, each rank)."""
    r = subprocess.run([sys.executable, "-c", "import sys, longctx.pipeline.model, longctx.pipeline.parallel; "
                        "print('DYNAMO' if 'torch._dynamo' in sys.modules else 'NO-DYNAMO')"],
                       capture_output=True, text=True, timeout=100)
    assert r.returncode == 0 and "NO-DYNAMO" in r.stdout, r.stdout + r.stderr[-2000:]
