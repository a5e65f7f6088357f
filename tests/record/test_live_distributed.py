"""Live metrics under torch.distributed (DDP, two CPU processes over gloo): rank 0 publishes each snapshot's
scalars once, the noise scale among them, and it is the distributed estimate (B_small: one backward pass on one
rank; B_big: the global batch) that ``lorascope analyze`` computes from the file; the other rank publishes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_record_distributed import _run

import lorascope
from lorascope.analysis.noise import noise_scale

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

SCRIPT = Path(__file__).with_name("_live_distributed_script.py")


def test_rank_0_publishes_the_distributed_noise_scale_once(tmp_path, torch_single_thread):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
          str(tmp_path)], tmp_path)
    rank0 = json.loads((tmp_path / "live_rank0.json").read_text())
    rank1 = json.loads((tmp_path / "live_rank1.json").read_text())
    assert rank1 == []  # published once, by the rank that writes the file
    with lorascope.open_run(tmp_path / "live.h5") as run:
        steps, snapshot_steps = run.steps.load(), [int(s) for s in run.snapshots["step"].values]
        assert run.config["distributed"]["world_size"] == 2
    assert [step for step, _ in rank0] == snapshot_steps  # each snapshot once, in order
    reference = noise_scale(steps)
    assert reference is not None
    b_simple = reference.series["b_simple"]
    np.testing.assert_array_equal(steps["gns_batch_small"].values, 2)  # one pass of 2 sequences on one rank
    np.testing.assert_array_equal(steps["gns_batch_big"].values, 8)  # the global batch
    for step, scalars in rank0:
        for group in ("all", "mlp", "embedding", "other"):
            expected = float(b_simple.sel(step=step, group=group))
            name = f"lorascope/{group}/noise_scale"
            if np.isfinite(expected):
                assert scalars[name] == pytest.approx(expected, rel=1e-9), (step, name)
            else:
                assert name not in scalars
        assert scalars["lorascope/all/batch_over_noise_scale"] == pytest.approx(
            8 / scalars["lorascope/all/noise_scale"], rel=1e-12)
        assert "lorascope/all/signal_rank" in scalars
    assert rank0[-1][1]["lorascope/all/noise_scale"] > 0
