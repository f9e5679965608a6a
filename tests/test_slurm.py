"""The SLURM scripts on a real two-node SLURM cluster (tests/slurm/cluster.sh: Debian's slurm-wlm, two
slurmd on loopback addresses), run as an operator runs them: `longctx launch slurm ... --submit`."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.training import assert_same_run, records, write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def slurm_cluster():
    if not shutil.which("slurmd") or not shutil.which("munged"):
        pytest.skip("SLURM is not installed: `apt-get install slurm-wlm munge` as root (.ci/run does it), "
                    "then these tests start a two-node cluster with tests/slurm/cluster.sh")
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster needs root (slurmd runs jobs as their user)")
    r = subprocess.run([str(ROOT / "tests" / "slurm" / "cluster.sh"), "start"], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    yield


def job_env():
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def submit(cfg, *args):
    r = subprocess.run([sys.executable, "-m", "longctx", "launch", "slurm", str(cfg), *map(str, args), "--submit"],
                       capture_output=True, text=True, timeout=120, env=job_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return int(re.search(r"Submitted batch job (\d+)", r.stdout).group(1))


def job(jid) -> dict:
    out = subprocess.run(["scontrol", "show", "job", str(jid)], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_state(jid, states, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job(jid)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {jid} did not reach {states} in {timeout}s: {job(jid)}")


@pytest.mark.timeout(900)
def test_two_node_training_equals_two_local_processes(slurm_cluster, uninterrupted):
    tmp, full = uninterrupted
    cfg = write_config(tmp, "slurm2")
    jid = submit(cfg, "--nodes", 2, "--gpus-per-node", 1, "--time", "00:15:00")
    info = wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = (tmp / "slurm2" / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "--node_rank=0" in log and "--node_rank=1" in log and "nodes node1,node2" in log
    assert_same_run(records(tmp / "slurm2"), full)
