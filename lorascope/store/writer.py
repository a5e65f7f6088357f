"""Append-only writer of run files (HDF5, single writer / multiple readers).

Every dataset is created when the file opens, then the file switches to SWMR mode: from then on rows are
appended in place and flushed, so a reader can follow the file while training runs and a killed writer
leaves every flushed row readable. The final status is stamped after the SWMR session closes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lorascope._version import __version__
from lorascope.errors import LorascopeError, RunFileExistsError
from lorascope.store import schema as S
from lorascope.store.payloads import Snapshot

_STR = h5py.string_dtype("utf-8")
# Every open of a run file, by the writer and by readers, goes without HDF5 file locking: a reader holding the
# file (lorascope analyze during training) must never make the writer's final status stamp fail, opens in one
# process must agree on the locking flag, and there is only ever one writer by design.
_COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


def check_writable(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Fail now, not after hours of training, if ``path`` cannot become a run file.

    Raises
    ------
    RunFileExistsError
        The file exists and ``overwrite`` is false.
    LorascopeError
        The path is a directory, or its folder is missing or not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise LorascopeError(f"{path}: is a directory; give a file path such as {path / 'run.h5'}")
    if path.exists() and not overwrite:
        raise RunFileExistsError(f"{path}: file exists; pass overwrite=True to replace it or choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LorascopeError(f"{path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise LorascopeError(f"{path}: not writable (permission denied); choose a writable location")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)  # dtypes, devices, enums: their text is what a reader needs


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _column_values(rows: Iterable[Any], column: S.Column) -> np.ndarray:
    values = []
    for row in rows:
        value = row.get(column.name, column.fill) if isinstance(row, Mapping) else getattr(row, column.name)
        values.append(value)
    if column.dtype == "str":
        return np.array([str(v) for v in values], dtype=object)
    return np.asarray(values, dtype=column.numpy_dtype)


class RunWriter:
    """Create a run file and append steps and snapshots to it.

    Parameters
    ----------
    path
        Target file. Checked at construction; created by :meth:`open`.
    modules
        One record per recorded matrix, with the attributes (or mapping keys) of
        :data:`lorascope.store.schema.MODULE_COLUMNS` (a :class:`lorascope.model.taxonomy.MatrixRef` works).
    coverage
        One record per model parameter with ``parameter``, ``shape``, ``recorded``, ``reason``.
    config
        Named JSON-serialisable sections (recorder options, optimizer, trainer, lora, ...).
    framework, framework_version
        What drove training ("plain", "transformers", "lightning") and its version.
    sv_capacity
        Length of the singular-value axis; defaults to the largest ``min(out, in)``.
    grad_sv
        Also store the gradient's singular values at snapshot steps.
    factors_k
        Store the top ``factors_k`` singular vectors of each update (0: none); with ``grad_sv``, also the
        gradient's (``snapshots/grad_factors``).
    delta_dtype
        Store the full update of each module at each snapshot in this dtype ("float16" or "float32").
    intruder_k
        Store the intruder columns (``intruder_cos``, ``weight_sv``) for the top ``intruder_k`` singular vectors of
        each weight (0: none).
    overwrite
        Replace an existing file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        modules: Sequence[Any],
        *,
        coverage: Sequence[Any] = (),
        config: Mapping[str, Any] | None = None,
        framework: str = "plain",
        framework_version: str = "",
        sv_capacity: int | None = None,
        grad_sv: bool = False,
        factors_k: int = 0,
        delta_dtype: str | None = None,
        intruder_k: int = 0,
        overwrite: bool = False,
    ) -> None:
        self.path = check_writable(path, overwrite=overwrite)
        self._modules = list(modules)
        self._coverage = list(coverage)
        self._config = dict(config or {})
        if any(not isinstance(key, str) or not key for key in self._config):
            raise ValueError(f"config section names must be non-empty strings. Got {sorted(map(repr, self._config))}.")
        self._framework = framework
        self._framework_version = framework_version
        shapes = [(int(_get(m, "out_features")), int(_get(m, "in_features"))) for m in self._modules]
        self._shapes = shapes
        default_capacity = max((min(s) for s in shapes), default=0)
        self.sv_capacity = default_capacity if sv_capacity is None else int(sv_capacity)
        if self.sv_capacity < 0:
            raise ValueError(f"sv_capacity must be >= 0. Got {sv_capacity} instead.")
        if factors_k < 0:
            raise ValueError(f"factors_k must be >= 0. Got {factors_k} instead.")
        if intruder_k < 0:
            raise ValueError(f"intruder_k must be >= 0. Got {intruder_k} instead.")
        if delta_dtype is not None and delta_dtype not in S.DELTA_DTYPES:
            raise ValueError(f"delta_dtype must be one of {S.DELTA_DTYPES} or None. Got {delta_dtype!r} instead.")
        self.grad_sv = bool(grad_sv)
        self.factors_k = int(factors_k)
        self.intruder_k = int(intruder_k)
        self.delta_dtype = delta_dtype
        self._file: h5py.File | None = None
        self._n_steps = 0
        self._n_snapshots = 0
        self._n_missing = 0

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def n_modules(self) -> int:
        return len(self._modules)

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def open(self) -> RunWriter:
        """Create the file, every group and dataset, and enter SWMR mode."""
        import torch

        if self._file is not None:
            return self
        f = h5py.File(self.path, "w", libver="latest", locking=False)
        try:
            f.attrs[S.ATTR_FORMAT] = S.FORMAT_NAME
            f.attrs[S.ATTR_SCHEMA_VERSION] = np.int64(S.SCHEMA_VERSION)
            f.attrs[S.ATTR_LORASCOPE_VERSION] = __version__
            f.attrs[S.ATTR_TORCH_VERSION] = str(torch.__version__)
            f.attrs[S.ATTR_FRAMEWORK] = self._framework
            f.attrs[S.ATTR_FRAMEWORK_VERSION] = self._framework_version
            f.attrs[S.ATTR_CREATED] = _now()
            f.attrs[S.ATTR_STATUS] = S.STATUS_RECORDING
            self._write_static(f, S.GROUP_MODULES, S.MODULE_COLUMNS, self._modules)
            self._write_static(f, S.GROUP_COVERAGE, S.COVERAGE_COLUMNS, self._coverage)
            config = f.create_group(S.GROUP_CONFIG)
            for key, section in self._config.items():
                config.attrs[key] = json.dumps(section, default=_json_default, sort_keys=True)
            self._create_table(f, S.GROUP_STEPS, S.columns_of(S.GROUP_STEPS), rows_per_chunk=512)
            snaps = self._create_table(f, S.GROUP_SNAPSHOTS, self._snapshot_columns(), rows_per_chunk=1)
            snaps.attrs[S.ATTR_SV_CAPACITY] = np.int64(self.sv_capacity)
            snaps.attrs[S.ATTR_FACTORS_K] = np.int64(self.factors_k)
            snaps.attrs[S.ATTR_DELTA_DTYPE] = self.delta_dtype or ""
            snaps.attrs[S.ATTR_INTRUDER_K] = np.int64(self.intruder_k)
            self._create_per_module(f)
            self._create_table(f, S.GROUP_MISSING, S.MISSING_COLUMNS, rows_per_chunk=16)
            self._n_missing = 0
            f.swmr_mode = True
        except BaseException:
            f.close()
            raise
        self._file = f
        return self

    def reopen(self, after_step: int) -> tuple[int, int]:
        """Continue an existing run file (a run resumed from the checkpoint at ``after_step``).

        Rows recorded after ``after_step`` are dropped, because the resumed run records them again; the file
        goes back to status ``recording``. The modules table must match. Returns the ``(examples_seen,
        tokens_seen)`` totals of the last kept step, for the running counters.
        """
        if self._file is not None:
            raise RuntimeError(f"{self.path}: the run writer is already open")
        f = _open_for_append(self.path)
        try:
            stored = [str(s) for s in f[S.GROUP_MODULES]["name"].asstr()[()]]
            names = [str(_get(m, "name")) for m in self._modules]
            if stored != names:
                raise LorascopeError(f"{self.path}: cannot continue this run file: it records {len(stored)} other "
                                     f"matrices than the {len(names)} selected now")
            snaps = f[S.GROUP_SNAPSHOTS]
            self.sv_capacity = int(snaps.attrs[S.ATTR_SV_CAPACITY])
            self.factors_k = int(snaps.attrs[S.ATTR_FACTORS_K])
            self.delta_dtype = str(snaps.attrs[S.ATTR_DELTA_DTYPE]) or None
            self.grad_sv = "grad_sv" in snaps
            self.intruder_k = int(snaps.attrs.get(S.ATTR_INTRUDER_K, 0))
            self._n_steps = _truncate_after(f[S.GROUP_STEPS], after_step)
            self._n_snapshots = _truncate_after(snaps, after_step)
            if S.GROUP_MISSING in f:
                self._n_missing = _keep_missing_until(f[S.GROUP_MISSING], after_step)
            else:  # a file written before the table existed
                self._create_table(f, S.GROUP_MISSING, S.MISSING_COLUMNS, rows_per_chunk=16)
                self._n_missing = 0
            totals = (-1, -1)
            if self._n_steps:
                last = self._n_steps - 1
                totals = (int(f[S.GROUP_STEPS]["examples_seen"][last]), int(f[S.GROUP_STEPS]["tokens_seen"][last]))
            elif after_step == 0:
                totals = (0, 0)
            f.attrs[S.ATTR_STATUS] = S.STATUS_RECORDING
            if S.ATTR_FINISHED in f.attrs:
                del f.attrs[S.ATTR_FINISHED]
            f.swmr_mode = True
        except BaseException:
            f.close()
            raise
        self._file = f
        return totals

    def close(self, status: str | None = S.STATUS_COMPLETE, *, config: Mapping[str, Any] | None = None) -> None:
        """Flush, close, and stamp the final status (``complete`` or ``failed``); ``None`` leaves the file
        marked ``recording`` (incomplete), as when the writer cannot tell whether the run finished.

        ``config``: more JSON sections for the config group, known only at the end (the recording's own cost)."""
        if status is not None and status not in S.STATUSES:
            raise ValueError(f"status must be one of {S.STATUSES}. Got {status!r} instead.")
        if self._file is None:
            return
        try:
            self._file.flush()
        finally:
            self._file.close()
            self._file = None
        if status is None:
            return
        # Attributes are stamped outside the SWMR session, where attribute writes are safe.
        with h5py.File(self.path, "r+", libver="latest", locking=False) as f:
            for key, section in (config or {}).items():
                f[S.GROUP_CONFIG].attrs[key] = json.dumps(section, default=_json_default, sort_keys=True)
            f.attrs[S.ATTR_STATUS] = status
            f.attrs[S.ATTR_FINISHED] = _now()

    def abandon(self) -> None:
        """Close without stamping a status: the file stays marked incomplete (``recording``)."""
        self.close(None)

    def __enter__(self) -> RunWriter:
        return self.open()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(S.STATUS_COMPLETE if exc_type is None else S.STATUS_FAILED)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    # -- appending -------------------------------------------------------------------------------------
    def append_steps(self, rows: Mapping[str, Any]) -> None:
        """Append a batch of step rows given as columns (``rows["step"]`` has the batch length).

        Missing columns take their fill value ("unknown"); per-module columns have shape (n, n_modules).
        """
        f = self._require_open()
        if S.INDEX not in rows:
            raise ValueError("append_steps needs the 'step' column")
        n = int(np.asarray(rows[S.INDEX]).reshape(-1).shape[0])
        group = f[S.GROUP_STEPS]
        columns = S.columns_of(S.GROUP_STEPS)
        values = {c.name: self._shaped(c, rows.get(c.name, c.fill), n) for c in columns}
        self._append(group, columns, values, self._n_steps, n)
        self._n_steps += n

    def append_snapshot(self, snapshot: Snapshot, /) -> None:
        """Append one snapshot.

        Parameters
        ----------
        snapshot
            The row and its per-module payloads: ``sv[i]`` holds the descending singular values of module ``i``
            (``None`` when not computed); ``factors[i] = (U, V)`` with U (out, k'), V (in, k'),
            k' <= factors_k; ``deltas[i]`` is (out, in).
        """
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"append_snapshot takes a lorascope.store.payloads.Snapshot. "
                            f"Got {type(snapshot).__name__} instead.")
        f = self._require_open()
        n_mod = self.n_modules
        sv, grad_sv = snapshot.sv, snapshot.grad_sv
        if len(sv) != n_mod:
            raise ValueError(f"sv must have one entry per module ({n_mod}). Got {len(sv)} instead.")
        values: dict[str, np.ndarray] = {
            S.INDEX: np.array([snapshot.step], dtype=np.int64),
            "examples_seen": np.array([snapshot.examples_seen], dtype=np.int64),
            "tokens_seen": np.array([snapshot.tokens_seen], dtype=np.int64),
            "energy": self._shaped(_col("energy"), snapshot.energy, 1),
            "delta_nonfinite": self._shaped(_col("delta_nonfinite"), 0 if snapshot.delta_nonfinite is None
                                            else snapshot.delta_nonfinite, 1),
        }
        values["sv"], values["sv_count"] = self._pad_spectra(sv)
        for name in ("held_loss", "held_loss_start", "held_loss_without_kind", "held_loss_without_layer"):
            value = getattr(snapshot, name)
            values[name] = self._shaped(_col(name), np.nan if value is None else value, 1)
        if self.grad_sv:
            if grad_sv is None:
                grad_sv = [None] * n_mod
            if len(grad_sv) != n_mod:
                raise ValueError(f"grad_sv must have one entry per module ({n_mod}). Got {len(grad_sv)} instead.")
            values["grad_sv"], values["grad_sv_count"] = self._pad_spectra(grad_sv)
        elif grad_sv is not None:
            raise ValueError("grad_sv given but the file was opened without grad_sv=True")
        self._intruder_values(snapshot, values)
        row = self._n_snapshots
        # Per-module payloads go first, the table (index last) after: a reader never sees a row without them.
        if snapshot.factors:
            self._append_factors(f, S.GROUP_FACTORS, snapshot.factors, row)
        if snapshot.grad_factors:
            if not (self.grad_sv and self.factors_k):
                raise ValueError("grad_factors given but the file was opened without grad_sv=True and factors_k > 0")
            if S.GROUP_GRAD_FACTORS in f:  # absent: a file written before it existed, continued by a resumed run
                self._append_factors(f, S.GROUP_GRAD_FACTORS, snapshot.grad_factors, row)
        if snapshot.deltas:
            self._append_deltas(f, snapshot.deltas, row)
        self._append(f[S.GROUP_SNAPSHOTS], self._snapshot_columns(), values, row, 1)
        self._n_snapshots += 1

    def append_missing(self, step: int, reason: str) -> None:
        """Append one row to ``snapshots_missing``: the snapshot of optimizer ``step`` is missing or incomplete,
        and why (ASCII, cut to the column's width)."""
        f = self._require_open()
        text = reason.encode("ascii", "replace")[: S.MISSING_REASON_BYTES]
        values = {S.INDEX: np.array([step], dtype=np.int64),
                  "reason": np.array([text], dtype=S.MISSING_COLUMNS[1].numpy_dtype)}
        self._append(f[S.GROUP_MISSING], S.MISSING_COLUMNS, values, self._n_missing, 1)
        self._n_missing += 1

    # -- internals -------------------------------------------------------------------------------------
    def _require_open(self) -> h5py.File:
        if self._file is None:
            raise RuntimeError(f"{self.path}: the run writer is not open; call open() first")
        return self._file

    def _shaped(self, column: S.Column, value: Any, n: int) -> np.ndarray:
        shape: tuple[int, ...] = (n,) if column.layout == S.ROW else (n, self.n_modules)
        arr = np.asarray(value, dtype=column.numpy_dtype)
        if arr.ndim == 0:
            return np.full(shape, arr, dtype=column.numpy_dtype)
        if arr.size != int(np.prod(shape)):
            raise ValueError(f"column {column.name!r} must have shape {shape}. Got {arr.shape} instead.")
        return arr.reshape(shape)

    def _snapshot_columns(self) -> tuple[S.Column, ...]:
        return S.columns_of(S.GROUP_SNAPSHOTS, grad_sv=self.grad_sv, intruder=self.intruder_k > 0)

    def _pad_spectra(self, spectra: Sequence[np.ndarray | None], capacity: int | None = None,
                     what: str = "singular values") -> tuple[np.ndarray, np.ndarray]:
        capacity = self.sv_capacity if capacity is None else capacity
        padded = np.full((1, self.n_modules, capacity), np.nan, dtype=np.float32)
        counts = np.zeros((1, self.n_modules), dtype=np.int32)
        for i, s in enumerate(spectra):
            if s is None:
                continue
            s = np.asarray(s, dtype=np.float32).reshape(-1)
            if s.shape[0] > capacity:
                raise ValueError(f"module {i}: {s.shape[0]} {what} exceed its capacity {capacity}")
            padded[0, i, : s.shape[0]] = s
            counts[0, i] = s.shape[0]
        return padded, counts

    def _intruder_values(self, snapshot: Snapshot, values: dict[str, np.ndarray]) -> None:
        """The intruder columns of one snapshot row, NaN-padded to ``intruder_k`` (NaN where not computed)."""
        given = {"intruder_cos": snapshot.intruder_cos, "weight_sv": snapshot.weight_sv}
        if not self.intruder_k:
            if any(v is not None for v in given.values()):
                raise ValueError("intruder_cos / weight_sv given but the file was opened with intruder_k=0")
            return
        for name, entries in given.items():
            entries = [None] * self.n_modules if entries is None else list(entries)
            if len(entries) != self.n_modules:
                raise ValueError(f"{name} must have one entry per module ({self.n_modules}). "
                                 f"Got {len(entries)} instead.")
            values[name] = self._pad_spectra(entries, self.intruder_k, f"{name} values")[0]

    def _append(self, group: h5py.Group, columns: Sequence[S.Column], values: Mapping[str, np.ndarray],
                start: int, n: int) -> None:
        ordered = [c for c in columns if c.name != S.INDEX] + [c for c in columns if c.name == S.INDEX]
        for column in ordered:
            if not column.required and column.name not in group:
                continue  # a file written before this optional column existed, continued by a resumed run
            ds = group[column.name]
            ds.resize(start + n, axis=0)
            ds[start:start + n] = values[column.name]
            ds.flush()

    def _append_factors(self, f: h5py.File, group: str, factors: Mapping[int, tuple[np.ndarray, np.ndarray]],
                        row: int) -> None:
        if not self.factors_k:
            raise ValueError("factors given but the file was opened with factors_k=0")
        for i, (u, v) in factors.items():
            for name, mat, dim in ((S.FACTOR_U, u, self._shapes[i][0]), (S.FACTOR_V, v, self._shapes[i][1])):
                mat = np.asarray(mat, dtype=np.float32)
                if mat.ndim != 2 or mat.shape[0] != dim or mat.shape[1] > self.factors_k:
                    raise ValueError(f"module {i}: factor {name} must be ({dim}, <= {self.factors_k}). "
                                     f"Got {mat.shape} instead.")
                padded = np.full((dim, self.factors_k), np.nan, dtype=np.float32)
                padded[:, : mat.shape[1]] = mat
                ds = f[group][name][S.module_key(i)]
                ds.resize(row + 1, axis=0)
                ds[row] = padded
                ds.flush()

    def _append_deltas(self, f: h5py.File, deltas: Mapping[int, np.ndarray], row: int) -> None:
        if not self.delta_dtype:
            raise ValueError("deltas given but the file was opened without delta_dtype")
        for i, delta in deltas.items():
            delta = np.asarray(delta)
            if delta.shape != self._shapes[i]:
                raise ValueError(f"module {i}: delta must be {self._shapes[i]}. Got {delta.shape} instead.")
            ds = f[S.GROUP_DELTAS][S.module_key(i)]
            ds.resize(row + 1, axis=0)
            ds[row] = delta.astype(self.delta_dtype)
            ds.flush()

    def _write_static(self, f: h5py.File, name: str, columns: Sequence[S.Column], rows: Sequence[Any]) -> None:
        group = f.create_group(name)
        for column in columns:
            data = _column_values(rows, column)
            dtype = _STR if column.dtype == "str" else column.numpy_dtype
            group.create_dataset(column.name, data=data, dtype=dtype, shape=(len(rows),))

    def _create_table(self, f: h5py.File, name: str, columns: Sequence[S.Column], rows_per_chunk: int) -> h5py.Group:
        group = f.create_group(name)
        for column in columns:
            trailing: tuple[int, ...] = {
                S.ROW: (),
                S.ROW_MODULE: (self.n_modules,),
                S.ROW_MODULE_SV: (self.n_modules, self.sv_capacity),
                S.ROW_MODULE_INTRUDER: (self.n_modules, self.intruder_k),
            }[column.layout]
            group.create_dataset(
                column.name,
                shape=(0, *trailing),
                # An axis of length 0 cannot hold a chunk: leave it unlimited (it never grows).
                maxshape=(None, *(t or None for t in trailing)),
                chunks=(rows_per_chunk, *(max(1, t) for t in trailing)),
                dtype=column.numpy_dtype,
                fillvalue=np.array(column.fill, dtype=column.numpy_dtype),
                **_COMPRESSION,
            )
        return group

    def _create_per_module(self, f: h5py.File) -> None:
        # The gradient's vectors when both its spectrum and the update's vectors are asked for.
        groups = [S.GROUP_FACTORS, S.GROUP_GRAD_FACTORS] if self.grad_sv else [S.GROUP_FACTORS]
        for group in groups if self.factors_k else ():
            factors = f.create_group(group)
            for name, axis in ((S.FACTOR_U, 0), (S.FACTOR_V, 1)):
                sub = factors.create_group(name)
                for i, shape in enumerate(self._shapes):
                    trailing = (shape[axis], self.factors_k)
                    sub.create_dataset(S.module_key(i), shape=(0, *trailing),
                                       maxshape=(None, *(t or None for t in trailing)),
                                       chunks=(1, *(max(1, t) for t in trailing)), dtype=np.float32,
                                       fillvalue=np.nan, **_COMPRESSION)
        if self.delta_dtype:
            deltas = f.create_group(S.GROUP_DELTAS)
            for i, shape in enumerate(self._shapes):
                deltas.create_dataset(S.module_key(i), shape=(0, *shape), maxshape=(None, *(t or None for t in shape)),
                                      chunks=(1, *(max(1, t) for t in shape)), dtype=self.delta_dtype,
                                      fillvalue=np.nan, **_COMPRESSION)


