import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: relative to the size of the reference."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


from tests.s3 import s3_endpoint  # noqa: E402,F401  (fixture)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):  # noqa: F811  (the fixture imported above)
    """One local Ray for the session, started after the S3 env is set so workers inherit it."""
    import ray
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()
