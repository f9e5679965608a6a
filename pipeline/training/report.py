"""report.md of a run directory: the stage plan, the loss curve, evaluation at each checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional


def _records(run_dir: Path) -> List[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve(records: List[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ok = [r for r in records if r["loss"] is not None]
    ax.plot([r["step"] for r in ok], [r["loss"] for r in ok], label="train loss")
    ev = [r for r in records if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out loss")
    for r0, r1 in zip(records, records[1:]):
        if r1["stage"] != r0["stage"]:
            ax.axvline(r1["step"] - 0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _eval_file(run_dir: Path, step: int, name: str) -> Dict[str, dict]:
    """An evaluation's results by variant ({"model": ...} when it ran the model alone); {} when absent."""
    path = run_dir / "eval" / f"step_{step:07d}" / name
    if not path.exists():
        return {}
    payload = json.loads(path.read_text())
    return payload["variants"] if "variants" in payload else {"model": payload}


def _passkey_cell(run_dir: Path, record: dict) -> str:
    """Accuracy per prompt length at this checkpoint, as trained (eval/step_XXXXXXX/passkey.json), else the mean."""
    per_length = next(iter(_eval_file(run_dir, record["step"], "passkey.json").values()), {}).get("per_length")
    if per_length:
        return ", ".join(f"{int(L):,}: {acc:.2f}" for L, acc in per_length.items())
    return "-" if record.get("passkey_accuracy") is None else f"{record['passkey_accuracy']:.2f}"


def _loss_at(result: dict, position: int) -> Optional[float]:
    """Mean loss of the position bucket that holds `position`."""
    for b in result.get("buckets", []):
        if b["start"] < position <= b["end"]:
            return b["mean_loss"]
    return None


def length_table(run_dir: Path, record: dict) -> List[str]:
    """The final checkpoint per length: passkey accuracy and loss at that position, for each variant
    evaluated (as trained, with eval.compare_mitigations), the training length marked."""
    passkey = _eval_file(run_dir, record["step"], "passkey.json")
    length = _eval_file(run_dir, record["step"], "loss_vs_position.json")
    names = list(passkey or length)
    if not names:
        return []
    lengths = sorted({int(L) for r in passkey.values() for L in r["lengths"]}
                     | {b["end"] for r in length.values() for b in r.get("buckets", [])[-1:]})
    trained = record["seq_len"]
    head = ["length"] + [f"passkey {n}" for n in passkey] + [f"loss at that position, {n}" for n in length]
    rows = [f"| {L:,}{' (trained)' if L == trained else f' ({L / trained:g}×)' if L > trained else ''} | "
            + " | ".join(f"{passkey[n]['per_length'][str(L)]:.2f}" if str(L) in passkey[n]["per_length"] else "-"
                         for n in passkey)
            + "".join(f" | {v:.3f}" if (v := _loss_at(length[n], L)) is not None else " | -" for n in length) + " |"
            for L in lengths]
    return [f"## By length, at the final checkpoint (step {record['step']}, trained at {trained:,} tokens)", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows, "",
            "Passkey: fraction of keys retrieved at that prompt length (every depth). Loss: mean of the "
            "loss-vs-position bucket that holds that position, reading held-out documents with the state carried. "
            + ("`with mitigations` adds `eval.compare_mitigations` to the model as trained."
               if len(names) > 1 else ""), ""]


def write_report(run_dir: Path, plan_text: str, started_from: str = "") -> Path:
    """`started_from`: the pretrained model the run continued (model.from_pretrained), named under the title."""
    run_dir = Path(run_dir)
    records = _records(run_dir)
    lines = [f"# Run report: {run_dir.name}", ""]
    if started_from:
        lines += [f"Continued from `{started_from}` (model.from_pretrained).", ""]
    evaluated = [r for r in records if "eval_seconds" in r]
    if evaluated:
        lines += length_table(run_dir, evaluated[-1])
    lines += ["## Stages", "", "```", plan_text, "```", ""]
    if records:
        loss_curve(records, run_dir / "loss.png")
        ok = [r for r in records if r["loss"] is not None] or [{"loss": float("nan")}]
        last = records[-1]
        lines += ["## Training", "", f"{last['step']} steps, {last['tokens']:,} tokens; final loss "
                  f"{ok[-1]['loss']:.4f} (first {ok[0]['loss']:.4f}).", "", "![loss](loss.png)", ""]
        ev = [r for r in records if "eval_seconds" in r or "eval_loss" in r]
        if ev:
            def cell(r, k, fmt):
                return "-" if r.get(k) is None else format(r[k], fmt)
            compared = any("collapse_point_mitigated" in r for r in ev)
            extra = (" | collapse point with mitigations", "|---") if compared else ("", "")
            lines += ["## Evaluation at each checkpoint", "",
                      "| step | stage | seq_len | held-out loss | passkey accuracy by length | "
                      f"collapse point{extra[0]} | max state norm |", f"|---|---|---|---|---|---{extra[1]}|---|"]
            lines += [f"| {r['step']} | {r['stage_name']} | {r['seq_len']} | {cell(r, 'eval_loss', '.4f')} | "
                      f"{_passkey_cell(run_dir, r)} | {cell(r, 'collapse_point', 'd')} | "
                      + (f"{cell(r, 'collapse_point_mitigated', 'd')} | " if compared else "")
                      + f"{cell(r, 'max_state_norm', '.3g')} |" for r in ev]
            lines += ["", "Collapse point: the first position bucket whose loss exceeds the best earlier bucket by "
                          "`eval.collapse_margin` nats (- : none within `eval.length_max`)."
                      + (" Loss-vs-position plots show the model as trained and with `eval.compare_mitigations`."
                         if compared else "")]
            eval_s = sum(r.get("eval_seconds", 0.0) for r in records)
            step_tokens = [r["tokens"] - prev for prev, r in zip([0] + [r["tokens"] for r in records], records)]
            train_s = sum(n / r["tokens_per_s"] for n, r in zip(step_tokens, records))
            if eval_s:
                lines += ["", f"Evaluation took {eval_s:.1f} s against {train_s:.1f} s of training steps "
                              f"({eval_s / max(eval_s + train_s, 1e-9):.0%} of the two)."]
            lines.append("")
            for r in ev:
                d = run_dir / "eval" / f"step_{r['step']:07d}"
                names = ["passkey", *sorted(f.stem for f in d.glob("niah_*.png")), "loss_vs_position", "state_stats"]
                pics = [f"![{name}](eval/{d.name}/{name}.png)" for name in names if (d / f"{name}.png").exists()]
                if pics:
                    lines += [f"### step {r['step']} ({r['stage_name']}, seq_len {r['seq_len']})", "", *pics, ""]
    else:
        lines += ["No training steps recorded yet.", ""]
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
