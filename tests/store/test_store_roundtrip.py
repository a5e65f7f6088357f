"""Round trip of the run file: what RunWriter appends is what open_run returns, field by field.

Hypothesis draws the structure of a run (modules and shapes, options, step batches, snapshots, which optional
columns are given); a numpy generator seeded by Hypothesis fills in the numbers, with NaN and +-inf mixed in.
Each example writes a real file into a fresh temporary folder (a function-scoped ``tmp_path`` would be shared
by all examples) and reads it back.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorascope import RunWriter, __version__, open_run
from lorascope.errors import LorascopeError, RunFileExistsError
from lorascope.store import schema as S
from lorascope.store.payloads import Snapshot
from lorascope.store.writer import check_writable

KINDS = ("attention", "mlp", "moe_expert", "router", "embedding", "head", "norm", "other")
OPTIONAL_MODULE_KEYS = ("transposed", "part", "lora")
STEP_ROW_INT = ("examples_seen", "tokens_seen", "batch_examples", "batch_tokens", "grad_nonfinite_modules")
STEP_ROW_FLOAT = ("loss", "lr", "grad_sq_norm_other", "gns_batch_small", "gns_batch_big")
STEP_MODULE_FLOAT = ("grad_sq_norm", "gns_sq_norm_small", "gns_sq_norm_big")
SPECIALS = np.array([np.nan, np.inf, -np.inf])
# Singular values, energies and squared norms are never negative: the reader refuses a file that holds one
# (lorascope/store/validate.py), so they are drawn as magnitudes (NaN and +Inf stay: they are data).
NON_NEGATIVE = {"energy", "sv", "grad_sv", "grad_sq_norm", "grad_sq_norm_other", "gns_sq_norm_small",
                "gns_sq_norm_big"}

# Text without NUL (HDF5 strings are NUL-terminated) and without lone surrogates (not encodable as UTF-8).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)


def column(name: str, group: str = S.GROUP_SNAPSHOTS) -> S.Column:
    return next(c for c in S.columns_of(group, grad_sv=True) if c.name == name)


# -- what a run is made of --------------------------------------------------------------------------------------
@dataclass
class Spec:
    """The structure of one run; the numbers come from ``seed``."""

    modules: list[dict[str, Any]]
    coverage: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    framework: str = "plain"
    framework_version: str = ""
    sv_capacity: int | None = None
    grad_sv: bool = False
    factors_k: int = 0
    delta_dtype: str | None = None
    step_batches: list[int] = field(default_factory=list)
    n_snapshots: int = 0
    seed: int = 0

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(m["out_features"], m["in_features"]) for m in self.modules]

    @property
    def capacity(self) -> int:
        default = max((min(shape) for shape in self.shapes), default=0)
        return default if self.sv_capacity is None else self.sv_capacity


def module_row(i: int, name: str, out: int, inp: int, **extra: Any) -> dict[str, Any]:
    return dict(name=name, module=f"model.layers.{i}", parameter="weight", kind="mlp", role="up", layer=i,
                expert=-1, out_features=out, in_features=inp, **extra)


@st.composite
def specs(draw: st.DrawFn, min_modules: int = 1, max_modules: int = 4) -> Spec:
    n_mod = draw(st.integers(min_modules, max_modules))
    names = draw(st.lists(TEXT.filter(bool), min_size=n_mod, max_size=n_mod, unique=True))
    modules = []
    for i, name in enumerate(names):
        row = module_row(i, name, draw(st.integers(1, 7)), draw(st.integers(1, 7)))
        row.update(module=draw(TEXT), parameter=draw(st.sampled_from(["weight", "gate_up_proj", "w"])),
                   kind=draw(st.sampled_from(KINDS)), role=draw(st.sampled_from(["q", "o", "gate", "", "router"])),
                   layer=draw(st.integers(-1, 40)), expert=draw(st.integers(-1, 63)))
        for key in draw(st.sets(st.sampled_from(OPTIONAL_MODULE_KEYS))):  # absent keys take the fill value
            row[key] = draw(st.sampled_from(["gate", "up", ""])) if key == "part" else draw(st.booleans())
        modules.append(row)
    max_rank = max(min(m["out_features"], m["in_features"]) for m in modules)
    coverage = draw(st.lists(st.fixed_dictionaries({
        "parameter": TEXT, "shape": st.sampled_from(["4x96x32", "7", "3x5"]), "recorded": st.booleans(),
        "reason": TEXT}), max_size=4))
    return Spec(
        modules=modules,
        coverage=coverage,
        config=draw(st.dictionaries(TEXT.filter(bool), JSON, max_size=3)),
        framework=draw(st.sampled_from(["plain", "transformers", "lightning"])),
        framework_version=draw(st.sampled_from(["", "5.0.1"])),
        sv_capacity=draw(st.none() | st.integers(1, max_rank + 2)),
        grad_sv=draw(st.booleans()),
        factors_k=draw(st.integers(0, 3)),
        delta_dtype=draw(st.sampled_from([None, "float16", "float32"])),
        step_batches=draw(st.lists(st.integers(0, 5), max_size=4)),
        n_snapshots=draw(st.integers(0, 4)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# -- writing, and what must come back --------------------------------------------------------------------------
def with_specials(rng: np.random.Generator, values: np.ndarray, p: float = 0.15) -> np.ndarray:
    values = np.array(values, dtype=np.float64)
    mask = rng.random(values.shape) < p
    values[mask] = rng.choice(SPECIALS, size=int(mask.sum()))
    return values


def spectrum(rng: np.random.Generator, length: int) -> np.ndarray:
    return np.abs(with_specials(rng, np.sort(rng.random(length) * 10)[::-1], p=0.1)).astype(np.float32)


def draw_spectra(rng: np.random.Generator, spec: Spec) -> list[np.ndarray | None]:
    """Per module: None (not computed), full, top-k (shorter than min(out, in)) or empty."""
    spectra: list[np.ndarray | None] = []
    for shape in spec.shapes:
        longest = min(min(shape), spec.capacity)
        choice = rng.integers(4)
        if choice == 0:
            spectra.append(None)
        elif choice == 1:
            spectra.append(spectrum(rng, longest))
        else:
            spectra.append(spectrum(rng, int(rng.integers(0, longest + 1))))
    return spectra


def padded(spectra: list[np.ndarray | None], capacity: int) -> tuple[np.ndarray, np.ndarray]:
    sv = np.full((len(spectra), capacity), np.nan, dtype=np.float32)
    count = np.zeros(len(spectra), dtype=np.int32)
    for i, s in enumerate(spectra):
        if s is not None:
            sv[i, : len(s)] = s
            count[i] = len(s)
    return sv, count


def fill_rows(name: str, group: str, n_rows: int, n_mod: int) -> np.ndarray:
    col = column(name, group)
    shape = (n_rows,) if col.layout == S.ROW else (n_rows, n_mod)
    return np.full(shape, col.fill, dtype=col.numpy_dtype)


def write_run(path: Path, spec: Spec) -> dict[str, Any]:
    """Write the run described by ``spec`` and return every value the reader must give back."""
    rng = np.random.default_rng(spec.seed)
    n_mod = len(spec.modules)
    expected_steps: dict[str, list[np.ndarray]] = {c.name: [] for c in S.STEP_COLUMNS}
    snapshots: list[dict[str, Any]] = []
    factors: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    deltas: dict[tuple[int, int], np.ndarray] = {}
    step = 0
    with RunWriter(path, spec.modules, coverage=spec.coverage, config=spec.config, framework=spec.framework,
                   framework_version=spec.framework_version, sv_capacity=spec.sv_capacity, grad_sv=spec.grad_sv,
                   factors_k=spec.factors_k, delta_dtype=spec.delta_dtype) as writer:
        for n in spec.step_batches:
            rows: dict[str, Any] = {S.INDEX: np.arange(step + 1, step + n + 1)}
            step += n
            given_columns = [c for c in S.STEP_COLUMNS if c.name != S.INDEX and rng.random() < 0.6]
            for col in given_columns:
                if rng.random() < 0.2:  # a scalar stands for the whole batch
                    rows[col.name] = (float(rng.choice(SPECIALS)) if col.numpy_dtype.kind == "f"
                                      else int(rng.integers(-1, 1000)))
                elif col.numpy_dtype.kind == "f":
                    shape = (n,) if col.layout == S.ROW else (n, n_mod)
                    rows[col.name] = with_specials(rng, rng.normal(size=shape) * 100).astype(col.numpy_dtype)
                if col.name in NON_NEGATIVE:
                    rows[col.name] = np.abs(rows[col.name])
                else:
                    rows[col.name] = rng.integers(-1, 10**12, size=n).astype(col.numpy_dtype).tolist()
            writer.append_steps(rows)
            for col in S.STEP_COLUMNS:
                full = fill_rows(col.name, S.GROUP_STEPS, n, n_mod)
                full[...] = np.asarray(rows.get(col.name, col.fill), dtype=col.numpy_dtype).reshape(
                    full.shape if np.ndim(rows.get(col.name, col.fill)) else ())
                expected_steps[col.name].append(full)

        for j in range(spec.n_snapshots):
            step += int(rng.integers(1, 4))
            snap: dict[str, Any] = {
                "step": step,
                "energy": np.abs(with_specials(rng, rng.random(n_mod) * 50)),
                "sv": draw_spectra(rng, spec),
            }
            if rng.random() < 0.7:
                snap["examples_seen"], snap["tokens_seen"] = 8 * step, int(rng.integers(0, 10**12))
            if rng.random() < 0.5:
                snap["delta_nonfinite"] = rng.integers(0, 100, size=n_mod)
            if spec.grad_sv and rng.random() < 0.8:
                snap["grad_sv"] = draw_spectra(rng, spec)
            if spec.factors_k:
                snap["factors"] = {}
                for i, (out, inp) in enumerate(spec.shapes):
                    if rng.random() < 0.7:
                        k = int(rng.integers(0, spec.factors_k + 1))
                        u, v = rng.normal(size=(out, k)), rng.normal(size=(inp, k))
                        snap["factors"][i] = (u, v)
                        factors[i, j] = (u, v)
            if spec.delta_dtype:
                snap["deltas"] = {i: with_specials(rng, rng.normal(size=shape) * 10, p=0.05)
                                  for i, shape in enumerate(spec.shapes)}
                deltas.update({(i, j): d for i, d in snap["deltas"].items()})
            writer.append_snapshot(Snapshot(**snap))
            snapshots.append(snap)

    n_steps = sum(spec.step_batches)
    steps = {name: np.concatenate(parts) if parts else fill_rows(name, S.GROUP_STEPS, 0, n_mod)
             for name, parts in expected_steps.items()}
    return {"n_steps": n_steps, "steps": steps, "snapshots": snapshots, "factors": factors, "deltas": deltas}


def check_run(path: Path, spec: Spec, expected: dict[str, Any]) -> None:
    n_mod = len(spec.modules)
    with open_run(path) as run:
        # root attributes
        assert run.complete and run.status == S.STATUS_COMPLETE
        assert run.attrs[S.ATTR_FORMAT] == S.FORMAT_NAME
        assert run.schema_version == S.SCHEMA_VERSION
        assert run.attrs[S.ATTR_LORASCOPE_VERSION] == __version__
        assert run.attrs[S.ATTR_FRAMEWORK] == spec.framework
        assert run.attrs[S.ATTR_FRAMEWORK_VERSION] == spec.framework_version
        assert run.attrs[S.ATTR_TORCH_VERSION]
        assert run.attrs[S.ATTR_CREATED] <= run.attrs[S.ATTR_FINISHED]  # ISO 8601, UTC: text order is time order

        # static tables and config
        assert list(run.modules.columns) == [c.name for c in S.MODULE_COLUMNS]
        assert len(run.modules) == n_mod
        for col in S.MODULE_COLUMNS:
            got = run.modules[col.name].tolist()
            assert got == [m.get(col.name, col.fill) for m in spec.modules], col.name
            if col.dtype != "str":
                assert run.modules[col.name].dtype == col.numpy_dtype, col.name
        assert list(run.coverage.columns) == [c.name for c in S.COVERAGE_COLUMNS]
        for col in S.COVERAGE_COLUMNS:
            assert run.coverage[col.name].tolist() == [r[col.name] for r in spec.coverage], col.name
        assert run.config == spec.config

        # steps
        assert run.n_steps == expected["n_steps"]
        steps = run.steps
        assert dict(steps.sizes) == {"step": expected["n_steps"], "module": n_mod}
        assert "step" in steps.indexes
        for col in S.STEP_COLUMNS:
            got = steps[col.name]
            np.testing.assert_array_equal(got.values, expected["steps"][col.name], err_msg=col.name)
            assert got.dtype == col.numpy_dtype, col.name
            assert got.dims == (("step",) if col.layout == S.ROW else ("step", "module")), col.name
        assert {"examples_seen", "tokens_seen"} <= set(steps.coords)
        np.testing.assert_array_equal(run.step_index, expected["steps"][S.INDEX])
        check_module_coords(steps, spec)

        # snapshots
        snapshots = expected["snapshots"]
        n_snap = len(snapshots)
        assert run.n_snapshots == n_snap
        view = run.snapshots
        assert dict(view.sizes) == {"snapshot": n_snap, "module": n_mod, "sv_index": spec.capacity}
        assert {"step", "examples_seen", "tokens_seen"} <= set(view.coords)
        assert view["step"].dims == ("snapshot",)
        np.testing.assert_array_equal(view["step"].values, [s["step"] for s in snapshots])
        np.testing.assert_array_equal(run.snapshot_index, [s["step"] for s in snapshots])
        np.testing.assert_array_equal(view["examples_seen"].values, [s.get("examples_seen", -1) for s in snapshots])
        np.testing.assert_array_equal(view["tokens_seen"].values, [s.get("tokens_seen", -1) for s in snapshots])
        energy = np.array([s["energy"] for s in snapshots]).reshape(n_snap, n_mod)
        np.testing.assert_array_equal(view["energy"].values, energy)
        nonfinite = np.array([s.get("delta_nonfinite", np.zeros(n_mod, np.int64)) for s in snapshots])
        np.testing.assert_array_equal(view["delta_nonfinite"].values, nonfinite.reshape(n_snap, n_mod))
        spectra = [("sv", "sv_count")] + ([("grad_sv", "grad_sv_count")] if spec.grad_sv else [])
        assert ("grad_sv" in view) == spec.grad_sv and run.grad_sv == spec.grad_sv
        for values, counts in spectra:
            want = [padded(s.get(values) or [None] * n_mod, spec.capacity) for s in snapshots]
            np.testing.assert_array_equal(view[values].values,
                                          np.array([w[0] for w in want]).reshape(n_snap, n_mod, spec.capacity))
            np.testing.assert_array_equal(view[counts].values, np.array([w[1] for w in want]).reshape(n_snap, n_mod))
            assert view[values].dims == ("snapshot", "module", "sv_index")
            assert view[values].dtype == np.float32 and view[counts].dtype == np.int32
        for name in ("energy", "sv_count", "delta_nonfinite"):
            assert view[name].dims == ("snapshot", "module")
        check_module_coords(view, spec)
        check_per_module(run, spec, expected, n_snap)


def check_module_coords(ds: Any, spec: Spec) -> None:
    assert ds["module"].values.tolist() == [m["name"] for m in spec.modules]
    for name in ("kind", "role", "layer", "expert", "out_features", "in_features"):
        assert ds[name].dims == ("module",), name
        assert ds[name].values.tolist() == [m[name] for m in spec.modules], name


def check_per_module(run: Any, spec: Spec, expected: dict[str, Any], n_snap: int) -> None:
    if not spec.factors_k:
        assert run.factors(0, 0) is None
    else:
        for i in range(len(spec.modules)):
            given = [j for j in range(n_snap) if (i, j) in expected["factors"]]
            for j in range(max(given, default=-1) + 1):  # rows past the last given one are not stored
                u, v = run.factors(i, j)
                assert u.shape == (spec.shapes[i][0], spec.factors_k) and u.dtype == np.float32
                assert v.shape == (spec.shapes[i][1], spec.factors_k) and v.dtype == np.float32
                out, inp = spec.shapes[i]
                want_u, want_v = expected["factors"].get((i, j), (np.zeros((out, 0)), np.zeros((inp, 0))))
                for got, want in ((u, want_u), (v, want_v)):
                    k = want.shape[1]  # NaN past the given k' <= factors_k; all NaN where none was given
                    np.testing.assert_array_equal(got[:, :k], want.astype(np.float32))
                    assert np.isnan(got[:, k:]).all()
            if given:
                by_name = run.factors(spec.modules[i]["name"], given[-1])
                np.testing.assert_array_equal(by_name[0], run.factors(i, given[-1])[0])
    if not spec.delta_dtype:
        assert run.delta(0, 0) is None
    else:
        for (i, j), want in expected["deltas"].items():
            got = run.delta(i, j)
            assert got.dtype == np.dtype(spec.delta_dtype) and got.shape == spec.shapes[i]
            with np.errstate(over="ignore"):
                np.testing.assert_array_equal(got, want.astype(spec.delta_dtype))


def roundtrip(spec: Spec) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.h5"
        expected = write_run(path, spec)
        check_run(path, spec, expected)


# -- the round trip ----------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_roundtrip_field_by_field(spec):
    roundtrip(spec)


def test_roundtrip_empty_run():
    roundtrip(Spec(modules=[module_row(0, "a", 3, 2)]))


def test_roundtrip_steps_without_snapshots():
    roundtrip(Spec(modules=[module_row(0, "a", 3, 2), module_row(1, "b", 2, 5)], step_batches=[3, 0, 4]))


def test_roundtrip_every_option_on():
    roundtrip(Spec(modules=[module_row(0, "a", 4, 3), module_row(1, "b", 2, 5)], coverage=[
        {"parameter": "a.weight", "shape": "4x3", "recorded": True, "reason": ""},
        {"parameter": "a.bias", "shape": "4", "recorded": False, "reason": "1-D parameter"}],
        config={"recorder": {"snapshots": "log"}, "optimizer": {"lr": 1e-3, "betas": [0.9, 0.99]}},
        sv_capacity=5, grad_sv=True, factors_k=2, delta_dtype="float16", step_batches=[2, 5], n_snapshots=3))


def test_roundtrip_zero_modules():
    roundtrip(Spec(modules=[], step_batches=[2, 1], n_snapshots=2))


def test_roundtrip_sv_capacity_zero():
    roundtrip(Spec(modules=[module_row(0, "a", 3, 2)], sv_capacity=0, step_batches=[1], n_snapshots=1))


def test_sv_is_a_data_variable_of_the_snapshots_view(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, [module_row(0, "a", 3, 2)]) as writer:
        writer.append_snapshot(Snapshot(step=1, energy=[5.0], sv=[np.array([2.0, 1.0])]))
    with open_run(path) as run:
        snapshots = run.snapshots
        assert "sv" in snapshots.data_vars
        assert "sv" in snapshots.mean("snapshot")


def test_delta_skipped_at_a_snapshot_is_not_read_as_zero(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, [module_row(0, "a", 3, 2)], delta_dtype="float32") as writer:
        for step in (1, 2, 3):
            deltas = None if step == 2 else {0: np.full((3, 2), float(step))}
            writer.append_snapshot(Snapshot(step=step, energy=[1.0], sv=[None], deltas=deltas))
    with open_run(path) as run:
        assert not np.any(run.delta(0, 1) == 0)


# -- config -------------------------------------------------------------------------------------------------------
def test_config_values_that_json_lacks_are_stored_as_their_nearest_json(tmp_path):
    import torch

    path = tmp_path / "run.h5"
    config = {"optimizer": {"lr": np.float32(0.5), "betas": (0.9, 0.99), "steps": np.int64(7),
                            "groups": {"a"}, "dtype": torch.bfloat16, "nested": {"flag": np.bool_(True)}}}
    with RunWriter(path, [module_row(0, "a", 2, 2)], config=config):
        pass
    with open_run(path) as run:
        assert run.config == {"optimizer": {"lr": 0.5, "betas": [0.9, 0.99], "steps": 7, "groups": ["a"],
                                            "dtype": "torch.bfloat16", "nested": {"flag": True}}}
    with h5py.File(path, "r") as f:  # stored as plain JSON text, readable without lorascope
        assert json.loads(f[S.GROUP_CONFIG].attrs["optimizer"])["steps"] == 7


# -- argument validation -----------------------------------------------------------------------------------------
MODULES = [module_row(0, "a", 4, 3), module_row(1, "b", 2, 5)]


@pytest.mark.parametrize("kwargs", [
    {"sv_capacity": -1},
    {"factors_k": -1},
    {"delta_dtype": "float64"},
    {"delta_dtype": "bfloat16"},
])
def test_writer_rejects_bad_options(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RunWriter(tmp_path / "run.h5", MODULES, **kwargs)
    assert not (tmp_path / "run.h5").exists()


@pytest.fixture
def writer(tmp_path):
    with RunWriter(tmp_path / "run.h5", MODULES, sv_capacity=3, factors_k=2, delta_dtype="float32") as w:
        yield w


@pytest.mark.parametrize("bad", [
    pytest.param(lambda w: w.append_steps({"loss": [1.0]}), id="steps-without-step"),
    pytest.param(lambda w: w.append_steps({"step": [1, 2], "loss": [1.0, 2.0, 3.0]}), id="row-column-length"),
    pytest.param(lambda w: w.append_steps({"step": [1], "grad_sq_norm": [1.0]}), id="module-column-width"),
    pytest.param(lambda w: w.append_steps({"step": [1, 2], "grad_sq_norm": np.ones((3, 2))}), id="module-rows"),
    pytest.param(lambda w: w.append_snapshot(Snapshot(step=1, energy=[1.0], sv=[None, None])), id="energy-length"),
    pytest.param(lambda w: w.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=[None])), id="sv-entries"),
    pytest.param(lambda w: w.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=[np.ones(4), None])),
                 id="sv-longer-than-capacity"),
    pytest.param(lambda w: w.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=[None, None],
                                                      delta_nonfinite=[1, 2, 3])), id="delta-nonfinite-length"),
    pytest.param(lambda w: w.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=[None, None],
                                                      grad_sv=[None, None])), id="grad-sv-not-enabled"),
    pytest.param(lambda w: w.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=[None, None],
                                                      factors={0: (np.ones((4, 3)), np.ones((3, 3)))})),
                 id="factors-k"),
    pytest.param(lambda w: w.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=[None, None],
                                                      factors={0: (np.ones((3, 1)), np.ones((3, 1)))})),
                 id="factor-rows"),
    pytest.param(lambda w: w.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=[None, None],
                                                      factors={1: (np.ones((2, 1)), np.ones(5))})), id="factor-ndim"),
    pytest.param(lambda w: w.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=[None, None],
                                                      deltas={0: np.ones((3, 4))})), id="delta-transposed"),
])
def test_writer_rejects_bad_rows_and_keeps_the_file_readable(writer, bad):
    writer.append_steps({"step": [1], "loss": [0.5]})
    writer.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=[np.ones(3), None]))
    with pytest.raises(ValueError):
        bad(writer)
    # A rejected row leaves nothing behind: the next good row takes its place.
    writer.append_steps({"step": [2], "loss": [0.25]})
    writer.append_snapshot(Snapshot(step=2, energy=[3.0, 4.0], sv=[None, np.ones(2)]))
    writer.close()
    with open_run(writer.path) as run:
        assert run.complete
        np.testing.assert_array_equal(run.steps["loss"].values, [0.5, 0.25])
        np.testing.assert_array_equal(run.snapshots["energy"].values, [[1.0, 2.0], [3.0, 4.0]])
        np.testing.assert_array_equal(run.snapshots["sv_count"].values, [[3, 0], [0, 2]])


def test_grad_sv_may_be_an_array_like_sv(tmp_path):
    with RunWriter(tmp_path / "run.h5", MODULES, sv_capacity=2, grad_sv=True) as w:
        w.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=np.ones((2, 2)), grad_sv=np.ones((2, 2))))
    with open_run(tmp_path / "run.h5") as run:
        np.testing.assert_array_equal(run.snapshots["grad_sv_count"].values, [[2, 2]])


def test_grad_sv_with_the_wrong_number_of_modules_is_rejected(tmp_path):
    with RunWriter(tmp_path / "run.h5", MODULES, grad_sv=True) as w:
        with pytest.raises(ValueError, match="grad_sv"):
            w.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=[None, None], grad_sv=[np.ones(2)]))


def test_payloads_need_their_option(tmp_path):
    with RunWriter(tmp_path / "run.h5", MODULES) as w:
        with pytest.raises(ValueError, match="factors_k"):
            w.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=[None, None],
                                       factors={0: (np.ones((4, 1)), np.ones((3, 1)))}))
        with pytest.raises(ValueError, match="delta_dtype"):
            w.append_snapshot(Snapshot(step=1, energy=[1.0, 2.0], sv=[None, None], deltas={0: np.ones((4, 3))}))


def test_append_snapshot_refuses_anything_but_a_snapshot(writer):
    with pytest.raises(TypeError, match="takes a lorascope.store.payloads.Snapshot. Got dict instead"):
        writer.append_snapshot({"step": 1, "energy": [1.0, 2.0], "sv": [None, None]})
    with pytest.raises(TypeError):
        writer.append_snapshot(step=1, energy=[1.0, 2.0], sv=[None, None])
    assert writer._n_snapshots == 0


def test_writer_must_be_open_to_append(tmp_path):
    w = RunWriter(tmp_path / "run.h5", MODULES)
    with pytest.raises(RuntimeError, match="open"):
        w.append_steps({"step": [1]})
    assert not w.is_open
    with pytest.raises(ValueError, match="status"):
        w.open().close("done")
    w.close()


# -- check_writable ---------------------------------------------------------------------------------------------
def test_check_writable_refuses_an_existing_file(tmp_path):
    path = tmp_path / "run.h5"
    path.write_bytes(b"precious")
    with pytest.raises(RunFileExistsError, match="overwrite=True") as info:
        check_writable(path)
    assert str(path) in str(info.value)
    with pytest.raises(RunFileExistsError):
        RunWriter(path, MODULES)
    assert path.read_bytes() == b"precious"
    assert check_writable(path, overwrite=True) == path


def test_check_writable_refuses_a_directory(tmp_path):
    with pytest.raises(LorascopeError, match="directory") as info:
        check_writable(tmp_path, overwrite=True)
    assert not isinstance(info.value, RunFileExistsError)


def test_check_writable_refuses_a_missing_folder(tmp_path):
    path = tmp_path / "missing" / "run.h5"
    with pytest.raises(LorascopeError, match="does not exist") as info:
        check_writable(path)
    assert str(path.parent) in str(info.value)


def _unwritable_folder(tmp_path: Path) -> Path | None:
    """A folder this process cannot write into: a read-only temporary folder, or for root (who writes there
    anyway) a /proc/<pid> folder, which even root cannot create files in."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    proc = Path(f"/proc/{os.getpid()}")
    return proc if proc.is_dir() and not os.access(proc, os.W_OK) else None


