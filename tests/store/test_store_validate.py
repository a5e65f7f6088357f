"""The validation pass on open (issue 15, item 3): what is refused (one line naming the dataset or attribute and the
rule, exit 2 from ``lorascope info``), what is flagged (kept, listed by ``info``) and what is data (neither).

Each file is a valid small run (``fixtures/broken.py``'s ``write_small_run``: 3 modules of min(out, in) 4, 12 steps,
snapshots at steps 1, 3, 6 and 12, sv_capacity 4) edited in exactly one way.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import lorascope.errors as errors
from lorascope import open_run
from lorascope.store import schema as S
from lorascope.store.info import run_info
from lorascope_cli.main import cli

ROOT = Path(__file__).resolve().parents[2]


def _load_broken():
    spec = importlib.util.spec_from_file_location("lorascope_fixtures_broken", ROOT / "fixtures" / "broken.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return _load_broken().write_small_run(tmp_path_factory.mktemp("validate") / "valid.h5")


@pytest.fixture
def edited(source, tmp_path) -> Callable[[Callable[[h5py.File], None]], Path]:
    def edit(change: Callable[[h5py.File], None]) -> Path:
        path = tmp_path / "edited.h5"
        shutil.copyfile(source, path)
        with h5py.File(path, "r+", libver="latest") as f:
            change(f)
        return path
    return edit


def _replace(name: str, data: np.ndarray | Callable[[np.ndarray], np.ndarray]) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        old = f[name][()]
        del f[name]
        f.create_dataset(name, data=data(old) if callable(data) else data)
    return change


def _set(name: str, index: tuple, value: float) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        values = f[name][()]
        values[index] = value
        f[name][...] = values
    return change


def _attr(name: str, value: object, group: str = "/") -> Callable[[h5py.File], None]:
    return lambda f: f[group].attrs.__setitem__(name, value)


REFUSED = {
    # the failures issue 15 lists (items 3 and 4)
    "loss_of_shape_n_by_3": (_replace("steps/loss", lambda v: np.repeat(v[:, None], 3, axis=1)),
                             "'steps/loss' has shape (12, 3), expected (rows)"),
    "loss_as_byte_strings": (_replace("steps/loss", lambda v: v.astype("S8")), "'steps/loss' must hold floats"),
    "negative_sv_count": (_set("snapshots/sv_count", (1, 0), -3), "'snapshots/sv_count' must be >= 0"),
    "schema_version_a_string": (_attr(S.ATTR_SCHEMA_VERSION, "1"), "'schema_version' must be an integer"),
    "schema_version_a_float": (_attr(S.ATTR_SCHEMA_VERSION, 1.5), "'schema_version' must be an integer"),
    "status_an_integer": (_attr(S.ATTR_STATUS, np.int64(1)), "'status' must be a string"),
    "steps_decreasing": (_set("steps/step", (5,), 2), "'steps/step' must not decrease"),
    "sv_count_beyond_capacity": (_set("snapshots/sv_count", (2, 1), 5),
                                 "'snapshots/sv_count' holds 5 at snapshot 2, module 1"),
    # more of the same rules
    "status_unknown": (_attr(S.ATTR_STATUS, "done"), "'status' must be one of recording, complete, failed"),
    "snapshot_steps_decreasing": (_set("snapshots/step", (3,), 1), "'snapshots/step' must not decrease"),
    "unsigned_steps_decreasing": (_replace("steps/step", lambda v: v[::-1].astype(np.uint64)),
                                  "'steps/step' must not decrease; row 1 holds 11 after 12"),
    "negative_energy": (_set("snapshots/energy", (0, 2), -1.0), "'snapshots/energy' must be >= 0"),
    "energy_of_integers": (_replace("snapshots/energy", lambda v: np.zeros(v.shape, np.int64)),
                           "'snapshots/energy' must hold floats"),
    "sv_axis_not_capacity": (_replace("snapshots/sv", lambda v: v[:, :, :3]),
                             "axis 2 the snapshots' sv_capacity"),
    "sv_capacity_a_string": (_attr(S.ATTR_SV_CAPACITY, "4", "snapshots"),
                             "'snapshots' attribute 'sv_capacity' must be an int >= 0"),
    "factors_k_negative": (_attr(S.ATTR_FACTORS_K, np.int64(-1), "snapshots"), "'factors_k' must be an int >= 0"),
    "delta_dtype_unknown": (_attr(S.ATTR_DELTA_DTYPE, "int8", "snapshots"), "'delta_dtype' must be one of"),
    "factors_k_without_factors": (_attr(S.ATTR_FACTORS_K, np.int64(2), "snapshots"),
                                  "required dataset 'snapshots/factors/u/000000' is missing"),
    "negative_out_features": (_set("modules/out_features", (0,), -6), "'modules/out_features' and 'in_features'"),
    "module_names_repeat": (_set("modules/name", (1,), "layers.0.q"), "'modules/name' must be unique"),
    "module_kind_of_floats": (_replace("modules/kind", np.zeros(3)), "'modules/kind' must hold strings"),
    "grad_sv_without_count": (lambda f: f["snapshots"].create_dataset("grad_sv", data=np.zeros((4, 3, 4), "f4")),
                              "'snapshots/grad_sv' and 'grad_sv_count' must both be present"),
    "created_an_integer": (_attr(S.ATTR_CREATED, np.int64(2026)), "'created' must be a string"),
    "dataset_section_a_list": (_attr("dataset", "[1, 2]", "config"),
                               "config section 'dataset' must be a JSON object; got a JSON array"),
    "model_config_a_number": (_attr("model", '{"config": 3}', "config"),
                              "config section 'model': 'config' must be a JSON object; got a JSON number"),
}


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_a_file_breaking_a_rule_is_refused_on_open_naming_the_dataset_and_rule(edited, key):
    change, fragment = REFUSED[key]
    path = edited(change)
    with pytest.raises(errors.CorruptRunFileError) as info:
        open_run(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert fragment in message, message
    result = CliRunner().invoke(cli, ["info", str(path)])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}", (result.output, result.exception)


@pytest.mark.parametrize(("column", "index"), [("snapshots/sv", (2, 0, 1)), ("steps/grad_sq_norm", (4, 2))])
def test_negative_singular_values_or_squared_norms_are_refused_by_the_view_and_by_info(edited, column, index):
    path = edited(_set(column, index, -0.5))
    group, name = column.split("/")
    with open_run(path) as run, pytest.raises(errors.CorruptRunFileError, match=f"'{column}' must be >= 0"):
        getattr(run, group).load()
    with pytest.raises(errors.CorruptRunFileError, match=f"'{column}' must be >= 0"):
        run_info(path)
    result = CliRunner().invoke(cli, ["info", str(path)])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and name in result.stderr


def test_a_newer_or_invalid_integer_version_is_a_schema_version_error(edited):
    for version in (S.SCHEMA_VERSION + 1, 0):
        path = edited(_attr(S.ATTR_SCHEMA_VERSION, np.int64(version)))
        with pytest.raises(errors.SchemaVersionError):
            open_run(path)


def test_energy_not_measured_is_flagged_not_refused(edited):
    path = edited(_set("snapshots/energy", (1, 0), np.nan))
    with open_run(path) as run:
        assert any("'snapshots/energy' is NaN at 1 module-snapshot(s)" in flag for flag in run.flags), run.flags
        assert np.isnan(run.snapshots["energy"].values[1, 0])
    summary = run_info(path)
    assert summary["flags"] == list(open_run(path).flags)
    text = CliRunner().invoke(cli, ["info", str(path)])
    assert text.exit_code == 0 and "flagged" in text.output and "energy" in text.output
    as_json = CliRunner().invoke(cli, ["info", "--json", str(path)])
    assert json.loads(as_json.output)["flags"] == summary["flags"]


def test_repeated_step_numbers_are_flagged(edited):
    path = edited(_set("steps/step", (3,), 3))
    with open_run(path) as run:
        assert run.flags == ("'steps/step': 1 repeated step number(s)",)
        assert run.steps.sizes["step"] == 12
    import lorascope  # analyze keeps the flag as a note: the report says what the file's validation saw

    assert f"{path}: flagged by the file's validation: 'steps/step': 1 repeated step number(s)" in \
        lorascope.analyze(path).notes


@pytest.mark.parametrize(("column", "value"), [("steps/loss", np.nan), ("steps/loss", np.inf),
                                               ("steps/grad_sq_norm", np.inf), ("steps/grad_sq_norm", np.nan),
                                               ("snapshots/energy", np.inf)])
def test_non_finite_measurements_are_data_neither_refused_nor_flagged(edited, column, value):
    path = edited(_set(column, (6,) if column == "steps/loss" else (2, 1), value))
    with open_run(path) as run:
        assert run.flags == ()
        run.steps.load()
        run.snapshots.load()
    assert run_info(path)["flags"] == []


def test_uncommitted_rows_of_a_killed_writer_are_not_read_and_flagged(edited):
    def killed_mid_row(f: h5py.File) -> None:
        f.attrs[S.ATTR_STATUS] = S.STATUS_RECORDING
        for name in ("loss", "examples_seen"):  # the writer had grown two columns when it was killed
            f["steps"][name].resize(13, axis=0)

    path = edited(killed_mid_row)
    with open_run(path) as run:
        assert run.n_steps == 12 and run.steps.sizes["step"] == 12
        assert run.flags == ("'steps': 1 row(s) written after the last committed one (a writer stopped mid-row) "
                             "are not read",)


@pytest.mark.parametrize("group", ["steps", "snapshots"])
def test_a_live_writer_s_index_extended_but_not_yet_written_is_not_read(edited, group):
    # The writer extends every column, then the index, then writes the index: a reader that opens the file between
    # the index's resize and its write sees the new row holding the fill value. It is not committed yet (it once
    # read as a decreasing step index: "'steps/step' must not decrease").
    def caught_mid_append(f: h5py.File) -> None:
        f.attrs[S.ATTR_STATUS] = S.STATUS_RECORDING
        table = f[group]
        n = table[S.INDEX].shape[0]
        for name in table:
            if isinstance(table[name], h5py.Dataset):
                table[name].resize(n + 1, axis=0)

    path = edited(caught_mid_append)
    with open_run(path) as run:
        committed = 12 if group == "steps" else 4
        assert (run.n_steps if group == "steps" else run.n_snapshots) == committed
        assert run.step_index.tolist() == list(range(1, 13)) and run.snapshot_index.tolist() == [1, 3, 6, 12]
        assert run.steps.sizes["step"] == 12 and run.snapshots.sizes["snapshot"] == 4
        assert run.flags == (f"'{group}': 1 row(s) written after the last committed one (a writer stopped mid-row) "
                             "are not read",)


def test_a_closed_file_whose_index_holds_the_fill_value_is_refused(edited):
    path = edited(lambda f: f["steps"][S.INDEX].resize(13, axis=0))
    with pytest.raises(errors.CorruptRunFileError, match="'steps/step' must not decrease; row 12 holds -1 after 12"):
        open_run(path)


def test_a_closed_file_with_rows_past_the_index_is_refused(edited):
    path = edited(lambda f: f["steps"]["loss"].resize(13, axis=0))
    with pytest.raises(errors.CorruptRunFileError, match="'steps/loss' has 13 rows but 'steps/step' has 12"):
        open_run(path)


def test_the_payload_of_a_snapshot_a_module_did_not_store_is_nan(tmp_path):
    from lorascope.store.payloads import Snapshot
    from lorascope.store.writer import RunWriter

    modules = [dict(name=f"m{i}", module=f"m{i}", parameter="weight", kind="other", role="", layer=-1, expert=-1,
                    out_features=3, in_features=2) for i in range(2)]
    path = tmp_path / "run.h5"
    with RunWriter(path, modules, factors_k=1, delta_dtype="float32") as writer:
        for step in (1, 2):
            writer.append_snapshot(Snapshot(step=step, energy=[1.0, 1.0], sv=[[1.0], [1.0]],
                                            factors={0: (np.ones((3, 1)), np.ones((2, 1)))} if step == 1 else {},
                                            deltas={0: np.ones((3, 2))} if step == 1 else {}))
    with open_run(path) as run:
        u, v = run.factors(0, 1)
        assert u.shape == (3, 1) and np.isnan(u).all() and np.isnan(v).all()
        assert np.isnan(run.delta(0, 1)).all() and np.isnan(run.delta(1, 0)).all()
        np.testing.assert_array_equal(run.delta(0, 0), np.ones((3, 2)))


def test_a_config_section_lorascope_does_not_read_may_hold_any_json(edited):
    path = edited(_attr("notes", '["a", "list"]', "config"))
    with open_run(path) as run:
        assert run.config["notes"] == ["a", "list"]


def test_the_valid_source_opens_without_flags(source):
    with open_run(source) as run:
        assert run.flags == ()
    assert run_info(source)["flags"] == []
