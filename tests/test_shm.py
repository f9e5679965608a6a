"""DeepSpeed's CPU all-reduce buffers in /dev/shm: those no live process maps are removed at start."""
import os
import subprocess
import sys
import time

from longctx.pipeline.parallel.shm import release_stale_shm_buffers


def test_stale_buffers_go_and_live_ones_stay(tmp_path):
    base = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_test-{os.getpid()}"
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
        removed = release_stale_shm_buffers()
        assert stale in removed and live not in removed
        assert not os.path.exists(stale) and os.path.exists(live)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert live in release_stale_shm_buffers() and not os.path.exists(live)
