"""`longctx launch`: submit-ready scripts rendered from the templates beside this file, with every value
checked against the config first (the stage plan for this world size, the data section for prepare)."""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from longctx.launch.hostfile import read_hostfile
from longctx.pipeline.config import Config, ConfigError, planning_chunk_size
from longctx.pipeline.training.curriculum import plan

HERE = Path(__file__).parent
SETTINGS_MARK = "# --- settings"


def _check_training(cfg: Config, o: dict) -> None:
    if o["hostfile"]:
        hosts = read_hostfile(o["hostfile"])
        if len(hosts) != o["nodes"] or any(s != o["gpus_per_node"] for s in hosts.values()):
            raise ConfigError(f"{o['hostfile']}: {len(hosts)} hosts with slots {list(hosts.values())}, but "
                              f"--nodes {o['nodes']} --gpus-per-node {o['gpus_per_node']} were asked for")
    chunk, note = planning_chunk_size(cfg)          # a login node may not hold the checkpoint the nodes will read
    if note:
        print(note, file=sys.stderr)
    plan(cfg, o["nodes"] * o["gpus_per_node"], chunk, o["where"])   # raises naming the stage and field


def _check_prepare(cfg: Config, o: dict) -> None:
    p = cfg.data.prepare
    if not p.output or not (p.inputs or p.synthetic.documents):
        raise ConfigError(f"{o['where']}: data.prepare needs inputs (or synthetic documents) and an output")


def _sbatch_value(key: str, value: str) -> str:
    """`value` as sbatch reads it in an #SBATCH line: its own parser, not the shell's, splits at blanks,
    takes "..." with backslash escapes and ends the line at an unquoted #. A line break cannot be quoted:
    the rest of the value would be a line of the job script, run as a command."""
    if not value.isprintable():
        raise ConfigError(f"{key}: {value!r} has a line break or another unprintable character: a line break "
                          "would end its #SBATCH line and run the rest as a command of the job; remove it")
    if re.fullmatch(r"[\w@%+=:,./-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _slurm(text: str, settings: dict, cfg: Config, o: dict) -> str:
    run_dir = str(Path(cfg.run.dir).resolve())
    if "\\" in run_dir:
        raise ConfigError(f"run.dir {run_dir!r}: a backslash in the path of the job's log (#SBATCH --output) makes "
                          "SLURM leave its %j unreplaced, so that every job writes one log; choose a run.dir (or, "
                          "for the default run.dir, a run.name) without one")
    settings.update(GPUS_PER_NODE=str(o["gpus_per_node"]), MASTER_PORT=str(cfg.launch.master_port),
                    LONGCTX_RUN_DIR=run_dir)
    # (flag, the key a refusal names, value); --output is a filename pattern, where %% is a literal %
    directives = [("--job-name", "run.name", f"longctx-{cfg.run.name}"),
                  ("--nodes", "--nodes", str(o["nodes"])),
                  ("--gpus-per-node", "--gpus-per-node", str(o["gpus_per_node"])),
                  ("--time", "--time" if o["time"] else "launch.time", o["time"] or cfg.launch.time),
                  ("--cpus-per-task", "launch.cpus_per_task", str(cfg.launch.cpus_per_task)),
                  ("--signal", "launch.stop_seconds", f"B:USR1@{cfg.launch.stop_seconds}"),
                  ("--output", "run.dir", run_dir.replace("%", "%%") + "/slurm-%j.out")]
    for flag, key, value in directives:
        line = f"#SBATCH {flag}={_sbatch_value(key, value)}"
        text = re.sub(rf"^#SBATCH {flag}=.*$", lambda _: line, text, flags=re.M)   # a function: no \ escapes
    extra = [("--partition", "--partition" if o["partition"] else "launch.partition",
              o["partition"] or cfg.launch.partition),
             ("--account", "launch.account", cfg.launch.account), ("--mem", "launch.mem", cfg.launch.mem)]
    lines = [f"#SBATCH {flag}={_sbatch_value(key, value)}" for flag, key, value in extra if value]
    if lines:
        text = text.replace("#SBATCH --requeue", "\n".join(lines + ["#SBATCH --requeue"]))
    return text


def _deepspeed(text: str, settings: dict, cfg: Config, o: dict) -> str:
    settings.update(MASTER_PORT=str(cfg.launch.master_port))
    if o["hostfile"]:
        settings["HOSTFILE"] = str(Path(o["hostfile"]).resolve())
    return text


def _ray(text: str, settings: dict, cfg: Config, o: dict) -> str:
    if o["address"]:
        settings["RAY_ADDRESS"] = o["address"]
    return text


@dataclass(frozen=True)
class Target:
    template: Path
    check: Callable        # (cfg, options) -> None; raises ConfigError naming the field
    fill: Callable         # (template text, settings to export, cfg, options) -> text


TARGETS = {"slurm": Target(HERE / "slurm" / "train.sbatch", _check_training, _slurm),
           "deepspeed": Target(HERE / "deepspeed" / "train.sh", _check_training, _deepspeed),
           "ray": Target(HERE / "ray" / "prepare.sh", _check_prepare, _ray)}


def render(target: str, cfg: Config, config_path: str, overrides: List[str], nodes: int, gpus_per_node: int,
           partition: str = "", time: str = "", hostfile: Optional[str] = None, address: str = "") -> str:
    if target not in TARGETS:
        raise ValueError(f"launch target must be one of {sorted(TARGETS)}, got {target!r}")
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    spec = TARGETS[target]
    options = dict(where=config_path, nodes=nodes, gpus_per_node=gpus_per_node, partition=partition, time=time,
                   hostfile=hostfile if target == "deepspeed" else None, address=address)
    spec.check(cfg, options)
    # LONGCTX_OVERRIDES (blank-separated, for use by hand) empty: the submitter's environment adds nothing.
    settings = {"LONGCTX_CONFIG": str(Path(config_path).resolve()), "LONGCTX_OVERRIDES": ""}
    text = spec.fill(spec.template.read_text(), settings, cfg, options)
    block = [f"# rendered by `longctx launch {target}` ({nodes} x {gpus_per_node})"]
    block += [f"{k}={shlex.quote(v)}" for k, v in settings.items()]
    block += [f"export {' '.join(settings)}"]
    if overrides:   # arguments of the script, as by hand: each reaches `longctx` whole, whatever it holds
        block += [f"set -- {shlex.join(overrides)} \"$@\""]
    return text.replace(SETTINGS_MARK, "\n".join(block) + "\n" + SETTINGS_MARK, 1) if SETTINGS_MARK in text \
        else text.replace("set -euo pipefail\n", "set -euo pipefail\n" + "\n".join(block) + "\n", 1)
