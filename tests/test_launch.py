"""`longctx launch` and the scripts in launch/: rendering, shell checks, and local end-to-end runs."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longctx.launch.local import free_port
from tests.shared import longctx_here

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/slurm/train.sbatch", "launch/slurm/prepare.sbatch", "launch/deepspeed/train.sh",
           "launch/ray/prepare.sh"]


def config(tmp_path, name="c", global_tokens=2048, micro=1):
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"""
run: {{name: {name}, dir: {tmp_path / name}}}
model: {{d_model: 32, n_layer: 2, vocab_size: 257, d_state: 16, headdim: 16, chunk_size: 16}}
data:
  prepare:
    output: {tmp_path / 'mds'}
    synthetic: {{documents: 30, min_tokens: 300, max_tokens: 900, seed: 2}}
train: {{micro_batch_size: {micro}}}
curriculum:
  stages:
    - {{name: short, seq_len: 64, steps: 3, global_batch_tokens: {global_tokens}}}
    - {{name: long, seq_len: 128, steps: 2, global_batch_tokens: {global_tokens}}}
checkpoint: {{every_steps: 0}}
eval: {{every_checkpoint: false}}
launch: {{partition: gpu, account: proj42}}
""")
    return p


def longctx(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "longctx", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def rendered(capsys, *args):
    """`longctx ARGS` in this process (tests/shared.py::longctx_here), from the repository's root: these commands
    render scripts or refuse, and start nothing."""
    return longctx_here(capsys, *args, cwd=ROOT)


def shell_ok(path):
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    r = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_bash_n_and_shellcheck(script):
    shell_ok(ROOT / script)
    assert os.access(ROOT / script, os.X_OK)
    assert "#" in (ROOT / script).read_text().splitlines()[1]   # a header comment says how to use it


@pytest.mark.parametrize("nodes,gpus", [(1, 8), (2, 4), (16, 8)])
def test_render_slurm(tmp_path, nodes, gpus, capsys):
    cfg = config(tmp_path, global_tokens=64 * 128 * 2)
    r = rendered(capsys, "launch", "slurm", cfg, "train.zero_stage=3", "--nodes", nodes, "--gpus-per-node", gpus,
                 "--time", "02:00:00", "--dry-run")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for line in (f"#SBATCH --nodes={nodes}", f"#SBATCH --gpus-per-node={gpus}", "#SBATCH --time=02:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --requeue",
                 f"LONGCTX_CONFIG={cfg.resolve()}", "set -- train.zero_stage=3 \"$@\"", f"GPUS_PER_NODE={gpus}"):
        assert line in text, line
    assert "srun" in text and "-m longctx node" in text and '--node-rank "${SLURM_NODEID}"' in text
    assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --cpus-per-task=16" in text
    assert "LONGCTX_RUN_DIR=" in text
    out = tmp_path / "rendered.sbatch"
    out.write_text(text)
    shell_ok(out)


def test_impossible_plans_are_refused_naming_stage_and_field(tmp_path, capsys):
    cfg = config(tmp_path, global_tokens=2048)       # 32 / 16 sequences per step
    r = rendered(capsys, "launch", "slurm", cfg, "--nodes", 8, "--gpus-per-node", 8, "--dry-run")
    assert r.returncode == 1
    assert "curriculum.stages[0] (short).global_batch_tokens" in r.stderr and "64 data-parallel ranks" in r.stderr
    r = rendered(capsys, "launch", "deepspeed", cfg, "curriculum.stages.1.seq_len=8", "--nodes", 1,
                 "--gpus-per-node", 2, "--dry-run")
    assert r.returncode == 1 and "curriculum.stages[1] (long).seq_len" in r.stderr


def test_render_deepspeed_and_ray_and_write(tmp_path, capsys):
    cfg = config(tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=4\nnode-b slots=4\n")
    r = rendered(capsys, "launch", "deepspeed", cfg, "--nodes", 2, "--gpus-per-node", 4, "--hostfile", hostfile, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"HOSTFILE={hostfile}" in r.stdout and "DS_ENV_FILE" in r.stdout
    r = rendered(capsys, "launch", "deepspeed", cfg, "--nodes", 3, "--gpus-per-node", 4, "--hostfile", hostfile, "--dry-run")
    assert r.returncode == 1 and "2 hosts" in r.stderr
    r = rendered(capsys, "launch", "ray", cfg, "--address", "http://head:8265")
    assert r.returncode == 0, r.stderr
    written = tmp_path / "c" / "launch" / "ray.sh"
    assert "RAY_ADDRESS=http://head:8265" in written.read_text()
    shell_ok(written)


@pytest.mark.slow      # the same `longctx node --hostfile` path as the two-host test of tests/test_slurm.py
def test_deepspeed_hostfile_script_trains_on_localhost(tmp_path):
    """launch/deepspeed/train.sh with 'localhost slots=2': one host needs no ssh (`longctx node`), on CPU."""
    cfg = config(tmp_path)
    assert longctx("prepare", cfg).returncode == 0
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HOSTFILE": str(tmp_path / "hostfile"),
           "LONGCTX_CONFIG": str(cfg), "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "launch/deepspeed/train.sh"), "train.zero_stage=1"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [x["seq_len"] for x in recs] == [64, 64, 64, 128, 128]
    assert "node 0 (localhost) of ['localhost']" in r.stdout


class RayHead:
    """`ray start --head --block` on 127.0.0.1, as an operator starts one, stopped on exit.

    Every port is its own: the suite's local Rays (tests/conftest.py) run on this machine too, and a head
    whose dashboard agent finds its HTTP port (52365 by default) taken loses the agent and never takes jobs."""

    def __init__(self, agent_port: int | None = None):
        self.dash = free_port()
        self.env = ({**os.environ, "RAY_AUTH_MODE": "token"} if (Path.home() / ".ray" / "auth_token").exists()
                    else dict(os.environ))
        self.args = [shutil.which("ray") or "ray", "start", "--head", "--node-ip-address=127.0.0.1",
                     f"--port={free_port()}", f"--dashboard-port={self.dash}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-agent-listen-port={agent_port or free_port()}",
                     f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
                     "--block"]

    def __enter__(self):
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, env=self.env)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.dash), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.5)
        return self

    def prepare(self, cfg, **env):
        """launch/ray/prepare.sh submitted to this head as soon as its job server listens, as an operator's
        script would: before the agent has registered the server answers "No available agent", retried."""
        return subprocess.run(["bash", str(ROOT / "launch/ray/prepare.sh")], cwd=ROOT, capture_output=True,
                              text=True, timeout=600,
                              env={**self.env, "RAY_ADDRESS": f"http://127.0.0.1:{self.dash}",
                                   "LONGCTX_CONFIG": str(cfg), "PYTHON": sys.executable, **env})

    def __exit__(self, *exc):
        # SIGTERM to `ray start --block` alone: it stops its processes in order and exits within seconds. Sent to
        # the whole group at once, the processes were gone as soon, but `ray start` itself lingered ~30 s more.
        self.proc.terminate()
        try:
            self.proc.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)      # anything of the head's still there


def test_ray_job_script_prepares_on_a_ray_head(tmp_path):
    """launch/ray/prepare.sh against a head started with `ray start --head` on 127.0.0.1."""
    cfg = config(tmp_path)
    with RayHead() as head:
        r = head.prepare(cfg)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout + r.stderr
        manifest = json.loads((tmp_path / "mds" / "manifest.json").read_text())
        assert manifest["documents"] == 30


def test_ray_job_script_names_the_cause_when_the_heads_agent_never_starts(tmp_path):
    """Another program holds the agent's port: the agent dies at start, so the job server never gets an
    agent. prepare.sh gives up after its attempts with a message that says where to look and what to do."""
    cfg = config(tmp_path)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        with RayHead(agent_port=taken.getsockname()[1]) as head:
            r = head.prepare(cfg, LONGCTX_SUBMIT_ATTEMPTS="2")
    assert r.returncode != 0
    assert "no agent yet; submitting again in 5 s (attempt 1 of 2)" in r.stderr
    assert "still had no agent after 2 attempts" in r.stderr
    assert "dashboard_agent.log" in r.stderr and "--dashboard-agent-listen-port" in r.stderr
    assert not (tmp_path / "mds" / "DONE").exists()
