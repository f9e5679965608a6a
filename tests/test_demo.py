"""The embedded default end to end (slow: about 9 minutes on 2 cores; `python -m pytest -m slow`)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_ends_within_ten_minutes_with_90_percent_passkey_and_evaluates_8x_its_length(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "longctx", "run", "configs/demo.yaml", f"run.dir={tmp_path / 'demo'}",
                        f"data.prepare.output={tmp_path / 'mds'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # measured 8 min 25 s on 2 cores (README); the 5-minute target of issue [N] is not met yet
    assert elapsed < 600, elapsed
    run = tmp_path / "demo"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["seq_len"] == 1024
    passkey = json.loads((run / "eval" / f"step_{final['step']:07d}" / "passkey.json").read_text())["variants"]
    assert set(passkey) == {"as trained", "with mitigations"}
    assert passkey["as trained"]["per_length"]["1024"] >= 0.9, passkey["as trained"]["per_length"]
    assert max(passkey["as trained"]["lengths"]) == 8 * 1024      # past the training length, both variants
    length = json.loads((run / "eval" / f"step_{final['step']:07d}" / "loss_vs_position.json").read_text())
    assert set(length["variants"]) == {"as trained", "with mitigations"}
    assert length["variants"]["as trained"]["length"] == 8 * 1024
    report = (run / "report.md").read_text()
    first_table = report.split("## Stages")[0]
    assert "8,192 (8×)" in first_table and "1,024 (trained)" in first_table
    assert "passkey with mitigations" in first_table and "loss at that position, as trained" in first_table
    assert "![loss](loss.png)" in report and "passkey.png" in report
    assert "x SP 2" in r.stdout
