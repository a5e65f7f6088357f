"""The held-batch loss columns of contributions=True: written and read back, absent from older files (read as
NaN), and a file without them continued by a resumed run."""

from __future__ import annotations

import h5py
import numpy as np

from lorascope import RunWriter, open_run
from lorascope.store import schema as S
from lorascope.store.payloads import Snapshot

MODULES = [{"name": n, "module": n, "parameter": "weight", "kind": k, "role": "", "layer": layer, "expert": -1,
            "out_features": 4, "in_features": 3} for n, k, layer in
           (("a", "attention", 0), ("b", "mlp", 0), ("c", "head", -1))]
HELD = ("held_loss", "held_loss_start", "held_loss_without_kind", "held_loss_without_layer")


def _write(path, snapshots):
    with RunWriter(path, MODULES) as writer:
        for snap in snapshots:
            writer.append_snapshot(snap)


def _snapshot(step, **held):
    return Snapshot(step=step, energy=np.ones(3), sv=[np.ones(3)] * 3, **held)


def test_held_losses_round_trip(tmp_path):
    path = tmp_path / "run.h5"
    _write(path, [_snapshot(1), _snapshot(2, held_loss=1.5, held_loss_start=2.5,
                                          held_loss_without_kind=[2.0, 1.75, 1.5],
                                          held_loss_without_layer=[2.25, 2.25, np.nan])])
    with open_run(path) as run:
        snaps = run.snapshots
        np.testing.assert_array_equal(snaps["held_loss"], [np.nan, 1.5])
        np.testing.assert_array_equal(snaps["held_loss_start"], [np.nan, 2.5])
        np.testing.assert_array_equal(snaps["held_loss_without_kind"], [[np.nan] * 3, [2.0, 1.75, 1.5]])
        np.testing.assert_array_equal(snaps["held_loss_without_layer"], [[np.nan] * 3, [2.25, 2.25, np.nan]])
        assert snaps["held_loss"].attrs["units"] == "nats per token"


def test_file_without_the_columns_reads_as_nan_and_continues(tmp_path):
    path = tmp_path / "run.h5"
    _write(path, [_snapshot(1), _snapshot(2)])
    with h5py.File(path, "r+") as f:  # a file written before the columns existed
        for name in HELD:
            del f[S.GROUP_SNAPSHOTS][name]
    with open_run(path) as run:
        snaps = run.snapshots
        assert snaps["held_loss"].shape == (2,) and np.isnan(snaps["held_loss"]).all()
        assert snaps["held_loss_without_kind"].shape == (2, 3)
        assert np.isnan(snaps["held_loss_without_kind"]).all()
    writer = RunWriter(path, MODULES, overwrite=True)
    writer.reopen(after_step=2)
    writer.append_snapshot(_snapshot(3, held_loss=1.0))
    writer.close()
    with open_run(path) as run:
        assert run.complete and run.n_snapshots == 3
        assert np.isnan(run.snapshots["held_loss"]).all()
