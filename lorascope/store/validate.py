"""One validation pass over a run file when it is opened: every group, dataset and attribute against
:mod:`lorascope.store.schema`, with one error line naming the dataset (or attribute) and the rule it breaks.

What is refused, what is repaired and what is only flagged (the reasons are in ``docs/format.md``, "What the
reader refuses, repairs and flags"):

- **Refused** (:class:`~lorascope.errors.CorruptRunFileError`, or :class:`~lorascope.errors.SchemaVersionError`
  for the version): what no reader can interpret without guessing: an attribute of the wrong type
  (``schema_version`` not an integer, ``status`` not one of the statuses, ``sv_capacity`` not an int >= 0, ...),
  a missing required group, dataset or attribute, a dataset of the wrong dtype kind (integer, float, bool,
  string) or number of axes, a module axis that is not the modules table, a singular-value axis that is not
  ``sv_capacity``, a column shorter than its table's index, a step index that decreases, a negative or
  over-capacity ``sv_count``, a negative size, energy, squared norm or singular value, an ``intruder_cos`` outside
  [0, 1 + 1e-5] (NaN allowed), intruder columns without a positive ``intruder_k`` (or the reverse).
- **Repaired**: rows a killed writer wrote past the index (uncommitted) are not read, nor, in a file still being
  written, index rows extended but not yet written (:func:`committed_rows`); an optional column a file lacks reads as
  its fill value.
- **Flagged** (kept, listed in :attr:`Run.flags <lorascope.store.reader.Run.flags>` and by ``lorascope info``):
  repeated step numbers, and energy that is NaN without a non-finite update (a matrix the recorder did not
  measure at that snapshot). A NaN or Inf loss, gradient or update is data (a diverged run), neither refused nor
  flagged here: the analysis says where the run diverged.

Dtype widths are not checked, only their kind: an int32 column stored as int64 reads the same. The checks on
open read only the small arrays (the two step indexes, ``sv_count`` and ``energy``, the modules' sizes); the
value checks of the large ones (singular values, gradient norms) run on arrays the views have read anyway
(:func:`check_values`), or block by block for ``lorascope info`` (:func:`check_all_values`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lorascope.errors import CorruptRunFileError, NotARunFileError, SchemaVersionError
from lorascope.store import schema as S

__all__ = ["check_all_values", "check_config_section", "check_file", "check_header", "check_values", "committed_rows"]

_NDIM = {S.ROW: 1, S.ROW_MODULE: 2, S.ROW_MODULE_SV: 3}
_KIND_WORDS = {"str": "strings", "bool": "booleans", "i": "integers", "f": "floats"}
_NON_NEGATIVE = frozenset({"sv", "grad_sv", "grad_sq_norm", "grad_sq_norm_other", "gns_sq_norm_small",
                           "gns_sq_norm_big", "weight_sv"})
"""Columns whose values cannot be negative: singular values and squared norms (NaN and +Inf are data)."""
_COSINE_MAX = 1.0 + 1e-5  # a largest |cosine| between unit vectors, with float32 rounding
_COSINES = frozenset({"intruder_cos"})
"""Columns of absolute cosines: in [0, 1] (up to rounding) or NaN (not computed)."""
_BLOCK_ELEMENTS = 1 << 24  # elements per block when lorascope info checks every value


def _decode(value: Any) -> Any:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _type_name(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    return f"the {type(value).__name__} {value!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_header(attrs: h5py.AttributeManager, path: Path) -> None:
    """The root attributes: the format marker, an integer schema version this reader knows, every required
    attribute present and of its type, ``status`` one of :data:`~lorascope.store.schema.STATUSES`."""
    fail = _failer(path)
    try:
        marker = _decode(attrs.get(S.ATTR_FORMAT))
    except (OSError, TypeError, ValueError):
        marker = None
    if not isinstance(marker, str) or marker != S.FORMAT_NAME:
        raise NotARunFileError(f"{path}: HDF5 file but not a lorascope run "
                               f"(root attribute '{S.ATTR_FORMAT}' is not '{S.FORMAT_NAME}')")
    if S.ATTR_SCHEMA_VERSION not in attrs:
        raise fail(f"root attribute '{S.ATTR_SCHEMA_VERSION}' is missing")
    version = attrs[S.ATTR_SCHEMA_VERSION]
    if not _is_int(version):
        raise fail(f"root attribute '{S.ATTR_SCHEMA_VERSION}' must be an integer; got {_type_name(_decode(version))}")
    if version > S.SCHEMA_VERSION:
        raise SchemaVersionError(f"{path}: schema version {version} is newer than this lorascope reads "
                                 f"({S.SCHEMA_VERSION}); upgrade lorascope")
    if version < 1:
        raise SchemaVersionError(f"{path}: schema version {version} is not a valid version")
    for name in (*S.ROOT_ATTRS, S.ATTR_FINISHED):
        if name not in attrs:
            if name == S.ATTR_FINISHED:
                continue
            raise fail(f"root attribute '{name}' is missing")
        if name == S.ATTR_SCHEMA_VERSION:
            continue
        value = _decode(attrs[name])
        if not isinstance(value, str):
            raise fail(f"root attribute '{name}' must be a string; got {_type_name(value)}")
    status = _decode(attrs[S.ATTR_STATUS])
    if status not in S.STATUSES:
        raise fail(f"root attribute '{S.ATTR_STATUS}' must be one of {', '.join(S.STATUSES)}; got {status!r}")


def committed_rows(index: np.ndarray) -> int:
    """How many rows of a table a writer has committed, from its step index as a live file shows it.

    The writer extends a table's columns, then its index, and writes the index last, so a reader following it
    (SWMR) can find the index extended but its new rows still holding the fill value (-1, never a step): those rows
    are not committed yet.
    """
    filled = np.flatnonzero(index != S.INDEX_FILL)
    return int(filled[-1]) + 1 if filled.size else 0


def check_file(f: h5py.File, path: Path, *, complete: bool) -> tuple[tuple[str, ...], dict[str, int]]:
    """Check every group and dataset of an open run file (after :func:`check_header`); returns the flags and the
    committed rows of each table (:func:`committed_rows` for a file still being written).

    Raises
    ------
    CorruptRunFileError
        Naming the first dataset or attribute that breaks a rule, and the rule.
    """
    fail = _failer(path)
    flags: list[str] = []
    n_mod = _check_static(f, S.GROUP_MODULES, S.MODULE_COLUMNS, fail)
    _check_static(f, S.GROUP_COVERAGE, S.COVERAGE_COLUMNS, fail)
    sizes = np.stack([_dataset(f, f"{S.GROUP_MODULES}/{name}", fail)[()] for name in ("out_features",
                                                                                       "in_features")])
    if sizes.size and sizes.min() < 0:
        raise fail(f"'{S.GROUP_MODULES}/out_features' and 'in_features' must be >= 0; got {int(sizes.min())}")
    names = _dataset(f, f"{S.GROUP_MODULES}/name", fail).asstr()[()]
    if len(set(names)) != len(names):
        raise fail(f"'{S.GROUP_MODULES}/name' must be unique; a matrix name repeats")
    if not isinstance(f.get(S.GROUP_CONFIG), h5py.Group):
        raise fail(f"required group '{S.GROUP_CONFIG}' is missing")
    snaps = f.get(S.GROUP_SNAPSHOTS)
    for group in (S.GROUP_STEPS, S.GROUP_SNAPSHOTS):
        if not isinstance(f.get(group), h5py.Group):
            raise fail(f"required group '{group}' is missing")
    capacity = _int_attr(snaps, S.ATTR_SV_CAPACITY, fail)
    factors_k = _int_attr(snaps, S.ATTR_FACTORS_K, fail)
    delta_dtype = _decode(snaps.attrs.get(S.ATTR_DELTA_DTYPE))
    if not isinstance(delta_dtype, str) or delta_dtype not in ("", *S.DELTA_DTYPES):
        raise fail(f"'{S.GROUP_SNAPSHOTS}' attribute '{S.ATTR_DELTA_DTYPE}' must be one of "
                   f"'', {', '.join(S.DELTA_DTYPES)}; got {_type_name(delta_dtype)}")
    grad_sv = [name in snaps for name in ("grad_sv", "grad_sv_count")]
    if any(grad_sv) and not all(grad_sv):
        raise fail(f"'{S.GROUP_SNAPSHOTS}/grad_sv' and 'grad_sv_count' must both be present or both absent")
    intruder_k = _check_intruder_presence(snaps, fail)

    trailing = {S.ROW: (), S.ROW_MODULE: (n_mod,), S.ROW_MODULE_SV: (n_mod, capacity),
                S.ROW_MODULE_INTRUDER: (n_mod, intruder_k)}
    rows: dict[str, int] = {}
    for group in (S.GROUP_STEPS, S.GROUP_SNAPSHOTS):
        n = rows[group] = _check_index(f, group, complete, fail, flags)
        longest = n
        for column in S.columns_of(group, grad_sv=all(grad_sv), intruder=intruder_k > 0):
            name = f"{group}/{column.name}"
            if not column.required and name not in f:
                continue  # repaired: reads as all fill
            ds = _dataset(f, name, fail)
            _check_kind(ds, name, column.dtype, fail)
            want = trailing[column.layout]
            if ds.ndim != 1 + len(want) or tuple(ds.shape[1:]) != want:
                expected = "(" + ", ".join(["rows", *map(str, want)]) + ")"
                raise fail(f"'{name}' has shape {ds.shape}, expected {expected}{_axis_words(column.layout)}")
            if ds.shape[0] < n or (complete and ds.shape[0] != n):
                raise fail(f"'{name}' has {ds.shape[0]} rows but '{group}/{S.INDEX}' has {n}")
            longest = max(longest, ds.shape[0])
        if longest > n:
            flags.append(f"'{group}': {longest - n} row(s) written after the last committed one (a writer stopped "
                         "mid-row) are not read")

    n = rows[S.GROUP_SNAPSHOTS]
    shapes = sizes.T if sizes.size else np.zeros((0, 2), dtype=np.int64)
    limit = np.minimum(shapes.min(axis=1), capacity) if n_mod else np.zeros(0, dtype=np.int64)
    for count in ("sv_count", "grad_sv_count"):
        if count in snaps:
            _check_counts(snaps[count][:n], f"{S.GROUP_SNAPSHOTS}/{count}", limit, capacity, names, fail)
    energy = snaps["energy"][:n]
    if (energy < 0).any():
        raise fail(f"'{S.GROUP_SNAPSHOTS}/energy' must be >= 0 (a squared norm); got {float(np.nanmin(energy))}")
    unknown = np.isnan(energy) & (snaps["delta_nonfinite"][:n] == 0)
    if unknown.any():
        flags.append(f"'{S.GROUP_SNAPSHOTS}/energy' is NaN at {int(unknown.sum())} module-snapshot(s) without a "
                     "non-finite update: not measured there; read as no spectrum")
    if intruder_k:  # small: (snapshots, modules, intruder_k)
        check_values(S.GROUP_SNAPSHOTS, {name: snaps[name][:n] for name in ("intruder_cos", "weight_sv")}, path)
    _check_payloads(f, shapes, factors_k, delta_dtype, n, complete, fail)
    return tuple(flags), rows


def _check_intruder_presence(snaps: h5py.Group, fail: Callable[[str], Exception]) -> int:
    """The snapshots' ``intruder_k`` (0 when absent: a file before it) and its columns, present exactly when > 0."""
    intruder_k = _int_attr(snaps, S.ATTR_INTRUDER_K, fail) if S.ATTR_INTRUDER_K in snaps.attrs else 0
    for column in S.INTRUDER_COLUMNS:
        if (column.name in snaps) != (intruder_k > 0):
            raise fail(f"'{S.GROUP_SNAPSHOTS}/{column.name}' must be present exactly when the snapshots' attribute "
                       f"'{S.ATTR_INTRUDER_K}' is > 0 (it is {intruder_k})")
    return intruder_k


