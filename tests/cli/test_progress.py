"""Progress on the long commands: a tqdm bar on stderr only when stderr is a terminal, none with --quiet, and the
library's ``progress=`` hooks (analyze, compare) called over every run they read."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_loss_run

import lorascope
from lorascope_cli.main import cli
from lorascope_cli.progress import progress_log, progress_over

TINY_RUN = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_run.h5"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_bar_is_drawn_only_on_a_terminal(monkeypatch, terminal):
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    wrap = progress_over("reading runs", "run", quiet=False)
    assert list(wrap(range(3))) == [0, 1, 2]
    assert ("reading runs" in stderr.getvalue()) is terminal


def test_quiet_means_no_wrapper_and_no_lines(capsys):
    assert progress_over("reading runs", "run", quiet=True) is None
    with progress_log("calibrating", "rank", 2, quiet=True, counts=lambda line: True) as log:
        log("rank 1: ...")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("terminal", [True, False])
def test_logged_lines_print_and_advance_the_bar(monkeypatch, terminal):
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    with progress_log("calibrating", "rank", 2, quiet=False, counts=lambda line: line.startswith("rank ")) as log:
        log("pretraining ...")
        log("rank 1: 10 bits")
        log("rank 2: 20 bits")
    text = stderr.getvalue()
    assert "pretraining ..." in text and "rank 2: 20 bits" in text
    assert ("calibrating" in text) is terminal  # the bar, drawn on a terminal only


def test_analyze_and_compare_call_the_progress_hook_over_every_run(tmp_path):
    paths = [shutil.copy(TINY_RUN, tmp_path / f"run{i}.h5") for i in range(2)]
    seen: list = []

    def progress(items):
        items = list(items)
        seen.append(len(items))
        return items

    lorascope.analyze(paths, progress=progress)
    steps = np.arange(1, 101)
    loss = 3.0 - 0.3 * np.log(steps)
    runs = [write_loss_run(tmp_path / name, loss, rank)
            for name, rank in (("full.h5", None), ("r1.h5", 1), ("r2.h5", 2))]
    lorascope.compare(runs[0], runs[1:], progress=progress)
    assert seen == [2, 2]


@pytest.mark.parametrize("quiet", [[], ["--quiet"], ["-q"]])
def test_analyze_of_several_files_prints_no_bar_off_a_terminal(tmp_path, quiet):
    paths = [shutil.copy(TINY_RUN, tmp_path / f"run{i}.h5") for i in range(2)]
    result = CliRunner().invoke(cli, ["analyze", *map(str, paths), "-o", str(tmp_path / "out"), *quiet])
    assert result.exit_code == 0, result.output
    assert "reading runs" not in result.output and "report:" in result.output
