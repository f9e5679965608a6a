import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


# Tests kept on one worker, in turn, whichever worker pytest-xdist gives them (`--dist loadgroup`,
# pyproject.toml), by a fixture they use: the test SLURM cluster, one per machine (tests/slurm/cluster.sh). Long
# set-ups need no group: tests/shared.py makes each once for all workers, whichever needs it first.
SERIAL_GROUPS = {"slurm_cluster": "slurm"}


FIRST_GROUP = "slurm"       # the longest group (~8 minutes) starts first: the last test to start is then a short one
# Then the modules whose tests start multi-process runs of a minute or more (`--durations` lists them), roughly the
# longest first, and the many short tests after them: the run ends on short tests, no worker alone on a long one.
LONG_MODULES = ("test_train.py", "test_study.py", "test_prepare.py", "test_train_carry.py", "test_precision.py",
                "test_nonfinite.py", "test_launch.py", "test_parallel.py")


def _groups(item) -> set:
    return {SERIAL_GROUPS[f] for f in getattr(item, "fixturenames", ()) if f in SERIAL_GROUPS}


@pytest.hookimpl(tryfirst=True)          # before xdist reads the groups from the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        for group in sorted(_groups(item)):
            item.add_marker(pytest.mark.xdist_group(group))
    def order(item):
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return (FIRST_GROUP not in _groups(item),
                LONG_MODULES.index(module) if module in LONG_MODULES else len(LONG_MODULES))
    items.sort(key=order)     # stable: the order is kept otherwise


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: relative to the size of the reference."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


from tests.s3 import s3_endpoint  # noqa: E402,F401  (fixture)


@pytest.fixture(scope="module")
def local_ray(s3_endpoint):  # noqa: F811  (the fixture imported above)
    """One local Ray for a module whose tests prepare data many times (each `prepare` would start its own),
    started after the S3 env is set so workers inherit it, and shut down at the module's end: an idle Ray costs
    ~2.5 CPU-s a minute, and the suite is CPU-bound. A test that prepares once lets `prepare` start its own."""
    import ray
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def _reference_run(tmp_path_factory, stages):
    """The run in a directory the workers share (tests/README.md: once per session, not per worker); each
    worker's tests get a directory of their own to write their runs in, with the run (`full`) and its prepared
    data (`mds`) linked in, read-only to them: write_config resolves the link, so their runs find the data
    complete as recorded under the path it was prepared at, and write nothing there."""
    import glob
    import re
    import subprocess

    from tests.shared import decompress, shared_once
    from tests.training import records, run_cmd, write_config
    with shared_once(tmp_path_factory, f"train{stages}") as (shared, make):
        if make:
            cfg = write_config(shared, "full", stages=stages)
            r = subprocess.run(run_cmd(cfg), capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            # DeepSpeed's CPU all-reduce buffers (66 MB per rank, named by the run's master address and port) are
            # released when the run ends, and so is the readers' shared memory by the ranks themselves (not by
            # Python's resource tracker after them, which warns). This run's buffers: another worker's run may
            # hold its own.
            port = re.search(r"--master_port=(\d+)", r.stdout + r.stderr).group(1)
            assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"), port
            assert "leaked shared_memory" not in r.stderr, r.stderr[-3000:]
            decompress(shared / "mds")
    tmp = tmp_path_factory.mktemp(f"train{stages}")
    for name in ("full", "mds"):
        (tmp / name).symlink_to(shared / name, target_is_directory=True)
    return tmp, records(tmp / "full")


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The 2-process reference run every resumed, pre-empted or multi-node run is compared with."""
    return _reference_run(tmp_path_factory, stages=2)


@pytest.fixture(scope="session")
def uninterrupted3(tmp_path_factory):
    """The same with a third stage: resuming from a checkpoint past finished stages."""
    return _reference_run(tmp_path_factory, stages=3)
