"""DeepSpeed's CPU all-reduce buffers in /dev/shm, which DeepSpeed never removes."""
from __future__ import annotations

import contextlib
import glob
import os


def release_shm_buffers(addr: str, port: str, rank: str = "*") -> None:
    """Unlink DeepSpeed's CPU all-reduce buffers of a run (/dev/shm, ~66 MB per rank). DeepSpeed never
    removes them, so every finished or killed CPU run would otherwise leave them until the memory is full."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"):
        with contextlib.suppress(FileNotFoundError):    # another process of the run removed it first
            os.unlink(path)
