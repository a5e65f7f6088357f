"""examples/reproduce/repro_subspace.py runs end to end at its smoke size: full fine-tuning and LoRA recorded with
factors_k and intruder_k, read back into the three tables and the JSON the docs quote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "reproduce" / "repro_subspace.py"


def test_repro_subspace_smoke(tmp_path):
    out = tmp_path / "study.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(a) intruder dimensions" in done.stdout and "(c) settling step" in done.stdout
    report = json.loads(out.read_text())
    assert [r["rank"] for r in report["runs"]] == [0, 1, 4]
    for run in report["runs"]:
        assert run["snapshot_step"][-1] == run["steps"] and len(run["snapshot_loss"]) == len(run["snapshot_step"])
        assert abs(run["matched"]["loss"] - report["matched_loss"]) <= max(
            abs(v - report["matched_loss"]) for v in run["snapshot_loss"])  # the closest snapshot was picked
        counts = run["intruders"]["0.5"]
        assert set(counts) == {"attention", "mlp"}
        assert all(0 <= c <= 10 * run["intruder_modules"][k] for k, v in counts.items() for c in v)
        assert run["settle"]["attention"]["modules"] == run["intruder_modules"]["attention"]
    for rank in ("1", "4"):
        phi = report["overlap_with_full"][rank]["all"]["phi"]
        assert 0.0 <= phi["left"] <= 1.0 and 0.0 <= phi["right"] <= 1.0
