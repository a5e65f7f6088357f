"""Reader of run files: validation with one clear error per problem, and xarray views of the tables."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import xarray as xr

from lorascope import _display
from lorascope.errors import (
    CorruptRunFileError,
    NotARunFileError,
    RunFileError,
    RunFileNotFoundError,
)
from lorascope.store import schema as S
from lorascope.store.validate import (
    check_all_values,
    check_config_section,
    check_file,
    check_header,
    check_values,
)

__all__ = ["Run", "open_run"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SWMR_WRITE_FLAG = 0x04  # superblock v3 "file consistency flags": bit 2 = opened for SWMR writing


def _has_swmr_writer(path: Path) -> bool:
    """Whether the superblock says a SWMR writer has the file open (or was killed with it open)."""
    with open(path, "rb") as f:
        head = f.read(12)
    return len(head) == 12 and head[:8] == _SIGNATURE and head[8] >= 3 and bool(head[11] & _SWMR_WRITE_FLAG)


def _open_hdf5(path: Path) -> h5py.File:
    if not path.exists():
        raise RunFileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise RunFileNotFoundError(f"{path}: is a directory, expected a run file (.h5)")
    size = path.stat().st_size
    if size == 0:
        raise NotARunFileError(f"{path}: empty file (0 bytes), not a run file")
    if not h5py.is_hdf5(path):
        raise NotARunFileError(f"{path}: not an HDF5 file, so not a lorascope run file")
    # SWMR read follows a file a writer still appends to (or left open when killed). Only then: in SWMR mode
    # HDF5 skips its end-of-file check, and a truncated file can hang it in retries instead of failing.
    swmr = _has_swmr_writer(path)
    try:  # without file locking, like the writer (see lorascope.store.writer)
        return h5py.File(path, "r", libver="latest", swmr=swmr, locking=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise NotARunFileError(f"{path}: HDF5 file cannot be opened (truncated or damaged?): "
                               f"{_first_line(exc)}") from None


def _decode(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _row_or_fill(ds: h5py.Dataset, row: int) -> np.ndarray:
    """Row ``row`` of a per-module dataset, which grows only at the snapshots that stored it: NaN past its end."""
    if row < ds.shape[0]:
        return ds[row]
    return np.full(ds.shape[1:], np.nan, dtype=ds.dtype)


class Run:
    """A recorded run, opened read-only.

    Use as a context manager, or call :meth:`close`. Views are read when accessed; :meth:`refresh` picks up
    rows a live writer appended since.

    Attributes
    ----------
    path : pathlib.Path
    attrs : dict
        Root attributes (format, schema_version, versions, framework, created, status, finished).
    modules : pandas.DataFrame
        One row per recorded matrix (name, module, parameter, kind, role, layer, expert, out/in features, ...).
    coverage : pandas.DataFrame
        One row per model parameter: whether it is recorded and why (not).
    config : dict
        Named configuration sections, parsed from JSON.
    flags : tuple of str
        What the validation on open kept but flags (repeated step numbers, energy not measured, rows a killed
        writer left uncommitted); see :mod:`lorascope.store.validate` for what is refused instead.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._load()

    def _load(self) -> None:
        self._file = _open_hdf5(self.path)
        try:
            self._read()
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as exc:
            self._file.close()
            if isinstance(exc, RunFileError):
                raise
            raise self._fail(f"damaged content ({type(exc).__name__}: {_first_line(exc)})") from None
        except BaseException:
            self._file.close()
            raise

    def _read(self) -> None:
        if self._file.swmr_mode:
            self._refresh_datasets()
        check_header(self._file.attrs, self.path)
        self.attrs = {k: _decode(v) for k, v in self._file.attrs.items()}
        self.flags, self._committed = check_file(self._file, self.path, complete=self.complete)
        self.modules = self._static_table(S.GROUP_MODULES, S.MODULE_COLUMNS)
        self.coverage = self._static_table(S.GROUP_COVERAGE, S.COVERAGE_COLUMNS)
        self.config = self._read_config()
        snaps = self._file[S.GROUP_SNAPSHOTS]
        self.grad_sv = "grad_sv" in snaps
        # Validated on open: a positive intruder_k comes with its two columns.
        self._intruder_k = int(snaps.attrs.get(S.ATTR_INTRUDER_K, 0))

    # -- metadata --------------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return str(self.attrs.get(S.ATTR_STATUS, S.STATUS_RECORDING))

    @property
    def complete(self) -> bool:
        """True only when the writer closed the file normally."""
        return self.status == S.STATUS_COMPLETE

    @property
    def schema_version(self) -> int:
        return int(self.attrs[S.ATTR_SCHEMA_VERSION])

    @property
    def intruder_k(self) -> int:
        """Length of the ``intruder`` axis of :attr:`snapshots` (its ``intruder_cos`` and ``weight_sv``): the number
        of top singular vectors of each weight compared with the starting weight's; 0 when the run did not record
        them (``intruder_k=0``, or a file written before they existed)."""
        return self._intruder_k

    @property
    def n_steps(self) -> int:
        return self._rows(S.GROUP_STEPS)

    @property
    def n_snapshots(self) -> int:
        return self._rows(S.GROUP_SNAPSHOTS)

    @property
    def step_index(self) -> np.ndarray:
        """Optimizer step of each committed step row, without reading the rest of the table."""
        return self._dataset(f"{S.GROUP_STEPS}/{S.INDEX}")[: self.n_steps]

    @property
    def snapshot_index(self) -> np.ndarray:
        """Optimizer step of each committed snapshot."""
        return self._dataset(f"{S.GROUP_SNAPSHOTS}/{S.INDEX}")[: self.n_snapshots]

    @property
    def file_size_bytes(self) -> int:
        return self.path.stat().st_size

    # -- views -----------------------------------------------------------------------------------------
    @property
    def steps(self) -> xr.Dataset:
        """Per-step table: dims ``step`` and ``module``; coords examples_seen, tokens_seen, kind, layer, expert."""
        return self._table(S.GROUP_STEPS, S.columns_of(S.GROUP_STEPS), row_dim="step")

    @property
    def snapshots(self) -> xr.Dataset:
        """Per-snapshot table: dims ``snapshot``, ``module`` and ``sv_index`` (and ``intruder`` when
        :attr:`intruder_k` > 0); coords step, examples/tokens seen."""
        columns = S.columns_of(S.GROUP_SNAPSHOTS, grad_sv=self.grad_sv, intruder=self.intruder_k > 0)
        return self._table(S.GROUP_SNAPSHOTS, columns, row_dim="snapshot")

    def factors(self, module: int | str, snapshot: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Top-k singular vectors (U (out, k), V (in, k)) of a module's update at a snapshot, or None when the
        run stored none. Columns past the vectors actually stored are NaN."""
        return self._factors(S.GROUP_FACTORS, module, snapshot)

    def grad_factors(self, module: int | str, snapshot: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Top-k singular vectors (U (out, k), V (in, k)) of a module's gradient at a snapshot step, or None when
        the run stored none (recorded with ``grad_sv=True`` and ``factors_k > 0``). NaN where not stored (a matrix
        without a gradient at that step, columns past the vectors stored)."""
        return self._factors(S.GROUP_GRAD_FACTORS, module, snapshot)

    def _factors(self, name: str, module: int | str, snapshot: int) -> tuple[np.ndarray, np.ndarray] | None:
        group = self._file.get(name)
        if group is None:
            return None
        key = S.module_key(self._module_index(module))
        row = self._snapshot_row(snapshot)
        return _row_or_fill(group[S.FACTOR_U][key], row), _row_or_fill(group[S.FACTOR_V][key], row)

    def delta(self, module: int | str, snapshot: int) -> np.ndarray | None:
        """The full update (out, in) of a module at a snapshot, or None when deltas were not stored (NaN where
        that module's update was not stored at that snapshot)."""
        group = self._file.get(S.GROUP_DELTAS)
        if group is None:
            return None
        return _row_or_fill(group[S.module_key(self._module_index(module))], self._snapshot_row(snapshot))

    def _snapshot_row(self, snapshot: int) -> int:
        n = self.n_snapshots
        if not -n <= snapshot < n:
            raise IndexError(f"{self.path}: snapshot {snapshot} out of range; the run has {n} snapshot(s)")
        return snapshot % n

    def check_values(self) -> None:
        """Check the values of every committed row of both tables, block by block (``lorascope info``; the views
        check the arrays they read): singular values and squared norms are never negative.

        Raises
        ------
        CorruptRunFileError
            Naming the column and the rule.
        """
        check_all_values(self._file, {S.GROUP_STEPS: self.n_steps, S.GROUP_SNAPSHOTS: self.n_snapshots},
                         self.path)

    def refresh(self) -> None:
        """Re-open the file to see the rows and the status a live writer has written since."""
        self._file.close()
        self._load()

    def _refresh_datasets(self) -> None:
        # In SWMR mode dataset extents are cached: refresh each table's index first, then its columns, which the
        # writer extends before the index, so no column can look shorter than the index.
        for group in (S.GROUP_STEPS, S.GROUP_SNAPSHOTS):
            table = self._file.get(group)
            if not isinstance(table, h5py.Group):
                continue
            if isinstance(table.get(S.INDEX), h5py.Dataset):
                table[S.INDEX].refresh()
            table.visititems(lambda name, obj: obj.refresh() if isinstance(obj, h5py.Dataset) and name != S.INDEX
                             else None)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _repr_html_(self) -> str | None:  # Jupyter; rendered by lorascope.report.notebook via lorascope._display
        from lorascope.store.info import run_summary  # info reads through this module

        return _display.html("run", run_summary(self)) if self._file else None

    def __repr__(self) -> str:
        if not self._file:
            return f"Run({str(self.path)!r}, closed)"
        return (f"Run({str(self.path)!r}, status={self.status!r}, modules={len(self.modules)}, "
                f"steps={self.n_steps}, snapshots={self.n_snapshots})")

    # -- internals -------------------------------------------------------------------------------------
    def _fail(self, message: str) -> CorruptRunFileError:
        return CorruptRunFileError(f"{self.path}: {message}")

    def _dataset(self, path: str) -> h5py.Dataset:
        ds = self._file.get(path)
        if not isinstance(ds, h5py.Dataset):
            raise self._fail(f"required dataset '{path}' is missing")
        return ds

    def _static_table(self, group: str, columns: tuple[S.Column, ...]) -> pd.DataFrame:
        data = {}
        for column in columns:
            ds = self._dataset(f"{group}/{column.name}")
            values = ds.asstr()[()] if column.dtype == "str" else ds[()]
            data[column.name] = np.asarray(values, dtype=object if column.dtype == "str" else column.numpy_dtype)
        return pd.DataFrame(data)  # dtypes, shapes and lengths checked on open (lorascope.store.validate)

    def _read_config(self) -> dict[str, Any]:
        group = self._file.get(S.GROUP_CONFIG)
        if group is None:
            raise self._fail(f"required group '{S.GROUP_CONFIG}' is missing")
        config = {}
        for key, value in group.attrs.items():
            try:
                config[key] = json.loads(_decode(value))
            except (TypeError, ValueError):
                raise self._fail(f"config section '{key}' is not valid JSON") from None
            check_config_section(key, config[key], self.path)
        return config

    def _rows(self, group: str) -> int:
        return self._committed[group]

    def _module_index(self, module: int | str) -> int:
        if isinstance(module, str):
            matches = np.flatnonzero(self.modules["name"].to_numpy() == module)
            if not len(matches):
                raise KeyError(f"{self.path}: no recorded module named {module!r}")
            return int(matches[0])
        return int(module)

    def _table(self, group: str, columns: tuple[S.Column, ...], row_dim: str) -> xr.Dataset:
        n = self._rows(group)
        n_mod = len(self.modules)
        raw = {c.name: self._dataset(f"{group}/{c.name}")[:n] if c.required or f"{group}/{c.name}" in self._file
               else np.full((n,) if c.layout == S.ROW else (n, n_mod), c.fill, dtype=c.numpy_dtype)
               for c in columns}  # an optional column absent
        check_values(group, raw, self.path)
        dims = {S.ROW: (row_dim,), S.ROW_MODULE: (row_dim, "module"), S.ROW_MODULE_SV: (row_dim, "module", "sv_index"),
                S.ROW_MODULE_INTRUDER: (row_dim, "module", "intruder")}
        index = S.INDEX if row_dim == "step" else "step"
        coords: dict[str, Any] = {
            index: ((row_dim,), raw[S.INDEX]),
            "examples_seen": ((row_dim,), raw["examples_seen"]),
            "tokens_seen": ((row_dim,), raw["tokens_seen"]),
            "module": self.modules["name"].to_numpy(dtype=str),
        }
        for name in ("kind", "role", "layer", "expert", "out_features", "in_features"):
            coords[name] = (("module",), self.modules[name].to_numpy())
        data_vars = {
            c.name: (dims[c.layout], raw[c.name], {"units": c.unit, "description": c.description})
            for c in columns
            if c.name not in (S.INDEX, "examples_seen", "tokens_seen")
        }
        ds = xr.Dataset(data_vars, coords=coords)
        ds.attrs.update({"path": str(self.path), "status": self.status})
        return ds


def open_run(path: str | os.PathLike[str]) -> Run:
    """Open a lorascope run file for reading.

    Parameters
    ----------
    path
        An HDF5 run file written by lorascope, complete, still being written, or left by a killed run.

    Returns
    -------
    Run
        Validated handle with ``steps`` / ``snapshots`` xarray views; use it as a context manager.

    Raises
    ------
    RunFileNotFoundError
        The path does not exist or is a directory.
    NotARunFileError
        Empty, not HDF5, damaged, or HDF5 without the lorascope format marker.
    SchemaVersionError
        Written by a newer lorascope.
    CorruptRunFileError
        A required group, dataset or attribute is missing, or one breaks a rule of the schema (its type, dtype,
        shape, length, or an invariant such as a step index that decreases): the message names it and the rule.
        What is refused, repaired or only flagged (:attr:`Run.flags`): :mod:`lorascope.store.validate`.
    """
    return Run(path)
