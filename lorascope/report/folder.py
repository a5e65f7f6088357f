"""The report folder: ``summary.json``, ``metrics.nc``, PNG plots and one self-contained ``report.html``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from lorascope.errors import LorascopeError
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


def prepare_folder(folder: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Check the output folder before any work: refuse an existing non-empty one unless ``force``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LorascopeError(f"{folder}: exists and is not a folder; choose another output path")
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
