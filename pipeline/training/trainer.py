"""`longctx train`: the per-rank training loop (what the DeepSpeed launcher starts on each process).

One job runs every curriculum stage: at a stage change the data is re-packed at the new
length, gradient accumulation is re-planned (tokens per step stay as configured), the
stage's mitigations are applied and the LR schedule continues. Checkpoints hold the
DeepSpeed state plus the trainer state (step, stage, tokens, loader position, RNG), so a
run killed at any point resumes to the losses of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch

from longctx.data.stream import PackedStream, open_splits, rank_share
from longctx.data.tokenizer import identity, load_tokenizer

from ..config import Config, ConfigError, evaluation_settings, model_config
from ..evaluate import niah
from ..evaluate.passkey import build_prompt
from ..evaluate.share import from_distributed
from ..model import Mamba2LM
from ..model.carry import CarriedStates
from ..parallel import Groups
from . import rank_status
from .checkpoint import EXIT_STOPPED, Checkpointer, write_stop_marker
from .compatibility import check_resume, run_identity
from .curriculum import learning_rate, plan, stage_at
from .evaluator import EvaluationInterrupted, Evaluator
from .loss import sequence_loss
from .metrics import MetricsLogger
from .preflight import preflight
from .process import (
    host_local_world,
    join_process_group,
    leave_process_group,
    rank_device,
    release_killed_runs_streaming_shm,
    uses_cuda,
)
from .progress import Progress, live_console
from .retake import Retake
from .run_dir import check_run_id, is_under, recorded_run_id, resume_mode, set_aside, start_run
from .stage_mitigations import StageMitigations
from .trainer_state import (
    carried_from_rank_state,
    load_trainer_state,
    rank_state,
    rng_state,
    seed_rngs,
    set_rng_state,
    trainer_state,
)

EVAL_SEED_OFFSET = 1_000_003      # the held-out stream's order: another seed than the training stream's


def build_model(cfg: Config) -> Mamba2LM:
    if cfg.model.from_pretrained:
        return Mamba2LM.from_pretrained(cfg.model.from_pretrained)
    return Mamba2LM(model_config(cfg))


def check_vocabulary(model: Mamba2LM, tok, where: str) -> None:
    """Refuses a model whose vocabulary cannot hold every token the tokenizer gives."""
    if model.config.padded_vocab_size < tok.vocab_size:
        raise ConfigError(f"{where}: model.vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tok.vocab_size})")


def check_passkey_prompts(cfg: Config, tok, where: str) -> None:
    """Builds a passkey prompt of each eval.passkey_lengths with this tokenizer, and checks that every niah
    prompt's fixed parts (instruction, needles, question) fit in its length: fails now, not at the first
    checkpoint."""
    for key, ev in evaluation_settings(cfg.eval):
        if ev.every_checkpoint and "passkey" in ev.kinds:
            for length in ev.passkey_lengths:
                try:
                    build_prompt(tok, length, 0.5, "12345")
                except ValueError as e:
                    raise ConfigError(f"{where}: {key}.passkey_lengths: {e}") from None
        if ev.every_checkpoint and "niah" in ev.kinds:
            try:
                niah.check_prompts(tok, ev.niah_tasks, ev.niah_lengths, ev.niah_samples, cfg.run.seed)
            except ValueError as e:
                raise ConfigError(f"{where}: {key}.niah_lengths: {e}") from None


def deepspeed_config(cfg: Config, micro: int, accum: int) -> dict:
    """The run's settings, then `train.deepspeed` merged on top (a raw passthrough wins)."""
    train = cfg.train
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
          "gradient_clipping": train.grad_clip, "zero_optimization": {"stage": train.zero_stage},
          "bf16": {"enabled": train.precision == "bf16"}, "fp16": {"enabled": train.precision == "fp16"},
          "steps_per_print": 1 << 30, "wall_clock_breakdown": False}

    def merge(base, top):
        for key, value in top.items():
            nested = isinstance(value, dict) and isinstance(base.get(key), dict)
            base[key] = merge(dict(base.get(key, {})), value) if nested else value
        return base
    return merge(ds, train.deepspeed)


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or getattr(param, "_no_weight_decay", False) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused (one kernel over all parameters: on a small model the per-parameter
    loop of the default implementation is a visible share of a step) where the parameters' device has it."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except RuntimeError:            # a device without the fused kernel
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


