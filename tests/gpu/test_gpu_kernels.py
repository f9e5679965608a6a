"""The GPU check's correctness phases as pytest tests: `pytest -m gpu tests/gpu` on a machine with a CUDA device.

tests/gpu/phases.py holds them (Triton vs torch backends at 370M shapes, l = 4K and 16K, every option but state
norm; 256K tokens with offsets past 2^31 against the torch backend chained piece by piece); tests/gpu/run.sh runs
them with mamba_ssm's outcome, the speed and model phases, each in its own process under a time limit, and
writes the JSON and Markdown results.
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run tests/gpu/run.sh)")]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("phase", ["correctness", "long"])
def test_phase_passes(phase, tmp_path):
    from tests.gpu.phases import run_phase
    d = run_phase(phase, tmp_path, tiny=False)
    failed = [c for c in d["checks"] if not c["ok"]]
    assert d["status"] == "ok", failed or d.get("traceback")