def test_check_writable_refuses_an_unwritable_folder(tmp_path):
    folder = _unwritable_folder(tmp_path)
    if folder is None:
        pytest.skip("no folder here is unwritable for this user (root without /proc)")
    with pytest.raises(LorascopeError, match="not writable"):
        check_writable(folder / "run.h5")


# -- status ---------------------------------------------------------------------------------------------------
def test_status_complete_after_close(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, MODULES).open()
    with open_run(path) as run:
        assert run.status == S.STATUS_RECORDING and not run.complete
        assert S.ATTR_FINISHED not in run.attrs
    writer.close()
    writer.close()  # closing twice is harmless
    with open_run(path) as run:
        assert run.status == S.STATUS_COMPLETE and run.complete
        assert S.ATTR_FINISHED in run.attrs


def test_status_failed_after_an_exception_in_with(tmp_path):
    path = tmp_path / "run.h5"
    with pytest.raises(KeyError, match="boom"):
        with RunWriter(path, MODULES) as writer:
            writer.append_steps({"step": [1, 2], "loss": [1.0, 0.5]})
            raise KeyError("boom")
    with open_run(path) as run:
        assert run.status == S.STATUS_FAILED and not run.complete
        assert run.n_steps == 2  # rows written before the failure are kept
        np.testing.assert_array_equal(run.steps["loss"].values, [1.0, 0.5])


