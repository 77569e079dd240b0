"""The quick accuracy benchmark (scenarios 1, 4, 11, 16 through the real daemon): a regression in
detection makes it exit non-zero, and this test fails with its scorecard."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_bench_accuracy_quick_detects_every_scenario():
    if os.geteuid() != 0:
        pytest.skip("needs root: runs the daemon and creates namespaces")
    result = subprocess.run([sys.executable, "-m", "bench.accuracy", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "| 1 |" in result.stdout and "| 16 |" in result.stdout
