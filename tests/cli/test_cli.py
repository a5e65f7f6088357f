"""The command line with click's CliRunner: exit codes, one-line errors, every report file present and parseable."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

import lorascope
from lorascope.demo import DemoConfig, run_demo
from lorascope.workflows.analyze import Analysis
from lorascope_cli.main import cli


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A real recording: a small Llama-named transformer trained in a plain loop."""
    folder = tmp_path_factory.mktemp("cli")
    cfg = DemoConfig(vocab=32, dim=16, layers=2, heads=2, mlp=32, pretrain_steps=2, facts=64, finetune_steps=24,
                     batch=8)
    run_path, _, _ = run_demo(folder / "demo", cfg=cfg, log=lambda _: None)
    return run_path


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_version_and_help():
    assert _invoke("--version").output.strip() == f"lorascope, version {lorascope.__version__}"
    result = _invoke("--help")
    assert result.exit_code == 0 and "analyze" in result.output and "info" in result.output


def test_info_text_and_json(recorded):
    result = _invoke("info", recorded)
    assert result.exit_code == 0, result.output
    assert "complete" in result.output and "attention 8" in result.output
    summary = json.loads(_invoke("info", recorded, "--json").output)
    assert summary["steps"]["count"] == 24 and summary["complete"] is True
    assert summary["modules_by_kind"] == {"attention": 8, "embedding": 1, "head": 1, "mlp": 6}


def test_analyze_writes_every_report_file(recorded, tmp_path):
    out = tmp_path / "report"
    result = _invoke("analyze", recorded, "-o", out, "--ranks", "2,4,8")
    assert result.exit_code == 0, result.output
    assert "a rank-4 LoRA (all-linear) captures" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "lorascope-summary" and summary["ranks"] == [2, 4, 8]
    assert set(summary["final"]["by_kind"]) == {"attention", "mlp", "embedding", "head"}
    with xr.open_dataset(out / "metrics.nc", engine="h5netcdf") as ds:
        assert ds.sizes["module"] == 16 and "energy_rank" in ds and "kind_energy_share" in ds
    for name in ("spectra", "energy_rank", "residual", "energy_share", "loss"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5


def test_analyze_json_matches_summary_file(recorded, tmp_path):
    result = _invoke("analyze", recorded, "-o", tmp_path / "r", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == json.loads((tmp_path / "r" / "summary.json").read_text())


@pytest.mark.parametrize("as_json", [False, True])
def test_analyze_computes_the_summary_once(recorded, tmp_path, monkeypatch, as_json):
    """summary.json, the page and the printed summary all render one Analysis.summary."""
    calls = []
    to_dict = Analysis.to_dict
    monkeypatch.setattr(Analysis, "to_dict", lambda self: calls.append(self) or to_dict(self))
    result = _invoke("analyze", recorded, "-o", tmp_path / "r", *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.output
    assert len(calls) == 1


def test_existing_output_folder_is_refused_unless_forced(recorded, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    keep = out / "notes.txt"
    keep.write_text("mine")
    result = _invoke("analyze", recorded, "-o", out)
    assert result.exit_code == 2 and "--force" in result.output and len(result.output.strip().splitlines()) == 1
    assert _invoke("analyze", recorded, "-o", out, "--force").exit_code == 0
    assert keep.read_text() == "mine" and (out / "report.html").exists()


@pytest.mark.parametrize("ranks", ["0", "a,b", "8,-1", ""])
def test_invalid_ranks_exit_2(recorded, tmp_path, ranks):
    result = _invoke("analyze", recorded, "-o", tmp_path / "r", "--ranks", ranks)
    assert result.exit_code == 2 and "ranks" in result.output.lower()


def test_bad_run_files_give_one_line_and_exit_2(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not a run")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    for path, words in ((tmp_path / "missing.h5", "no such file"), (tmp_path, "is a directory"),
                        (text, "not an HDF5 file"), (plain, "not a lorascope run")):
        for command in ("info", "analyze"):
            result = _invoke(command, path, *(["-o", tmp_path / "out"] if command == "analyze" else []))
            assert result.exit_code == 2, (command, path, result.output)
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and words in lines[0] and str(path) in lines[0]
            assert "Traceback" not in result.output


def test_runs_of_different_models_exit_2(recorded, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = tmp_path / "other.h5"
    with lorascope.record(model, other, optimizer=opt):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    result = _invoke("analyze", recorded, other, "-o", tmp_path / "r")
    assert result.exit_code == 2 and "different models" in result.output


def test_demo_command_runs_end_to_end(tmp_path):
    result = _invoke("demo", "-o", tmp_path / "demo", "--steps", "12")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "demo_run.h5").is_file()
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    assert "captures" in result.output
