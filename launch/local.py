"""`longctx run`: prepare data if needed, train on N local processes through the DeepSpeed launcher (its output
and its ranks' through the console: launch/console.py), write the report."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from longctx.pipeline.config import Config
from longctx.pipeline.training.progress import CONSOLE_ENV, LIVE

from .console import Console, Relay


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shards_ready(cfg: Config) -> bool:
    from longctx.data import storage
    shards = cfg.data.shards or cfg.data.prepare.output
    from longctx.data.splits import DONE
    return bool(shards) and storage.exists(storage.join(shards, DONE))


def ensure_data(cfg: Config) -> None:
    """Run `prepare` when the shards are missing (nothing to do when they are complete)."""
    if shards_ready(cfg) and (cfg.data.shards or not (cfg.data.prepare.inputs or cfg.data.prepare.synthetic.documents)):
        return
    if not (cfg.data.prepare.inputs or cfg.data.prepare.synthetic.documents):
        raise ValueError(f"data: no shards at {cfg.data.shards or cfg.data.prepare.output!r} and nothing to prepare "
                         "(data.prepare.inputs / data.prepare.synthetic)")
    from longctx.data.prepare import prepare
    prepare(cfg.data, cfg.tokenizer)


def launch_command(config: str, overrides: List[str], world: Dict[str, int], port: int, node_rank: int = 0,
                   master_addr: str = "127.0.0.1") -> List[str]:
    """DeepSpeed's per-node launcher (deepspeed.launcher.launch): it starts this node's ranks and, on SIGTERM,
    passes it on to them (SIGKILL 30 s later). Started directly, without DeepSpeed's runner in between: the
    runner dies on SIGTERM and would leave the ranks running. `world` is {host: ranks} for every node, in
    node-rank order; every node runs this command with its own `node_rank`."""
    world_info = base64.urlsafe_b64encode(json.dumps({h: list(range(n)) for h, n in world.items()}).encode())
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info.decode()}",
            f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={port}", "--no_local_rank",
            "--module", "longctx.launch.cli", "train", config, *overrides]


# Once the launcher has exited, how long its output may stay open: its ranks have ended with it, unless one it
# could not stop still holds the pipes; its lines until then are shown, and then this process goes on.
LINGER_S = 10.0


def run_relayed(cmd: List[str], env: Dict[str, str], console: Console, verbose: bool) -> int:
    """Run the launcher with its (and its ranks') stdout and stderr through the console; its exit status. As
    `subprocess.call` did before the relay: an exception here (Ctrl-C's KeyboardInterrupt: the ranks, in the
    terminal's process group, have their SIGINT too) kills the launcher and is raised again; a signal whose
    handler returns (SIGTERM) leaves the wait going on."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    relay = Relay(proc.stdout, proc.stderr, console, verbose)
    try:
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if not relay.finish(LINGER_S):     # every line read to its end before the report and the exit status
            console.line(f"longctx run: a process the launcher started still holds its output open after "
                         f"{LINGER_S:.0f} s; not waiting for it", to_err=True)


def run_local(cfg: Config, config: str, overrides: List[str], nproc: int, plan_text: str,
              verbose: bool = False) -> int:
    import torch

    from longctx.pipeline.training.preflight import preflight

    from .noise import quiet_in_process
    if not verbose:
        quiet_in_process()          # Ray's banner (the data prepared here), streaming's (the preflight)
    ensure_data(cfg)
    preflight(cfg, config)           # before any process starts: a mismatch costs seconds here, days later
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    from longctx.pipeline.parallel.shm import CLEAN_STREAMING_SHM, release_stale_shm_buffers
    env[CLEAN_STREAMING_SHM] = "1"
    stale = release_stale_shm_buffers()
    if stale:
        print(f"removed {len(stale)} DeepSpeed buffer(s) in /dev/shm left by killed runs", flush=True)
    from longctx.pipeline.training import rank_status
    from longctx.pipeline.training.checkpoint import EXIT_STOPPED, STOPPED
    stopped = Path(cfg.run.dir) / STOPPED
    stopped.unlink(missing_ok=True)
    rank_status.clear(Path(cfg.run.dir))
    port = free_port()
    cmd = launch_command(config, overrides, {"localhost": nproc}, port)
    print("launch:", " ".join(cmd), flush=True)
    console = Console(sys.stdout, sys.stderr, live=sys.stdout.isatty())
    env[CONSOLE_ENV] = LIVE if console.live else "lines"     # the ranks' stdout is our pipe: tell them (progress.py)
    # SIGTERM to this process group (pre-emption) reaches the launcher and the ranks too: they stop at a
    # checkpoint; this process waits for them instead of dying first, then reports how the run ended.
    previous = signal.signal(signal.SIGTERM, lambda *_: console.line("longctx run: SIGTERM; waiting for the ranks "
                                                                     "to checkpoint"))
    try:
        rc = run_relayed(cmd, env, console, verbose)
    finally:
        signal.signal(signal.SIGTERM, previous)
    release_stale_shm_buffers("127.0.0.1", str(port))     # those of ranks that were killed, once old enough
    from longctx.pipeline.training.report import write_report
    report = write_report(Path(cfg.run.dir), plan_text, started_from=cfg.model.from_pretrained)
    print(f"report: {report}")
    # the same command with run.resume=never would set this run aside and start over
    again = "run it again with run.resume=auto" if cfg.run.resume == "never" else "run the same command"
    if stopped.exists():
        print(f"longctx run: stopped at a checkpoint ({stopped}); {again} to resume", flush=True)
        return EXIT_STOPPED
    if rc != 0:
        lost = rank_status.failures(Path(cfg.run.dir))
        print("longctx run: the run ended with status " + str(rc) + "".join(f"\n  {line}" for line in lost)
              + f"\n  {again} to resume from the last complete checkpoint", file=sys.stderr, flush=True)
    return rc