def check_config_section(name: str, value: Any, path: Path) -> None:
    """A config section lorascope reads (:data:`~lorascope.store.schema.CONFIG_OBJECTS`) is a JSON object, and so
    are the fields inside it that lorascope reads as objects."""
    if name not in S.CONFIG_OBJECTS:
        return
    fail = _failer(path)
    if not isinstance(value, dict):
        raise fail(f"config section '{name}' must be a JSON object; got a JSON {_json_type(value)}")
    for field in S.CONFIG_OBJECTS[name]:
        if value.get(field) is not None and not isinstance(value[field], dict):
            raise fail(f"config section '{name}': '{field}' must be a JSON object; got a JSON "
                       f"{_json_type(value[field])}")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def check_values(group: str, raw: Mapping[str, np.ndarray], path: Path) -> None:
    """The value rules of columns too large to read on open, on arrays a view has read anyway: singular values
    and squared norms are never negative (NaN and +Inf are data)."""
    fail = _failer(path)
    for name, values in raw.items():
        if name in _NON_NEGATIVE and values.size and (values < 0).any():
            raise fail(f"'{group}/{name}' must be >= 0; got {float(np.nanmin(values))}")
        if name in _COSINES and values.size:
            bad = ~np.isnan(values) & ~((values >= 0) & (values <= _COSINE_MAX))
            if bad.any():
                raise fail(f"'{group}/{name}' must be an absolute cosine in [0, 1] or NaN; got "
                           f"{float(values[bad].flat[0])}")


