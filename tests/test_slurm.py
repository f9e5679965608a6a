"""The SLURM scripts on a real two-node SLURM cluster (tests/slurm/cluster.sh: Debian's slurm-wlm, two
slurmd on loopback addresses), run as an operator runs them: `longctx launch slurm ... --submit`."""
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longctx.data.splits import SPLITS
from longctx.launch.local import free_port
from tests.training import STEPS3, assert_same_run, records, write_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"


@pytest.fixture
def slurm_cluster(request):
    """The test cluster (`slurm_daemons`), for a test that pytest-xdist runs on the one worker that holds it.

    One cluster per machine: tests/conftest.py puts every test using this fixture in the xdist group "slurm". When
    the group is ignored (pytest-xdist 3.8's loadgroup under pytest 9.2, or `--dist` other than loadgroup), each
    worker would start the cluster over the others' and leave a slurmctld running: refused before anything
    starts."""
    if os.environ.get("PYTEST_XDIST_WORKER") and not request.node.nodeid.endswith("@slurm"):
        pytest.fail(f"pytest-xdist did not keep the SLURM tests on one worker ({request.node.nodeid} has no @slurm): "
                    "run with --dist loadgroup (pyproject.toml's default) and pytest < 9.2 (pyproject.toml's "
                    "dev range), or with -n 0", pytrace=False)
    request.getfixturevalue("slurm_daemons")


@pytest.fixture(scope="session")
def slurm_daemons():
    """The test cluster, up for the session and stopped after it (cluster.sh stops only the daemons it started).
    It has a config and ports of its own, so SLURM_CONF points every sbatch/scontrol/squeue of the tests, and of
    their jobs (sbatch passes the environment on), at it rather than at a SLURM the machine may run itself."""
    if not shutil.which("slurmd") or not shutil.which("munged"):
        pytest.skip("SLURM is not installed: `apt-get install slurm-wlm munge` as root (.ci/run does it), "
                    "then these tests start a two-node cluster with tests/slurm/cluster.sh")
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster needs root (slurmd runs jobs as their user): run these tests as root, "
                    "e.g. `sudo -E \"$(command -v python)\" -m pytest tests/test_slurm.py tests/test_launch_scripts.py`")
    try:
        r = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        conf = re.search(r"^export SLURM_CONF=(.+)$", r.stdout, re.M).group(1)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SLURM_CONF", conf)
            yield
    finally:        # also after a failed start: the suite leaves no daemon it started behind
        r = subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr


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


@pytest.mark.timeout(1500)
def test_two_node_job_requeued_in_stage_1_and_2_resumes_each_time_and_equals_two_local_processes(
        slurm_cluster, uninterrupted3):
    """A three-stage job on two nodes, pre-empted as SLURM does it (`scontrol requeuehold`: SIGTERM to every
    task) in stage 1 and again in stage 2: each requeued allocation resumes from the checkpoint written at
    the step reached, past finished stages, and the job ends with the losses of two local processes. (Stage 0:
    test_scontrol_requeue_checkpoints_first_and_the_requeued_job_finishes_the_run.)"""
    tmp, full = uninterrupted3
    cfg = write_config(tmp, "slurm3", stages=3)
    jid = submit(cfg, "--nodes", 2, "--gpus-per-node", 1, "--time", "00:20:00")
    run_dir = tmp / "slurm3"
    ends = list(itertools.accumulate(STEPS3))
    stops = []
    for stage in (1, 2):
        deadline = time.time() + 300
        while time.time() < deadline and _metrics_lines(run_dir) <= ends[stage - 1]:
            time.sleep(0.05)
        subprocess.run(["scontrol", "requeuehold", str(jid)], check=True, timeout=30)
        wait_state(jid, {"PENDING", "REQUEUE_HOLD"}, timeout=120)
        stops.append(json.loads((run_dir / "stopped.json").read_text())["step"])
        assert ends[stage - 1] < stops[-1] < ends[-1], (stage, stops)
        subprocess.run(["scontrol", "release", str(jid)], check=True, timeout=30)
    info = wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = (run_dir / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log[-3000:]
    assert "--node_rank=0" in log and "--node_rank=1" in log and "nodes node1,node2" in log
    assert [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)] == stops, log[-3000:]
    assert_same_run(records(run_dir), full)


