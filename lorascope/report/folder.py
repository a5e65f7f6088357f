"""The report folder: ``summary.json``, ``metrics.nc``, PNG plots and one self-contained ``report.html``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from lorascope.errors import InvalidOptionError, LorascopeError
from lorascope.report.format import json_text

if TYPE_CHECKING:
    from lorascope.workflows.analyze import Analysis


@dataclass(frozen=True)
class ReportFiles:
    """Paths of everything a report folder holds."""

    folder: Path
    summary: Path
    metrics: Path
    html: Path
    images: dict[str, Path]


def check_output_path(path: str | os.PathLike[str], *, folder: bool, name: str = "output") -> Path:
    """A path a command will write, checked before any work: a folder (created with its parents when missing)
    or a file (its folder must exist), under an existing folder this process may write in.

    What is already there (an existing file, a non-empty folder) is the caller's to refuse or overwrite.

    Raises
    ------
    InvalidOptionError
        One line naming the path and what is wrong with it.
    """
    path = Path(path)
    if not folder and path.is_dir():
        raise InvalidOptionError(f"{name} {path}: is a folder; give a file path")
    parent = path if folder else path.parent
    if not folder and not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise InvalidOptionError(f"{name} {path}: the folder {parent} {what}; create it or choose another path")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidOptionError(f"{name} {path}: {existing} exists and is not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidOptionError(f"{name} {path}: cannot write in {existing} (permission denied); choose another "
                                 "path")
    return path


def prepare_folder(folder: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Check the output folder before any work: refuse an existing non-empty one unless ``force``, and one that
    cannot be created or written (:func:`check_output_path`)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LorascopeError(f"{folder}: exists and is not a folder; choose another output path")
    check_output_path(folder, folder=True, name="output folder")
    # With force, the report's own files are overwritten in place; nothing else in the folder is touched.
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise LorascopeError(f"{folder}: output folder exists and is not empty; pass --force (force=True) to "
                             "overwrite the report files in it, or choose another")
    return folder


def netcdf_ready(ds: xr.Dataset) -> xr.Dataset:
    """NetCDF has no bool and no object strings: store flags as int8 and text as fixed unicode."""
    out = ds.copy()
    for name in list(out.variables):
        values = out[name].values
        if values.dtype == bool:
            out[name] = out[name].astype(np.int8)
            out[name].attrs["flag"] = "1 = true, 0 = false"
        elif values.dtype == object:
            out[name] = out[name].astype(str)
    return out


def write_report(analysis: Analysis, folder: str | os.PathLike[str], *, force: bool = False) -> ReportFiles:
    """Write the report folder for an :class:`~lorascope.workflows.analyze.Analysis`.

    ``summary.json`` and the HTML page both render :attr:`Analysis.summary`, computed once; the figures draw the
    analysis' arrays.
    """
    from lorascope.report.html import render_html
    from lorascope.report.plots import make_plots

    folder = prepare_folder(folder, force=force)
    folder.mkdir(parents=True, exist_ok=True)
    summary_path = folder / "summary.json"
    summary_path.write_text(json_text(analysis.summary))
    metrics_path = folder / "metrics.nc"
    netcdf_ready(analysis.to_dataset()).to_netcdf(metrics_path, engine="h5netcdf")
    images = make_plots(analysis, folder)
    html_path = folder / "report.html"
    html_path.write_text(render_html(analysis.summary, images), encoding="utf-8")
    return ReportFiles(folder, summary_path, metrics_path, html_path, images)
