"""The GPU check's plan, rehearsed on CPU so that it cannot rot between GPU runs (tests/gpu/run.sh).

- tests/gpu/offline/ (git-ignored) is complete and small enough to travel: mamba_ssm's Triton SSD kept from its
  sdist with its version, the wheels; when it is incomplete the module's fixture runs tests/gpu/fetch.sh (PyPI is
  reachable here and in CI) and a failed fetch fails these tests with its output: they are never skipped;
- the wheels alone give a python without site-packages a working omegaconf and PyYAML;
- `run.sh --rehearse` runs every phase's code at tiny shapes in fp32 on the Triton interpreter, mamba_ssm's
  kernels included (imported from the vendored files, not an installed mamba_ssm), each phase in its own process
  under its time limit, and writes the JSON and Markdown results;
- a timed-out phase, a failed check and an error make the run exit non-zero naming them;
- the scripts pass bash -n and shellcheck.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu import offline
from tests.shared import shared_once

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "tests" / "gpu"
PHASES = ["env", "correctness", "long", "long_peer", "speed", "model"]


@pytest.fixture(scope="module")
def offline_folder(tmp_path_factory):
    # One worker fetches while the others wait on shared_once's lock: fetch.sh replaces the folder, so a second
    # worker's fetch removed it under the rehearsal the first had started (seen in CI: "no vendored mamba_ssm").
    with shared_once(tmp_path_factory, "gpu-offline") as (_, first):
        if first and offline.check():
            r = fetch_sh(offline.OFFLINE)
            assert r.returncode == 0, ("tests/gpu/fetch.sh could not fill tests/gpu/offline (is PyPI reachable?):\n"
                                       + r.stdout[-2000:] + r.stderr[-4000:])
    problems = offline.check()
    assert not problems, problems
    return offline.OFFLINE


def fetch_sh(dest, env=None, timeout=600):
    return subprocess.run(["bash", str(GPU / "fetch.sh"), str(dest)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def run_sh(*args, env=None, timeout=900):
    return subprocess.run(["bash", str(GPU / "run.sh"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable, **(env or {})})


@pytest.mark.timeout(700)
def test_offline_folder_is_complete_small_and_holds_only_the_peers_triton_ssd(offline_folder):
    size = offline.folder_bytes(offline_folder)
    assert size < offline.MAX_BYTES, f"{size / 2**20:.1f} MiB"
    manifest = offline.peer_manifest(offline_folder)
    peer = offline_folder / "peer"
    kept = {p.relative_to(peer).as_posix() for p in peer.rglob("*") if p.is_file()}
    listed = {f.split(" ")[0] for f in manifest["files"]}
    assert kept == listed | {"peer.json", "LICENSE"}, kept ^ (listed | {"peer.json", "LICENSE"})
    assert "mamba_ssm/ops/triton/ssd_combined.py" in listed and not any(f.startswith("csrc") for f in kept)
    stub = (peer / "mamba_ssm" / "__init__.py").read_text()
    assert f"__version__ = {manifest['version']!r}" in stub and "import" not in stub.split('"""')[-1]
    assert len(manifest["sha256"]) == 64 and manifest["sdist"].startswith(f"mamba_ssm-{manifest['version']}")
    assert "tests/gpu/offline/" in (ROOT / ".gitignore").read_text().split()


@pytest.mark.timeout(300)
def test_a_failed_fetch_leaves_the_last_complete_folder_as_it_was(offline_folder, tmp_path):
    """mamba_ssm 1.0.1 has no Triton SSD: its vendoring fails after the downloads, and the folder a check may be
    reading stays whole (it was removed first, and left without its peer)."""
    dest = tmp_path / "offline"
    shutil.copytree(offline_folder, dest)
    files = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    r = fetch_sh(dest, env={"MAMBA_SSM_VERSION": "1.0.1"}, timeout=240)
    assert r.returncode != 0 and "no mamba_ssm.ops.triton.ssd_combined in it" in r.stderr, r.stdout + r.stderr
    assert offline.check(dest) == []
    assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files
    assert [p.name for p in tmp_path.iterdir()] == ["offline"]      # nothing of the attempt left beside it


