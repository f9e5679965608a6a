"""Merge the GPU check's phase fragments into OUT/gpu_check.json and OUT/gpu_check.md; exit 1 naming every failure.

  python tests/gpu/report.py WORK OUT --phases env,correctness,... --limits env=25,... [--budget S]

WORK holds, per phase, PHASE.json (tests/gpu/phases.py) and PHASE.rc ("exit-code seconds limit", run.sh) and
PHASE.log. A phase fails when it timed out (exit 124 or 137), exited non-zero, left no fragment or one still
'running', raised, or has a failed check; with --budget, the whole run fails past that many seconds.
Standard library only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Tuple

TIMED_OUT = (124, 137)


def read_phase(work: Path, name: str, limit: float) -> Tuple[dict, List[str]]:
    """The phase's fragment (or a stand-in) with rc/seconds/limit added, and its failures."""
    frag_path, rc_path, log_path = (work / f"{name}.{ext}" for ext in ("json", "rc", "log"))
    frag = json.loads(frag_path.read_text()) if frag_path.is_file() else dict(phase=name, status="missing",
                                                                               checks=[], tables=[], notes=[])
    rc, seconds = None, None
    if rc_path.is_file():
        parts = rc_path.read_text().split()
        rc, seconds = int(parts[0]), float(parts[1])
    frag.update(rc=rc, seconds=seconds if seconds is not None else frag.get("seconds"), limit_s=limit)
    if log_path.is_file():
        frag["log_tail"] = log_path.read_text(errors="replace").splitlines()[-40:]
    fails = []
    if rc is None:
        fails.append(f"{name}: did not run")
    elif rc in TIMED_OUT:
        fails.append(f"{name}: timed out after its {limit:g} s limit (exit {rc})")
    elif rc != 0 and frag["status"] in ("ok", "failed"):
        fails.append(f"{name}: exited {rc}")
    if frag["status"] == "missing" and rc not in TIMED_OUT:
        fails.append(f"{name}: wrote no results")
    elif frag["status"] == "running" and rc not in TIMED_OUT:
        fails.append(f"{name}: stopped before its end (exit {rc})")
    elif frag["status"] == "error":
        fails.append(f"{name}: error: {frag.get('error')}")
    fails += [f"{name}: {c['name']}: failed ({c['detail']})"[:500] for c in frag.get("checks", []) if not c["ok"]]
    frag["result"] = "ok" if not fails else "FAILED"
    return frag, fails


def md_table(columns, rows) -> List[str]:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")
    return ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns),
            *["| " + " | ".join(map(cell, r)) + " |" for r in rows]]


def markdown(summary: dict) -> str:
    env = next((p for p in summary["phases"] if p["phase"] == "env"), {})
    data = env.get("data", {})
    lines = [f"# GPU check: {data.get('device', '?')}, {summary['date']}", "",
             f"**{'PASS' if not summary['failures'] else 'FAIL'}** in {summary['seconds']:.0f} s"
             + (f" (budget {summary['budget_s']:g} s)" if summary.get("budget_s") else "")
             + f"; mode {summary['mode']}; torch {data.get('torch', '?')}, triton {data.get('triton', '?')}, "
             f"CUDA {data.get('cuda', '?')}; mamba_ssm {data.get('mamba_ssm', '?')}", ""]
    if summary["failures"]:
        lines += ["Failures:", ""] + [f"- {f}" for f in summary["failures"]] + [""]
    lines += ["## Phases", ""] + md_table(
        ["phase", "limit s", "took s", "result"],
        [[p["phase"], f"{p['limit_s']:g}", "-" if p.get("seconds") is None else f"{p['seconds']:.1f}", p["result"]]
         for p in summary["phases"]]) + [""]
    for p in summary["phases"]:
        for t in p.get("tables", []):
            lines += [f"## {p['phase']}: {t['title']}", ""] + md_table(t["columns"], t["rows"]) + [""]
        lines += [f"- {n}" for n in p.get("notes", [])] + ([""] if p.get("notes") else [])
    if summary["not_run"]:
        lines += ["## Not run", ""] + [f"- {n}" for n in summary["not_run"]] + [""]
    lines += [f"Bounds: {summary['bounds']}", ""]
    return "\n".join(lines)


BOUNDS = ("max |Δ| / max |reference|; fp32 1e-5 (3xTF32), bf16 3e-2 for outputs and final states, 6e-2 for "
          "gradients (tests/gpu/phases.py)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--phases", required=True, help="comma-separated, in run order")
    ap.add_argument("--limits", required=True, help="phase=seconds,...")
    ap.add_argument("--budget", type=float, default=0, help="seconds the whole run may take (0: no bound)")
    ap.add_argument("--seconds", type=float, default=None, help="the whole run's seconds (default: the phases' sum)")
    ap.add_argument("--mode", default="full")
    a = ap.parse_args(argv)
    limits = {k: float(v) for k, v in (kv.split("=") for kv in a.limits.split(","))}
    phases, failures, not_run = [], [], []
    for name in a.phases.split(","):
        frag, fails = read_phase(a.work, name, limits[name])
        phases.append(frag)
        failures += fails
        not_run += frag.get("not_run", [])
    seconds = a.seconds if a.seconds is not None else sum(p.get("seconds") or 0 for p in phases)
    if a.budget and seconds > a.budget:
        failures.append(f"the whole run took {seconds:.0f} s, past its {a.budget:g} s budget")
    summary = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), mode=a.mode, seconds=seconds, budget_s=a.budget,
                   passed=not failures, failures=failures, not_run=not_run, bounds=BOUNDS, phases=phases)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    (a.out / "gpu_check.md").write_text(markdown(summary))
    for n in not_run:
        print(f"not run: {n}")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    print(f"GPU check {'passed' if not failures else f'FAILED ({len(failures)})'} in {seconds:.0f} s: "
          f"{a.out / 'gpu_check.md'}, {a.out / 'gpu_check.json'}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
