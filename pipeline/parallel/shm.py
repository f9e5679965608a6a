"""Shared memory in /dev/shm that runs leave behind: DeepSpeed's CPU all-reduce buffers, which DeepSpeed never
removes, and mosaicml-streaming's registrations of killed runs."""
from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
import time
from collections import defaultdict

from ...data.streaming_core import streaming_module

# A rank creates its buffer by writing 66 MB into a new file and maps it only then (DeepSpeed's shared_create):
# for that long, under load for seconds, a live run's buffer is mapped by no one. Removing it then hangs the run
# for good (its other ranks poll for the file without a timeout), so a buffer counts as left behind only once it
# has also been unchanged this long.
UNCHANGED_FOR_S = 120.0


def release_shm_buffers(addr: str, port: str, rank: str = "*") -> None:
    """Unlink a rank's own DeepSpeed CPU all-reduce buffers (/dev/shm, ~66 MB per rank) once its run no longer
    uses them: DeepSpeed never removes them, so every finished run would otherwise leave them until the memory
    is full. Only for the rank itself, whose run still holds its address and port: another run cannot have
    taken them meanwhile."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"):
        with contextlib.suppress(FileNotFoundError):    # another process of the run removed it first
            os.unlink(path)


def mapped_paths() -> set:
    """Files under /dev/shm that some live process maps (every /proc/PID/maps we may read)."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(None, 5)[5].strip() for line in f if "/dev/shm/" in line)
        except (OSError, IndexError):      # the process ended meanwhile, or a line without a path
            continue
    return mapped


def _unchanged_for(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime >= seconds
    except FileNotFoundError:
        return False


def release_stale_shm_buffers(addr: str = "*", port: str = "*",
                              unchanged_for_s: float = UNCHANGED_FOR_S) -> list:
    """Unlink this user's DeepSpeed buffers (of one address and port, or all) that no live process maps and
    that nothing wrote for `unchanged_for_s`: those of runs killed before they could clean up (SIGKILL, a lost
    node). Returns the paths removed. Buffers of runs still going, or starting, are kept. Not by address and
    port alone: once a run's ranks are gone, another run may take the same port and be creating its own."""
    buffers = {path for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*")
               if _unchanged_for(path, unchanged_for_s)}
    if not buffers:
        return []
    stale = sorted(buffers - mapped_paths())
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return stale


# Set by `longctx run` for its ranks: one machine, the run's own. Not set by `longctx node` (SLURM, hostfile): a
# shared node may hold another job's live registrations in a container with its own process namespace, whose
# mappings no /proc here shows.
CLEAN_STREAMING_SHM = "LONGCTX_CLEAN_STREAMING_SHM"

# mosaicml-streaming's names: /dev/shm/<6-digit number>_<what> and, in the temporary directory, its file locks
_STREAMING_NAME = re.compile(r"^(\d{6})_[a-z_]+$")
_NUMBER_GLOB = "[0-9]" * 6


def _removal_order(path: str) -> int:
    """A registration's number is free to streaming once its `_locals` is gone and no lock holds it: those go
    last, so a reader looking for a number meanwhile never takes one whose other files still exist."""
    name = os.path.basename(path)
    return 2 if name.endswith("_filelock") else 1 if name.endswith("_locals") else 0


def release_stale_streaming_shm() -> list:
    """Remove this user's mosaicml-streaming registrations of which no live process maps any file: those of
    killed runs (a SIGKILL runs no clean-up). Returns the paths removed. Run it before this host's readers open.

    Not streaming's `clean_stale_shared_memory`: that removes every registration from 000000 up to the first
    free number, live ones included (this host's other readers'), and none past a gap. A leaked registration
    costs more than memory: a reader with a remote is refused a local cache still registered there ("Reused
    local directory", when the killed reader had not downloaded yet), and a file lock left in the temporary
    directory keeps its number taken for good (streaming skips it). The one race left: a reader creating a
    registration between its file's creation and its mapping (inside Python's SharedMemory, microseconds)."""
    constant = streaming_module("base.constant")    # the ranks import streaming anyway

    uid, groups = os.getuid(), defaultdict(list)
    patterns = [f"/dev/shm/{_NUMBER_GLOB}_*"] + [
        os.path.join(tempfile.gettempdir(), f"{_NUMBER_GLOB}_{what}")
        for what in (constant.BARRIER_FILELOCK, constant.CACHE_FILELOCK)]
    for pattern in patterns:      # a lock left without its registration still holds the number
        for path in glob.glob(pattern):
            name = os.path.basename(path)
            with contextlib.suppress(FileNotFoundError):
                if _STREAMING_NAME.match(name) and os.stat(path).st_uid == uid:
                    groups[name[:6]].append(path)
    if not groups:
        return []
    # read after the listing: a registration made since has its files mapped by now, and counts as live
    live = {os.path.basename(p)[:6] for p in mapped_paths() if _STREAMING_NAME.match(os.path.basename(p))}
    removed = []
    for number, paths in sorted(groups.items()):
        if number in live:
            continue
        for path in sorted(paths, key=_removal_order):
            with contextlib.suppress(FileNotFoundError):      # gone meanwhile
                os.unlink(path)
                removed.append(path)
    return removed