@pytest.mark.timeout(120)
def test_the_wheels_alone_give_omegaconf_and_yaml(offline_folder, tmp_path):
    """A python without site-packages (-S) imports omegaconf and yaml from the unpacked wheels and resolves an
    interpolation (omegaconf's grammar, i.e. its antlr4 runtime)."""
    site = tmp_path / "site"
    done = offline.site(site, offline_folder, everything=True)
    assert any(w.startswith("omegaconf-") and v == "unpacked" for w, v in done.items()), done
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import omegaconf, yaml; "
            "assert omegaconf.__file__.startswith(sys.argv[1]) and yaml.__file__.startswith(sys.argv[1]); "
            "c = omegaconf.OmegaConf.create('a: 3\\nb: ${a}'); print(c.b, omegaconf.__version__)")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(site)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("3 "), r.stdout + r.stderr


@pytest.mark.timeout(900)
def test_rehearsal_runs_every_phase_and_writes_the_results(offline_folder, tmp_path):
    r = run_sh("--rehearse", tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:] + (tmp_path / "gpu_check.log").read_text()[-6000:]
    s = json.loads((tmp_path / "gpu_check.json").read_text())
    assert s["passed"] and s["failures"] == [] and s["mode"] == "rehearse"
    by = {p["phase"]: p for p in s["phases"]}
    assert list(by) == PHASES
    for name, p in by.items():
        assert p["status"] == "ok" and p["rc"] == 0 and p["result"] == "ok", (name, p.get("traceback"))
        assert p["tables"] and all(t["rows"] for t in p["tables"]), name
    manifest = offline.peer_manifest(offline_folder)
    assert manifest["version"] in by["env"]["data"]["mamba_ssm"] and manifest["sha256"] in by["env"]["data"]["mamba_ssm"]
    assert by["env"]["data"]["triton_interpreter"] is True
    # the kernels' comparisons ran, with every gradient, and the peer ran on the long input and in the timing
    grads = {k for case in by["correctness"]["data"].values() for k in case if k.startswith("d")}
    assert grads == {f"d{k}" for k in ("z", "x", "B", "C", "dt", "A", "D", "dt_bias", "initial_states",
                                       "decay_scale", "input_scale")}
    assert any("window" in name for name in by["correctness"]["data"])
    assert by["long_peer"]["data"]["float32"]["outcome"] == "right"
    timed = next(iter(by["speed"]["data"].values()))
    assert set(timed["ms"]) == {"triton", "mamba_ssm", "torch"} and timed["triton_over_mamba_ssm"] > 0
    assert {k.split(",")[0] for k in by["model"]["data"]} == {"triton", "torch"}
    assert any("NCCL" in n and "not possible on one GPU" in n for n in s["not_run"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert "**PASS**" in md and "## Not run" in md and "NCCL" in md and "mamba_ssm" in md
    assert md.count("\n## ") >= len(PHASES) + 2


@pytest.mark.timeout(120)
def test_a_timed_out_phase_fails_the_run_and_is_named(offline_folder, tmp_path):
    r = run_sh("--rehearse", "--phases", "env", tmp_path, env={"GPU_CHECK_LIMIT_env": "0.5"})
    assert r.returncode != 0
    assert "env: timed out after its 0.5 s limit" in r.stderr, r.stdout + r.stderr
    assert "**FAIL**" in (tmp_path / "gpu_check.md").read_text()


def test_failed_checks_errors_and_missing_phases_are_named(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()

    def phase(name, rc, status, checks=()):
        if status is not None:
            (work / f"{name}.json").write_text(json.dumps(dict(phase=name, status=status, error="boom", tables=[],
                                                               notes=[], checks=[dict(name=c, ok=ok, detail="x")
                                                                                 for c, ok in checks])))
        (work / f"{name}.rc").write_text(f"{rc} 1.5 10")
    phase("a", 0, "ok", [("fine", True)])
    phase("b", 1, "failed", [("every option, l=4096, bfloat16", False), ("fine", True)])
    phase("c", 1, "error")
    phase("d", 137, "running")
    phase("e", 1, None)
    r = subprocess.run([sys.executable, str(GPU / "report.py"), work, out, "--phases", "a,b,c,d,e",
                        "--limits", "a=10,b=10,c=10,d=10,e=10", "--budget", "30", "--seconds", "31"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    for text in ("b: every option, l=4096, bfloat16: failed", "c: error: boom", "d: timed out after its 10 s limit",
                 "e: wrote no results", "past its 30 s budget"):
        assert text in r.stderr, (text, r.stderr)
    assert "a:" not in r.stderr
    s = json.loads((out / "gpu_check.json").read_text())
    assert not s["passed"] and [p["result"] for p in s["phases"]] == ["ok"] + ["FAILED"] * 4


@pytest.mark.parametrize("script", ["run.sh", "fetch.sh"])
def test_scripts_pass_bash_n_and_shellcheck(script):
    path = GPU / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    r = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert os.access(path, os.X_OK)
