"""DeepSpeed's CPU all-reduce buffers in /dev/shm: those no live process maps, and nothing wrote for a while, are
removed at start; one a starting run is still writing is not."""
import os
import subprocess
import sys
import time

from longctx.pipeline.parallel.shm import UNCHANGED_FOR_S, release_stale_shm_buffers


def test_stale_buffers_go_and_live_ones_stay(tmp_path):
    """Fresh files, swept here as if they had aged (unchanged_for_s=0), by this test's address only: a
    `longctx run` starting on another pytest worker sweeps every buffer of this user that aged UNCHANGED_FOR_S,
    and took this test's aged files before its own calls (a flake of the suite on three workers)."""
    addr = f"test-{os.getpid()}"
    base = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}"
    stale, live = f"{base}_1_0", f"{base}_2_0"
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import mmap, sys, time
f = open({live!r}, "r+b"); m = mmap.mmap(f.fileno(), 4096); print("mapped", flush=True); time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        removed = release_stale_shm_buffers(addr, unchanged_for_s=0)
        assert removed == [stale]
        assert not os.path.exists(stale) and os.path.exists(live)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert release_stale_shm_buffers(addr, unchanged_for_s=0) == [live] and not os.path.exists(live)


def test_a_buffer_a_starting_run_is_still_writing_is_kept():
    """DeepSpeed's rank writes its 66 MB buffer into a new file before it maps it: for that long (seconds under
    load) no process maps it. Removed then by another run starting on the host, its run hung for good: the other
    ranks polled for the file forever (seen in the suite on three workers). Only what nothing wrote for
    UNCHANGED_FOR_S goes; by address and port too (what `longctx run` removes when its ranks are gone, where the
    next run may already be creating its own under the same port)."""
    path = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_test-{os.getpid()}_3_0"
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    try:
        assert path not in release_stale_shm_buffers() and os.path.exists(path)
        assert path not in release_stale_shm_buffers(f"test-{os.getpid()}", "3") and os.path.exists(path)
        old = time.time() - UNCHANGED_FOR_S - 1
        os.utime(path, (old, old))
        assert release_stale_shm_buffers(f"test-{os.getpid()}", "3") == [path] and not os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