def test_status_recording_after_abandon(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, MODULES).open()
    writer.append_steps({"step": [1]})
    writer.abandon()
    assert not writer.is_open
    with open_run(path) as run:
        assert run.status == S.STATUS_RECORDING and not run.complete
        assert S.ATTR_FINISHED not in run.attrs
        assert run.n_steps == 1


# -- the committed real recording ---------------------------------------------------------------------------------
TINY_RUN = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_run.h5"


@pytest.mark.skipif(not TINY_RUN.is_file(), reason="fixtures/tiny_run.h5 not generated (fixtures/make_fixtures.py)")
def test_committed_tiny_run_is_a_consistent_complete_recording():
    assert TINY_RUN.stat().st_size < 200_000
    with open_run(TINY_RUN) as run:
        assert run.complete and run.grad_sv
        np.testing.assert_array_equal(run.step_index, np.arange(1, 41))
        steps, snapshots = run.steps, run.snapshots
        assert np.isfinite(steps["loss"].values).all() and steps["loss"].values[-5:].mean() < steps["loss"][:5].mean()
        assert (steps["grad_sq_norm"].values > 0).all()
        np.testing.assert_array_equal(snapshots["step"].values, [1, 2, 4, 8, 16, 32, 40])
        rank = np.minimum(run.modules["out_features"], run.modules["in_features"]).to_numpy()
        np.testing.assert_array_equal(snapshots["sv_count"].values, np.broadcast_to(rank, (7, len(rank))))
        sv = snapshots["sv"].values.astype(np.float64)
        # full spectra: sum of s_i^2 is the exact energy, singular values descend
        np.testing.assert_allclose(np.nansum(sv**2, axis=-1), snapshots["energy"].values, rtol=1e-4)
        assert (np.diff(np.nan_to_num(sv, nan=0.0), axis=-1) <= 0).all()
        assert (np.diff(snapshots["energy"].values, axis=0) > 0).mean() > 0.9  # the update grows with training
