"""Crash safety: a recording training process killed with SIGKILL at a random point leaves a run file that opens,
says it is incomplete, and holds a consecutive prefix of intact rows; a second process can read the file while it
is being written. The child is tests/_record_kill_script.py, which prints "STEP n" after each optimizer step.

What is guaranteed about how many rows survive: the child prints "STEP n" after step n's row and snapshot are
queued, so the file never has more than one step beyond the last printed line. The writer thread may still be
behind when the kill lands: with the child's queue of QUEUE_SIZE items (a step row and a snapshot per step) plus
the item being written and one pending step row, at most LAG printed steps can be missing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import lorascope
from lorascope_cli.main import cli

SCRIPT = Path(__file__).with_name("_record_kill_script.py")
QUEUE_SIZE = 4  # as in the script
LAG = (QUEUE_SIZE + 2 + 1) // 2  # printed steps whose rows may still be unwritten when the kill lands
BATCH, LENGTH = 4, 8  # as in the script


@pytest.fixture
def start_training(tmp_path):
    """``start_training(run_path)`` runs the script in a child process; every child is killed at teardown."""
    children = []

    def start(run_path: Path) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny model; leave the second core to the test process
        stderr_path = tmp_path / f"stderr-{len(children)}.txt"
        stderr = stderr_path.open("w")  # a file, not a pipe: nobody reads it while the child runs; closed at teardown
        child = subprocess.Popen([sys.executable, str(SCRIPT), str(run_path)], stdout=subprocess.PIPE,
                                 stderr=stderr, text=True, env=env)
        child.stderr_path = stderr_path
        children.append((child, stderr))
        return child

    yield start
    for child, stderr in children:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
        stderr.close()


def _wait_for(child: subprocess.Popen, step: int) -> int:
    """Read the child's lines until "STEP step" ("READY" for step 0); returns the last step printed."""
    last = 0
    while True:
        line = child.stdout.readline()
        if not line:
            child.wait()
            stderr = child.stderr_path.read_text()
            pytest.fail(f"training process ended (exit {child.returncode}) before step {step}:\n{stderr}")
        if line.startswith("STEP "):
            last = int(line.split()[1])
        if (step == 0 and line.startswith("READY")) or (step > 0 and last >= step):
            return last


def _kill(child: subprocess.Popen, last_read: int) -> int:
    """SIGKILL the child; returns the last step it printed before dying (``last_read`` or a later one)."""
    os.kill(child.pid, signal.SIGKILL)
    rest = child.stdout.read()
    child.wait()
    assert child.returncode == -signal.SIGKILL
    return max([last_read] + [int(line.split()[1]) for line in rest.splitlines() if line.startswith("STEP ")])


def _check_prefix(run: lorascope.Run, last_printed: int, *, live: bool = False, payloads: bool = True) -> None:
    """Every row present is intact and each table is a consecutive prefix of the steps taken; at least the
    steps printed up to ``last_printed`` but LAG are there.

    ``live``: the writer may still be appending. A live reader's view of each dataset dates from when it first
    read (or refreshed) it, so the two tables need not agree with each other; a dead writer's file must have a
    snapshot for every step row but possibly the last. ``payloads``: also read every snapshot's singular vectors
    and full updates.
    """
    assert run.status == "recording" and not run.complete
    n_steps, n_snapshots = run.n_steps, run.n_snapshots
    for n in (n_steps, n_snapshots):
        assert n >= last_printed - LAG
        if not live:  # a live child has gone on since it printed ``last_printed``
            assert n <= last_printed + 1
    np.testing.assert_array_equal(run.step_index, np.arange(1, n_steps + 1))
    # A snapshot after every step, written after that step's row.
    np.testing.assert_array_equal(run.snapshot_index, np.arange(1, n_snapshots + 1))
    if not live:
        assert n_steps - 1 <= n_snapshots <= n_steps

    steps = run.steps
    np.testing.assert_array_equal(steps["examples_seen"], BATCH * np.arange(1, n_steps + 1))
    np.testing.assert_array_equal(steps["tokens_seen"], BATCH * LENGTH * np.arange(1, n_steps + 1))
    assert np.all(np.isfinite(steps["loss"])) and np.all(np.isfinite(steps["grad_sq_norm"]))

    snapshots = run.snapshots
    assert np.all(np.isfinite(snapshots["energy"])) and np.all(snapshots["energy"] > 0)
    counts = snapshots["sv_count"].values
    assert np.all(counts > 0)
    spectra = snapshots["sv"].values
    for row in range(n_snapshots):
        for module in range(len(run.modules)):
            s = spectra[row, module, : counts[row, module]]
            assert np.all(np.isfinite(s)) and np.all(np.diff(s) <= 0)
            np.testing.assert_allclose(np.sum(s.astype(np.float64) ** 2), snapshots["energy"].values[row, module],
                                       rtol=1e-3)
            if not payloads:
                continue
            u, v = run.factors(module, row)
            assert np.all(np.isfinite(u)) and np.all(np.isfinite(v))
            delta = run.delta(module, row).astype(np.float64)
            np.testing.assert_allclose(np.sum(delta**2), snapshots["energy"].values[row, module], rtol=1e-2)