def check_all_values(f: h5py.File, rows: Mapping[str, int], path: Path) -> None:
    """:func:`check_values` over every committed row of both tables, read block by block (``lorascope info``)."""
    for group, n in rows.items():
        table = f[group]
        for name in sorted((_NON_NEGATIVE | _COSINES) & set(table)):
            ds = table[name]
            per_row = max(1, int(np.prod(ds.shape[1:])))
            step = max(1, _BLOCK_ELEMENTS // per_row)
            for start in range(0, n, step):
                check_values(group, {name: ds[start:min(n, start + step)]}, path)


# -- internals -------------------------------------------------------------------------------------------------


def _failer(path: Path) -> Callable[[str], CorruptRunFileError]:
    return lambda message: CorruptRunFileError(f"{path}: {message}")


def _dataset(f: h5py.File | h5py.Group, name: str, fail: Callable[[str], Exception]) -> h5py.Dataset:
    try:
        ds = f.get(name)
    except (KeyError, OSError, ValueError, RuntimeError):
        ds = None
    if not isinstance(ds, h5py.Dataset):
        raise fail(f"required dataset '{name}' is missing")
    return ds


def _check_kind(ds: h5py.Dataset, name: str, dtype: str, fail: Callable[[str], Exception]) -> None:
    if dtype == "str":
        ok, want = h5py.check_string_dtype(ds.dtype) is not None, "str"
    else:
        want = np.dtype(dtype).kind
        ok = ds.dtype.kind in ("iu" if want == "i" else want) and ds.dtype.fields is None
    if not ok:
        got = "strings" if h5py.check_string_dtype(ds.dtype) is not None else str(ds.dtype)
        raise fail(f"'{name}' must hold {_KIND_WORDS[want]} ({dtype}); got {got}")


def _axis_words(layout: str) -> str:
    return {S.ROW: "", S.ROW_MODULE: ": axis 1 is the modules table",
            S.ROW_MODULE_SV: ": axis 1 is the modules table, axis 2 the snapshots' sv_capacity",
            S.ROW_MODULE_INTRUDER: ": axis 1 is the modules table, axis 2 the snapshots' intruder_k"}[layout]


def _check_static(f: h5py.File, group: str, columns: tuple[S.Column, ...], fail: Callable[[str], Exception]
                  ) -> int:
    if not isinstance(f.get(group), h5py.Group):
        raise fail(f"required group '{group}' is missing")
    lengths = {}
    for column in columns:
        name = f"{group}/{column.name}"
        ds = _dataset(f, name, fail)
        _check_kind(ds, name, column.dtype, fail)
        if ds.ndim != 1:
            raise fail(f"'{name}' has shape {ds.shape}, expected one axis (one row per entry)")
        lengths[column.name] = ds.shape[0]
    if len(set(lengths.values())) > 1:
        raise fail(f"columns of '{group}' have mismatched lengths {lengths}")
    return next(iter(lengths.values()), 0)


def _int_attr(group: h5py.Group, name: str, fail: Callable[[str], Exception]) -> int:
    if name not in group.attrs:
        raise fail(f"'{group.name.lstrip('/')}' attribute '{name}' is missing")
    value = group.attrs[name]
    if not _is_int(value) or value < 0:
        raise fail(f"'{group.name.lstrip('/')}' attribute '{name}' must be an int >= 0; "
                   f"got {_type_name(_decode(value))}")
    return int(value)


def _check_index(f: h5py.File, group: str, complete: bool, fail: Callable[[str], Exception],
                 flags: list[str]) -> int:
    name = f"{group}/{S.INDEX}"
    ds = _dataset(f, name, fail)
    _check_kind(ds, name, "int64", fail)
    if ds.ndim != 1:
        raise fail(f"'{name}' has shape {ds.shape}, expected one axis (one row per entry)")
    index = ds[()]
    if not complete:
        index = index[: committed_rows(index)]
    decreasing, repeated = index[1:] < index[:-1], index[1:] == index[:-1]  # no np.diff: unsigned ints wrap
    if decreasing.any():
        at = int(np.flatnonzero(decreasing)[0])
        raise fail(f"'{name}' must not decrease; row {at + 1} holds {int(index[at + 1])} after {int(index[at])}")
    if repeated.any():
        flags.append(f"'{name}': {int(repeated.sum())} repeated step number(s)")
    return int(index.shape[0])


def _check_counts(counts: np.ndarray, name: str, limit: np.ndarray, capacity: int, names: np.ndarray,
                  fail: Callable[[str], Exception]) -> None:
    if counts.size and counts.min() < 0:
        row, j = np.argwhere(counts < 0)[0]
        raise fail(f"'{name}' must be >= 0; got {int(counts[row, j])} at snapshot {row}, module {j} ({names[j]})")
    over = counts > limit
    if over.any():
        row, j = np.argwhere(over)[0]
        raise fail(f"'{name}' holds {int(counts[row, j])} at snapshot {row}, module {j} ({names[j]}), more than the "
                   f"{int(limit[j])} singular values it can have (sv_capacity {capacity}, min(out, in) of the "
                   "matrix)")


def _check_payloads(f: h5py.File, shapes: np.ndarray, factors_k: int, delta_dtype: str, n: int, complete: bool,
                    fail: Callable[[str], Exception]) -> None:
    """The optional per-module datasets: present when the snapshots' attributes say so, each (rows, ...) of its
    matrix's shape, never more rows than a complete file has snapshots."""
    wanted: list[tuple[str, Callable[[int, int], tuple[int, int]]]] = []
    # The gradient's vectors are checked when present (files before them, or without grad_sv, lack them).
    for group in (S.GROUP_FACTORS, S.GROUP_GRAD_FACTORS) if factors_k else ():
        if group == S.GROUP_FACTORS or group in f:
            wanted += [(f"{group}/{S.FACTOR_U}", lambda o, i: (o, factors_k)),
                       (f"{group}/{S.FACTOR_V}", lambda o, i: (i, factors_k))]
    if not factors_k and S.GROUP_GRAD_FACTORS in f:
        raise fail(f"'{S.GROUP_GRAD_FACTORS}' is present but the snapshots' attribute '{S.ATTR_FACTORS_K}' is 0")
    if delta_dtype:
        wanted.append((S.GROUP_DELTAS, lambda o, i: (o, i)))
    for group, shape_of in wanted:
        for j, (out, inp) in enumerate(shapes):
            name = f"{group}/{S.module_key(j)}"
            ds = _dataset(f, name, fail)
            _check_kind(ds, name, "float32", fail)
            want = shape_of(int(out), int(inp))
            if ds.ndim != 3 or tuple(ds.shape[1:]) != want:
                raise fail(f"'{name}' has shape {ds.shape}, expected (rows, {want[0]}, {want[1]})")
            if complete and ds.shape[0] > n:
                raise fail(f"'{name}' has {ds.shape[0]} rows but the run has {n} snapshot(s)")
