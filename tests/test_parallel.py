"""Sequence parallelism (pipeline/parallel.py): R gloo processes, each holding a contiguous
segment of every sequence, give the single-process model's logits and gradients."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.pipeline.model import Mamba2Config, Mamba2LM
from longctx.pipeline.model.mitigations import STATE_NORM_UNSUPPORTED, LayerMitigations
from longctx.pipeline.parallel import Groups, SequenceParallel
from longctx.pipeline.training.loss import lm_loss, sequence_loss
from tests.conftest import rel_err

ROWS, LENGTH, VOCAB = 2, 64, 61

# name: (world, seq_parallel, model options, documents, mitigations per layer, activation checkpointing)
CASES = {
    "plain_2": (2, 2, {}, False, None, False),
    "documents_2": (2, 2, {"ngroups": 2, "d_intermediate": 32}, True, None, False),
    "documents_scales_gate_in_scan_4": (
        4, 4, {"rmsnorm": False}, True,
        [LayerMitigations(decay_scale=[0.9] * 4 + [0.97] * 4, input_scale=[0.7] * 8), LayerMitigations(input_scale=[0.5] * 8)],
        True),
    "window_sp2_dp2_4": (4, 2, {}, True, [LayerMitigations(window=11), LayerMitigations(window=45)], False),
    "window_across_ranks_4": (4, 4, {"d_intermediate": 32}, True,
                              [LayerMitigations(window=40, decay_scale=[0.95] * 8), LayerMitigations(window=5)], False),
}


def make_model(options, mitigations, checkpointing):
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8, headdim=8, chunk_size=8)
    m = Mamba2LM(Mamba2Config(**{**cfg, **options}))
    with torch.no_grad():                     # decays closer to 1: the state carries far across ranks
        for layer in m.backbone.layers:
            layer.mixer.A_log.uniform_(-3.0, -1.0)
    m.set_mitigations(mitigations)
    if checkpointing:
        m.enable_gradient_checkpointing()
    return m.train()


def make_batch(documents):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (ROWS * 2, LENGTH + 1), generator=g)   # up to 2 data-parallel replicas
    seq_idx = torch.zeros(ROWS * 2, LENGTH, dtype=torch.int32)
    if documents:
        # boundaries at a segment start (16, 32), one row after one (33: inside the conv halo), mid-segment
        for row, starts in enumerate([[32], [5, 33], [16, 17, 50], [40]]):
            for s in starts:
                seq_idx[row, s:] += 1
    labels = ids[:, 1:].clone()
    labels[:, :-1][seq_idx[:, 1:] != seq_idx[:, :-1]] = -100
    return ids[:, :-1], labels, (seq_idx if documents else None)


def _worker(rank, world, case, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, degree, options, documents, mitigations, checkpointing = CASES[case]
        model = make_model(options, mitigations, checkpointing)
        sp = Groups(world, rank).get(degree)
        model.set_sequence_parallel(sp)
        ids, labels, seq_idx = make_batch(documents)
        dp = world // degree
        rows = slice(rank // degree * ROWS, rank // degree * ROWS + ROWS)
        seg = LENGTH // degree
        cols = slice(sp.rank * seg, (sp.rank + 1) * seg)
        logits = model(ids[rows, cols], seq_idx=None if seq_idx is None else seq_idx[rows, cols]).logits
        loss, mean = sequence_loss(logits, labels[rows, cols], sp)
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():          # DeepSpeed's data-parallel average over the world
            dist.all_reduce(p.grad)
            grads[name] = p.grad / world
        torch.save({"logits": logits.detach(), "mean": mean, "grads": grads, "bytes": sp.bytes_sent,
                    "rows": (rows.start, rows.stop), "cols": (cols.start, cols.stop), "dp": dp},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequence_parallel_equals_one_process(case, tmp_path):
    world, degree, options, documents, mitigations, checkpointing = CASES[case]
    mp.start_processes(_worker, args=(world, case, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    ids, labels, seq_idx = make_batch(documents)
    model = make_model(options, mitigations, checkpointing)
    dp = world // degree
    means = []
    for d in range(dp):                                    # one replica after the other, gradients averaged
        rows = slice(d * ROWS, d * ROWS + ROWS)
        full = model(ids[rows], seq_idx=None if seq_idx is None else seq_idx[rows]).logits
        loss = lm_loss(full, labels[rows])
        (loss / dp).backward()
        means.append(float(loss.detach()))
        for res in results:
            if res["rows"] == (rows.start, rows.stop):
                c0, c1 = res["cols"]
                assert rel_err(res["logits"], full[:, c0:c1]) <= 1e-5, (case, res["cols"])
                assert abs(res["mean"] - means[-1]) <= 1e-5 * abs(means[-1])
    for name, p in model.named_parameters():
        for res in results:                                # every rank ends with the same gradient
            assert rel_err(res["grads"][name], p.grad) <= 1e-5, (case, name)
    if documents:                                          # the documents really cross ranks
        assert seq_idx is not None and bool((seq_idx[:, LENGTH // degree - 1] != seq_idx[:, LENGTH // degree]).any())


def test_state_norm_under_sequence_parallelism_is_refused_by_name():
    from longctx import kernels
    sp = SequenceParallel(group=None, rank=0, size=2)
    x = torch.zeros(1, 8, 2, 4)
    with pytest.raises(ValueError, match="mitigations.state_norm is not supported with seq_parallel > 1"):
        sp.scan(x, torch.zeros(1, 8, 2), -torch.ones(2), torch.zeros(1, 8, 1, 4), torch.zeros(1, 8, 1, 4), None, None,
                lambda offset: {"state_norm": kernels.StateNorm(8, 1.0)})
    assert "seq_parallel: 1" in STATE_NORM_UNSUPPORTED


def test_decoding_cache_is_refused_under_sequence_parallelism():
    m = make_model({}, None, False).eval()
    m.set_sequence_parallel(SequenceParallel(group=None, rank=0, size=2))
    with pytest.raises(ValueError, match="decoding cache"):
        m.step(torch.tensor([1]), m.init_cache(1))


def test_bench_sp_traffic_per_layer_does_not_grow_with_length(tmp_path):
    import json
    import subprocess
    import sys
    out = tmp_path / "sp.json"
    r = subprocess.run([sys.executable, "-m", "longctx", "bench", "sp", "--lengths", "512,2048", "--repeats", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [row["length"] for row in rows] == [512, 2048]
    sent = {row["bytes_per_layer_per_rank"] for row in rows}
    # one fp32 state forward (plus its decay) and one backward per layer, and the small conv halo
    assert len(sent) == 1 and 2 * 8 * 32 * 64 * 4 < sent.pop() < 3 * 8 * 32 * 64 * 4
    assert all(row["sp_step_s"] > 0 and row["one_process_step_s"] > 0 for row in rows)
