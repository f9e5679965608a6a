"""`longctx bench sp`: sequence-parallel step time and traffic at several lengths.

For each length, R gloo processes run forward + backward of a Mamba-2 with the sequence
split over them, and one process runs the same model on the whole sequence, each process
on one thread, in the same invocation (so the ratio is the figure to quote). Traffic is
the payload each rank puts into the group's collectives (pipeline/parallel.py counts
it) in one forward + backward, per layer: the state pass plus the conv halo, which must
not grow with the length.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..model import Mamba2Config, Mamba2LM
from ..parallel import Groups
from ..training.loss import sequence_loss

SHAPE = dict(d_model=128, n_layer=2, vocab_size=257, d_state=64, headdim=32, chunk_size=256)


def _step_seconds(model, ids, labels, sp, repeats):
    times, sent = [], []
    for _ in range(repeats + 1):                       # the first call warms up
        before = 0 if sp is None else sp.bytes_sent
        t0 = time.perf_counter()
        loss, _ = sequence_loss(model(ids).logits, labels, sp)
        loss.backward()
        times.append(time.perf_counter() - t0)
        sent.append(0 if sp is None else sp.bytes_sent - before)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:]), sent[-1]


def _inputs(length):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, length + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _model():
    torch.manual_seed(0)
    return Mamba2LM(Mamba2Config(**SHAPE)).train()


def _worker(rank, world, lengths, repeats, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, sp = _model(), Groups(world, rank).get(world)
        model.set_sequence_parallel(sp)
        rows = []
        for length in lengths:
            ids, labels = _inputs(length)
            seg = length // world
            cols = slice(rank * seg, (rank + 1) * seg)
            dist.barrier()
            seconds, sent = _step_seconds(model, ids[:, cols], labels[:, cols], sp, repeats)
            rows.append({"length": length, "step_s": seconds, "bytes_per_layer": sent / SHAPE["n_layer"]})
        torch.save(rows, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_sp_bench(lengths: List[int], nproc: int = 2, repeats: int = 3) -> List[dict]:
    import tempfile
    for length in lengths:
        if length % (nproc * SHAPE["chunk_size"]):
            raise ValueError(f"length {length} must be a multiple of nproc x chunk_size "
                             f"({nproc} x {SHAPE['chunk_size']})")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(nproc, lengths, repeats, f"{tmp}/init", tmp), nprocs=nproc,
                           start_method="spawn")
        per_rank = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(nproc)]
    torch.set_num_threads(1)
    model, rows = _model(), []
    for i, length in enumerate(lengths):
        ids, labels = _inputs(length)
        one, _ = _step_seconds(model, ids, labels, None, repeats)
        sp_s = max(r[i]["step_s"] for r in per_rank)
        rows.append({"length": length, "nproc": nproc, "one_process_step_s": one, "sp_step_s": sp_s,
                     "speedup": one / sp_s, "bytes_per_layer_per_rank": max(r[i]["bytes_per_layer"] for r in per_rank),
                     "threads_per_process": 1, **{k: SHAPE[k] for k in ("d_model", "n_layer", "d_state", "headdim")}})
    return rows
