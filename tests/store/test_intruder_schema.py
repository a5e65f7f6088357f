"""The intruder columns (``intruder_cos``, ``weight_sv``), the snapshots' ``intruder_k`` and the gradient's singular
vectors (``snapshots/grad_factors``): written, reopened, and refused when they break the schema (issue 18)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from lorascope import RunWriter, open_run
from lorascope.errors import CorruptRunFileError
from lorascope.store import Snapshot
from lorascope.store import schema as S

MODULES = [dict(name=f"layers.0.{role}", module=f"layers.0.{role}", parameter="weight", kind="attention", role=role,
                layer=0, expert=-1, out_features=out, in_features=inp)
           for role, out, inp in (("q", 6, 4), ("v", 3, 5))]


def write(path, *, intruder_k=3, grad_sv=True, factors_k=2, snapshots=2):
    rng = np.random.default_rng(0)
    with RunWriter(path, MODULES, intruder_k=intruder_k, grad_sv=grad_sv, factors_k=factors_k) as writer:
        for step in range(1, snapshots + 1):
            extra = {}
            if intruder_k:
                # Module 1 has only 2 of its 3 directions measured, module 0 none at the first snapshot.
                extra["intruder_cos"] = [None if step == 1 else np.array([0.25, 0.5, 1.0]), np.array([0.1, 0.9])]
                extra["weight_sv"] = [None if step == 1 else np.array([3.0, 2.0, 1.0]), np.array([4.0, 0.5])]
            if grad_sv and factors_k:
                extra["grad_factors"] = {0: (rng.standard_normal((6, 2)), rng.standard_normal((4, 2))),
                                         1: (rng.standard_normal((3, 1)), rng.standard_normal((5, 1)))}
            writer.append_snapshot(Snapshot(step=step, energy=[1.0, 2.0], sv=[np.ones(4), np.ones(3)],
                                            grad_sv=[np.ones(4), None] if grad_sv else None, **extra))
    return path


def test_the_intruder_columns_and_gradient_vectors_round_trip(tmp_path):
    path = write(tmp_path / "run.h5")
    with open_run(path) as run:
        assert run.intruder_k == 3
        view = run.snapshots
        assert view["intruder_cos"].dims == ("snapshot", "module", "intruder")
        assert view["intruder_cos"].shape == (2, 2, 3) and view["intruder_cos"].dtype == np.float32
        np.testing.assert_array_equal(view["intruder_cos"].values[1, 0], [0.25, 0.5, 1.0])
        np.testing.assert_allclose(view["intruder_cos"].values[1, 1], [0.1, 0.9, np.nan], rtol=1e-6)
        assert np.isnan(view["intruder_cos"].values[0, 0]).all()
        np.testing.assert_allclose(view["weight_sv"].values[0, 1], [4.0, 0.5, np.nan])
        assert view["weight_sv"].attrs["units"] == "weight units"
        u, v = run.grad_factors("layers.0.v", 1)
        assert u.shape == (3, 2) and v.shape == (5, 2)
        assert np.isfinite(u[:, 0]).all() and np.isnan(u[:, 1]).all()  # one vector stored, the other padded
        u0, _ = run.grad_factors(0, 0)
        rng = np.random.default_rng(0)
        np.testing.assert_allclose(u0, rng.standard_normal((6, 2)).astype(np.float32))


def test_a_file_without_them_reads_as_not_recorded(tmp_path):
    path = write(tmp_path / "run.h5", intruder_k=0, grad_sv=False)
    with h5py.File(path, "r+") as f:  # a file from before the attribute existed
        del f[S.GROUP_SNAPSHOTS].attrs[S.ATTR_INTRUDER_K]
    with open_run(path) as run:
        assert run.intruder_k == 0
        assert "intruder_cos" not in run.snapshots and "weight_sv" not in run.snapshots
        assert run.grad_factors(0, 0) is None
        assert run.factors(0, 0) is not None


def test_grad_factors_need_the_gradient_spectrum_and_factors(tmp_path):
    path = write(tmp_path / "run.h5", intruder_k=0, grad_sv=True, factors_k=0)
    with open_run(path) as run:
        assert run.grad_sv and run.grad_factors(0, 0) is None
    with RunWriter(tmp_path / "b.h5", MODULES, factors_k=2) as writer, \
            pytest.raises(ValueError, match="grad_factors given"):
        writer.append_snapshot(Snapshot(step=1, energy=[1.0, 1.0], sv=[None, None],
                                        grad_factors={0: (np.ones((6, 1)), np.ones((4, 1)))}))


def test_the_writer_refuses_intruder_values_it_has_no_room_for(tmp_path):
    with RunWriter(tmp_path / "a.h5", MODULES) as writer, pytest.raises(ValueError, match="intruder_k=0"):
        writer.append_snapshot(Snapshot(step=1, energy=[1.0, 1.0], sv=[None, None],
                                        intruder_cos=[np.array([0.5]), None]))
    with RunWriter(tmp_path / "b.h5", MODULES, intruder_k=2) as writer, pytest.raises(ValueError, match="capacity 2"):
        writer.append_snapshot(Snapshot(step=1, energy=[1.0, 1.0], sv=[None, None],
                                        intruder_cos=[np.array([0.5, 0.4, 0.3]), None]))
    with pytest.raises(ValueError, match="intruder_k must be >= 0"):
        RunWriter(tmp_path / "c.h5", MODULES, intruder_k=-1)


@pytest.mark.parametrize("value, ok", [(1.0 + 5e-6, True), (np.nan, True), (0.0, True), (1.001, False),
                                       (-0.01, False), (np.inf, False)])
def test_the_reader_refuses_a_cosine_outside_0_1(tmp_path, value, ok):
    path = write(tmp_path / "run.h5")
    with h5py.File(path, "r+") as f:
        f[f"{S.GROUP_SNAPSHOTS}/intruder_cos"][1, 1, 0] = value
    if ok:
        with open_run(path) as run:
            assert run.snapshots["intruder_cos"].values[1, 1, 0] == pytest.approx(value, nan_ok=True)
        return
    with pytest.raises(CorruptRunFileError, match=r"'snapshots/intruder_cos' must be an absolute cosine in \[0, 1\]"):
        open_run(path)


def test_the_reader_refuses_a_negative_weight_singular_value(tmp_path):
    path = write(tmp_path / "run.h5")
    with h5py.File(path, "r+") as f:
        f[f"{S.GROUP_SNAPSHOTS}/weight_sv"][0, 1, 0] = -1.0
    with pytest.raises(CorruptRunFileError, match="'snapshots/weight_sv' must be >= 0; got -1.0"):
        open_run(path)


def test_the_reader_refuses_columns_and_attribute_that_disagree(tmp_path):
    path = write(tmp_path / "run.h5")
    with h5py.File(path, "r+") as f:
        f[S.GROUP_SNAPSHOTS].attrs[S.ATTR_INTRUDER_K] = np.int64(0)
    with pytest.raises(CorruptRunFileError, match="'snapshots/intruder_cos' must be present exactly when"):
        open_run(path)
    with h5py.File(path, "r+") as f:
        f[S.GROUP_SNAPSHOTS].attrs[S.ATTR_INTRUDER_K] = np.int64(4)
    with pytest.raises(CorruptRunFileError, match=r"'snapshots/intruder_cos' has shape \(2, 2, 3\), expected "
                                                  r"\(rows, 2, 4\)"):
        open_run(path)
    with h5py.File(path, "r+") as f:
        f[S.GROUP_SNAPSHOTS].attrs[S.ATTR_INTRUDER_K] = "3"
    with pytest.raises(CorruptRunFileError, match="attribute 'intruder_k' must be an int >= 0"):
        open_run(path)
    plain = write(tmp_path / "plain.h5", intruder_k=0)
    with h5py.File(plain, "r+") as f:
        f[S.GROUP_SNAPSHOTS].attrs[S.ATTR_INTRUDER_K] = np.int64(2)
    with pytest.raises(CorruptRunFileError, match="must be present exactly when"):
        open_run(plain)


def test_the_reader_refuses_gradient_vectors_of_the_wrong_shape(tmp_path):
    path = write(tmp_path / "run.h5")
    with h5py.File(path, "r+") as f:
        group = f[f"{S.GROUP_GRAD_FACTORS}/{S.FACTOR_V}"]
        del group[S.module_key(1)]
        group.create_dataset(S.module_key(1), data=np.zeros((2, 4, 2), dtype=np.float32))
    with pytest.raises(CorruptRunFileError, match=r"'snapshots/grad_factors/v/000001' has shape \(2, 4, 2\), "
                                                  r"expected \(rows, 5, 2\)"):
        open_run(path)


def test_a_resumed_file_keeps_its_intruder_axis(tmp_path):
    path = write(tmp_path / "run.h5")
    writer = RunWriter(path, MODULES, overwrite=True)  # the recorder of a resumed run opens with its own options
    writer.reopen(after_step=1)
    assert writer.intruder_k == 3
    writer.append_snapshot(Snapshot(step=2, energy=[1.0, 1.0], sv=[None, None],
                                    intruder_cos=[np.array([0.75]), None], weight_sv=[np.array([2.0]), None]))
    writer.close()
    with open_run(path) as run:
        np.testing.assert_array_equal(run.snapshot_index, [1, 2])
        np.testing.assert_array_equal(run.snapshots["intruder_cos"].values[1, 0], [0.75, np.nan, np.nan])
        np.testing.assert_allclose(run.snapshots["intruder_cos"].values[0, 1], [0.1, 0.9, np.nan], rtol=1e-6)
