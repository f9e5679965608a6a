"""Evaluation runs: on any checkpoint (`longctx eval`) and at every training checkpoint (the trainer's hook).

Each writes into an output directory: passkey.json + passkey.png, niah.json + table.md + niah_<task>.png,
loss_vs_position.json + .png, state_stats.json + state_stats.png; with `compare`, the same prompts with and
without mitigations.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from longctx.data.synthetic import make_document
from longctx.data.tokenizer import ByteTokenizer, HFTokenizer

from ..model.load import find_checkpoint
from ..training import checkpoint
from .length import MIN_POSITION, per_token_loss, summarize
from .niah import TASKS as NIAH_TASKS
from .niah import evaluate_niah
from .passkey import evaluate_passkey
from .plots import curves, passkey_heatmaps
from .share import EVERYTHING, RankShare
from .states import evaluate_states


def tokenizer_for(source: Path, choice: Optional[str], vocab_size: int):
    """--tokenizer byte|PATH, else the one saved with our checkpoint (or its export), else bytes for a
    byte-vocabulary model."""
    if choice == "byte":
        return ByteTokenizer()
    if choice:
        return HFTokenizer(choice)
    found = find_checkpoint(source)
    # a training checkpoint's record, or the copy `longctx export` writes beside the weights
    info = (source if found is None else found[0] / found[1]) / checkpoint.TOKENIZER_INFO
    if info.exists():
        meta = json.loads(info.read_text())
        if meta["kind"] == "hf":
            return HFTokenizer(str(info.parent / checkpoint.TOKENIZER_FILE), meta["eos_id"])
        return ByteTokenizer(meta["eos_id"])
    if vocab_size == ByteTokenizer.vocab_size:
        return ByteTokenizer()
    raise ValueError(f"{source}: no tokenizer saved with it, and its vocabulary ({vocab_size:,} ids) is not the byte "
                     f"vocabulary ({ByteTokenizer.vocab_size}): decoding its ids as bytes would be meaningless. Pass "
                     "--tokenizer PATH/tokenizer.json (or --tokenizer byte if it really is a byte model)")


def long_text_row(tok, length: int, seed: int = 0, stream=None, rows: int = 1):
    """`rows` consecutive rows of `length` tokens (rows, length) and their labels: held-out documents from
    `stream`, else synthetic ones, packed as the stream packs them (a row's last label is the next row's first
    token)."""
    if stream is not None:
        b = stream.next_batch(rows, length)
        return torch.as_tensor(b.input_ids), torch.as_tensor(b.labels)
    rng, ids = random.Random(seed), []
    while sum(map(len, ids)) < rows * length + 1:
        ids.append(np.append(tok.encode(make_document(rng, rng.randint(4000, 40000))), tok.eos_id))
    text = np.concatenate(ids)[: rows * length + 1].astype(np.int64)
    x = np.stack([text[r * length:(r + 1) * length] for r in range(rows)])
    y = np.stack([text[r * length + 1:(r + 1) * length + 1] for r in range(rows)])
    return torch.as_tensor(x), torch.as_tensor(y)


def _passkey(model, tok, row, o) -> dict:
    return evaluate_passkey(model, tok, o["lengths"], o["depths"], o["samples"], o["seed"], o["prefill_chunk"],
                            between_batches=o["should_stop"], share=o["share"])


def _niah(model, tok, row, o) -> dict:
    return evaluate_niah(model, tok, o["tasks"], o["lengths"], o["samples"], o["seed"], o["prefill_chunk"],
                         between_batches=o["should_stop"], share=o["share"])


def _length(model, tok, row, o) -> np.ndarray:
    return per_token_loss(model, *row, o["prefill_chunk"])


def _length_of_rows(losses, o) -> dict:
    return summarize(np.stack(losses), o["buckets"], o["margin"], o["train_length"], o["min_position"])


def _states(model, tok, row, o) -> dict:
    return evaluate_states(model, row[0], train_length=o["train_length"])


def _no_figures(figures: bool, out: Path, *names: str) -> bool:
    """Whether the figures are not drawn (eval.figures false); then none of an earlier attempt at the same step
    stays beside the new numbers."""
    if not figures:
        for name in names:
            (out / name).unlink(missing_ok=True)
    return not figures


def _write_passkey(results: Dict[str, dict], payload, out: Path, marks, figures: bool) -> None:
    (out / "passkey.json").write_text(json.dumps(payload, indent=1))
    if _no_figures(figures, out, "passkey.png"):
        return
    passkey_heatmaps(results, out / "passkey.png", train_length=next((x for x, _ in marks), None))


def _write_niah(results: Dict[str, dict], payload, out: Path, marks, figures: bool) -> None:
    """niah.json, and per task a heatmap of length x depth (one panel per variant): niah_<task>.png."""
    (out / "niah.json").write_text(json.dumps(payload, indent=1))
    tasks = next(iter(results.values()))["tasks"]
    if _no_figures(figures, out, *(f"niah_{task}.png" for task in tasks)):
        return
    for task in tasks:
        panels = {(task if len(results) == 1 else f"{task}, {name}"): {
            "lengths": r["lengths"], "depths": r["depths"], "accuracy": r["per_depth"][task],
            "mean_accuracy": float(np.mean(list(r["per_task"][task].values())))} for name, r in results.items()}
        passkey_heatmaps(panels, out / f"niah_{task}.png", train_length=next((x for x, _ in marks), None))


def _write_length(results: Dict[str, dict], payload, out: Path, marks, figures: bool) -> None:
    (out / "loss_vs_position.json").write_text(json.dumps(payload, indent=1))
    if _no_figures(figures, out, "loss_vs_position.png"):
        return
    series = {n: ([(b["start"] + b["end"]) / 2 for b in r["buckets"]], [b["mean_loss"] for b in r["buckets"]])
              for n, r in results.items()}
    collapsed: Dict[int, list] = {}
    for n, r in results.items():
        if r["collapse_point"]:
            collapsed.setdefault(r["collapse_point"], []).append(n)
    # one label per position: several variants collapsing at one bucket would print over each other
    marks += [(at, f"collapse ({names[0]})" if len(names) == 1 else f"collapse ({len(names)} variants)")
              for at, names in collapsed.items()]
    curves(series, out / "loss_vs_position.png", "position (tokens)", "loss (nats)", marks=marks)


def _write_states(results: Dict[str, dict], payload, out: Path, marks, figures: bool) -> None:
    (out / "state_stats.json").write_text(json.dumps(payload, indent=1))
    if _no_figures(figures, out, "state_stats.png"):
        return
    single, series = len(results) == 1, {}
    for n, r in results.items():
        per_layer = np.asarray(r["max_norm_per_layer"])
        layers = r.get("layers", range(per_layer.shape[1] if per_layer.size else 0))   # the Mamba layers
        for column, layer in enumerate(layers):
            series[f"{n} layer {layer}" if not single else f"layer {layer}"] = (r["positions"], per_layer[:, column])
    curves(series, out / "state_stats.png", "position (tokens)", "max ||h|| over heads", logy=True, marks=marks)


@dataclass(frozen=True)
class Kind:
    run: Callable          # (model, tok, row (1, L) or None, options) -> result (with `combine`: one row's part)
    write: Callable        # (results by variant, JSON payload, out dir, plot marks, figures too) -> None
    reads_text: bool       # runs on long rows of text, the same for every variant
    # how ranks share the work: within a variant (its own items), else whole variants over ranks
    splits_within: bool = False
    always_table: bool = False   # table.md also for one variant (niah: task x length), else only to compare
    # (parts of a variant's rows, options) -> its result: the kind reads options["sequences"] rows of text, the
    # same for every variant, and each row of each variant is an item of its own over the ranks
    combine: Optional[Callable] = None


KINDS = {"passkey": Kind(_passkey, _write_passkey, reads_text=False, splits_within=True),
         "niah": Kind(_niah, _write_niah, reads_text=False, splits_within=True, always_table=True),
         "length": Kind(_length, _write_length, reads_text=True, combine=_length_of_rows),
         "states": Kind(_states, _write_states, reads_text=True)}


def run_eval(kind: str, model, tok, out: Path, *, lengths: Sequence[int], depths: Sequence[float] = (0.0, 0.5, 1.0),
             samples: int = 2, seed: int = 0, prefill_chunk: int = 4096, buckets: int = 16, margin: float = 0.5,
             min_position: int = MIN_POSITION, sequences: int = 1, tasks: Sequence[str] = tuple(NIAH_TASKS),
             train_length: Optional[int] = None, stream=None, variants: Optional[Dict[str, object]] = None,
             models: Optional[Dict[str, object]] = None,
             write: bool = True, figures: bool = True, should_stop: Optional[Callable[[], None]] = None,
             share: RankShare = EVERYTHING) -> dict:
    """Run one evaluation for each variant (name -> LayerMitigations list, None, or "as is") and write its
    files (its figures too unless `figures` is false). Without variants the model runs as it is; `models` names
    another model for a variant (a second checkpoint), evaluated on the same prompts and text. `tasks`: niah's.
    `sequences`: the rows of text loss against position averages, consecutive in the held-out stream (the same
    for every variant). `should_stop` is called between passkey and niah batches (it may raise to end the
    evaluation). With a `share` over ranks, each computes its part (passkey and niah batches, each variant's rows
    of loss against position, whole variants of the state statistics) and every rank returns all results."""
    if kind not in KINDS:
        raise ValueError(f"unknown evaluation {kind!r}: one of {', '.join(KINDS)}")
    spec = KINDS[kind]
    options = dict(lengths=lengths, depths=depths, samples=samples, seed=seed, prefill_chunk=prefill_chunk,
                   tasks=tasks, buckets=buckets, margin=margin, min_position=min_position, train_length=train_length,
                   sequences=sequences, should_stop=should_stop, share=share if spec.splits_within else EVERYTHING)
    out = Path(out)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    variants = variants or {"model": "as is"}
    device = next(model.parameters()).device
    rows = sequences if spec.combine else 1
    text = None
    if spec.reads_text:       # the same text for every variant
        text = tuple(t.to(device) for t in long_text_row(tok, max(lengths), seed, stream, rows))
    names = list(variants)
    items = len(names) * rows             # item i: row i % rows of variant i // rows
    mine = range(items) if spec.splits_within else share.mine(items)
    done = {}
    for i in mine:
        name, r = names[i // rows], i % rows
        m = (models or {}).get(name, model)
        saved = m.mitigations
        if variants[name] != "as is":
            m.set_mitigations(variants[name])
        try:
            done[i] = spec.run(m, tok, None if text is None else tuple(t[r:r + 1] for t in text), options)
        finally:
            m.set_mitigations(saved)
    parts = list(done.values()) if spec.splits_within else share.gather(done, items)
    results = {name: spec.combine(parts[j * rows:(j + 1) * rows], options) if spec.combine else parts[j]
               for j, name in enumerate(names)}
    if write:
        payload = next(iter(results.values())) if len(results) == 1 else {"variants": results}
        spec.write(results, payload, out, [(train_length, "training length")] if train_length else [], figures)
        if len(results) > 1 or spec.always_table:
            (out / "table.md").write_text(comparison_table(kind, results) + "\n")
    return results


def comparison_table(kind: str, results: Dict[str, dict]) -> str:
    names = list(results)
    if kind == "passkey":
        lengths = results[names[0]]["lengths"]
        head = "| length | " + " | ".join(names) + " |"
        rows = [f"| {L:,} | " + " | ".join(f"{results[n]['per_length'][str(L)]:.2f}" for n in names) + " |"
                for L in lengths]
    elif kind == "niah" and len(names) == 1:      # task x length
        r = results[names[0]]
        head = "| task | " + " | ".join(f"{L:,}" for L in r["lengths"]) + " |"
        rows = [f"| {t} | " + " | ".join(f"{r['per_task'][t][str(L)]:.2f}" for L in r["lengths"]) + " |"
                for t in r["tasks"]]
        rows.append("| mean | " + " | ".join(f"{r['per_length'][str(L)]:.2f}" for L in r["lengths"]) + " |")
        return "\n".join([head, "|" + "---|" * (len(r["lengths"]) + 1)] + rows)
    elif kind == "niah":                           # a row per task and length, a column per variant
        r = results[names[0]]
        head = "| task | length | " + " | ".join(names) + " |"
        rows = [f"| {t} | {L:,} | " + " | ".join(f"{results[n]['per_task'][t][str(L)]:.2f}" for n in names) + " |"
                for t in r["tasks"] for L in r["lengths"]]
        rows.append("| mean | | " + " | ".join(f"{results[n]['mean_accuracy']:.2f}" for n in names) + " |")
        return "\n".join([head, "|" + "---|" * (len(names) + 2)] + rows)
    elif kind == "length":
        head = "| bucket | " + " | ".join(names) + " |"
        buckets = results[names[0]]["buckets"]
        rows = [f"| {b['start']:,}-{b['end']:,} | " + " | ".join(
            f"{results[n]['buckets'][i]['mean_loss']:.3f}" if i < len(results[n]['buckets']) else "-" for n in names)
            + " |" for i, b in enumerate(buckets)]
        rows.append("| collapse point | " + " | ".join(str(results[n]["collapse_point"]) for n in names) + " |")
    else:
        head = "| | " + " | ".join(names) + " |"
        # a model without Mamba layers (a transformer) has no state: "-"
        rows = ["| max final ||h|| | " + " | ".join(f"{np.max(results[n]['norms'][-1]):.3g}" if results[n]["norms"]
                                                    else "-" for n in names) + " |"]
    return "\n".join([head, "|" + "---|" * (len(names) + 1)] + rows)
