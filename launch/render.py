"""`longctx launch`: submit-ready scripts rendered from the templates beside this file, with every value
checked against the config first (the stage plan for this world size, the data section for prepare)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import List, Optional

from pipeline.config import Config, ConfigError, model_chunk_size
from pipeline.curriculum import plan

HERE = Path(__file__).parent
TEMPLATES = {"slurm": HERE / "slurm" / "train.sbatch", "deepspeed": HERE / "deepspeed" / "train.sh",
             "ray": HERE / "ray" / "prepare.sh"}
SETTINGS_MARK = "# --- settings"


def hostfile_slots(path: str) -> List[tuple]:
    hosts = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m:
            raise ConfigError(f"{path}:{i}: expected 'host slots=N', got {line!r}")
        hosts.append((m.group(1), int(m.group(2))))
    return hosts


def render(target: str, cfg: Config, config_path: str, overrides: List[str], nodes: int, gpus_per_node: int,
           partition: str = "", time: str = "", hostfile: Optional[str] = None, address: str = "") -> str:
    if target not in TEMPLATES:
        raise ValueError(f"launch target must be one of {sorted(TEMPLATES)}, got {target!r}")
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    where = config_path
    if target in ("slurm", "deepspeed"):
        if target == "deepspeed" and hostfile:
            hosts = hostfile_slots(hostfile)
            if len(hosts) != nodes or any(s != gpus_per_node for _, s in hosts):
                raise ConfigError(f"{hostfile}: {len(hosts)} hosts with slots {[s for _, s in hosts]}, but "
                                  f"--nodes {nodes} --gpus-per-node {gpus_per_node} were asked for")
        plan(cfg, nodes * gpus_per_node, model_chunk_size(cfg), where)     # raises naming the stage and field
    else:
        p = cfg.data.prepare
        if not p.output or not (p.inputs or p.synthetic.documents):
            raise ConfigError(f"{where}: data.prepare needs inputs (or synthetic documents) and an output")
    text = TEMPLATES[target].read_text()
    settings = {"LONGCTX_CONFIG": str(Path(config_path).resolve()), "LONGCTX_OVERRIDES": " ".join(overrides)}
    if target == "slurm":
        settings.update(GPUS_PER_NODE=str(gpus_per_node), MASTER_PORT=str(cfg.launch.master_port))
        directives = {"--job-name": f"longctx-{cfg.run.name}", "--nodes": str(nodes),
                      "--gpus-per-node": str(gpus_per_node), "--time": time or cfg.launch.time,
                      "--output": str(Path(cfg.run.dir).resolve() / "slurm-%j.out")}
        for flag, value in directives.items():
            text = re.sub(rf"^#SBATCH {flag}=.*$", f"#SBATCH {flag}={value}", text, flags=re.M)
        extra = [f"#SBATCH --partition={partition or cfg.launch.partition}"] if (partition or cfg.launch.partition) else []
        extra += [f"#SBATCH --account={cfg.launch.account}"] if cfg.launch.account else []
        if extra:
            text = text.replace("#SBATCH --requeue", "\n".join(extra + ["#SBATCH --requeue"]))
    elif target == "deepspeed":
        settings.update(MASTER_PORT=str(cfg.launch.master_port))
        if hostfile:
            settings["HOSTFILE"] = str(Path(hostfile).resolve())
    elif address:
        settings["RAY_ADDRESS"] = address
    block = [f"# rendered by `longctx launch {target}` ({nodes} x {gpus_per_node})"]
    block += [f"{k}={shlex.quote(v)}" for k, v in settings.items()]
    block += [f"export {' '.join(settings)}"]
    return text.replace(SETTINGS_MARK, "\n".join(block) + "\n" + SETTINGS_MARK, 1) if SETTINGS_MARK in text \
        else text.replace("set -euo pipefail\n", "set -euo pipefail\n" + "\n".join(block) + "\n", 1)
