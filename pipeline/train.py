"""`longctx train`: the per-rank training loop (what the DeepSpeed launcher starts on each process).

One job runs every curriculum stage: at a stage change the data is re-packed at the new
length, gradient accumulation is re-planned (tokens per step stay as configured), the
stage's mitigations are applied and the LR schedule continues. Checkpoints hold the
DeepSpeed state plus the trainer state (step, stage, tokens, loader position, RNG), so a
run killed at any point resumes to the losses of an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data.stream import IGNORE, DocumentSource, PackedStream, rank_share
from data.tokenizer import identity, load_tokenizer

from . import checkpoint
from .config import Config, ConfigError, model_config
from .curriculum import learning_rate, plan, stage_at
from .evaluate.passkey import build_prompt
from .evaluate.run import run_eval
from .metrics import MetricsLogger
from .mitigations import LayerMitigations, calibrate_state_norm, merge_overrides, resolve
from .model import Mamba2LM
from .parallel import Groups, sequence_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EVAL_SEED_OFFSET = 1_000_003      # the held-out stream is another seeded order of the documents


def build_model(cfg: Config) -> Mamba2LM:
    if cfg.model.from_pretrained:
        return Mamba2LM.from_pretrained(cfg.model.from_pretrained)
    return Mamba2LM(model_config(cfg))


def deepspeed_config(cfg: Config, micro: int, accum: int) -> dict:
    """The run's settings, then `train.deepspeed` merged on top (a raw passthrough wins)."""
    t = cfg.train
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
          "gradient_clipping": t.grad_clip, "zero_optimization": {"stage": t.zero_stage},
          "bf16": {"enabled": t.precision == "bf16"}, "fp16": {"enabled": t.precision == "fp16"},
          "steps_per_print": 1 << 30, "wall_clock_breakdown": False}

    def merge(a, b):
        for k, v in b.items():
            a[k] = merge(dict(a.get(k, {})), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a
    return merge(ds, t.deepspeed)


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lm_loss(logits, labels):
    """Mean token loss over the valid labels of one process's whole sequences."""
    return sequence_loss(logits, labels, None, IGNORE)[0]


def _rng_state() -> dict:
    """Every RNG the process uses, as JSON-friendly lists (stored in trainer_state.json too)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist()}


def _set_rng_state(s: dict) -> None:
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))


class Trainer:
    def __init__(self, cfg: Config, where: str = "<config>"):
        import deepspeed
        import torch.distributed as dist
        self.cfg, self.dist = cfg, dist
        cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)

        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.tok = load_tokenizer(cfg.tokenizer)
        model = build_model(cfg)
        if model.config.padded_vocab_size < self.tok.vocab_size:
            raise ConfigError(f"{where}: model.vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({self.tok.vocab_size})")
        self.plans = plan(cfg, self.world, model.config.chunk_size, where)
        if cfg.eval.every_checkpoint and "passkey" in cfg.eval.kinds:
            for L in cfg.eval.passkey_lengths:     # fail now, not at the first checkpoint
                try:
                    build_prompt(self.tok, L, 0.5, "12345")
                except ValueError as e:
                    raise ConfigError(f"{where}: eval.passkey_lengths: {e}") from None
        if cfg.train.activation_checkpointing:
            model.enable_gradient_checkpointing()
        self.model = model

        shards = cfg.data.shards or cfg.data.prepare.output
        if not shards:
            raise ConfigError(f"{where}: data.shards (or data.prepare.output) is empty: where are the MDS shards?")
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE") or str(self._local_world_size()))
        cache = cfg.data.cache_dir or str(self.run_dir / "cache")
        source = DocumentSource(shards, cache)
        self.stream = PackedStream(source, self.tok.eos_id, seed=cfg.run.seed)
        self.eval_stream = PackedStream(source, self.tok.eos_id, seed=cfg.run.seed + EVAL_SEED_OFFSET)

        first = self.plans[0]
        optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=first.lr,
                                      betas=tuple(cfg.train.betas))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, first.micro_batch, first.grad_accum))
        self.sp_groups = Groups(self.world, self.rank)
        self.state = {"step": 0, "tokens": 0, "bad_steps": 0, "skipped_micro_batches": 0}
        self.stage_mitigations = {}
        self.stop_requested = False

    def _local_world_size(self) -> int:
        """Ranks on this host (mosaicml-streaming needs it to pick one local leader per node)."""
        import socket
        hosts = [None] * self.world
        self.dist.all_gather_object(hosts, socket.gethostname())
        return hosts.count(socket.gethostname())

    # -- lifecycle ------------------------------------------------------------------------------
    def resume(self) -> int:
        resume = self.cfg.run.resume
        if resume == "never":
            return 0
        if resume == "auto":
            tag = checkpoint.latest_tag(self.ckpt_root)
            root = self.ckpt_root
        else:
            root, tag = Path(resume).parent, Path(resume).name
            if not (root / tag).is_dir():
                raise ConfigError(f"run.resume: {resume} is not a checkpoint directory")
        if tag is None:
            return 0
        trainer = checkpoint.load(self.engine, root, tag)
        self.state = {k: trainer[k] for k in self.state}
        self.stream.load_state_dict(trainer["loader"])
        self.eval_stream.load_state_dict(trainer["eval_loader"])
        self.stage_mitigations = {int(k): [LayerMitigations(**m) for m in v] if v is not None else None
                                  for k, v in trainer.get("mitigations", {}).items()}
        _set_rng_state(trainer["rng"])
        if self.rank == 0:
            print(f"resumed from {root / tag} at step {self.state['step']}", flush=True)
        return self.state["step"]

    def trainer_state(self, stage) -> dict:
        return {**self.state, "stage": stage.index, "stage_name": stage.name, "seq_len": stage.seq_len,
                "loader": self.stream.state_dict(),
                "eval_loader": self.eval_stream.state_dict(), "rng": _rng_state(),
                "mitigations": {str(k): None if v is None else [asdict(m) for m in v]
                                for k, v in self.stage_mitigations.items()}}

    def enter_stage(self, p) -> None:
        # DeepSpeed's data-parallel world is every rank (pipeline/parallel.py): it counts each SP rank's
        # micro-batch as one, so its batch size is micro x accum x world, not x DP.
        self.engine.set_train_batch_size(p.micro_batch * p.grad_accum * self.world)
        self.model.set_sequence_parallel(None)        # calibration below reads whole sequences
        if p.index not in self.stage_mitigations:
            self.stage_mitigations[p.index] = self.stage_layers(p)
        self.model.set_mitigations(self.stage_mitigations[p.index])
        self.model.set_sequence_parallel(self.sp_groups.get(p.seq_parallel))
        if self.rank == 0:
            print(f"stage {p.index} '{p.name}': seq_len {p.seq_len}, {p.steps} steps, micro {p.micro_batch} x "
                  f"accum {p.grad_accum} x DP {p.data_parallel} x SP {p.seq_parallel}", flush=True)

    def stage_config(self, p):
        """The stage's mitigations section: the top-level one with the stage's overrides merged in."""
        return merge_overrides(self.cfg.mitigations, self.cfg.curriculum.stages[p.index].mitigations,
                               f"curriculum.stages[{p.index}]")

    def stage_layers(self, p):
        """The stage's mitigations; state-norm thresholds calibrated here when the config gives none."""
        return self.resolve_layers(self.stage_config(p), p)

    def resolve_layers(self, mit, p):
        """Per-layer mitigations of a merged config, calibrating state norm on a prompt of the stage's length."""
        n_layer, nheads = self.model.config.n_layer, self.model.config.nheads
        calibrated = None
        if mit.state_norm.every and not mit.state_norm.thresholds:
            self.model.set_mitigations(resolve(type(mit)(decay_scale=mit.decay_scale, input_scale=mit.input_scale),
                                               n_layer, nheads))
            prompt = torch.as_tensor(self.eval_stream.next_batch(1, p.seq_len).input_ids, device=self.device)
            was_training = self.engine.module.training
            self.engine.module.eval()
            calibrated = calibrate_state_norm(self.engine.module, prompt, mit.state_norm.multiplier)
            self.engine.module.train(was_training)
        layers = resolve(mit, n_layer, nheads, calibrated=calibrated)
        return layers if any(m.active for m in layers) else None

    # -- steps --------------------------------------------------------------------------------
    def all_mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return float(t.item()) / self.world

    def train_step(self, p) -> dict:
        lr = learning_rate(self.plans, self.state["step"])
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = self.stream.next_batch(p.sequences_per_step, p.seq_len, p.max_doc_tokens)
        dp_rank = self.rank // p.seq_parallel
        share = rank_share(batch, dp_rank, p.data_parallel, self.rank % p.seq_parallel, p.seq_parallel)
        t0, losses, bad = time.perf_counter(), [], 0
        for m in range(p.grad_accum):
            rows = share.rows(m * p.micro_batch, (m + 1) * p.micro_batch)
            ids = torch.as_tensor(rows.input_ids, device=self.device)
            labels = torch.as_tensor(rows.labels, device=self.device)
            seq_idx = self.documents(rows)
            loss, mean = sequence_loss(self.engine(ids, seq_idx=seq_idx).logits, labels, self.model.sequence_parallel)
            finite = torch.tensor([float(torch.isfinite(loss)) * float(math.isfinite(mean))], device=self.device)
            self.dist.all_reduce(finite, op=self.dist.ReduceOp.MIN)
            if finite.item() < 1:            # skip this micro-batch everywhere: a zero loss with zero gradients
                bad += 1
                loss = sum(p_.sum() for p_ in self.engine.module.parameters()) * 0.0
            else:
                losses.append(mean)
            self.engine.backward(loss)
            self.engine.step()
        elapsed = time.perf_counter() - t0
        self.state["step"] += 1
        self.state["tokens"] += p.global_batch_tokens
        self.state["skipped_micro_batches"] += bad
        self.state["bad_steps"] = self.state["bad_steps"] + 1 if bad else 0
        grad_norm = self.engine.get_global_grad_norm()
        mean_loss = self.all_mean(sum(losses) / len(losses)) if losses else None   # null: every micro-batch skipped
        return {"step": self.state["step"], "stage": p.index, "stage_name": p.name, "seq_len": p.seq_len,
                "loss": mean_loss, "skipped_micro_batches": bad, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens": self.state["tokens"], "tokens_per_s": p.global_batch_tokens / max(self.all_mean(elapsed), 1e-9)}

    def documents(self, batch):
        """seq_idx for the scan (state reset at each document start), or None when train.document_resets
        is off and packed documents flow into each other."""
        if not self.cfg.train.document_resets:
            return None
        return torch.as_tensor(batch.seq_idx, device=self.device)

    @torch.no_grad()
    def heldout_loss(self, p) -> float:
        """Loss on sequences of another seeded document order, at the stage's length; under
        sequence parallelism each rank reads its segment (the group sums)."""
        n = max(1, self.cfg.eval.heldout_sequences)
        sp = self.model.sequence_parallel
        batch = self.eval_stream.next_batch(n, p.seq_len)
        if sp is not None:
            batch = rank_share(batch, 0, 1, sp.rank, sp.size)
        module = self.engine.module
        was_training = module.training
        module.eval()
        _, mean = sequence_loss(module(torch.as_tensor(batch.input_ids, device=self.device),
                                       seq_idx=self.documents(batch)).logits,
                                torch.as_tensor(batch.labels, device=self.device), sp)
        module.train(was_training)
        return mean

    def evaluate(self, p, record: dict, metrics: MetricsLogger) -> None:
        """The checkpoint's evaluation into eval/step_XXXXXXX/, the step's metrics record and TensorBoard.
        Every rank runs it on the same prompts (ZeRO-3 needs all ranks in each forward); rank 0 writes."""
        ev = self.cfg.eval
        if not ev.every_checkpoint:
            return
        t0 = time.perf_counter()
        step, out = self.state["step"], self.run_dir / "eval" / checkpoint.tag_of(self.state["step"])
        write = self.rank == 0
        module = self.engine.module
        if "heldout" in ev.kinds:
            loss = self.heldout_loss(p)
            record["eval_loss"] = loss if math.isfinite(loss) else None
            if write:
                out.mkdir(parents=True, exist_ok=True)
                (out / "heldout.json").write_text(json.dumps({"step": step, "seq_len": p.seq_len,
                                                              "heldout_loss": record["eval_loss"]}))
        # passkey / length / states decode recurrently (memory independent of length): whole sequences
        # on every rank, no sequence parallelism
        sp = self.model.sequence_parallel
        self.model.set_sequence_parallel(None)
        try:
            self._recurrent_evals(p, record, metrics, out, write)
        finally:
            self.model.set_sequence_parallel(sp)
        module.train()
        record["eval_seconds"] = time.perf_counter() - t0

    def _recurrent_evals(self, p, record, metrics, out, write) -> None:
        ev, step, module = self.cfg.eval, self.state["step"], self.engine.module
        common = dict(prefill_chunk=ev.prefill_chunk, train_length=p.seq_len, write=write, seed=self.cfg.run.seed)
        if "passkey" in ev.kinds:
            res = run_eval("passkey", module, self.tok, out, lengths=ev.passkey_lengths, depths=ev.passkey_depths,
                           samples=ev.passkey_samples, **common)["model"]
            record["passkey_accuracy"] = res["mean_accuracy"]
            for L, acc in res["per_length"].items():
                metrics.scalar(f"eval/passkey_accuracy_{L}", acc, step)
            metrics.image("eval/passkey", out / "passkey.png", step)
        if "length" in ev.kinds:
            variants = None
            if ev.compare_mitigations:     # the same text with the stage's mitigations and with these on top
                mitigated = self.resolve_layers(merge_overrides(self.stage_config(p), ev.compare_mitigations,
                                                                "eval.compare_mitigations"), p)
                module.set_mitigations(self.stage_mitigations[p.index])
                variants = {"as trained": "as is", "with mitigations": mitigated}
            results = run_eval("length", module, self.tok, out, lengths=[ev.length_max], buckets=ev.length_buckets,
                               margin=ev.collapse_margin, stream=self.eval_stream, variants=variants, **common)
            res = results["as trained" if variants else "model"]
            record["collapse_point"] = res["collapse_point"]
            if variants:
                record["collapse_point_mitigated"] = results["with mitigations"]["collapse_point"]
            metrics.image("eval/loss_vs_position", out / "loss_vs_position.png", step)
        if "states" in ev.kinds:
            res = run_eval("states", module, self.tok, out, lengths=[ev.length_max], stream=self.eval_stream,
                           **common)["model"]
            record["max_state_norm"] = float(np.max(res["norms"][-1]))

    def save(self, p) -> None:
        checkpoint.save(self.engine, self.ckpt_root, self.state["step"], self.trainer_state(p), self.model.config,
                        identity(self.tok), self.cfg.checkpoint.keep_last, self.rank == 0, self.dist.barrier,
                        tokenizer_file=self.cfg.tokenizer.path if self.cfg.tokenizer.kind == "hf" else None)

    def run(self) -> int:
        start = self.resume()
        metrics = MetricsLogger(self.run_dir, self.rank == 0, resume_step=start)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop_requested", True))
        total = self.plans[-1].last_step
        every = self.cfg.checkpoint.every_steps
        current = None
        try:
            while self.state["step"] < total:
                p = stage_at(self.plans, self.state["step"])
                if current != p.index:
                    self.enter_stage(p)
                    current = p.index
                record = self.train_step(p)
                stop = self._any_rank(self.stop_requested)
                step = self.state["step"]
                due = stop or step == p.last_step or (every and step % every == 0)
                if due:
                    self.evaluate(p, record, metrics)
                metrics.log(record)          # before the checkpoint: a kill in between resumes from the previous one
                if due:
                    self.save(p)
                if self.state["bad_steps"] > self.cfg.train.max_bad_steps:
                    raise RuntimeError(f"{self.state['bad_steps']} steps in a row had a non-finite loss "
                                       f"(train.max_bad_steps = {self.cfg.train.max_bad_steps}); lower the LR or "
                                       "check the data; the last checkpoint is intact")
                if stop:
                    if self.rank == 0:
                        print(f"SIGTERM: checkpoint written at step {step}; exiting", flush=True)
                    return 0
        finally:
            metrics.close()
        return 0

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()
        # after the barrier no rank uses it any more
        release_shm_buffers(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
                            rank=os.environ.get("LOCAL_RANK", "0"))


def release_shm_buffers(addr: str, port: str, rank: str = "*") -> None:
    """Unlink DeepSpeed's CPU all-reduce buffers of a run (/dev/shm, ~66 MB per rank). DeepSpeed never
    removes them, so every finished or killed CPU run would otherwise leave them until the memory is full."""
    import contextlib
    import glob
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"):
        with contextlib.suppress(FileNotFoundError):    # another process of the run removed it first
            os.unlink(path)


def train(cfg: Config, where: str = "<config>") -> int:
    trainer = Trainer(cfg, where)
    try:
        return trainer.run()
    finally:
        trainer.close()