@pytest.mark.timeout(900)
def test_hostfile_script_without_ssh_on_two_hosts_equals_two_local_processes(slurm_cluster, uninterrupted):
    """launch/deepspeed/train.sh with a two-host hostfile (the cluster's loopback names), started on each
    host with its NODE_RANK: one DeepSpeed launcher per host, no ssh, rendezvous at the first host."""
    tmp, full = uninterrupted
    cfg = write_config(tmp, "hostfile2")
    (tmp / "hostfile2.hosts").write_text("# two hosts\nnode1 slots=1\nnode2 slots=1\n")
    env = {**job_env(), "HOSTFILE": str(tmp / "hostfile2.hosts"), "LONGCTX_CONFIG": str(cfg),
           "MASTER_PORT": str(free_port())}
    hosts = [subprocess.Popen(["bash", str(ROOT / "launch/deepspeed/train.sh")], env={**env, "NODE_RANK": str(i)},
                              cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try:
        logs = [h.communicate(timeout=600)[0] for h in hosts]
    finally:
        for h in hosts:
            h.kill()
    assert [h.returncode for h in hosts] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "node 0 (node1) of ['node1', 'node2']" in logs[0] and "--master_addr=node1" in logs[1]
    assert_same_run(records(tmp / "hostfile2"), full)


def _metrics_lines(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.timeout(1200)
def test_scontrol_requeue_checkpoints_first_and_the_requeued_job_finishes_the_run(slurm_cluster, uninterrupted):
    """Pre-emption as SLURM does it (`scontrol requeuehold`: SIGTERM to the script and every task, SIGKILL
    KillWait=30 s later) while the checkpoint's evaluation takes tens of seconds: the checkpoint of the step
    reached exists before the job runs again, and the requeued job (with a quick evaluation: an allowed change)
    ends with the losses of the uninterrupted run."""
    tmp, full = uninterrupted
    cfg = write_config(tmp, "slurm-pre")
    fast = cfg.read_text()
    cfg.write_text(fast.replace("passkey_samples: 1", "passkey_samples: 150"))     # longer than KillWait
    jid = submit(cfg, "--nodes", 2, "--gpus-per-node", 1, "--time", "00:15:00")
    run_dir = tmp / "slurm-pre"
    deadline = time.time() + 300
    while time.time() < deadline and not _metrics_lines(run_dir):
        time.sleep(0.1)
    time.sleep(2)                           # step 2 is due for the slow evaluation: training or evaluating it
    subprocess.run(["scontrol", "requeuehold", str(jid)], check=True, timeout=30)
    info = wait_state(jid, {"PENDING", "REQUEUE_HOLD"}, timeout=120)
    assert info["Reason"] in ("JobHeldAdmin", "JobHeldUser", "job_requeued_in_held_state"), info
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert (run_dir / "checkpoints" / latest / "COMPLETE.json").exists()
    assert json.loads((run_dir / "stopped.json").read_text())["checkpoint"] == latest
    cfg.write_text(fast)                    # the requeued job reads the config again
    subprocess.run(["scontrol", "release", str(jid)], check=True, timeout=30)
    info = wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = (run_dir / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "SIGTERM: checkpoint written at step" in log and "resumed from" in log
    assert_same_run(records(run_dir), full)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_job_at_its_time_limit_checkpoints_and_requeues_itself(slurm_cluster, tmp_path):
    """`--time 3` minutes with `launch.stop_seconds=60` and more steps than fit: SLURM sends USR1 before the
    limit (up to a minute early), the script stops the ranks at a checkpoint and requeues the job; the next
    allocation resumes from that checkpoint, gets further and requeues again. (With `--time 2`, USR1 can come
    before the ranks have started, and an allocation gets no step done.)"""
    cfg = write_config(tmp_path, "chain")
    text = cfg.read_text().replace("steps: 6,", "steps: 100000,").replace("every_steps: 2", "every_steps: 0")
    cfg.write_text(text + "launch: {stop_seconds: 60}\n")
    subprocess.run([sys.executable, "-m", "longctx", "prepare", str(cfg)], check=True, timeout=300,
                   capture_output=True)
    jid = submit(cfg, "--nodes", 2, "--gpus-per-node", 1, "--time", "00:03:00")
    run_dir = tmp_path / "chain"
    deadline = time.time() + 2000
    try:
        while time.time() < deadline and int(job(jid).get("Restarts", 0)) < 2:
            time.sleep(2)
        info = job(jid)
    finally:
        subprocess.run(["scancel", str(jid)], timeout=30)
    log = (run_dir / f"slurm-{jid}.out").read_text()
    assert int(info["Restarts"]) >= 2, log[-3000:]
    stops = [int(m) for m in re.findall(r"SIGTERM: checkpoint written at step (\d+)", log)]
    resumes = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert log.count("time limit near") >= 2 and len(stops) >= 2
    assert resumes[0] == stops[0] and stops[1] > stops[0]      # the second allocation went on from the first
    steps = [r["step"] for r in records(run_dir)]
    assert steps[:stops[1]] == list(range(1, stops[1] + 1))


def _prepare_config(tmp, name, inputs):
    path = tmp / f"{name}.yaml"
    path.write_text(f"""
run: {{name: {name}, dir: {tmp / name}}}
tokenizer: {{kind: byte}}
data: {{prepare: {{inputs: ["{inputs}"], output: {tmp / name / 'mds'}, chunk_bytes: 40000, num_workers: 0}}}}
""")
    return path


@pytest.mark.timeout(900)
def test_prepare_sbatch_uses_a_ray_cluster_on_both_nodes_and_equals_a_local_prepare(slurm_cluster, local_ray,
                                                                                      tmp_path):
    """launch/slurm/prepare.sbatch on two nodes: a Ray head on node1 and a worker on node2, joined by polling;
    `longctx prepare` tokenizes on both (the manifest says where each part was done), its shards equal a local
    prepare byte for byte, and no Ray process of the job is left afterwards, while other Ray instances on the
    machine (this test module's) live on."""
    import ray

    from longctx.data.synthetic import SyntheticConfig, write_jsonl
    inputs = write_jsonl(SyntheticConfig(documents=120, min_tokens=500, max_tokens=3000, seed=5), str(tmp_path))
    with open(inputs, "a") as f:
        f.write("not json\n")                 # one rejected record: the job's exit status is prepare's 3
    port = free_port()
    cfg = _prepare_config(tmp_path, "cluster", inputs)
    out = tmp_path / "prepare-%j.out"
    r = subprocess.run(["sbatch", "--nodes=2", "--cpus-per-task=2", f"--output={out}",
                        str(ROOT / "launch/slurm/prepare.sbatch")], capture_output=True, text=True, timeout=60,
                       env={**job_env(), "LONGCTX_CONFIG": str(cfg), "RAY_PORT": str(port)})
    assert r.returncode == 0, r.stderr
    jid = int(re.search(r"Submitted batch job (\d+)", r.stdout).group(1))
    info = wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=600)
    log = (tmp_path / f"prepare-{jid}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", log[-4000:]    # complete, 1 rejected
    assert "ray_wait: 2 nodes alive" in log and "exit status 3" in log
    cluster = json.loads((tmp_path / "cluster" / "mds" / "manifest.json").read_text())
    assert set(cluster["run"]["tokenized_on"]) == {"127.0.0.2", "127.0.0.3"}, cluster["run"]
    left = subprocess.run(["pgrep", "-f", f"ray.*{port}"], capture_output=True, text=True).stdout
    assert not left, f"Ray processes of the job are still running: {left}"
    assert ray.get(ray.put("alive"), timeout=30) == "alive"          # the job stopped only its own Ray

    from longctx.data.prepare import prepare
    from longctx.pipeline.config import load_config
    local = load_config(str(_prepare_config(tmp_path, "local", inputs)), [])
    prepare(local.data, local.tokenizer)            # on this module's Ray
    here = json.loads((tmp_path / "local" / "mds" / "manifest.json").read_text())
    assert {**cluster, "run": None} == {**here, "run": None}        # `run`: wall time, rates, nodes
    assert len(cluster["parts"]) >= 4
    shards = sorted(p.relative_to(tmp_path / "local" / "mds") for p in (tmp_path / "local" / "mds").glob("*/*/*")
                    if p.parts[-3] in SPLITS)
    assert len(shards) >= 8
    for f in shards:
        assert (tmp_path / "local" / "mds" / f).read_bytes() == (tmp_path / "cluster" / "mds" / f).read_bytes(), f


def _node_processes(node: str) -> list:
    """The node's slurmd and every process of its job steps (they carry SLURMD_NODENAME in their environment)."""
    pids = set()
    pidfile = Path(os.environ.get("LONGCTX_SLURM_DIR", "/tmp/longctx-slurm")) / f"slurmd-{node}.pid"
    if pidfile.exists():
        pids.add(int(pidfile.read_text().split()[0]))
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"SLURMD_NODENAME={node}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    pids.add(int(proc.name))
            except OSError:
                pass
    children = {}
    for proc in Path("/proc").iterdir():       # and the steps' slurmstepd, forked by that slurmd
        try:
            children.setdefault(int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(
                int(proc.name))
        except (OSError, ValueError, IndexError):
            pass
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in pids:
                pids.add(child)
                todo.append(child)
    return sorted(pids)


@pytest.mark.slow              # about 2 minutes; `python -m pytest -m slow -k node_lost`
@pytest.mark.timeout(1200)
def test_a_node_lost_mid_run_ends_the_job_in_bounded_time_and_the_run_resumes(slurm_cluster, uninterrupted):
    """node2's slurmd, its step daemons and its ranks SIGKILLed mid-run (a machine gone): the ranks on node1
    fail fast on the broken collective and the job leaves RUNNING within 120 s (SlurmdTimeout 20 s, KillWait
    30 s here); with node2 back the job is requeued or resubmitted, resumes from the last complete checkpoint,
    and ends with the losses of the uninterrupted run."""
    import signal
    tmp, full = uninterrupted
    cfg = write_config(tmp, "slurm-lost")
    jid = submit(cfg, "--nodes", 2, "--gpus-per-node", 1, "--time", "00:15:00")
    run_dir = tmp / "slurm-lost"
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoints" / "latest").exists():
        time.sleep(0.1)
    assert job(jid)["JobState"] == "RUNNING", job(jid)
    try:
        lost = _node_processes("node2")
        for pid in lost:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        t0 = time.time()
        while job(jid).get("JobState") == "RUNNING" and time.time() - t0 < 300:
            time.sleep(0.5)
        ended = time.time() - t0
        print(f"job left RUNNING {ended:.1f}s after node2 was lost: {job(jid).get('JobState')}")
        info = wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PENDING",
                                "REQUEUED", "REQUEUE_HOLD"}, timeout=300)       # COMPLETING settles first
    finally:
        subprocess.run([str(CLUSTER), "start"], capture_output=True, timeout=180)   # node2 back, same ports
    assert ended < 120, (ended, info)
    log = (run_dir / f"slurm-{jid}.out").read_text()
    if info["JobState"] in ("PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"):   # --requeue on NODE_FAIL
        subprocess.run(["scontrol", "release", str(jid)], timeout=30)
        final = wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    else:
        assert info["JobState"] in ("FAILED", "NODE_FAIL", "CANCELLED"), info
        jid = submit(cfg, "--nodes", 2, "--gpus-per-node", 1, "--time", "00:15:00")
        final = wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = (run_dir / f"slurm-{jid}.out").read_text()
    assert final["JobState"] == "COMPLETED", log[-3000:]
    assert re.search(r"resumed from \S+ at step [1-9]", log), log[-3000:]
    print(f"then {info['JobState']} ({info.get('Reason')})")
    assert_same_run(records(run_dir), full)
