"""`longctx run`: prepare data if needed, train on N local processes through the DeepSpeed launcher,
write the report."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

from longctx.pipeline.config import Config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shards_ready(cfg: Config) -> bool:
    from longctx.data import storage
    shards = cfg.data.shards or cfg.data.prepare.output
    return bool(shards) and storage.exists(storage.join(shards, "index.json"))


def ensure_data(cfg: Config) -> None:
    """Run `prepare` when the shards are missing (nothing to do when they are complete)."""
    if shards_ready(cfg) and (cfg.data.shards or not (cfg.data.prepare.inputs or cfg.data.prepare.synthetic.documents)):
        return
    if not (cfg.data.prepare.inputs or cfg.data.prepare.synthetic.documents):
        raise ValueError(f"data: no shards at {cfg.data.shards or cfg.data.prepare.output!r} and nothing to prepare "
                         "(data.prepare.inputs / data.prepare.synthetic)")
    from longctx.data.prepare import prepare
    prepare(cfg.data, cfg.tokenizer)


def launch_command(config: str, overrides: List[str], nproc: int, port: int) -> List[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", str(nproc),
            "--master_port", str(port),
            "--module", "longctx.launch.cli", "train", config, *overrides]


def run_local(cfg: Config, config: str, overrides: List[str], nproc: int, plan_text: str) -> int:
    import torch
    ensure_data(cfg)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    from streaming.base.util import clean_stale_shared_memory
    clean_stale_shared_memory()     # a killed run leaves the shards' shared memory registered; once, before the ranks
    port = free_port()
    cmd = launch_command(config, overrides, nproc, port)
    print("launch:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    from longctx.pipeline.parallel.shm import release_shm_buffers
    release_shm_buffers("127.0.0.1", str(port))     # also those of ranks that were killed
    from longctx.pipeline.training.report import write_report
    report = write_report(Path(cfg.run.dir), plan_text)
    print(f"report: {report}")
    return rc