def _open_for_append(path: Path) -> h5py.File:
    """Open a run file read-write. A writer that was killed leaves HDF5's "open for SWMR write" flag set, which
    blocks a plain read-write open; such a file is rebuilt by copying everything it holds into a new file."""
    from lorascope.store.reader import open_run

    open_run(path).close()  # one clear error if this is not a readable run file
    try:
        return h5py.File(path, "r+", libver="latest", locking=False)
    except OSError as exc:
        if "open for write" not in str(exc):
            raise
    rebuilt = path.with_name(path.name + ".rebuilding")
    with h5py.File(path, "r", libver="latest", swmr=True, locking=False) as src, \
            h5py.File(rebuilt, "w", libver="latest", locking=False) as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name in src:
            src.copy(src[name], dst, name=name)
        # A killed writer may have extended data columns past the index: cut them back to the committed rows.
        for group in (S.GROUP_STEPS, S.GROUP_SNAPSHOTS):
            _truncate_after(dst[group], None)
    os.replace(rebuilt, path)
    return h5py.File(path, "r+", libver="latest", locking=False)


def _truncate_after(table: h5py.Group, after_step: int | None) -> int:
    """Cut a table, with the per-module datasets nested in it, to the committed rows with step <= ``after_step``
    (all committed rows when None). Returns the number of rows kept."""
    index = table[S.INDEX][()]
    keep = len(index) if after_step is None else int(np.searchsorted(index, after_step, side="right"))
    table[S.INDEX].resize(keep, axis=0)  # the index first: a reader never sees rows without their columns

    def cut(_: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.shape and obj.shape[0] > keep:
            obj.resize(keep, axis=0)

    table.visititems(cut)
    return keep


def _keep_missing_until(table: h5py.Group, after_step: int) -> int:
    """Keep the rows of ``snapshots_missing`` with step <= ``after_step`` (its rows are in the order the recorder
    decided, not sorted by step). Returns the number kept."""
    n = table[S.INDEX].shape[0]
    steps, reasons = table[S.INDEX][:n], table["reason"][:n]
    keep = steps <= after_step
    table[S.INDEX].resize(0, axis=0)
    for name, values in (("reason", reasons[keep]), (S.INDEX, steps[keep])):
        table[name].resize(len(values), axis=0)
        table[name][:] = values
    return int(keep.sum())


def _get(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def _col(name: str) -> S.Column:
    return next(c for c in S.SNAPSHOT_COLUMNS if c.name == name)
