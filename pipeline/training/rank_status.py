"""Each rank's state in the run directory (ranks/rank<N>.json), so that when a run ends badly the
launcher can say which rank went first and how: a rank killed outright (SIGKILL, the out-of-memory
killer, a lost node) never gets to write its end, and stays `running`."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import List

DIR = "ranks"


def write_status(run_dir: Path, rank: int, state: str) -> None:
    d = Path(run_dir) / DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "state": state,
                               "time": time.time()}))
    os.replace(tmp, d / f"rank{rank}.json")


def clear(run_dir: Path) -> None:
    for f in (Path(run_dir) / DIR).glob("rank*.json"):
        f.unlink(missing_ok=True)


def failures(run_dir: Path) -> List[str]:
    """One line per rank that did not end cleanly, the ones that died without a word first."""
    died, failed = [], []
    for f in sorted((Path(run_dir) / DIR).glob("rank*.json"), key=lambda p: int(p.stem[4:])):
        s = json.loads(f.read_text())
        where = f"rank {s['rank']} (pid {s['pid']} on {s['host']})"
        if s["state"] == "running":
            died.append(f"{where} died without finishing: killed (SIGKILL, out of memory, its node lost) or "
                        "crashed in native code")
        elif s["state"].startswith("failed"):
            failed.append(f"{where} {s['state']}")
    return died + failed
