"""The scripts in launch/, rendered by `longctx launch` or used by hand, run with bash while fake cluster tools
(srun, scontrol, pdsh, ssh, ray, and PYTHON for the node's `longctx`) record what reaches them: every override
arrives whole, no value written into a script runs as a command, and no secret is written where a log or
another user reads it. Over ssh the real DeepSpeed runner runs; only pdsh is fake, and it runs each host's line
with a fresh environment through bash, as a remote login shell would."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longctx.launch.cli import main, unpack_argv
from tests.test_launch import config
from tests.test_slurm import slurm_cluster, slurm_daemons, wait_state  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
BLANK = "curriculum.stages.0.mitigations={decay_scale: 0.9}"     # the override of the audit (issue 31, item 7)
SECRET = "planted-S3cr3t-value-31"

FAKE_PYTHON = """#!{python}
# the node's python: records its arguments (and which variables it got, by name), does nothing
import json, os, sys
keys = ("LONGCTX_CONFIG", "LONGCTX_RUN_DIR", "HOSTFILE", "RAY_ADDRESS")
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"tool": "python", "argv": sys.argv[1:], "names": sorted(os.environ),
                        "env": {{k: os.environ.get(k) for k in keys}}}}) + "\\n")
"""
FAKE_SRUN = """#!/usr/bin/env bash
# srun: the step's command on "node1", without srun's options (-w takes a value)
while [ "$#" -gt 0 ] && [[ "$1" == -* ]]; do
  if [ "$1" = -w ]; then shift; fi
  shift
done
SLURM_NODEID=0 SLURMD_NODENAME=node1 exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then echo node1; fi
"""
FAKE_GETENT = """#!/usr/bin/env bash
echo "127.0.0.1 STREAM $2"
"""
FAKE_RAY = """#!{python}
# ray: `ray start` returns at once; `ray job submit ... -- CMD` runs CMD as the job server does, one line for
# /bin/sh, joined as `ray job submit` joins it: shlex.join (Ray 2.60) or subprocess.list2cmdline (older Ray)
import json, os, shlex, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"tool": "ray", "argv": args}}) + "\\n")
if args[:2] == ["job", "submit"]:
    cmd = args[args.index("--") + 1:]
    line = subprocess.list2cmdline(cmd) if os.environ["FAKE_RAY_JOIN"] == "list2cmdline" else shlex.join(cmd)
    rc = subprocess.call(["/bin/sh", "-c", line])
    print("Job 'raysubmit_1' succeeded" if rc == 0 else "Job 'raysubmit_1' failed")
    sys.exit(rc)
"""
FAKE_PDSH = """#!{python}
# pdsh -S -f N -w host,host LINE...: each host's line (%n: its index) through bash with a fresh environment,
# as ssh runs it; DeepSpeed's per-node launcher in it is replaced by the recorder. With FAKE_PDSH_BLOCK, the
# hosts run until stopped; DeepSpeed's `pdsh ... pkill` that stops them is recorded, not run.
import json, os, shlex, subprocess, sys, time
args = sys.argv[1:]
hosts = args[args.index("-w") + 1].split(",")
line = " ".join(args[args.index("-w") + 2:])
env_file = os.environ.get("DS_ENV_FILE")
mode = os.stat(env_file).st_mode & 0o777 if env_file and os.path.exists(env_file) else None
with open({log!r}, "a") as f:
    tool = "pdsh-kill" if line.startswith("pkill") else "pdsh"
    f.write(json.dumps({{"tool": tool, "argv": args, "env_file": env_file, "mode": mode}}) + "\\n")
if tool == "pdsh-kill":
    sys.exit(0)
if os.environ.get("FAKE_PDSH_BLOCK"):
    time.sleep(600)
line = line.replace("-m deepspeed.launcher.launch", shlex.quote({recorder!r}))
rcs = [subprocess.call(["bash", "-c", line.replace("%n", str(i))], env={{"PATH": "/usr/bin:/bin", "HOME": {home!r}}})
       for i in range(len(hosts))]
