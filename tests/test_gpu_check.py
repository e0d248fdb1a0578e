"""benchmarks/gpu_check.py runs where no test runs (a lent GPU): its checks run here on CPU and a tiny model, so that
the script a GPU session gets is known to work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_method_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path), "--device", "cpu"]
    done = subprocess.run([*cmd, "--tiny", "--skip_claim", "--steps", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    for method in ("lora", "prompt_tuning", "residual_prompt_tuning", "xprompt", "bitfit", "unipelt"):
        assert f"| {method} |" in report
    assert "FAILED" not in report and "REAL" not in report
