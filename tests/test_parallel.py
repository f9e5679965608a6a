"""Sequence parallelism (pipeline/parallel.py): R gloo processes, each holding a contiguous
segment of every sequence, give the single-process model's logits and gradients: Mamba layers
by state passing, attention layers (hybrids, transformers) by gathering the earlier ranks' keys
and values."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.pipeline.model import Mamba2Config, Mamba2LM
from longctx.pipeline.model.config import AttnConfig
from longctx.pipeline.model.mitigations import STATE_NORM_UNSUPPORTED, LayerMitigations
from longctx.pipeline.parallel import Groups, SequenceParallel
from longctx.pipeline.training.loss import lm_loss, sequence_loss
from tests.conftest import rel_err

ROWS, LENGTH, VOCAB = 2, 64, 61

F32, F64 = torch.float32, torch.float64
TOLERANCE = {F32: 1e-5, F64: 1e-12}        # max |SP - one process| / max |one process|, logits and gradients
# Parameters the model computes in fp32 whatever its dtype (RMSNorm's and A's `.float()`, as mamba_ssm): their
# gradients are fp32 sums over positions, which SP adds in another order (rank by rank), so fp32's tolerance
FP32_INSIDE = ("norm.weight", "norm2.weight", "norm_f.weight", "A_log")


def tolerance(dtype, name):
    return TOLERANCE[F32 if name.endswith(FP32_INSIDE) else dtype]

# attention at layer 1 of 2 (GQA, partial RoPE), with and without its conv over q, k, v (3 rows of halo)
HYBRID = {"attn_layer_idx": [1], "attn_cfg": AttnConfig(num_heads=4, num_heads_kv=2, rotary_emb_dim=4)}
HYBRID_CONV = {**HYBRID, "attn_cfg": AttnConfig(num_heads=4, num_heads_kv=2, rotary_emb_dim=4, d_conv=4, mlp_dim=16)}
# every layer attention with a gated MLP: RoPE on every channel (pairs interleaved); with a conv, MQA and position
# interpolation (global positions divided by rotary_scaling)
TRANSFORMER = {"attn_layer_idx": [0, 1], "d_intermediate": 32,
               "attn_cfg": AttnConfig(num_heads=2, rotary_emb_dim=16, rotary_emb_interleaved=True)}
TRANSFORMER_CONV = {**TRANSFORMER, "attn_cfg": AttnConfig(num_heads=4, num_heads_kv=1, rotary_emb_dim=8, d_conv=3,
                                                          rotary_scaling=2.0)}

# name: (world, seq_parallel, model options, documents, mitigations per layer, activation checkpointing, dtype)
CASES = {
    "plain_2": (2, 2, {}, False, None, False, F32),
    "documents_2": (2, 2, {"ngroups": 2, "d_intermediate": 32}, True, None, False, F32),
    "documents_scales_gate_in_scan_4": (
        4, 4, {"rmsnorm": False}, True,
        [LayerMitigations(decay_scale=[0.9] * 4 + [0.97] * 4, input_scale=[0.7] * 8), LayerMitigations(input_scale=[0.5] * 8)],
        True, F32),
    "window_sp2_dp2_4": (4, 2, {}, True, [LayerMitigations(window=11), LayerMitigations(window=45)], False, F32),
    "window_across_ranks_4": (4, 4, {"d_intermediate": 32}, True,
                              [LayerMitigations(window=40, decay_scale=[0.95] * 8), LayerMitigations(window=5)], False,
                              F32),
    # attention layers, in float64: documents crossing a rank boundary and starting exactly at one (make_batch)
    "attention_hybrid_conv_documents_2": (2, 2, HYBRID_CONV, True, None, False, F64),
    "attention_hybrid_2": (2, 2, HYBRID, False, None, False, F64),
    "attention_transformer_documents_checkpointing_4": (4, 4, TRANSFORMER, True, None, True, F64),
    "attention_transformer_conv_documents_sp2_dp2_4": (4, 2, TRANSFORMER_CONV, True, None, False, F64),
}


def make_model(options, mitigations, checkpointing, dtype=F32):
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8, headdim=8, chunk_size=8)
    m = Mamba2LM(Mamba2Config(**{**cfg, **options})).to(dtype)
    with torch.no_grad():                     # decays closer to 1: the state carries far across ranks
        for mixer in m.mamba_mixers():
            mixer.A_log.uniform_(-3.0, -1.0)
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
        _, degree, options, documents, mitigations, checkpointing, dtype = CASES[case]
        model = make_model(options, mitigations, checkpointing, dtype)
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
    world, degree, options, documents, mitigations, checkpointing, dtype = CASES[case]
    mp.start_processes(_worker, args=(world, case, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    ids, labels, seq_idx = make_batch(documents)
    model = make_model(options, mitigations, checkpointing, dtype)
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
                assert rel_err(res["logits"], full[:, c0:c1]) <= TOLERANCE[dtype], (case, res["cols"])
                assert abs(res["mean"] - means[-1]) <= 1e-5 * abs(means[-1])
    for name, p in model.named_parameters():
        for res in results:                                # every rank ends with the same gradient
            assert rel_err(res["grads"][name], p.grad) <= tolerance(dtype, name), (case, name)
    if documents:                                          # the documents really cross ranks
        assert seq_idx is not None and bool((seq_idx[:, LENGTH // degree - 1] != seq_idx[:, LENGTH // degree]).any())


CONV_K, CONV_CALL = 4, 16          # two calls of 16 rows, each split over 2 ranks: rank starts at 8, 16 (the cut), 24


def conv_case():
    """float64 conv inputs, the output's cotangent, and a row per offset o in -(K-1) .. K-1: documents start at o
    rows after each rank start (8 + o, 16 + o, 24 + o; 16 is where the second call enters the first's tail)."""
    from tests.test_conv import documents_around
    offsets = range(-(CONV_K - 1), CONV_K)
    seq = torch.zeros(len(offsets), 2 * CONV_CALL, dtype=torch.int32)
    for start in (8, 16, 24):
        seq += documents_around(start, CONV_K, 2 * CONV_CALL)
    g = torch.Generator().manual_seed(3)
    x, grad = (torch.randn(len(offsets), 2 * CONV_CALL, 5, generator=g, dtype=torch.float64) for _ in range(2))
    return x, torch.randn(5, 1, CONV_K, generator=g, dtype=torch.float64), torch.randn(5, generator=g,
                                                                                     dtype=torch.float64), seq, grad


def _conv_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sp = Groups(world, rank).get(world)
        x, w, b, seq, grad = conv_case()
        x, w, b = (t.requires_grad_() for t in (x, w, b))
        seg, tail, outs = CONV_CALL // world, None, []
        for call in range(2):        # the second entered with the first's tail as the carried state enters it
            cols = slice(call * CONV_CALL + rank * seg, call * CONV_CALL + (rank + 1) * seg)
            sp.begin(seq[:, cols], CONV_K - 1)
            out, final = sp.conv_from(x[:, cols], w, b, seq[:, cols], tail)
            outs.append(out)
            final = sp.broadcast_from_last(final.detach().contiguous())     # CarriedStates.from_last_rank
            continues = (seq[:, CONV_CALL] == seq[:, CONV_CALL - 1]).to(final.dtype)   # entering(rows)
            tail = final * continues[:, None, None]
        loss = sum((out * grad[:, c * CONV_CALL + rank * seg:][:, :seg]).sum() for c, out in enumerate(outs))
        loss.backward()
        torch.save({"outs": [o.detach() for o in outs], "x": x.grad, "weight": w.grad, "bias": b.grad},
                   Path(out_dir) / f"conv{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_conv_halo_and_carried_tail_keep_documents_apart(tmp_path):
    """SequenceParallel.conv_from over 2 ranks, in two calls the second entered with the first's final tail,
    equals the whole row's conv in one call (float64), forward and gradients, with a document starting at each
    offset -(K-1) .. K-1 of every rank start: the halo and the tail bring in no other document's rows. Gradients
    stop at the carried tail, so the reference's second call reads the first call's rows detached."""
    from longctx.kernels import causal_conv1d
    world = 2
    mp.start_processes(_conv_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"conv{r}.pt") for r in range(world)]
    x, w, b, seq, grad = conv_case()
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    whole, _ = causal_conv1d(x, w, b, seq_idx=seq)
    detached = torch.cat([x[:, :CONV_CALL].detach(), x[:, CONV_CALL:]], 1)
    second, _ = causal_conv1d(detached, w, b, seq_idx=seq)
    expected = torch.cat([whole[:, :CONV_CALL], second[:, CONV_CALL:]], 1)
    (expected * grad).sum().backward()
    seg, errors = CONV_CALL // world, {}
    for r, res in enumerate(results):
        for call, out in enumerate(res["outs"]):
            start = call * CONV_CALL + r * seg
            for row, offset in enumerate(range(-(CONV_K - 1), CONV_K)):
                errors[f"row start {start}, document at {start + offset}"] = rel_err(out[row],
                                                                                     expected[row, start:start + seg])
    assert max(errors.values()) <= 1e-12, {k: e for k, e in errors.items() if e > 1e-12}
    for name, p in (("x", x), ("weight", w), ("bias", b)):
        assert rel_err(sum(res[name] for res in results), p.grad) <= 1e-12, name


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
    """A Mamba layer's traffic is its state (fixed), an attention layer's its segment's keys and values (growing
    with the length); the last rank's attention holds the keys of the whole sequence, but only its own queries."""
    import json
    import subprocess
    import sys
    out = tmp_path / "sp.json"
    r = subprocess.run([sys.executable, "-m", "longctx", "bench", "sp", "--lengths", "512,2048", "--repeats", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [row["length"] for row in rows] == [512, 2048]
    sent = {row["mamba_bytes_per_layer_per_rank"] for row in rows}
    # one fp32 state forward (plus its decay) and one backward per layer, and the small conv halo
    assert len(sent) == 1 and 2 * 8 * 32 * 64 * 4 < sent.pop() < 3 * 8 * 32 * 64 * 4
    for row in rows:     # its segment's fp32 keys and values (2 heads of 32) forward, their gradients backward
        assert row["attention_bytes_per_layer_per_rank"] == 2 * (row["length"] // 2) * 2 * 2 * 32 * 4
        assert 0 < row["attention_saved_bytes_per_layer_max_rank"] < row["attention_saved_bytes_per_layer_one_process"]
        assert 0 < row["mamba_saved_bytes_per_layer_max_rank"] < row["mamba_saved_bytes_per_layer_one_process"]
    assert all(row["sp_step_s"] > 0 and row["one_process_step_s"] > 0 for row in rows)
