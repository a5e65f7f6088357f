"""compare's subspace section on planted runs: intruder counts of each run beside its rank and dataset size, and the
overlap between a LoRA run's final update subspace and full fine-tuning's (1 where planted equal, near r/n where
planted at random); a pair without the vectors gets one line naming the options."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_analyze_subspace import write_planted

import lorascope
from lorascope.report.compare import format_comparison

PREFIX = "base_model.model."


def test_overlap_and_intruders_beside_rank(tmp_path):
    full = write_planted(tmp_path / "full.h5", seed=0)
    same = write_planted(tmp_path / "same.h5", seed=0, prefix=PREFIX, lora=True, cos=np.array([0.1, 0.2, 0.3]))
    other = write_planted(tmp_path / "other.h5", seed=5, prefix=PREFIX, lora=True)
    comparison = lorascope.compare(full, [same, other])
    sub = comparison.subspace
    assert sub is not None and sub.missing is None
    full_row, same_row, other_row = sub.runs
    assert full_row.rank is None and full_row.overlap is None and full_row.dataset_examples == 400
    assert full_row.counts == {"attention": 4, "mlp": 2, "all": 6}
    assert same_row.rank == 2 and same_row.counts == {"attention": 6, "mlp": 3, "all": 9}
    assert same_row.overlap is not None and other_row.overlap is not None
    for side in ("left", "right"):
        assert same_row.overlap["all"].phi[side] == pytest.approx(1.0, abs=1e-4)  # the same planted subspace
        # rank-2 subspaces drawn independently in 24 / 16 dimensions: phi ~ 2 / n
        assert other_row.overlap["all"].phi[side] < 0.5
    assert same_row.overlap["attention"].modules == 2 and same_row.overlap["mlp"].modules == 1
    np.testing.assert_allclose(same_row.overlap["all"].angles_deg["left"], [0.0, 0.0], atol=0.5)
    summary = comparison.summary["subspace"]
    json.dumps(summary)
    assert summary["runs"][1]["overlap_with_full"]["all"]["rank"] == 8
    text = format_comparison(comparison.summary)
    assert "Intruder dimensions at the final snapshot" in text and "1.00/1.00" in text


def test_pair_without_vectors_gets_one_line(tmp_path):
    full = write_planted(tmp_path / "full.h5", factors=False, intruders=False)
    lora = write_planted(tmp_path / "lora.h5", factors=False, intruders=False, prefix=PREFIX, lora=True)
    comparison = lorascope.compare(full, [lora])
    text = format_comparison(comparison.summary)
    assert len([line for line in text.splitlines() if "intruder_k=10" in line]) == 1
    assert "factors_k=8" in text and "Falloff" in text



def test_damaged_lora_vectors_are_left_out(tmp_path):
    import h5py

    full = write_planted(tmp_path / "full.h5", seed=0)
    lora = write_planted(tmp_path / "lora.h5", seed=0, prefix=PREFIX, lora=True)
    with h5py.File(lora, "r+") as f:
        f["snapshots/factors/u/000000"][...] = np.inf  # the q_proj LoRA's vectors
    comparison = lorascope.compare(full, [lora])
    overlap = comparison.subspace.runs[1].overlap
    assert overlap["attention"].modules == 1 and overlap["all"].modules == 2

    def refuse(constant):
        raise AssertionError(constant)

    json.loads(json.dumps(comparison.summary), parse_constant=refuse)