sys.exit(max(rcs))
"""
RECORDER = """import json, os, sys
# a host's launcher: records its arguments and the variables that reached it (values of the non-secret HF_HOME)
with open({log!r}, "a") as f:
    f.write(json.dumps({{"tool": "launch", "argv": sys.argv[1:], "names": sorted(os.environ),
                        "env": {{"HF_HOME": os.environ.get("HF_HOME")}}}}) + "\\n")
"""


class Fakes:
    """Fake tools in tmp/bin, their record in tmp/log.jsonl, and the environment a script runs in."""

    def __init__(self, tmp: Path):
        self.log, self.bin = tmp / "log.jsonl", tmp / "bin"
        self.work, home, temp = tmp / "work", tmp / "home", tmp / "tmp"
        for d in (self.bin, self.work, home, temp):
            d.mkdir(parents=True, exist_ok=True)
        self.python = self.bin / "fake-python"
        recorder = tmp / "recorder.py"
        recorder.write_text(RECORDER.format(log=str(self.log)))
        tools = {"fake-python": FAKE_PYTHON, "srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "squeue": "#!/bin/sh\n",
                 "getent": FAKE_GETENT, "ray": FAKE_RAY, "ssh": "#!/bin/sh\n", "pdsh": FAKE_PDSH}
        for name, text in tools.items():
            (self.bin / name).write_text(text.format(python=sys.executable, log=str(self.log), recorder=str(recorder),
                                                     home=str(home)))
            (self.bin / name).chmod(0o755)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("LONGCTX_", "SLURM", "NODE_RANK", "DS_ENV"))}
        self.env = {**base, "PATH": f"{self.bin}:{os.environ['PATH']}", "PYTHON": str(self.python),
                    "FAKE_LOG": str(self.log), "FAKE_RAY_JOIN": "shlex", "HOME": str(home), "TMPDIR": str(temp),
                    "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": "7", "DS_ACCELERATOR": "cpu",
                    "MASTER_ADDR": "127.0.0.1"}

    def run(self, script, *args, **env):
        return subprocess.run(["bash", str(script), *args], cwd=self.work, env={**self.env, **env},
                              capture_output=True, text=True, timeout=240)

    def records(self, tool):
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [r for r in map(json.loads, lines) if r["tool"] == tool]

    def longctx_args(self):
        """What `longctx` got on the node, decoded as its main() decodes it: [command, config, overrides...]."""
        calls = [unpack_argv(r["argv"][2:]) for r in self.records("python") if r["argv"][:2] == ["-m", "longctx"]]
        calls += [unpack_argv(r["argv"][r["argv"].index("longctx.launch.cli") + 1:]) for r in self.records("launch")]
        assert len(calls) >= 1, self.log.read_text() if self.log.exists() else "nothing ran"
        assert all(c == calls[0] for c in calls), calls           # every host got the same
        return calls[0]


def render(capsys, tmp, target, cfg, overrides, *options):
    """`longctx launch TARGET --dry-run` (in this process: its config checks and messages are the CLI's)."""
    if target == "deepspeed":
        hostfile = tmp / "hosts"
        if not hostfile.exists():
            hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
        options = ("--hostfile", hostfile, *options)
    rc = main(["launch", target, str(cfg), *overrides, "--nodes", "2" if target == "deepspeed" else "1",
               "--gpus-per-node", "1", *map(str, options), "--dry-run"])
    out, err = capsys.readouterr()
    if rc == 0:
        script = tmp / f"rendered-{target}.sh"
        script.write_text(out)
        return script
    return err


# (target, mode): deepspeed runs with NODE_RANK (no ssh) or over ssh (the real DeepSpeed runner, a fake pdsh)
SSH = {"PYTHON": sys.executable}
TARGETS = [("slurm", {}), ("deepspeed", {"NODE_RANK": "0"}), ("deepspeed", SSH), ("ray", {"FAKE_RAY_JOIN": "shlex"}),
           ("ray", {"FAKE_RAY_JOIN": "list2cmdline"})]
IDS = ["slurm", "deepspeed-node-rank", "deepspeed-ssh", "ray", "ray-list2cmdline"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target,mode", TARGETS, ids=IDS)
def test_rendered_script_passes_each_override_whole_to_longctx_on_the_node(tmp_path, capsys, target, mode):
    """An override with blanks (issue 31, item 7) reaches `longctx` on the node as one argument, as given."""
    fakes = Fakes(tmp_path)
    cfg = config(tmp_path)
    overrides = [BLANK, "train.zero_stage=1"]
    script = render(capsys, tmp_path, target, cfg, overrides, *(["--address", "http://head:8265"]
                                                              if target == "ray" else []))
    r = fakes.run(script, **mode)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    args = fakes.longctx_args()
    assert args[1:1 + 1 + len(overrides)] == [str(cfg.resolve()), *overrides], args


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", ["launch/slurm/train.sbatch", "launch/slurm/prepare.sbatch",
                                    "launch/deepspeed/train.sh", "launch/ray/prepare.sh"])
