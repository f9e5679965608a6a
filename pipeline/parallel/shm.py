"""Shared memory in /dev/shm that runs leave behind: DeepSpeed's CPU all-reduce buffers, which DeepSpeed never
removes, and (the flag below) mosaicml-streaming's registrations of killed runs."""
from __future__ import annotations

import contextlib
import glob
import os

# Set by `longctx run` for its ranks: one machine, this run's own, so mosaicml-streaming's shared memory found
# there at start is a killed run's. Not set by `longctx node` (SLURM, hostfile): a shared node may hold another
# job's live streams, which streaming's clean-up would remove too.
CLEAN_STREAMING_SHM = "LONGCTX_CLEAN_STREAMING_SHM"


def release_shm_buffers(addr: str, port: str, rank: str = "*") -> None:
    """Unlink DeepSpeed's CPU all-reduce buffers of a run (/dev/shm, ~66 MB per rank). DeepSpeed never
    removes them, so every finished or killed CPU run would otherwise leave them until the memory is full."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"):
        with contextlib.suppress(FileNotFoundError):    # another process of the run removed it first
            os.unlink(path)


def _mapped_paths() -> set:
    """Files under /dev/shm that some live process maps (every /proc/PID/maps we may read)."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(None, 5)[5].strip() for line in f if "/dev/shm/" in line)
        except (OSError, IndexError):      # the process ended meanwhile, or a line without a path
            continue
    return mapped


def release_stale_shm_buffers() -> list:
    """Unlink this user's DeepSpeed buffers that no live process maps: those of runs killed before they
    could clean up (SIGKILL, a lost node). Returns the paths removed. Buffers of runs still going are kept."""
    buffers = set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))
    if not buffers:
        return []
    stale = sorted(buffers - _mapped_paths())
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return stale
