"""DeepSpeed/MPI hostfiles ("host slots=N" per line): the nodes of a run, in node-rank order."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict

from longctx.pipeline.config import ConfigError


def read_hostfile(path: str) -> Dict[str, int]:
    """{host: slots} in file order (the node ranks); comments and blank lines are skipped."""
    hosts: Dict[str, int] = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m:
            raise ConfigError(f"{path}:{i}: expected 'host slots=N', got {line!r}")
        if m.group(1) in hosts:
            raise ConfigError(f"{path}:{i}: host {m.group(1)!r} is listed twice")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise ConfigError(f"{path}: no hosts (lines like 'node-1 slots=8')")
    return hosts


def uniform_slots(path: str, hosts: Dict[str, int]) -> int:
    """The ranks per node. Every node must run as many: the data loader and the sequence-parallel groups
    assume the same local world size on every node."""
    slots = set(hosts.values())
    if len(slots) != 1:
        raise ConfigError(f"{path}: slots differ between hosts ({hosts}); give every host the same number of "
                          "slots (ranks per node)")
    return slots.pop()
