"""`longctx bench sp`: sequence-parallel step time, traffic and memory at several lengths, for a hybrid.

For each length, R gloo processes run forward + backward of a hybrid (a Mamba-2 layer, then an attention layer)
with the sequence split over them, and one process runs the same model on the whole sequence, each process on one
thread, in the same invocation (so the ratio is the figure to quote).

Per layer kind, measured:
- traffic: the payload each rank puts into the group's collectives (`SequenceParallel.bytes_sent`) during each
  block's forward and backward (hooks around the blocks; the loss's own all-reduce is outside them). A Mamba
  layer's (state pass plus conv halo) must not grow with the length; an attention layer's (its segment's keys and
  values, gathered, and their gradients, reduce-scattered) grows with the segment;
- memory: the bytes each block saves for its backward (activations; the parameters left out, storages shared
  between saved tensors counted once), on the rank that saves most and in the one process. The all-gather's own
  buffer (every rank's keys and values, freed within the forward) is not among them: it is computed from the
  shapes (`attention_gather_buffer_bytes`).

The default lengths stop at 16K: one process's attention over packed documents saves its block-diagonal mask for
backward (about 4.5 bytes per query-key pair on CPU: 1.2 GB at 16K, 4.8 GB at 32K).
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
from ..model.config import AttnConfig
from ..parallel import Groups
from ..training.loss import sequence_loss

# layer 0 Mamba-2 (h=8, p=32, n=64), layer 1 attention (4 query heads, 2 key/value heads of 32 channels, RoPE)
SHAPE = dict(d_model=128, n_layer=2, vocab_size=257, d_state=64, headdim=32, chunk_size=256, attn_layer_idx=[1],
             attn_cfg=AttnConfig(num_heads=4, num_heads_kv=2, rotary_emb_dim=32))
KINDS = ("mamba", "attention")
DOCUMENT = 1000


class LayerMeter:
    """Per layer kind, over one forward + backward (`start`, then `per_layer`): the bytes its blocks send into the
    group's collectives, and the bytes they save for backward."""

    def __init__(self, model: Mamba2LM, sp):
        self.sp = sp
        self.kinds = ["attention" if i in model.config.attention_layers else "mamba"
                      for i in range(model.config.n_layer)]
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.start()
        for block, kind in zip(model.backbone.layers, self.kinds):
            block.register_forward_pre_hook(lambda m, args: self._enter())
            block.register_forward_hook(lambda m, args, out, kind=kind: self._leave(kind))
            block.register_full_backward_pre_hook(lambda m, grad: self._mark())
            block.register_full_backward_hook(lambda m, gin, gout, kind=kind: self._add_sent(kind))

    def start(self):
        self.sent, self.saved = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
        self._mark()

    def per_layer(self):
        """({kind: bytes sent per layer}, {kind: bytes saved per layer}) since `start`."""
        layers = {kind: max(1, self.kinds.count(kind)) for kind in KINDS}
        return ({k: v // layers[k] for k, v in self.sent.items()}, {k: v // layers[k] for k, v in self.saved.items()})

    def _mark(self):
        self._sent_before = 0 if self.sp is None else self.sp.bytes_sent

    def _add_sent(self, kind):
        self.sent[kind] += (0 if self.sp is None else self.sp.bytes_sent) - self._sent_before

    def _pack(self, t):
        storage = t.untyped_storage()          # saved tensors stay alive until backward: their addresses are distinct
        if storage.data_ptr() not in self.parameters:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    def _enter(self):
        self._mark()
        self._storages = {}
        self._saving = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saving.__enter__()

    def _leave(self, kind):
        self._saving.__exit__(None, None, None)
        self._add_sent(kind)
        self.saved[kind] += sum(self._storages.values())


def _step(model, ids, labels, seq_idx, sp, meter, repeats):
    """(median seconds of a forward + backward, {kind: bytes sent per layer}, {kind: bytes saved per layer})."""
    times = []
    for _ in range(repeats + 1):                       # the first call warms up
        meter.start()
        t0 = time.perf_counter()
        loss, _ = sequence_loss(model(ids, seq_idx=seq_idx).logits, labels, sp)
        loss.backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return (statistics.median(times[1:]), *meter.per_layer())


def _inputs(length):
    """Token ids, labels and seq_idx: packed documents of DOCUMENT tokens, as train.document_resets (the default)
    trains, so documents cross the ranks' boundaries and the attention reads a block-diagonal causal mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, length + 1), generator=g)
    seq_idx = (torch.arange(length, dtype=torch.int32) // DOCUMENT)[None]
    return ids[:, :-1], ids[:, 1:], seq_idx


def _model():
    torch.manual_seed(0)
    return Mamba2LM(Mamba2Config(**SHAPE)).train()


def _worker(rank, world, lengths, repeats, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, sp = _model(), Groups(world, rank).get(world)
        model.set_sequence_parallel(sp)
        meter = LayerMeter(model, sp)
        rows = []
        for length in lengths:
            ids, labels, seq_idx = _inputs(length)
            seg = length // world
            cols = slice(rank * seg, (rank + 1) * seg)
            dist.barrier()
            seconds, sent, saved = _step(model, ids[:, cols], labels[:, cols], seq_idx[:, cols], sp, meter, repeats)
            rows.append({"length": length, "step_s": seconds, "sent": sent, "saved": saved})
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
    model = _model()
    meter, rows = LayerMeter(model, None), []
    a = SHAPE["attn_cfg"]
    for i, length in enumerate(lengths):
        one, _, one_saved = _step(model, *_inputs(length), None, meter, repeats)
        sp_s = max(r[i]["step_s"] for r in per_rank)
        row = {"length": length, "nproc": nproc, "one_process_step_s": one, "sp_step_s": sp_s, "speedup": one / sp_s}
        for kind in KINDS:
            row[f"{kind}_bytes_per_layer_per_rank"] = max(r[i]["sent"][kind] for r in per_rank)
            row[f"{kind}_saved_bytes_per_layer_max_rank"] = max(r[i]["saved"][kind] for r in per_rank)
            row[f"{kind}_saved_bytes_per_layer_one_process"] = one_saved[kind]
        # every rank's segment of keys and values, received by the all-gather (fp32; computed, not measured)
        row["attention_gather_buffer_bytes"] = length * 2 * a.kv_heads() * a.dim(SHAPE["d_model"]) * 4
        rows.append({**row, "threads_per_process": 1, "document_tokens": DOCUMENT,
                     **{k: SHAPE[k] for k in ("d_model", "n_layer", "d_state", "headdim", "attn_layer_idx")},
                     "attn_heads": a.num_heads, "attn_kv_heads": a.kv_heads(),
                     "attn_head_dim": a.dim(SHAPE["d_model"])})
    return rows
