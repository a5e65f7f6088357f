"""A reader follows a run file while a writer process appends to it (HDF5 SWMR), and a killed writer leaves every
flushed row readable.

The writer is a child process that prints one line per flushed step; the test synchronises on those lines and on
the child's stdin, never on wall-clock time. Expected values are functions of the step, shared with the child.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np

from lorascope import RunWriter, open_run
from lorascope.store import schema as S

SHAPES = [(4, 3), (3, 5), (2, 2)]
MODULES = [dict(name=f"layers.{i}.proj", module=f"layers.{i}.proj", parameter="weight", kind="mlp", role="up",
                layer=i, expert=-1, out_features=out, in_features=inp) for i, (out, inp) in enumerate(SHAPES)]
SNAPSHOT_EVERY = 3


def step_row(step: int) -> dict[str, list]:
    """The step row the writer appends at ``step``."""
    return {"step": [step], "examples_seen": [4 * step], "tokens_seen": [40 * step], "loss": [1.0 / step],
            "lr": [1e-3 * step], "grad_sq_norm": [[step, 2.0 * step, 0.5 * step]]}


def snapshot_row(step: int) -> dict:
    """The snapshot the writer appends at ``step``: a full, a top-1 and a missing spectrum, and one delta."""
    return {"step": step, "examples_seen": 4 * step, "tokens_seen": 40 * step,
            "energy": [float(step), step + 0.5, step + 0.25],
            "sv": [np.array([step, step / 2, step / 4]), np.array([float(step)]), None],
            "deltas": {0: np.full(SHAPES[0], float(step))}}


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_store_concurrent import MODULES, SNAPSHOT_EVERY, snapshot_row, step_row
    from lorascope.store.payloads import Snapshot
    from lorascope.store.writer import RunWriter

    path, n_steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    hold_after = {{int(s) for s in sys.argv[4].split(",") if s}}
    writer = RunWriter(path, MODULES, delta_dtype="float32").open()
    print("open", flush=True)
    for step in range(1, n_steps + 1):
        writer.append_steps(step_row(step))
        if step % SNAPSHOT_EVERY == 0:
            writer.append_snapshot(Snapshot(**snapshot_row(step)))
        print(step, flush=True)  # every row up to this step is flushed
        if step in hold_after:
            sys.stdin.readline()  # wait for the test (or to be killed)
        time.sleep(pause)
    print("closing", flush=True)
    sys.stdin.readline()  # close only when the test says so
    writer.close()
    print("closed", flush=True)
""").format(tests=str(Path(__file__).resolve().parent))