def test_script_by_hand_takes_LONGCTX_OVERRIDES_then_its_arguments_whole(tmp_path, script):
    """By hand: LONGCTX_OVERRIDES split at blanks as before, then the script's arguments, each whole."""
    fakes = Fakes(tmp_path)
    cfg = config(tmp_path)
    (tmp_path / "hosts").write_text("node-a slots=1\nnode-b slots=1\n")
    r = fakes.run(ROOT / script, BLANK, "train.lr=0.001", LONGCTX_CONFIG=str(cfg), HOSTFILE=str(tmp_path / "hosts"),
                  NODE_RANK="1", RAY_ADDRESS="http://head:8265", LONGCTX_OVERRIDES="train.zero_stage=1 run.seed=4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    args = fakes.longctx_args()
    assert args[1:6] == [str(cfg), "train.zero_stage=1", "run.seed=4", BLANK, "train.lr=0.001"], args


MARKER = "PWNED-31"
PAYLOAD = f"x $(touch {MARKER}) `touch {MARKER}`; touch {MARKER} | 'q' \"d\" #c %j"   # and what quoting must keep


def ran(tmp: Path) -> list:
    """Marker files the payload's `touch` made (relative: wherever a shell ran it)."""
    return list(tmp.rglob(MARKER)) + [m for m in (ROOT / MARKER, Path.home() / MARKER) if m.exists()]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target,mode", TARGETS, ids=IDS)
def test_values_in_a_rendered_script_never_run_and_reach_the_node_whole(tmp_path, capsys, target, mode):
    """Every value rendered into a script (config path, overrides, run name and dir, account, partition, mem,
    time, hostfile, address) carries $( ), backquotes, ; and quotes: the script runs with nothing of it
    executed, and each value arrives as given (issue 31, item 8)."""
    fakes = Fakes(tmp_path)
    p = PAYLOAD      # in every value
    folder = tmp_path / f"cfg {p}\nline two"                  # a line break is fine where the shell quotes it
    folder.mkdir()
    cfg = folder / "c.yaml"
    cfg.write_text(config(tmp_path).read_text())
    overrides = [f"run.name={json.dumps(p)}", f"run.dir={json.dumps(str(tmp_path / ('run ' + p)))}",
                 f"launch.account={json.dumps(p)}", f"launch.mem={json.dumps(p)}", BLANK]
    options = {"slurm": ["--partition", p, "--time", p], "ray": ["--address", f"http://head:8265/{p}"]}
    if target == "deepspeed":
        hostdir = tmp_path / f"hosts {p}"
        hostdir.mkdir()
        (hostdir / "hosts").write_text("node-a slots=1\nnode-b slots=1\n")
        options["deepspeed"] = ["--hostfile", hostdir / "hosts"]
    script = render(capsys, tmp_path, target, cfg, overrides, *options.get(target, []))
    if target == "slurm":       # the #SBATCH block stays comments: no value's line is one for the shell
        head = script.read_text().split("\nset -uo pipefail\n")[0].splitlines()
        assert all(line.startswith("#") for line in head), head
    r = fakes.run(script, **mode)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not ran(tmp_path), "a value rendered into the script ran as a command"
    args = fakes.longctx_args()
    assert args[1:2 + len(overrides)] == [str(cfg.resolve()), *overrides], args
    env = next(r["env"] for r in fakes.records("python")) if fakes.records("python") else {}
    if target == "slurm":
        assert env["LONGCTX_RUN_DIR"] == str(tmp_path / ("run " + p)) and env["LONGCTX_CONFIG"] == str(cfg.resolve())
    if target == "deepspeed" and "NODE_RANK" in mode:
        assert env["HOSTFILE"] == str(hostdir / "hosts")
    if target == "ray":
        submit = fakes.records("ray")[0]["argv"]
        assert submit[submit.index("--address") + 1] == f"http://head:8265/{p}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override,key", [("run.name", "run.name"), ("launch.account", "launch.account"),
                                          ("launch.partition", "launch.partition"), ("launch.mem", "launch.mem"),
                                          ("launch.time", "launch.time"), ("--partition", "--partition"),
                                          ("--time", "--time")])
