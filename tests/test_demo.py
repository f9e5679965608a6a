"""The embedded default end to end (slow: about 6 minutes on 2 cores; `python -m pytest -m slow`)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_reaches_90_percent_passkey_at_its_final_length_within_ten_minutes(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "longctx", "run", "configs/demo.yaml", f"run.dir={tmp_path / 'demo'}",
                        f"data.prepare.output={tmp_path / 'mds'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert elapsed < 600, elapsed
    run = tmp_path / "demo"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["seq_len"] == 1024
    passkey = json.loads((run / "eval" / f"step_{final['step']:07d}" / "passkey.json").read_text())
    assert passkey["per_length"]["1024"] >= 0.9, passkey["per_length"]
    report = (run / "report.md").read_text()
    assert "![loss](loss.png)" in report and "passkey.png" in report and "with mitigations" in report
    assert "x SP 2" in r.stdout
