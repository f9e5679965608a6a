"""`longctx train`: the per-rank training loop (what the DeepSpeed launcher starts on each process).

One job runs every curriculum stage: at a stage change the data is re-packed at the new
length, gradient accumulation is re-planned (tokens per step stay as configured), the
stage's mitigations are applied and the LR schedule continues. Checkpoints hold the
DeepSpeed state plus the trainer state (step, stage, tokens, loader position, RNG), so a
run killed at any point resumes to the losses of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from longctx.data.stream import PackedStream, open_splits, rank_share
from longctx.data.tokenizer import identity, load_tokenizer

from ..config import Config, ConfigError, model_config
from ..evaluate.passkey import build_prompt
from ..evaluate.share import from_distributed
from ..model import Mamba2LM
from ..model.carry import CarriedStates
from ..parallel import Groups
from ..parallel.shm import CLEAN_STREAMING_SHM, release_shm_buffers, release_stale_streaming_shm
from . import rank_status
from .checkpoint import EXIT_STOPPED, Checkpointer, write_stop_marker
from .compatibility import check_resume, run_identity
from .curriculum import learning_rate, plan, stage_at
from .evaluator import EvaluationInterrupted, Evaluator
from .loss import sequence_loss
from .metrics import MetricsLogger
from .preflight import preflight
from .run_dir import check_run_id, is_under, recorded_run_id, resume_mode, set_aside, start_run
from .stage_mitigations import StageMitigations

EVAL_SEED_OFFSET = 1_000_003      # the held-out stream's order: another seed than the training stream's


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


def adamw(model, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused (one kernel over all parameters: on a small model the per-parameter
    loop of the default implementation is a visible share of a step) where the parameters' device has it."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except RuntimeError:            # a device without the fused kernel
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


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


def _float64_mean(losses) -> torch.Tensor:
    """This rank's mean of its micro-batches' losses in float64 (0 when there are none), to sum over ranks."""
    return torch.stack(losses).double().mean() if losses else torch.zeros((), dtype=torch.float64)


class Trainer:
    def __init__(self, cfg: Config, where: str = "<config>"):
        import deepspeed
        import torch.distributed as dist
        self.cfg, self.dist = cfg, dist
        self.stop_requested = False        # SIGTERM from here on is a stop at a checkpoint, not a kill
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop_requested", True))
        cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
        # a collective that waits longer than this fails: a rank lost on another node ends the run (NCCL does
        # not always see a dead peer; gloo sees the closed connection at once)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                                   timeout=timedelta(seconds=cfg.train.collective_timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        rank_status.write_status(Path(cfg.run.dir), self.rank, "running")
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)

        self.run_dir = Path(cfg.run.dir)
        self.tok = load_tokenizer(cfg.tokenizer)
        model = build_model(cfg)
        if model.config.padded_vocab_size < self.tok.vocab_size:
            raise ConfigError(f"{where}: model.vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({self.tok.vocab_size})")
        self.plans = plan(cfg, self.world, model.config.chunk_size, where)
        shards = preflight(cfg, where, self.tok)   # shards, tokenizer and model belong together
        if cfg.eval.every_checkpoint and "passkey" in cfg.eval.kinds:
            for L in cfg.eval.passkey_lengths:     # fail now, not at the first checkpoint
                try:
                    build_prompt(self.tok, L, 0.5, "12345")
                except ValueError as e:
                    raise ConfigError(f"{where}: eval.passkey_lengths: {e}") from None
        if cfg.train.activation_checkpointing:
            model.enable_gradient_checkpointing()
        if cfg.train.compile:
            failure = model.compile_blocks()
            if failure and self.rank == 0:
                print(f"train.compile: torch.compile cannot build kernels here ({failure}); the blocks run eagerly",
                      flush=True)
        self.model = model

        cache = cfg.data.cache_dir or str(self.run_dir / "cache")
        with self._host_local_world():       # training reads only train/, every evaluation only heldout/
            # a killed run leaves mosaicml-streaming's registrations in /dev/shm (and a reader with a remote is
            # refused a local cache still registered there): under `longctx run` the first rank removes those no
            # live process maps while the others wait. Here, not in the launcher: the ranks import streaming
            # anyway, the launcher would spend ~6 s on it before starting them
            if os.environ.get(CLEAN_STREAMING_SHM) == "1":
                if self.rank == 0:
                    self._release_stale_streaming_shm()
                self.dist.barrier()
            source, heldout = open_splits(shards, cache)
        self.stream = PackedStream(source, self.tok.eos_id, seed=cfg.run.seed)
        # None: no held-out document, and preflight found that nothing in this run reads one
        self.eval_stream = (PackedStream(heldout, self.tok.eos_id, seed=cfg.run.seed + EVAL_SEED_OFFSET)
                            if heldout is not None else None)

        self.identity = run_identity(cfg, model.config, identity(self.tok), source.identity, self.world, self.plans)
        self.checkpoints = Checkpointer(
            None, self.run_dir / "checkpoints", is_rank0=self.rank == 0, barrier=dist.barrier,
            keep_last=cfg.checkpoint.keep_last, model_config=model.config, tokenizer_identity=identity(self.tok),
            tokenizer_file=cfg.tokenizer.path if cfg.tokenizer.kind == "hf" else None,
            metrics_file=self.run_dir / "metrics.jsonl")
        self.resume_as_applied = resume = resume_mode(cfg.run.resume, self.rank == 0)
        if self.rank == 0 and resume == "never":
            moved = set_aside(self.run_dir)
            if moved is not None:
                print(f"run.resume=never: the earlier run's outputs are now in {moved}", flush=True)
        dist.barrier()
        self.to_resume = self.checkpoints.to_resume(resume)
        saved_id = None
        if self.to_resume is not None:        # refuse what the checkpoint cannot continue under before DeepSpeed starts
            saved_id = self._check_resume(*self.to_resume, where)
        self.run_id = self._this_run(saved_id)

        first = self.plans[0]
        optimizer = adamw(model, first.lr, cfg.train.weight_decay, tuple(cfg.train.betas))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, first.micro_batch, first.grad_accum))
        self.checkpoints.engine = self.engine
        self.sp_groups = Groups(self.world, self.rank)
        self.state = {"step": 0, "tokens": 0, "bad_steps": 0, "skipped_micro_batches": 0}
        self.pending = None              # a stop checkpoint's step record whose evaluation is still to run
        self.step_ended = None           # when the last step ended, if nothing else ran since
        self.carried: Optional[CarriedStates] = None   # this rank's rows' final states (carry_state), or zeros
        self.stage_of_carried: Optional[int] = None    # the stage they belong to
        self.mitigations = StageMitigations(cfg, model, self.calibration_prompt)
        self.evaluator = Evaluator(cfg, model, self.tok, self.eval_stream, self.mitigations, self.documents,
                                   self.device, write=self.rank == 0, should_stop=self.stop_agreed,
                                   share=from_distributed(dist, cfg.train.zero_stage))

    @staticmethod
    def _release_stale_streaming_shm() -> None:
        try:
            removed = release_stale_streaming_shm()
        except OSError as e:       # the others wait at the barrier: a clean-up that fails must not stop this rank
            print(f"could not remove killed runs' mosaicml-streaming registrations ({e}); continuing", flush=True)
            return
        if removed:
            print(f"removed {len(removed)} file(s) of killed runs' mosaicml-streaming registrations", flush=True)

    @contextlib.contextmanager
    def _host_local_world(self):
        """LOCAL_RANK / LOCAL_WORLD_SIZE as mosaicml-streaming needs them: the ranks that share this host
        (and its /dev/shm) elect one leader. A launcher's own values count the ranks it started, which is
        less when several launchers share a host (two SLURM nodes on one machine)."""
        import socket
        hosts = [None] * self.world
        self.dist.all_gather_object(hosts, socket.gethostname())
        here = [r for r, h in enumerate(hosts) if h == socket.gethostname()]
        saved = {k: os.environ.get(k) for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        os.environ.update(LOCAL_RANK=str(here.index(self.rank)), LOCAL_WORLD_SIZE=str(len(here)))
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    # -- lifecycle ------------------------------------------------------------------------------
    def _check_resume(self, root: Path, tag: str, where: str) -> Optional[str]:
        """Refuses a checkpoint this run cannot continue; returns the id of the run that wrote it."""
        saved = json.loads((root / tag / "trainer_state.json").read_text())
        if "identity" not in saved:
            raise ConfigError(f"{root / tag}: the checkpoint records no run identity (written by an older longctx); "
                              "it cannot be checked against this run: start a new run with run.resume=never")
        check_run_id(self.run_dir, root / tag, saved.get("run_id"), self.resume_as_applied)
        for note in check_resume(saved["identity"], self.identity, saved["step"], where):
            if self.rank == 0:
                print(f"resume: changed since {tag}: {note}", flush=True)
        return saved.get("run_id")

    def _this_run(self, saved_id: Optional[str]) -> str:
        """The run's id: a new one for a new run, the checkpoint's when continuing one (rank 0 records it)."""
        if self.rank == 0:
            mine = recorded_run_id(self.run_dir)
            if self.to_resume is None:
                start_run(self.run_dir)
            elif saved_id and mine and saved_id != mine:      # another run's checkpoint, given by path
                if not is_under(self.to_resume[0], self.run_dir / "checkpoints"):
                    moved = set_aside(self.run_dir)   # this directory's run: not pruned for, nor mixed with it
                    print(f"run.resume={self.cfg.run.resume} continues run {saved_id}; this directory's run "
                          f"{mine} is now in {moved}", flush=True)
                start_run(self.run_dir, saved_id)
            elif mine is None:                        # an older longctx's run
                start_run(self.run_dir, saved_id)
        self.dist.barrier()
        return recorded_run_id(self.run_dir)

    def resume(self) -> int:
        found = self.to_resume
        if found is None:
            return 0
        trainer = self.checkpoints.load(*found)
        self.state = {k: trainer[k] for k in self.state}
        self.stream.load_state_dict(trainer["loader"])
        if self.eval_stream is not None:
            self.eval_stream.load_state_dict(trainer["eval_loader"])
        self.mitigations.load_state_dict(trainer.get("mitigations", {}))
        _set_rng_state(trainer["rng"])
        self.pending = trainer.get("pending")
        carried = self.checkpoints.load_rank_state(*found, self.rank)
        if carried is not None and trainer["identity"]["world_size"] != self.world:
            carried = None                   # rows are laid out over another world: the stage's states restart
            if self.rank == 0:
                print("resume: the world size changed; carried states start again from zeros", flush=True)
        if carried is not None and carried.get("carried") is not None:
            self.carried = CarriedStates.from_state_dict(carried["carried"], self.device)
            self.stage_of_carried = carried["stage"]
        if self.rank == 0:
            print(f"resumed from {found[0] / found[1]} at step {self.state['step']}", flush=True)
        return self.state["step"]

    def trainer_state(self, stage, pending: Optional[dict] = None) -> dict:
        return {**self.state, "stage": stage.index, "stage_name": stage.name, "seq_len": stage.seq_len,
                "loader": self.stream.state_dict(),
                "eval_loader": None if self.eval_stream is None else self.eval_stream.state_dict(),
                "rng": _rng_state(),
                "mitigations": self.mitigations.state_dict(), "identity": self.identity, "pending": pending,
                "run_id": self.run_id}

    def rank_state(self) -> Optional[tuple]:
        """(rank, what only this rank holds: its rows' carried states), or None when nothing is carried."""
        if self.carried is None:
            return None
        return self.rank, {"stage": self.stage_of_carried, "carried": self.carried.state_dict()}

    def enter_stage(self, p) -> None:
        # DeepSpeed's data-parallel world is every rank (longctx.pipeline.parallel): it counts each SP rank's
        # micro-batch as one, so its batch size is micro x accum x world, not x DP.
        self.engine.set_train_batch_size(p.micro_batch * p.grad_accum * self.world)
        if self.stage_of_carried != p.index:          # a stage starts from zero states (rows, lengths may change)
            self.carried, self.stage_of_carried = None, p.index
        self.model.set_carried(None)
        self.model.set_sequence_parallel(None)        # calibration reads whole sequences
        self.model.set_mitigations(self.mitigations.of(p))
        self.model.set_sequence_parallel(self.sp_groups.get(p.seq_parallel))
        if self.rank == 0:
            print(f"stage {p.index} '{p.name}': seq_len {p.seq_len}, {p.steps} steps, micro {p.micro_batch} x "
                  f"accum {p.grad_accum} x DP {p.data_parallel} x SP {p.seq_parallel}", flush=True)

    def calibration_prompt(self, seq_len: int) -> torch.Tensor:
        return torch.as_tensor(self.eval_stream.next_batch(1, seq_len).input_ids, device=self.device)

    # -- steps --------------------------------------------------------------------------------
    def train_step(self, p) -> tuple:
        """One optimizer step. Returns its metrics record and whether any rank was asked to stop.

        One collective per step, before the last micro-batch's backward (whose engine step applies the
        optimizer): which micro-batches had a finite loss on every rank, the loss, the stop flag. Each
        rank reads its own losses' finiteness on the host (no collective) to leave a bad micro-batch out
        of its backward. A micro-batch whose loss is not finite on some rank is left out on every rank,
        and the step is the one its other micro-batches give alone: the engine is put back as the step
        began (a snapshot taken before the optimizer step) and the step retaken over the kept ones. A step
        whose micro-batches were all bad changes neither parameters nor optimizer. A step whose reduced
        gradient is not finite (a finite loss can still give one) is bad as a whole, exactly like that:
        the engine is put back as the step began and every micro-batch counts as left out."""
        lr = learning_rate(self.plans, self.state["step"])
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        # wall time from the previous step's end (loader, logging and checks included); from here after a
        # checkpoint, an evaluation or a stage change
        t0 = self.step_ended or time.perf_counter()
        dp_rank, per = self.rank // p.seq_parallel, p.sequences_per_step // p.data_parallel
        if p.carry_state == "document":     # one row-stable stream per row slot; this rank reads its slots
            batch = self.stream.next_lane_batch(p.data_parallel * p.micro_batch, p.grad_accum, p.seq_len,
                                                p.max_doc_tokens, keep=range(dp_rank * p.micro_batch,
                                                                             (dp_rank + 1) * p.micro_batch))
        else:
            batch = self.stream.next_batch(p.sequences_per_step, p.seq_len, p.max_doc_tokens,
                                           keep=range(dp_rank * per, (dp_rank + 1) * per))  # only this rank's rows
        share = rank_share(batch, 0, 1, self.rank % p.seq_parallel, p.seq_parallel)
        micro = [share.rows(m * p.micro_batch, (m + 1) * p.micro_batch) for m in range(p.grad_accum)]
        means, finite, snapshot, entering = [], [], None, []
        for m, rows in enumerate(micro):
            entering.append(self._enter_carried(p, rows))
            loss, mean = self._forward(rows)
            self._keep_carried(p)
            ok = bool(torch.isfinite(loss.detach()) & torch.isfinite(mean))     # this rank's, on the host
            means.append(mean)
            finite.append(ok)
            last = m == len(micro) - 1
            if last:
                agreed, mean_loss, stop = self._agree(means, finite)
                if not all(agreed):
                    snapshot = self._snapshot()      # parameters and optimizer state as the step began
            # a step to be retaken is undone anyway: its gradient is not checked
            applied = self._backward(loss if ok else self._zero_loss(), boundary=last, check=snapshot is None)
        kept = [rows for rows, ok in zip(micro, agreed) if ok]
        if snapshot is not None:            # undo the step DeepSpeed took on the partial gradient, retake it
            self._restore(snapshot)
            self.carried = None             # a bad micro-batch's final state is not carried on
            for i, (rows, state) in enumerate((r, e) for r, e, ok in zip(micro, entering, agreed) if ok):
                self.model.set_carried(state)
                loss, _ = self._forward(rows)
                # the engine divides by the configured accumulation; the step averages over the kept ones
                applied = self._backward(loss * (len(micro) / len(kept)), boundary=i == len(kept) - 1)
            mean_loss = self._mean_loss([m for m, ok in zip(means, agreed) if ok])
        if not applied:                     # a non-finite gradient: nothing of this step was applied
            kept, self.carried = [], None
        bad = len(micro) - len(kept)
        self.model.set_carried(None)        # evaluations and calibration read from zero states
        elapsed = time.perf_counter() - t0
        self.state["step"] += 1
        self.state["tokens"] += p.global_batch_tokens
        self.state["skipped_micro_batches"] += bad
        self.state["bad_steps"] = self.state["bad_steps"] + 1 if bad else 0
        grad_norm = self.engine.get_global_grad_norm() if kept else None
        record = {"step": self.state["step"], "stage": p.index, "stage_name": p.name, "seq_len": p.seq_len,
                  "loss": mean_loss if kept else None, "skipped_micro_batches": bad, "lr": lr,
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "tokens": self.state["tokens"], "tokens_per_s": p.global_batch_tokens / max(elapsed, 1e-9)}
        return record, stop

    def _enter_carried(self, p, rows) -> Optional[list]:
        """Sets the state this micro-batch's rows start from (carry_state; None: zeros) and returns it.
        Under document resets a row of a document lane takes the carried state only where it continues the
        document its lane's previous row was in (docs/guides/research.md, "Carried state")."""
        if p.carry_state == "none":
            return None
        continues = rows.continues if p.carry_state == "document" and self.cfg.train.document_resets else None
        return self.model.enter_carried(self.carried, None if continues is None else torch.as_tensor(continues))

    def _keep_carried(self, p) -> None:
        """After a micro-batch's forward: its final state (the sequence's end: the last rank of an SP group)
        is what the same rows start from next."""
        if p.carry_state == "none":
            return
        self.carried = self.model.carried_final()

    def _agree(self, means, finite) -> tuple:
        """The step's collective: (finite on every rank, per micro-batch), the loss averaged over ranks
        (meaningful when every micro-batch is kept), whether any rank was asked to stop."""
        local = _float64_mean(means if all(finite) else [])
        summed = torch.tensor([float(not ok) for ok in finite] + [0.0, float(self.stop_requested)],
                              dtype=torch.float64, device=self.device)
        summed[-2] = local
        self.dist.all_reduce(summed)
        values = summed.tolist()
        return [v == 0 for v in values[:-2]], values[-2] / self.world, values[-1] > 0

    def _mean_loss(self, kept_means) -> float:
        """The loss over the kept micro-batches, averaged over ranks (after a step with bad ones)."""
        summed = _float64_mean(kept_means).reshape(1).to(self.device)
        self.dist.all_reduce(summed)
        return float(summed[0]) / self.world

    def _forward(self, rows) -> tuple:
        """(loss to backpropagate, mean token loss) of one micro-batch."""
        ids = torch.as_tensor(rows.input_ids, device=self.device)
        labels = torch.as_tensor(rows.labels, device=self.device)
        return sequence_loss(self.engine(ids, seq_idx=self.documents(rows)).logits, labels,
                             self.model.sequence_parallel)

    def _backward(self, loss, boundary: bool, check: bool = True) -> bool:
        """Backward and the engine's step; at the accumulation boundary, False when the step's gradient was not
        finite, and the engine is then as the step began (the optimizer would have written NaN into the
        weights and their moments: AdamW under ZeRO 0, and DeepSpeed checks no overflow in bf16)."""
        # the boundary is set explicitly, so a retaken step may have fewer micro-batches than configured
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)
        if boundary and check and not self._gradient_finite():
            snapshot = self._snapshot()      # before the optimizer step: parameters and optimizer state
            self.engine.step()               # ends DeepSpeed's accumulation (buffers, counters) ...
            self._restore(snapshot)          # ... and what it applied is undone
            return False
        self.engine.step()
        return True

    def _gradient_finite(self) -> bool:
        """Whether the reduced gradient about to be applied is finite on every rank (a collective). fp16 is left
        to DeepSpeed's loss scaler, which skips an overflowing step and lowers the scale: that is how it
        finds the scale, not a bad step."""
        if self.cfg.train.precision == "fp16":
            return True
        if self.cfg.train.zero_stage > 0:    # the ZeRO optimizer holds the reduced partitions; it agrees over ranks
            return not self.engine.optimizer.has_overflow(partition_gradients=True)
        grads = [p_.grad for p_ in self.engine.module.parameters() if p_.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        bad = (~finite).to(device=self.device, dtype=torch.float32).reshape(1)    # one flag: one host sync
        self.dist.all_reduce(bad, op=self.dist.ReduceOp.MAX)
        return not bool(bad.item())

    def _zero_loss(self):
        """A loss with zero gradients for every parameter (DeepSpeed reduces every parameter's gradient)."""
        return sum(p_.sum() for p_ in self.engine.module.parameters()) * 0.0

    def _snapshot(self) -> Path:
        path = self.run_dir / "checkpoints" / ".before-nonfinite"
        self.engine.save_checkpoint(str(path), tag="step", client_state={}, save_latest=False)
        return path

    def _restore(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path), tag="step", load_optimizer_states=True, load_lr_scheduler_states=False)
        self.dist.barrier()
        if self.rank == 0:
            shutil.rmtree(path)

    def documents(self, batch):
        """seq_idx for the scan (state reset at each document start), or None when train.document_resets
        is off and packed documents flow into each other."""
        if not self.cfg.train.document_resets:
            return None
        return torch.as_tensor(batch.seq_idx, device=self.device)

    def run(self) -> int:
        start = self.resume()
        # a pending record (stopped before its due evaluation) is logged again once evaluated
        metrics = MetricsLogger(self.run_dir, self.rank == 0, resume_step=start - (self.pending is not None))
        total = self.plans[-1].last_step
        every = self.cfg.checkpoint.every_steps
        current = None
        try:
            if self.stop_agreed():            # asked to stop while starting: nothing new to save
                if self.rank == 0:
                    write_stop_marker(self.run_dir, start)
                    print(f"SIGTERM while starting: exiting with {EXIT_STOPPED}; resume continues from step {start}",
                          flush=True)
                return EXIT_STOPPED
            if self.pending is not None:      # the evaluation a stop checkpoint put off
                p = stage_at(self.plans, start - 1)
                self.enter_stage(p)
                current = p.index
                if not self.evaluate(p, start, self.pending, metrics):
                    return self.stop(p, self.pending, metrics, evaluation_due=True)
                metrics.log(self.pending)
            while self.state["step"] < total:
                p = stage_at(self.plans, self.state["step"])
                if current != p.index:
                    self.enter_stage(p)
                    current = p.index
                    self.step_ended = None
                record, stop = self.train_step(p)
                self.step_ended = time.perf_counter()
                step = self.state["step"]
                due = step == p.last_step or bool(every and step % every == 0)
                if stop:
                    return self.stop(p, record, metrics, evaluation_due=due and self.cfg.eval.every_checkpoint)
                if due and not self.evaluate(p, step, record, metrics):
                    return self.stop(p, record, metrics, evaluation_due=True)
                metrics.log(record)          # before the checkpoint: a kill in between resumes from the previous one
                if due:
                    self.checkpoints.save(step, self.trainer_state(p), self.rank_state())
                    self.step_ended = None
                if self.state["bad_steps"] >= self.cfg.train.max_bad_steps:
                    raise RuntimeError(f"{self.state['bad_steps']} steps in a row had a non-finite loss or gradient "
                                       f"(train.max_bad_steps = {self.cfg.train.max_bad_steps}); lower the LR or "
                                       "check the data; the last checkpoint is intact")
        finally:
            metrics.close()
        return 0

    def evaluate(self, p, step: int, record: dict, metrics) -> bool:
        """The checkpoint's evaluation into `record`; False when a stop interrupted it, with the held-out
        stream and RNG put back as they were before it (the evaluation reruns from there after resuming)."""
        before = None if self.eval_stream is None else self.eval_stream.state_dict(), _rng_state()
        evaluated = dict(record)
        try:
            self.evaluator.evaluate(p, step, evaluated, metrics)
        except EvaluationInterrupted:
            if self.eval_stream is not None:
                self.eval_stream.load_state_dict(before[0])
            _set_rng_state(before[1])
            return False
        record.update(evaluated)
        return True

    def stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        t = torch.tensor([float(self.stop_requested)], device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def stop(self, p, record: dict, metrics, evaluation_due: bool) -> int:
        """SIGTERM (pre-emption, a time limit): the checkpoint first, since the grace before SIGKILL is
        short; an evaluation this step was due for runs when the run resumes, and its record is logged then."""
        step = self.state["step"]
        if not evaluation_due:
            metrics.log(record)
        self.checkpoints.save(step, self.trainer_state(p, pending=record if evaluation_due else None),
                              self.rank_state())
        if self.rank == 0:
            write_stop_marker(self.run_dir, step)
            print(f"SIGTERM: checkpoint written at step {step}; exiting with {EXIT_STOPPED} (resume to continue"
                  f"{', evaluation of this step included' if evaluation_due else ''})", flush=True)
        return EXIT_STOPPED

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()
        # after the barrier no rank uses them any more
        release_shm_buffers(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
                            rank=os.environ.get("LOCAL_RANK", "0"))
        # the readers' shared memory: `longctx train` leaves by os._exit, which runs no finalizer (Python's
        # resource tracker would remove it, warning of "leaked shared_memory objects")
        for stream in (self.stream, self.eval_stream):
            if stream is not None:
                stream.source.close()


def train(cfg: Config, where: str = "<config>") -> int:
    rank = int(os.environ.get("RANK", "0"))
    trainer, state = None, "failed"
    try:
        trainer = Trainer(cfg, where)
        rc = trainer.run()
        state = "stopped" if rc == EXIT_STOPPED else "finished"
        return rc
    except BaseException as e:
        state = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise
    finally:
        rank_status.write_status(Path(cfg.run.dir), rank, state)
        if trainer is not None:
            trainer.close()
