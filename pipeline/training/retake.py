"""The non-finite retake: how a training step leaves out what is not finite on some rank.

A micro-batch whose loss is not finite on some rank is left out on every rank, and the step is the
one its other micro-batches give alone: the engine is put back as the step began (a snapshot taken
before the optimizer step) and the step retaken over the kept ones. A step whose reduced gradient
is not finite (a finite loss can still give one) is bad as a whole: its engine step runs, since it
ends DeepSpeed's accumulation, and what it applied is undone the same way.

Several methods here are collectives (each says so): every rank calls them at the same points of
the step, in the same order."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch


def _float64_mean(losses) -> torch.Tensor:
    """This rank's mean of its micro-batches' losses in float64 (0 when there are none), to sum over ranks."""
    return torch.stack(losses).double().mean() if losses else torch.zeros((), dtype=torch.float64)


class Retake:
    """The checks and the undo of one rank's DeepSpeed `engine`; snapshots go to `snapshot_dir`
    (the run's checkpoints directory, a filesystem every rank writes to)."""

    def __init__(self, engine, dist, device: torch.device, rank: int, world: int, snapshot_dir: Path,
                 precision: str, zero_stage: int):
        self.engine, self.dist, self.device, self.rank, self.world = engine, dist, device, rank, world
        self.snapshot_dir, self.precision, self.zero_stage = Path(snapshot_dir), precision, zero_stage

    def agree(self, means, finite, stop_requested: bool) -> tuple:
        """The step's collective: (finite on every rank, per micro-batch), the loss averaged over ranks
        (meaningful when every micro-batch is kept), whether any rank was asked to stop."""
        local = _float64_mean(means if all(finite) else [])
        summed = torch.tensor([float(not ok) for ok in finite] + [0.0, float(stop_requested)],
                              dtype=torch.float64, device=self.device)
        summed[-2] = local
        self.dist.all_reduce(summed)
        values = summed.tolist()
        return [v == 0 for v in values[:-2]], values[-2] / self.world, values[-1] > 0

    def mean_loss(self, kept_means) -> float:
        """The loss over the kept micro-batches, averaged over ranks (after a step with bad ones; a collective)."""
        summed = _float64_mean(kept_means).reshape(1).to(self.device)
        self.dist.all_reduce(summed)
        return float(summed[0]) / self.world

    def gradient_finite(self) -> bool:
        """Whether the reduced gradient about to be applied is finite on every rank (a collective). fp16 is left
        to DeepSpeed's loss scaler, which skips an overflowing step and lowers the scale: that is how it
        finds the scale, not a bad step."""
        if self.precision == "fp16":
            return True
        if self.zero_stage > 0:    # the ZeRO optimizer holds the reduced partitions; it agrees over ranks
            return not self.engine.optimizer.has_overflow(partition_gradients=True)
        grads = [param.grad for param in self.engine.module.parameters() if param.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        bad = (~finite).to(device=self.device, dtype=torch.float32).reshape(1)    # one flag: one host sync
        self.dist.all_reduce(bad, op=self.dist.ReduceOp.MAX)
        return not bool(bad.item())

    def zero_loss(self):
        """A loss with zero gradients for every parameter, backpropagated in place of a left-out micro-batch's
        (DeepSpeed reduces every parameter's gradient)."""
        return sum(param.sum() for param in self.engine.module.parameters()) * 0.0

    def snapshot(self) -> Path:
        """The engine's parameters and optimizer state as they are now, on disk (every rank its part)."""
        path = self.snapshot_dir / ".before-nonfinite"
        self.engine.save_checkpoint(str(path), tag="step", client_state={}, save_latest=False)
        return path

    def restore(self, path: Path) -> None:
        """The engine put back as `snapshot` saved it; the snapshot is removed once every rank has read it
        (a collective)."""
        self.engine.load_checkpoint(str(path), tag="step", load_optimizer_states=True, load_lr_scheduler_states=False)
        self.dist.barrier()
        if self.rank == 0:
            shutil.rmtree(path)

    def discard_step(self) -> None:
        """The engine's step without what it applies: the step ends DeepSpeed's accumulation (buffers,
        counters), the snapshot before it puts parameters and optimizer state back (the optimizer would
        have written NaN into the weights and their moments)."""
        snapshot = self.snapshot()
        self.engine.step()
        self.restore(snapshot)