def start_writer(path: Path, n_steps: int, *, hold_after: tuple[int, ...] = (), pause: float = 0.0,
                 ) -> subprocess.Popen:
    """Start the writer process; it waits for a line on stdin after each step in ``hold_after``."""
    args = [str(path), str(n_steps), str(pause), ",".join(map(str, hold_after))]
    proc = subprocess.Popen([sys.executable, "-c", WRITER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "open", "the writer process did not start"
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        stream.close()


def read_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    assert line, f"the writer process ended early (exit code {proc.wait()})"
    return line


def tell(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()


def check_rows(run, at_least_steps: int) -> tuple[int, int]:
    """Every committed row holds what the writer wrote; returns the (steps, snapshots) row counts."""
    n, m = run.n_steps, run.n_snapshots
    assert n >= at_least_steps
    assert m >= at_least_steps // SNAPSHOT_EVERY
    steps = run.steps
    written = np.arange(1, n + 1)
    np.testing.assert_array_equal(steps["step"].values, written)
    for name in ("examples_seen", "tokens_seen", "loss", "lr", "grad_sq_norm"):
        want = np.array([step_row(s)[name][0] for s in written], dtype=steps[name].dtype).reshape(steps[name].shape)
        np.testing.assert_array_equal(steps[name].values, want, err_msg=name)
    snapshots = run.snapshots
    taken = SNAPSHOT_EVERY * np.arange(1, m + 1)
    np.testing.assert_array_equal(snapshots["step"].values, taken)
    for j, step in enumerate(taken):
        want = snapshot_row(int(step))
        np.testing.assert_array_equal(snapshots["energy"].values[j], want["energy"])
        np.testing.assert_array_equal(snapshots["sv_count"].values[j], [3, 1, 0])
        np.testing.assert_array_equal(snapshots["sv"].values[j, 0], want["sv"][0].astype(np.float32))
        assert snapshots["sv"].values[j, 1, 0] == step and np.isnan(snapshots["sv"].values[j, 1, 1:]).all()
        assert np.isnan(snapshots["sv"].values[j, 2]).all()
        np.testing.assert_array_equal(run.delta(0, j), want["deltas"][0])
    return n, m


def test_readers_opening_the_file_follow_a_live_writer(tmp_path):
    path = tmp_path / "run.h5"
    n_steps = 30
    proc = start_writer(path, n_steps, pause=0.002)
    try:
        while (line := read_line(proc)) != "closing":
            step = int(line)
            with open_run(path) as run:  # while the writer keeps appending
                assert run.status == S.STATUS_RECORDING and not run.complete
                check_rows(run, step)
        with open_run(path) as run:
            assert not run.complete
            assert check_rows(run, n_steps) == (n_steps, n_steps // SNAPSHOT_EVERY)
        tell(proc)
        assert read_line(proc) == "closed"
        assert proc.wait() == 0
    finally:
        stop(proc)
    with open_run(path) as run:
        assert run.complete
        assert check_rows(run, n_steps) == (n_steps, n_steps // SNAPSHOT_EVERY)


def test_a_reader_left_open_refreshes(tmp_path):
    path = tmp_path / "run.h5"
    n_steps, hold_every = 30, 5
    proc = start_writer(path, n_steps, hold_after=tuple(range(hold_every, n_steps + 1, hold_every)), pause=0.002)
    live = open_run(path)  # opened before the first row, kept open
    try:
        assert live.status == S.STATUS_RECORDING
        seen = (0, 0)
        while (line := read_line(proc)) != "closing":
            if int(line) % hold_every:
                continue
            # The writer waits while the reader refreshes (refreshing while a row lands is
            # test_refresh_while_a_row_lands_between_two_columns).
            live.refresh()
            counts = check_rows(live, int(line))
            assert counts >= seen, "rows never disappear"
            seen = counts
            tell(proc)
        live.refresh()
        assert check_rows(live, n_steps) == (n_steps, n_steps // SNAPSHOT_EVERY)
        # Closed before the writer closes: a reader still open makes the writer's close() fail
        # (test_close_succeeds_while_a_reader_has_the_file_open).
        live.close()
        tell(proc)
        assert read_line(proc) == "closed"
        assert proc.wait() == 0
    finally:
        live.close()
        stop(proc)
    with open_run(path) as run:
        assert run.complete


def test_a_reader_left_open_reads_deltas_of_new_snapshots(tmp_path):
    path = tmp_path / "run.h5"
    first, second = SNAPSHOT_EVERY, 2 * SNAPSHOT_EVERY
    proc = start_writer(path, second, hold_after=(first, second))
    try:
        while int(read_line(proc)) < first:
            pass
        with open_run(path) as run:
            np.testing.assert_array_equal(run.delta(0, 0), snapshot_row(first)["deltas"][0])
            tell(proc)
            while int(read_line(proc)) < second:
                pass
            run.refresh()
            assert run.n_snapshots == 2
            np.testing.assert_array_equal(run.delta(0, 1), snapshot_row(second)["deltas"][0])
    finally:
        stop(proc)


def test_open_run_is_current_while_another_run_of_the_file_is_open(tmp_path):
    path = tmp_path / "run.h5"
    proc = start_writer(path, 3, hold_after=(1, 2))
    try:
        assert read_line(proc) == "1"
        with open_run(path) as first:
            assert first.n_steps == 1
            tell(proc)
            assert read_line(proc) == "2"
            with open_run(path) as second:
                assert second.n_steps == 2
    finally:
        stop(proc)


def test_refresh_while_a_row_lands_between_two_columns(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    proc = start_writer(path, 3, hold_after=(1, 2))
    try:
        assert read_line(proc) == "1"
        with open_run(path) as run:
            refresh = h5py.Dataset.refresh
            landed = []

            def refresh_then_let_a_row_land(ds: h5py.Dataset) -> None:
                refresh(ds)
                if not landed and ds.name.startswith(f"/{S.GROUP_STEPS}/") and not ds.name.endswith(f"/{S.INDEX}"):
                    tell(proc)  # the writer appends step 2, all columns and the index, then waits again
                    landed.append(read_line(proc))

            monkeypatch.setattr(h5py.Dataset, "refresh", refresh_then_let_a_row_land)
            run.refresh()
            monkeypatch.undo()
            assert landed == ["2"]
            check_rows(run, 1)
            run.refresh()
            assert check_rows(run, 2)[0] == 2
    finally:
        stop(proc)


def test_writer_killed_after_flushed_rows_leaves_them_all(tmp_path):
    path = tmp_path / "run.h5"
    flushed = 8
    proc = start_writer(path, 20, hold_after=(flushed,))
    try:
        while int(read_line(proc)) < flushed:
            pass
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        stop(proc)
    with open_run(path) as run:
        assert run.status == S.STATUS_RECORDING and not run.complete
        assert S.ATTR_FINISHED not in run.attrs
        assert check_rows(run, flushed) == (flushed, flushed // SNAPSHOT_EVERY)


def test_writer_killed_at_any_moment_leaves_a_consistent_file(tmp_path):
    path = tmp_path / "run.h5"
    proc = start_writer(path, 400)  # killed while it keeps writing
    try:
        reported = 0
        while reported < 10:
            reported = int(read_line(proc))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        stop(proc)
    with open_run(path) as run:
        assert not run.complete
        check_rows(run, reported)  # at least what it reported, each row whole


READER = textwrap.dedent("""
    import sys
    from lorascope import open_run
    with open_run(sys.argv[1]) as run:
        print("open", flush=True)
        sys.stdin.readline()  # keep the file open until told
        run.refresh()
        print(run.status, flush=True)
""")


def test_close_succeeds_while_a_reader_has_the_file_open(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, MODULES).open()
    writer.append_steps(step_row(1))
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(reader) == "open"
        writer.close()
        tell(reader)
        assert read_line(reader) == S.STATUS_COMPLETE, "the reader that stayed open sees the final status"
    finally:
        writer.abandon()
        stop(reader)
    with open_run(path) as run:
        assert run.complete
