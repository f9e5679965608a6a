"""A study's results: every variant's metrics per length over its seeds, with 95% intervals, and its paired
difference from the baseline (OUT/results.json, OUT/results.md, OUT/<metric>.png with error bars).

Labels: a training variant evaluated as trained is its own name; with an evaluation-time variant,
"<variant> + <evaluation variant>". Metrics: `passkey` (the fraction of keys retrieved; one value per prompt),
`loss` (the mean loss of the loss-vs-position bucket ending at that position; one value per seed), `collapsed`
(at the evaluated length: 1 when the loss collapsed within it, else 0; one value per seed, so its mean is the
fraction of seeds that collapse; each seed's collapse point is in `collapse_points`), `niah <task>` (RULER's
string_match_all per prompt). The baseline is the study's `baseline` variant as trained; a difference
uses the seeds both have (a failed cell drops out, and `n_seeds` shows it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from . import laws as capacity_laws
from .runner import AS_TRAINED, Failure, failure_lines
from .spec import Study
from .stats import METHOD, estimate, paired_difference


def scores(kind: str, result: dict) -> Dict[str, Dict[int, List[float]]]:
    """metric -> length -> one score per prompt (or per seed, for the loss), in a fixed order."""
    if kind == "passkey":
        by_length: Dict[int, List[float]] = {}
        for o in result["outputs"]:
            by_length.setdefault(int(o["length"]), []).append(float(o["correct"]))
        return {"passkey": by_length}
    if kind == "length":
        return {"loss": {int(b["end"]): [float(b["mean_loss"])] for b in result["buckets"]},
                "collapsed": {int(result["length"]): [float(result["collapse_point"] is not None)]}}
    if kind == "niah":
        out: Dict[str, Dict[int, List[float]]] = {}
        for p in result["prompts"]:
            score = float(p.get("score", p["correct"]))
            out.setdefault(f"niah {p['task']}", {}).setdefault(int(p["length"]), []).append(score)
        return out
    raise ValueError(f"a study cannot summarize the evaluation {kind!r}")


def label(variant: str, evaluated_as: str) -> str:
    return variant if evaluated_as == AS_TRAINED else f"{variant} + {evaluated_as}"


def collect(results: Dict[tuple, Dict[str, dict]]) -> Dict[str, Dict[str, Dict[int, Dict[int, List[float]]]]]:
    """label -> metric -> length -> seed -> scores."""
    table: Dict[str, Dict[str, Dict[int, Dict[int, List[float]]]]] = {}
    for (variant, seed), kinds in results.items():
        for kind, by_variant in kinds.items():
            for evaluated_as, result in by_variant.items():
                for metric, by_length in scores(kind, result).items():
                    for length, values in by_length.items():
                        (table.setdefault(label(variant, evaluated_as), {}).setdefault(metric, {})
                         .setdefault(length, {})[seed]) = values
    return table


def collapse_points(results: Dict[tuple, Dict[str, dict]]) -> Dict[str, Dict[str, object]]:
    """label -> seed -> the position where the loss collapsed (None: it did not), from the length evaluations."""
    points: Dict[str, Dict[str, object]] = {}
    for (variant, seed), kinds in sorted(results.items(), key=lambda item: item[0][1]):
        for evaluated_as, result in kinds.get("length", {}).items():
            points.setdefault(label(variant, evaluated_as), {})[str(seed)] = result["collapse_point"]
    return points


def law_outcomes(study: Study, results: Dict[tuple, Dict[str, dict]]) -> List[capacity_laws.CellOutcome]:
    """Each evaluated cell as trained, with its state size and training length (from its config)."""
    out = []
    for cell in study.cells:
        got = results.get((cell.variant, cell.seed))
        if not got:
            continue
        loss, passkey = got["length"][AS_TRAINED], got["passkey"][AS_TRAINED]
        accuracy = {length: sum(v) / len(v) for length, v in scores("passkey", passkey)["passkey"].items()}
        model = cell.config.model
        out.append(capacity_laws.CellOutcome(
            state=model.ssm_dim * model.d_state, d_state=model.d_state,
            train_length=cell.config.curriculum.stages[-1].seq_len, seed=cell.seed,
            collapse_point=loss["collapse_point"], eval_length=int(loss["length"]), passkey=accuracy))
    return out


def summarize(study: Study, results: Dict[tuple, Dict[str, dict]]) -> dict:
    table = collect(results)
    summary = {lab: {metric: {str(L): estimate(by_seed, what=f"{lab} {metric} at {L}").as_dict()
                              for L, by_seed in sorted(lengths.items())}
                     for metric, lengths in metrics.items()}
               for lab, metrics in table.items()}
    base = table.get(study.baseline, {})
    differences: Dict[str, dict] = {}
    for lab, metrics in table.items():
        if lab == study.baseline:
            continue
        for metric, lengths in metrics.items():
            for L, by_seed in sorted(lengths.items()):
                against = base.get(metric, {}).get(L, {})
                seeds = sorted(set(by_seed) & set(against))
                if not seeds:
                    continue
                d = paired_difference({s: by_seed[s] for s in seeds}, {s: against[s] for s in seeds},
                                      what=f"{lab} - {study.baseline}, {metric} at {L}")
                differences.setdefault(lab, {}).setdefault(metric, {})[str(L)] = d.as_dict()
    payload = {"study": study.name, "baseline": study.baseline, "seeds": study.seeds, "method": METHOD,
               "summary": summary, "differences": differences, "collapse_points": collapse_points(results)}
    if study.laws is not None:
        payload["laws"] = capacity_laws.laws(law_outcomes(study, results), **study.laws)
    return payload


def _cell(e: dict) -> str:
    return f"{e['mean']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"


def _point(by_seed: dict, seed: str) -> str:
    if seed not in by_seed:
        return "-"
    return "none" if by_seed[seed] is None else f"{by_seed[seed]:,}"


def markdown(payload: dict, failures: List[Failure]) -> str:
    lines = [f"# Study {payload['study']}", "", f"Seeds {payload['seeds']}; baseline `{payload['baseline']}`. "
             f"Each cell: mean [95% interval] ({payload['method']}).", ""]
    metrics = sorted({m for by in payload["summary"].values() for m in by})
    for metric in metrics:
        lengths = sorted({int(L) for by in payload["summary"].values() for L in by.get(metric, {})})
        for title, block in ((metric, payload["summary"]),
                             (f"{metric}: difference from `{payload['baseline']}`", payload["differences"])):
            rows = [lab for lab in block if metric in block[lab]]
            if not rows:
                continue
            lines += [f"## {title}", "", "| | " + " | ".join(f"{L:,}" for L in lengths) + " |",
                      "|---|" + "---|" * len(lengths)]
            lines += [f"| {lab} | " + " | ".join(_cell(block[lab][metric][str(L)]) if str(L) in block[lab][metric]
                                                 else "-" for L in lengths) + " |" for lab in rows]
            lines.append("")
    points = payload.get("collapse_points") or {}
    if points:
        seeds = [str(s) for s in payload["seeds"]]
        lines += ["## Collapse point per seed", "", "Where the loss against position rose by the margin above its "
                  "best since the minimum position (`none`: it did not).", "",
                  "| | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
        lines += [f"| {lab} | " + " | ".join(_point(by, s) for s in seeds) + " |" for lab, by in points.items()]
        lines.append("")
    if "laws" in payload:
        lines += capacity_laws.markdown(payload["laws"], payload["seeds"])
    if failures:
        lines += ["## Failed cells", "", *failure_lines(failures), ""]
    return "\n".join(lines)


def plot(payload: dict, out: Path) -> List[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    metrics = sorted({m for by in payload["summary"].values() for m in by})
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(9, 4))
        for i, (lab, by) in enumerate(payload["summary"].items()):
            if metric not in by:
                continue
            points = sorted((int(L), e) for L, e in by[metric].items())
            xs = [L for L, _ in points]
            ys = [e["mean"] for _, e in points]
            err = [[e["mean"] - e["ci_low"] for _, e in points], [e["ci_high"] - e["mean"] for _, e in points]]
            # ten colours, then the next ten dashed with other markers: every series told apart
            ax.errorbar(xs, ys, yerr=err, marker="os^D"[i // 10 % 4], linestyle=("-", "--", ":", "-.")[i // 10 % 4],
                        capsize=3, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel(metric)
        ax.set_title(f"{payload['study']}: {metric} (mean and 95% interval over seeds and prompts)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        path = out / f"{metric.replace(' ', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_summary(study: Study, results: Dict[tuple, Dict[str, dict]], failures: List[Failure]) -> List[Path]:
    study.out.mkdir(parents=True, exist_ok=True)
    payload = summarize(study, results)
    payload["failed"] = [f.__dict__ for f in failures]
    (study.out / "results.json").write_text(json.dumps(payload, indent=1))
    (study.out / "results.md").write_text(markdown(payload, failures))
    return [study.out / "results.json", study.out / "results.md", *plot(payload, study.out)]
