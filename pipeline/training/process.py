"""This training process's place in the job: joining the launcher's process group on its device, the
ranks that share this host, the shared memory killed runs left behind, and leaving the group at the end.
Every function that calls a collective says so: each rank calls it at the same point."""
from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from ...data.streaming_shm import host_registry_lock
from ..parallel.shm import CLEAN_STREAMING_SHM, release_shm_buffers, release_stale_streaming_shm


def uses_cuda() -> bool:
    """Whether the ranks run on GPUs: CUDA is there and the launcher did not ask for the CPU (DS_ACCELERATOR)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def join_process_group(cuda: bool, timeout_s: int) -> tuple:
    """Joins the launcher's process group (its RANK, WORLD_SIZE, MASTER_ADDR/PORT); returns (rank, world size)."""
    import deepspeed
    # a collective that waits longer than this fails: a rank lost on another node ends the run (NCCL does
    # not always see a dead peer; gloo sees the closed connection at once)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def rank_device(cuda: bool) -> torch.device:
    """This rank's device, made the current one: the GPU the launcher's LOCAL_RANK names, or the CPU."""
    if not cuda:
        return torch.device("cpu")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def host_local_world(rank: int, world: int):
    """LOCAL_RANK / LOCAL_WORLD_SIZE as mosaicml-streaming needs them: the ranks that share this host
    (and its /dev/shm) elect one leader. A launcher's own values count the ranks it started, which is
    less when several launchers share a host (two SLURM nodes on one machine). A collective."""
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    here = [r for r, h in enumerate(hosts) if h == socket.gethostname()]
    saved = {k: os.environ.get(k) for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    os.environ.update(LOCAL_RANK=str(here.index(rank)), LOCAL_WORLD_SIZE=str(len(here)))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def release_killed_runs_streaming_shm(rank: int) -> None:
    """A killed run leaves mosaicml-streaming's registrations in /dev/shm (and a reader with a remote is
    refused a local cache still registered there): under `longctx run` the first rank removes those no
    live process maps while the others wait (a collective then). Here, not in the launcher: the ranks
    import streaming anyway."""
    if os.environ.get(CLEAN_STREAMING_SHM) != "1":
        return
    if rank == 0:
        with host_registry_lock():     # not while another job on the host registers its readers
            _release_stale_streaming_shm()
    dist.barrier()


def _release_stale_streaming_shm() -> None:
    try:
        removed = release_stale_streaming_shm()
    except OSError as e:       # the others wait at the barrier: a clean-up that fails must not stop this rank
        print(f"could not remove killed runs' mosaicml-streaming registrations ({e}); continuing", flush=True)
        return
    if removed:
        print(f"removed {len(removed)} file(s) of killed runs' mosaicml-streaming registrations", flush=True)


def leave_process_group() -> None:
    """After the last collective: leaves the group (a collective, when it was joined) and removes this
    rank's DeepSpeed CPU all-reduce buffers, which DeepSpeed never removes."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # after the barrier no rank uses them any more
    release_shm_buffers(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
                        rank=os.environ.get("LOCAL_RANK", "0"))