def test_a_line_break_in_an_sbatch_value_is_refused_naming_the_key(tmp_path, capsys, override, key):
    """A line break would end its #SBATCH line and run the rest as a command of the job: refused, with the key,
    before anything is written (issue 31, item 8)."""
    cfg = config(tmp_path)
    value = f"gpu\ntouch {MARKER}"
    if override.startswith("--"):
        out = render(capsys, tmp_path, "slurm", cfg, [], override, value)
    else:
        out = render(capsys, tmp_path, "slurm", cfg, [f"{override}={json.dumps(value)}"])
    assert isinstance(out, str), f"rendered: {out.read_text()}"
    assert f"{key}: " in out and "line break" in out and "#SBATCH" in out, out


@pytest.mark.timeout(120)
def test_a_backslash_in_run_name_renders_or_is_refused_naming_run_dir(tmp_path, capsys):
    """run.name='a\\gb' (a backslash in re.sub's replacement crashed `longctx launch`): the job name takes it
    whole; in the default run.dir it would turn off the log's %j, so that is refused naming run.dir."""
    cfg = config(tmp_path)
    script = render(capsys, tmp_path, "slurm", cfg, ["run.name=a\\gb"])
    assert isinstance(script, Path), script
    assert '#SBATCH --job-name="longctx-a\\\\gb"' in script.read_text().splitlines()
    err = render(capsys, tmp_path, "slurm", cfg, ["run.name=a\\gb", "run.dir=runs/${run.name}"])
    assert isinstance(err, str) and "run.dir" in err and "backslash" in err and "Traceback" not in err, err


SECRETS = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": SECRET + "-token",
           "MLFLOW_TRACKING_PASSWORD": SECRET + "-mlflow"}


def leaks(tmp: Path, r) -> list:
    """Where a planted secret is: any file under tmp (the working dir, the run dir, $TMPDIR, $HOME, the fakes'
    record of pdsh's command line, which DeepSpeed logs and ps shows) or the output."""
    written = {str(f): f.read_bytes() for f in tmp.rglob("*") if f.is_file()}
    written.update(stdout=r.stdout.encode(), stderr=r.stderr.encode())
    return [where for where, data in written.items() if any(v.encode() in data for v in SECRETS.values())]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [SSH, {"NODE_RANK": "0"}], ids=["ssh", "node-rank"])
def test_deepspeed_script_writes_no_secret_anywhere(tmp_path, capsys, mode):
    """Planted secrets in the environment of launch/deepspeed/train.sh (issue 31, item 9). Over ssh, DeepSpeed's
    pdsh runner logs each host's line, exports included, and ps shows it: no secret is in that line, in any
    file the run leaves or in its output; the environment file it reads is 0600 while it runs and gone after,
    and the non-secret variables still reach the hosts. Without ssh (NODE_RANK), the node's process inherits
    the secrets, and nothing is written."""
    fakes = Fakes(tmp_path)
    cfg = config(tmp_path)
    script = render(capsys, tmp_path, "deepspeed", cfg, ["train.zero_stage=1"])
    r = fakes.run(script, HF_HOME="/hf/home", **SECRETS, **mode)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not leaks(tmp_path, r)
    assert not (fakes.work / ".deepspeed_env").exists()
    if "NODE_RANK" in mode:
        assert set(SECRETS) <= set(fakes.records("python")[0]["names"])
        return
    pdsh = fakes.records("pdsh")
    assert len(pdsh) == 1 and pdsh[0]["mode"] == 0o600, pdsh
    assert not Path(pdsh[0]["env_file"]).exists()
    hosts = fakes.records("launch")
    assert len(hosts) == 2 and all(h["env"]["HF_HOME"] == "/hf/home" for h in hosts), hosts
    assert not set(SECRETS) & set(hosts[0]["names"])
    assert all(name in r.stderr for name in SECRETS)          # named (never shown) as not passed
    assert fakes.longctx_args()[:3] == ["train", str(cfg.resolve()), "train.zero_stage=1"]