def _kill_points():
    """(step after which to kill, 0: right after the file is created; then a delay of up to 50 ms, so that kills land
    anywhere in the training and the writing of a step): two in the default suite, 40 more when slow."""
    points = []
    for seed in range(42):
        draw = random.Random(seed)
        points.append(pytest.param(draw.randint(0, 12), draw.random() * 0.05, id=f"seed{seed}",
                                   marks=[pytest.mark.slow] if seed >= 2 else []))
    return points


def _commands_read(run_path: Path, folder: Path, n_steps: int) -> None:
    """``lorascope info`` reports the killed run as incomplete and ``lorascope analyze`` analyses it (a run killed
    before its first step has nothing to analyse: one line and exit 2, never a traceback)."""
    runner = CliRunner()
    info = runner.invoke(cli, ["info", "--json", str(run_path)])
    assert info.exit_code == 0, (info.output, info.exception)
    summary = json.loads(info.stdout)
    assert summary["status"] == "recording" and not summary["complete"] and summary["steps"]["count"] == n_steps
    report = runner.invoke(cli, ["analyze", str(run_path), "-o", str(folder / "report"), "--json"])
    if n_steps:
        assert report.exit_code == 0, (report.output, report.exception)
        assert json.loads(report.stdout)["runs"][0]["complete"] is False
    else:
        assert report.exit_code in (0, 2) and len(report.stderr.splitlines()) <= 1, (report.output, report.exception)


@pytest.mark.parametrize(("kill_after", "delay_s"), _kill_points())
def test_killed_run_leaves_a_readable_prefix(kill_after, delay_s, tmp_path, start_training):
    run_path = tmp_path / "run.h5"
    child = start_training(run_path)
    last_read = _wait_for(child, kill_after)
    time.sleep(delay_s)
    last_printed = _kill(child, last_read)
    with lorascope.open_run(run_path) as run:
        _check_prefix(run, last_printed)
        n_steps = run.n_steps
    _commands_read(run_path, tmp_path, n_steps)


def test_live_file_is_readable_by_another_process_while_training_writes_it(tmp_path, start_training):
    run_path = tmp_path / "run.h5"
    child = start_training(run_path)
    first = _wait_for(child, 3)
    with lorascope.open_run(run_path) as run:  # opened while the child appends to it
        _check_prefix(run, first, live=True)
        rows_then = run.n_steps
        later = _wait_for(child, first + LAG + 2)
        run.refresh()
        _check_prefix(run, later, live=True, payloads=False)
        assert run.n_steps > rows_then  # new rows show up without reopening
        last_printed = _kill(child, later)
        run.refresh()
        _check_prefix(run, last_printed, payloads=False)
    with lorascope.open_run(run_path) as run:
        _check_prefix(run, last_printed)


def test_live_reader_reads_factors_and_updates_of_rows_that_appear_after_opening(tmp_path, start_training):
    run_path = tmp_path / "run.h5"
    child = start_training(run_path)
    first = _wait_for(child, LAG + 2)
    with lorascope.open_run(run_path) as run:
        rows_then = run.n_snapshots
        assert rows_then > 0
        run.factors(0, rows_then - 1)  # read once: the reader now holds the dataset's extent
        run.delta(0, rows_then - 1)
        later = _wait_for(child, first + LAG + 2)
        run.refresh()
        assert run.n_snapshots > rows_then
        newest = run.n_snapshots - 1
        u, v = run.factors(0, newest)
        assert np.all(np.isfinite(u)) and np.all(np.isfinite(v))
        assert np.all(np.isfinite(run.delta(0, newest)))
        _kill(child, later)