class Trainer:
    def __init__(self, cfg: Config, where: str = "<config>"):
        # imported before the SIGTERM handler is set: a SIGTERM during its seconds of import ends a process that
        # has nothing to save yet
        import deepspeed  # noqa: F401
        import torch.distributed as dist
        self.cfg, self.dist, self.run_dir = cfg, dist, Path(cfg.run.dir)
        self.stop_requested = False        # SIGTERM from here on is a stop at a checkpoint, not a kill
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop_requested", True))
        cuda = uses_cuda()
        self.rank, self.world = join_process_group(cuda, cfg.train.collective_timeout_s)
        rank_status.write_status(self.run_dir, self.rank, "running")
        self.device = rank_device(cuda)
        seed_rngs(cfg.run.seed)

        self.tok = load_tokenizer(cfg.tokenizer)
        self.model = build_model(cfg)
        check_vocabulary(self.model, self.tok, where)
        self.plans = plan(cfg, self.world, self.model.config.chunk_size, where)
        shards = preflight(cfg, where, self.tok)   # shards, tokenizer and model belong together
        check_passkey_prompts(cfg, self.tok, where)
        self._prepare_model()
        source = self._open_streams(shards)

        self.identity = run_identity(cfg, self.model.config, identity(self.tok), source.identity, self.world,
                                     self.plans)
        self.checkpoints = self._checkpointer()
        self._resume_or_start(where)       # before DeepSpeed starts: a checkpoint it cannot continue is refused
        self.engine, self.optimizer = self._start_engine()
        self.checkpoints.engine = self.engine
        self.retake = Retake(self.engine, dist, self.device, self.rank, self.world, self.run_dir / "checkpoints",
                             cfg.train.precision, cfg.train.zero_stage)
        self.sp_groups = Groups(self.world, self.rank)

        self.state = {"step": 0, "tokens": 0, "bad_steps": 0, "skipped_micro_batches": 0}
        self.pending = None              # a stop checkpoint's step record whose evaluation is still to run
        self.step_ended = None           # when the last step ended, if nothing else ran since
        self.carried: Optional[CarriedStates] = None   # this rank's rows' final states (carry_state), or zeros
        self.stage_of_carried: Optional[int] = None    # the stage they belong to
        self.mitigations = StageMitigations(cfg, self.model, self.calibration_prompt)
        self.evaluator = Evaluator(cfg, self.model, self.tok, self.eval_stream, self.mitigations, self.documents,
                                   self.device, write=self.rank == 0, should_stop=self.stop_agreed,
                                   share=from_distributed(dist, cfg.train.zero_stage))

    # -- start-up -------------------------------------------------------------------------------
    def _prepare_model(self) -> None:
        """What train.activation_checkpointing and train.compile ask of the model."""
        if self.cfg.train.activation_checkpointing:
            self.model.enable_gradient_checkpointing()
        if self.cfg.train.compile:
            failure = self.model.compile_blocks()
            if failure and self.rank == 0:
                print(f"train.compile: torch.compile cannot build kernels here ({failure}); the blocks run eagerly",
                      flush=True)

    def _open_streams(self, shards: str):
        """The training stream (self.stream) and the held-out one (self.eval_stream); returns the training
        documents' source. Collectives: every rank opens them at the same point."""
        cache = self.cfg.data.cache_dir or str(self.run_dir / "cache")
        with host_local_world(self.rank, self.world):    # training reads only train/, every evaluation only heldout/
            release_killed_runs_streaming_shm(self.rank)
            source, heldout = open_splits(shards, cache)
        seed = self.cfg.run.seed
        self.stream = PackedStream(source, self.tok.eos_id, seed=seed)
        # None: no held-out document, and preflight found that nothing in this run reads one
        self.eval_stream = (PackedStream(heldout, self.tok.eos_id, seed=seed + EVAL_SEED_OFFSET)
                            if heldout is not None else None)
        return source

    def _checkpointer(self) -> Checkpointer:
        """This run's checkpoints; the engine is set once DeepSpeed has started."""
        cfg = self.cfg
        tokenizer_file = cfg.tokenizer.path if cfg.tokenizer.kind == "hf" else None
        return Checkpointer(
            None, self.run_dir / "checkpoints", is_rank0=self.rank == 0, barrier=self.dist.barrier,
            keep_last=cfg.checkpoint.keep_last, model_config=self.model.config, tokenizer_identity=identity(self.tok),
            tokenizer_file=tokenizer_file, metrics_file=self.run_dir / "metrics.jsonl")

    def _resume_or_start(self, where: str) -> None:
        """run.resume as this process applies it (self.resume_as_applied), the checkpoint it continues
        (self.to_resume; None: a new run), refused when this run cannot continue it, and the run's id."""
        self.resume_as_applied = resume = resume_mode(self.cfg.run.resume, self.rank == 0)
        if self.rank == 0 and resume == "never":
            moved = set_aside(self.run_dir)
            if moved is not None:
                print(f"run.resume=never: the earlier run's outputs are now in {moved}", flush=True)
        self.dist.barrier()
        self.to_resume = self.checkpoints.to_resume(resume)
        saved_id = None
        if self.to_resume is not None:
            saved_id = self._check_resume(*self.to_resume, where)
        self.run_id = self._this_run(saved_id)

    def _start_engine(self) -> tuple:
        """DeepSpeed's engine and optimizer, set up for the first stage (`enter_stage` sets each stage's)."""
        import deepspeed
        first = self.plans[0]
        optimizer = adamw(self.model, first.lr, self.cfg.train.weight_decay, tuple(self.cfg.train.betas))
        engine, optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer,
            config=deepspeed_config(self.cfg, first.micro_batch, first.grad_accum))
        return engine, optimizer

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
        saved = self.checkpoints.load(*found)
        self.state = {k: saved[k] for k in self.state}
        load_trainer_state(saved, stream=self.stream, eval_stream=self.eval_stream, mitigations=self.mitigations)
        self.pending = saved.get("pending")
        self.carried, self.stage_of_carried = carried_from_rank_state(
            self.checkpoints.load_rank_state(*found, self.rank), saved["identity"]["world_size"], self.world,
            self.device, self.rank == 0)
        if self.rank == 0:
            print(f"resumed from {found[0] / found[1]} at step {self.state['step']}", flush=True)
        return self.state["step"]

    def save_checkpoint(self, stage, pending: Optional[dict] = None) -> None:
        """The checkpoint at this step of `stage`: DeepSpeed's state, the trainer state and this rank's own."""
        self.checkpoints.save(self.state["step"],
                              trainer_state(self.state, stage, stream=self.stream, eval_stream=self.eval_stream,
                                            mitigations=self.mitigations, identity=self.identity,
                                            run_id=self.run_id, pending=pending),
                              rank_state(self.rank, self.carried, self.stage_of_carried))

    def enter_stage(self, stage) -> None:
        # DeepSpeed's data-parallel world is every rank (longctx.pipeline.parallel): it counts each SP rank's
        # micro-batch as one, so its batch size is micro x accum x world, not x DP.
        self.engine.set_train_batch_size(stage.micro_batch * stage.grad_accum * self.world)
        if self.stage_of_carried != stage.index:      # a stage starts from zero states (rows, lengths may change)
            self.carried, self.stage_of_carried = None, stage.index
        self.model.set_carried(None)
        self.model.set_sequence_parallel(None)        # calibration reads whole sequences
        self.model.set_mitigations(self.mitigations.of(stage))
        self.model.set_sequence_parallel(self.sp_groups.get(stage.seq_parallel))
        if self.rank == 0:
            print(f"stage {stage.index} '{stage.name}': seq_len {stage.seq_len}, {stage.steps} steps, micro "
                  f"{stage.micro_batch} x accum {stage.grad_accum} x DP {stage.data_parallel} x SP "
                  f"{stage.seq_parallel}", flush=True)

    def calibration_prompt(self, seq_len: int) -> torch.Tensor:
        return torch.as_tensor(self.eval_stream.next_batch(1, seq_len).input_ids, device=self.device)

    # -- steps --------------------------------------------------------------------------------
    def train_step(self, stage) -> tuple:
        """One optimizer step. Returns its metrics record and whether any rank was asked to stop.

        One collective per step, before the last micro-batch's backward (whose engine step applies the
        optimizer): which micro-batches had a finite loss on every rank, the loss, the stop flag. Each
        rank reads its own losses' finiteness on the host (no collective) to leave a bad micro-batch out
        of its backward. A micro-batch whose loss is not finite on some rank is left out on every rank,
        and the step is the one its other micro-batches give alone: the engine is put back as the step
        began (a snapshot taken before the optimizer step) and the step retaken over the kept ones. A step
        whose micro-batches were all bad changes neither parameters nor optimizer. A step whose reduced
        gradient is not finite (a finite loss can still give one) is bad as a whole, exactly like that:
        the engine is put back as the step began and every micro-batch counts as left out (`retake.py`)."""
        lr = learning_rate(self.plans, self.state["step"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # wall time from the previous step's end (loader, logging and checks included); from here after a
        # checkpoint, an evaluation or a stage change
        t0 = self.step_ended or time.perf_counter()
        micro = self._micro_batches(stage)
        means, finite, snapshot, entering = [], [], None, []
        for m, rows in enumerate(micro):
            entering.append(self._enter_carried(stage, rows))
            loss, mean = self._forward(rows)
            self._keep_carried(stage)
            ok = bool(torch.isfinite(loss.detach()) & torch.isfinite(mean))     # this rank's, on the host
            means.append(mean)
            finite.append(ok)
            last = m == len(micro) - 1
            if last:
                agreed, mean_loss, stop = self.retake.agree(means, finite, self.stop_requested)
                if not all(agreed):
                    snapshot = self.retake.snapshot()      # parameters and optimizer state as the step began
            # a step to be retaken is undone anyway: its gradient is not checked
            applied = self._backward(loss if ok else self.retake.zero_loss(), boundary=last,
                                     check=snapshot is None)
        kept = [rows for rows, ok in zip(micro, agreed) if ok]
        if snapshot is not None:            # undo the step DeepSpeed took on the partial gradient, retake it
            self.retake.restore(snapshot)
            self.carried = None             # a bad micro-batch's final state is not carried on
            for i, (rows, state) in enumerate((r, e) for r, e, ok in zip(micro, entering, agreed) if ok):
                self.model.set_carried(state)
                loss, _ = self._forward(rows)
                # the engine divides by the configured accumulation; the step averages over the kept ones
                applied = self._backward(loss * (len(micro) / len(kept)), boundary=i == len(kept) - 1)
            mean_loss = self.retake.mean_loss([m for m, ok in zip(means, agreed) if ok])
        if not applied:                     # a non-finite gradient: nothing of this step was applied
            kept, self.carried = [], None
        bad = len(micro) - len(kept)
        self.model.set_carried(None)        # evaluations and calibration read from zero states
        elapsed = time.perf_counter() - t0
        self.state["step"] += 1
        self.state["tokens"] += stage.global_batch_tokens
        self.state["skipped_micro_batches"] += bad
        self.state["bad_steps"] = self.state["bad_steps"] + 1 if bad else 0
        grad_norm = self.engine.get_global_grad_norm() if kept else None
        record = {"step": self.state["step"], "stage": stage.index, "stage_name": stage.name,
                  "seq_len": stage.seq_len, "loss": mean_loss if kept else None, "skipped_micro_batches": bad,
                  "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                  "tokens": self.state["tokens"], "tokens_per_s": stage.global_batch_tokens / max(elapsed, 1e-9)}
        return record, stop

    def _micro_batches(self, stage) -> list:
        """This rank's rows of the step, one Batch per micro-batch: its data-parallel share of the
        step's sequences and, under sequence parallelism, its segment of each."""
        dp_rank, per = self.rank // stage.seq_parallel, stage.sequences_per_step // stage.data_parallel
        if stage.carry_state == "document":     # one row-stable stream per row slot; this rank reads its slots
            mine = range(dp_rank * stage.micro_batch, (dp_rank + 1) * stage.micro_batch)
            batch = self.stream.next_lane_batch(stage.data_parallel * stage.micro_batch, stage.grad_accum,
                                                stage.seq_len, stage.max_doc_tokens, keep=mine)
        else:
            batch = self.stream.next_batch(stage.sequences_per_step, stage.seq_len, stage.max_doc_tokens,
                                           keep=range(dp_rank * per, (dp_rank + 1) * per))  # only this rank's rows
        share = rank_share(batch, 0, 1, self.rank % stage.seq_parallel, stage.seq_parallel)
        return [share.rows(m * stage.micro_batch, (m + 1) * stage.micro_batch) for m in range(stage.grad_accum)]

    def _enter_carried(self, stage, rows) -> Optional[list]:
        """Sets the state this micro-batch's rows start from (carry_state; None: zeros) and returns it.
        Under document resets a row of a document lane takes the carried state only where it continues the
        document its lane's previous row was in (docs/guides/research.md, "Carried state")."""
        if stage.carry_state == "none":
            return None
        continues = rows.continues if stage.carry_state == "document" and self.cfg.train.document_resets else None
        return self.model.enter_carried(self.carried, None if continues is None else torch.as_tensor(continues))

    def _keep_carried(self, stage) -> None:
        """After a micro-batch's forward: its final state (the sequence's end: the last rank of an SP group)
        is what the same rows start from next."""
        if stage.carry_state == "none":
            return
        self.carried = self.model.carried_final()

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
        if boundary and check and not self.retake.gradient_finite():
            self.retake.discard_step()
            return False
        self.engine.step()
        return True

    def documents(self, batch):
        """seq_idx for the scan (state reset at each document start), or None when train.document_resets
        is off and packed documents flow into each other."""
        if not self.cfg.train.document_resets:
            return None
        return torch.as_tensor(batch.seq_idx, device=self.device)

    def run(self) -> int:
        start = self.resume()
        # a pending record (stopped before its due evaluation) is logged again once evaluated
        progress = Progress(self.plans, self.cfg.run.log_every, live=live_console()) if self.rank == 0 else None
        metrics = MetricsLogger(self.run_dir, self.rank == 0, resume_step=start - (self.pending is not None),
                                progress=progress)
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
                stage = stage_at(self.plans, start - 1)
                self.enter_stage(stage)
                current = stage.index
                if not self.evaluate(stage, start, self.pending, metrics, final=start == total):
                    return self.stop(stage, self.pending, metrics, evaluation_due=True)
                metrics.log(self.pending)
            while self.state["step"] < total:
                stage = stage_at(self.plans, self.state["step"])
                if current != stage.index:
                    self.enter_stage(stage)
                    current = stage.index
                    self.step_ended = None
                record, stop = self.train_step(stage)
                self.step_ended = time.perf_counter()
                step = self.state["step"]
                due = step == stage.last_step or bool(every and step % every == 0)
                if stop:
                    return self.stop(stage, record, metrics, evaluation_due=due and self.cfg.eval.every_checkpoint)
                if due and not self.evaluate(stage, step, record, metrics, final=step == total):
                    return self.stop(stage, record, metrics, evaluation_due=True)
                metrics.log(record)          # before the checkpoint: a kill in between resumes from the previous one
                if due:
                    self.save_checkpoint(stage)
                    self.step_ended = None
                if self.state["bad_steps"] >= self.cfg.train.max_bad_steps:
                    raise RuntimeError(f"{self.state['bad_steps']} steps in a row had a non-finite loss or gradient "
                                       f"(train.max_bad_steps = {self.cfg.train.max_bad_steps}); lower the LR or "
                                       "check the data; the last checkpoint is intact")
        finally:
            metrics.close()
        return 0

    def evaluate(self, stage, step: int, record: dict, metrics, final: bool = False) -> bool:
        """The checkpoint's evaluation into `record` (`final`: the run's last, with eval.final); False when a
        stop interrupted it, with the held-out stream and RNG put back as they were before it (the evaluation
        reruns from there after resuming)."""
        before = None if self.eval_stream is None else self.eval_stream.state_dict(), rng_state()
        evaluated = dict(record)
        try:
            self.evaluator.evaluate(stage, step, evaluated, metrics, final=final)
        except EvaluationInterrupted:
            if self.eval_stream is not None:
                self.eval_stream.load_state_dict(before[0])
            set_rng_state(before[1])
            return False
        record.update(evaluated)
        return True

    def stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, stage, record: dict, metrics, evaluation_due: bool) -> int:
        """SIGTERM (pre-emption, a time limit): the checkpoint first, since the grace before SIGKILL is
        short; an evaluation this step was due for runs when the run resumes, and its record is logged then."""
        step = self.state["step"]
        if not evaluation_due:
            metrics.log(record)
        self.save_checkpoint(stage, pending=record if evaluation_due else None)
        if self.rank == 0:
            write_stop_marker(self.run_dir, step)
            print(f"SIGTERM: checkpoint written at step {step}; exiting with {EXIT_STOPPED} (resume to continue"
                  f"{', evaluation of this step included' if evaluation_due else ''})", flush=True)
        return EXIT_STOPPED

    def close(self) -> None:
        leave_process_group()
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
