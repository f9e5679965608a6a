"""The evaluation at each training checkpoint: held-out loss at the stage's length, passkey
retrieval, RULER-style needles in a haystack (niah), loss against position and state norms, into
eval/step_XXXXXXX/, the step's metrics record and TensorBoard.

Ranks share the passkey and niah batches and the comparison's variants and gather the results (equal to
one process's); under ZeRO-3, which needs all ranks in each forward, every rank runs everything. Rank 0
writes. Evaluations run in a fixed order, since several read the held-out stream one
after another. A stop request (SIGTERM) is checked, on every rank together, before each kind
and between passkey and niah batches: the evaluation then ends with `EvaluationInterrupted`, so that the
checkpoint is written within the launcher's grace and the evaluation runs after resuming."""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from longctx.data.stream import rank_share

from ..config import evaluation_variants, final_eval
from ..evaluate.run import run_eval
from ..evaluate.share import EVERYTHING, RankShare
from ..mitigations import merge_overrides
from ..model.checkpoint_layout import tag_of
from .loss import sequence_loss


class EvaluationInterrupted(Exception):
    """A stop was requested during the evaluation (on every rank alike)."""


class Evaluator:
    def __init__(self, cfg, model, tok, eval_stream, stage_mitigations, documents, device, write: bool,
                 should_stop: Callable[[], bool] = lambda: False, share: RankShare = EVERYTHING):
        self.cfg, self.model, self.tok, self.stream = cfg, model, tok, eval_stream
        self.share = share                    # passkey batches and comparison variants split over ranks
        self.mitigations, self.documents, self.device, self.write = stage_mitigations, documents, device, write
        self.should_stop = should_stop        # collective: every rank calls it at the same points
        self.ev = getattr(cfg, "eval", None)  # this checkpoint's settings (eval.final's at the run's last)
        # name -> (method, reads whole sequences). Whole-sequence evaluations decode recurrently (memory
        # independent of length) on every rank, with sequence parallelism off.
        self.kinds = {"heldout": (self.heldout, False), "passkey": (self.passkey, True), "niah": (self.niah, True),
                      "length": (self.length, True), "states": (self.states, True)}

    def evaluate(self, stage, step: int, record: dict, metrics, final: bool = False) -> None:
        ev = self.ev = final_eval(self.cfg.eval) if final else self.cfg.eval
        if not ev.every_checkpoint:
            return
        t0 = time.perf_counter()
        out = Path(self.cfg.run.dir) / "eval" / tag_of(step)
        try:
            for name, (run, whole) in self.kinds.items():
                if name in ev.kinds:
                    if self.should_stop():
                        raise EvaluationInterrupted(name)
                    with self._whole_sequences() if whole else contextlib.nullcontext():
                        run(stage, step, record, metrics, out)
        finally:
            self.model.train()
        record["eval_seconds"] = time.perf_counter() - t0

    @contextlib.contextmanager
    def _whole_sequences(self):
        sp = self.model.sequence_parallel
        self.model.set_sequence_parallel(None)
        try:
            yield
        finally:
            self.model.set_sequence_parallel(sp)

    @torch.no_grad()
    def heldout_loss(self, stage) -> float:
        """Loss on sequences of the held-out stream at the stage's length; under sequence
        parallelism each rank reads its segment (the group sums)."""
        n = self.ev.heldout_sequences
        sp = self.model.sequence_parallel
        batch = self.stream.next_batch(n, stage.seq_len)
        if sp is not None:
            batch = rank_share(batch, 0, 1, sp.rank, sp.size)
        was_training = self.model.training
        self.model.eval()
        _, mean = sequence_loss(self.model(torch.as_tensor(batch.input_ids, device=self.device),
                                           seq_idx=self.documents(batch)).logits,
                                torch.as_tensor(batch.labels, device=self.device), sp)
        self.model.train(was_training)
        return float(mean)

    def heldout(self, stage, step, record, metrics, out) -> None:
        loss = self.heldout_loss(stage)
        record["eval_loss"] = loss if math.isfinite(loss) else None
        if self.write:
            out.mkdir(parents=True, exist_ok=True)
            (out / "heldout.json").write_text(json.dumps({"step": step, "seq_len": stage.seq_len,
                                                          "heldout_loss": record["eval_loss"]}))

    def _common(self, stage) -> dict:
        ev = self.ev
        return dict(prefill_chunk=ev.prefill_chunk, train_length=stage.seq_len, write=self.write,
                    figures=ev.figures, seed=self.cfg.run.seed, should_stop=self._check_stop, share=self.share)

    def _image(self, metrics, tag: str, png: Path, step: int) -> None:
        """A figure this evaluation drew into TensorBoard (not one an earlier run left at the same step)."""
        if self.ev.figures:
            metrics.image(tag, png, step)

    def _check_stop(self) -> None:
        if self.should_stop():
            raise EvaluationInterrupted("between prompt batches")

    def _variants(self, stage):
        """With eval.compare_mitigations ("with mitigations") or eval.variants (named): the model as trained (with
        the stage's mitigations) and with each on top, all on the same prompts; else None (the model as it is)."""
        extra = evaluation_variants(self.ev)
        if not extra:
            return None
        as_trained = self.mitigations.stage_config(stage)
        variants = {name: self.mitigations.resolve(merge_overrides(as_trained, overrides, f"eval.variants.{name}"),
                                                   stage)
                    for name, overrides in extra.items()}
        self.model.set_mitigations(self.mitigations.of(stage))
        return {"as trained": "as is", **variants}

    def _named(self, results: dict, field: str) -> dict:
        """eval.variants' results of one field, by name (for the metrics record)."""
        return {name: results[name][field] for name in self.ev.variants}

    def _accuracies(self, kind: str, results: dict, record: dict) -> dict:
        """KIND_accuracy of the model as trained (or alone), KIND_accuracy_mitigated (eval.compare_mitigations),
        KIND_accuracy_variants (eval.variants) into the record; returns the as-trained results."""
        res = results["as trained" if "as trained" in results else "model"]
        record[f"{kind}_accuracy"] = res["mean_accuracy"]
        if "with mitigations" in results:
            record[f"{kind}_accuracy_mitigated"] = results["with mitigations"]["mean_accuracy"]
        if self.ev.variants:
            record[f"{kind}_accuracy_variants"] = self._named(results, "mean_accuracy")
        return res

    def passkey(self, stage, step, record, metrics, out) -> None:
        ev = self.ev
        variants = self._variants(stage)
        results = run_eval("passkey", self.model, self.tok, out, lengths=ev.passkey_lengths, depths=ev.passkey_depths,
                           samples=ev.passkey_samples, variants=variants, **self._common(stage))
        res = self._accuracies("passkey", results, record)
        for length, acc in res["per_length"].items():
            metrics.scalar(f"eval/passkey_accuracy_{length}", acc, step)
        if "with mitigations" in results:
            for length, acc in results["with mitigations"]["per_length"].items():
                metrics.scalar(f"eval/passkey_accuracy_mitigated_{length}", acc, step)
        if self.ev.variants:
            for name in self.ev.variants:
                for length, acc in results[name]["per_length"].items():
                    metrics.scalar(f"eval/passkey_accuracy_{name}_{length}", acc, step)
        self._image(metrics, "eval/passkey", out / "passkey.png", step)

    def niah(self, stage, step, record, metrics, out) -> None:
        """Records niah_accuracy (the mean string_match_all score over every prompt), with variants
        niah_accuracy_mitigated / niah_accuracy_variants as passkey does; scalars eval/niah_<task>_<length>."""
        ev = self.ev
        variants = self._variants(stage)
        results = run_eval("niah", self.model, self.tok, out, tasks=ev.niah_tasks, lengths=ev.niah_lengths,
                           samples=ev.niah_samples, variants=variants, **self._common(stage))
        res = self._accuracies("niah", results, record)
        for name, r in results.items():
            tag = {"model": "", "as trained": "", "with mitigations": "mitigated_"}.get(name, f"{name}_")
            for task, per_length in r["per_task"].items():
                for length, acc in per_length.items():
                    metrics.scalar(f"eval/niah_{tag}{task}_{length}", acc, step)
        for task in res["tasks"]:
            self._image(metrics, f"eval/niah_{task}", out / f"niah_{task}.png", step)

    def length(self, stage, step, record, metrics, out) -> None:
        ev = self.ev
        variants = self._variants(stage)
        results = run_eval("length", self.model, self.tok, out, lengths=[ev.length_max], buckets=ev.length_buckets,
                           margin=ev.collapse_margin, sequences=ev.length_sequences, stream=self.stream,
                           variants=variants, **self._common(stage))
        res = results["as trained" if variants else "model"]
        record["collapse_point"] = res["collapse_point"]
        if "with mitigations" in results:
            record["collapse_point_mitigated"] = results["with mitigations"]["collapse_point"]
        if self.ev.variants:
            record["collapse_point_variants"] = self._named(results, "collapse_point")
        self._image(metrics, "eval/loss_vs_position", out / "loss_vs_position.png", step)

    def states(self, stage, step, record, metrics, out) -> None:
        res = run_eval("states", self.model, self.tok, out, lengths=[self.ev.length_max], stream=self.stream,
                       **self._common(stage))["model"]
        if res["layers"]:                       # a model without Mamba layers has no state to measure
            record["max_state_norm"] = float(np.max(res["norms"][-1]))