@pytest.mark.timeout(300)
def test_deepspeed_script_over_ssh_passes_sigterm_on_to_the_runner_and_removes_its_file(tmp_path, capsys):
    """The script waits for DeepSpeed's runner instead of becoming it (so that it can remove the environment
    file): a SIGTERM to the script still reaches the runner, which stops the hosts' launchers."""
    fakes = Fakes(tmp_path)
    script = render(capsys, tmp_path, "deepspeed", config(tmp_path), [])
    # its own process group, so that `finally` ends the runner and pdsh too when the script failed to
    proc = subprocess.Popen(["bash", str(script)], cwd=fakes.work, env={**fakes.env, **SSH, "FAKE_PDSH_BLOCK": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not fakes.records("pdsh") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert fakes.records("pdsh"), "the hosts' launchers did not start"
        proc.send_signal(signal.SIGTERM)               # to the script alone, as `kill PID` sends it
        out = proc.communicate(timeout=60)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):      # all gone: the script and everything it started
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and fakes.records("pdsh-kill"), out[-3000:]
    assert not Path(fakes.records("pdsh")[0]["env_file"]).exists()


@pytest.mark.timeout(120)
def test_deepspeed_script_refuses_a_secret_named_in_LONGCTX_ENV_VARS(tmp_path, capsys):
    """Asked to pass AWS_SECRET_ACCESS_KEY over ssh, the script stops before DeepSpeed, naming it, showing
    nothing of it and leaving no environment file."""
    fakes = Fakes(tmp_path)
    script = render(capsys, tmp_path, "deepspeed", config(tmp_path), [])
    r = fakes.run(script, LONGCTX_ENV_VARS="HF_HOME AWS_SECRET_ACCESS_KEY", **SECRETS, **SSH)
    assert r.returncode == 2 and "AWS_SECRET_ACCESS_KEY" in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert not leaks(tmp_path, r)
    assert not fakes.records("pdsh") and not list((tmp_path / "tmp").iterdir())


@pytest.mark.timeout(300)
def test_sbatch_reads_every_quoted_value_whole(slurm_cluster, tmp_path, capsys):  # noqa: F811
    """The test cluster's sbatch and slurmd read the #SBATCH lines of a rendered script: the job name, the
    account and the log's path (blanks, quotes, #, $( ), a literal %j) arrive as given. The job is those lines
    with `echo ran` for a body."""
    run_dir = tmp_path / f"run {PAYLOAD}"
    run_dir.mkdir()
    script = render(capsys, tmp_path, "slurm", config(tmp_path), [
        f"run.name={json.dumps(PAYLOAD)}", f"launch.account={json.dumps(PAYLOAD)}",
        f"run.dir={json.dumps(str(run_dir))}", "launch.cpus_per_task=1"], "--partition", "debug", "--time", "00:05:00")
    job = tmp_path / "job.sh"
    job.write_text(script.read_text().split("\nset -uo pipefail\n")[0] + "\necho ran\n")
    r = subprocess.run(["sbatch", "--parsable", str(job)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip().split(";")[0]
    assert wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=240)["JobState"] == "COMPLETED"
    show = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True, timeout=30).stdout
    assert re.search(r"JobName=(.*)\n", show).group(1) == f"longctx-{PAYLOAD}", show
    assert re.search(r"Account=(.*) QOS=", show).group(1) == PAYLOAD.lower(), show   # SLURM lower-cases accounts
    assert (run_dir / f"slurm-{jid}.out").read_text() == "ran\n"
