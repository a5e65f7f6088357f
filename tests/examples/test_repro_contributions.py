"""examples/reproduce/repro_contributions.py runs end to end at a tiny size and prints which kind runs out first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "reproduce" / "repro_contributions.py"


def test_repro_contributions_prints_the_first_to_run_out():
    done = subprocess.run([sys.executable, str(SCRIPT), "--examples", "256", "--pretrain-steps", "20", "--epochs",
                           "4", "--batch-size", "32", "--ranks", "1", "4"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Contributions: what each kind" in done.stdout
    assert "Runs out first" in done.stdout and "attention: share" in done.stdout
