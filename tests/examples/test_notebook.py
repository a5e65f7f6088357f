"""examples/notebook.ipynb runs top to bottom in a real Jupyter kernel (nbclient, ipykernel), so it cannot rot:
no cell raises, the run, the analysis and the recommendation show their HTML summaries, and the restyled
figures come back as PNG images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("transformers")  # the recommendation cell builds a tiny Llama config

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "notebook.ipynb"


def outputs_of(cell) -> dict[str, str]:
    """mime type -> data of a code cell's displayed results (the value of its last line)."""
    shown: dict[str, str] = {}
    for output in cell.get("outputs", []):
        if output["output_type"] in ("execute_result", "display_data"):
            shown.update(output["data"])
    return shown


def test_notebook_runs_and_shows_rich_output(tmp_path, monkeypatch):
    notebook = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, notebook)
    nb = nbformat.read(notebook, as_version=4)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel is a second process on a shared, busy machine
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    by_source = {cell.source.splitlines()[-1]: outputs_of(cell) for cell in code}
    run = by_source["run  # status, modules by kind, steps, snapshots"]
    assert "lorascope run: run.h5" in run["text/html"] and "status" in run["text/html"]
    assert "lorascope analysis: run.h5" in by_source["analysis"]["text/html"]
    assert "Forecast" in by_source["analysis"]["text/html"]
    assert "recommended rank" in by_source["recommendation"]["text/html"]
    figures = [outputs_of(cell) for cell in code if cell.source.splitlines()[-1] == "fig"]
    assert len(figures) == 2 and all("image/png" in shown for shown in figures)
    assert (tmp_path / "run.h5").is_file()
