"""RunWriter.reopen: continuing a run file after a given step, including one left by a killed writer."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lorascope import open_run
from lorascope.errors import LorascopeError
from lorascope.store.payloads import Snapshot
from lorascope.store.writer import RunWriter

MODULES = [dict(name=f"m{i}", module=f"m{i}", parameter="weight", kind="mlp", role="", layer=i, expert=-1,
                out_features=3, in_features=2, transposed=False, part="", lora=False) for i in range(2)]

WRITE_AND_DIE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_store_reopen import MODULES
    from lorascope.store.payloads import Snapshot
    from lorascope.store.writer import RunWriter
    w = RunWriter({path!r}, MODULES, delta_dtype="float32").open()
    for step in range(1, 7):
        w.append_steps({{"step": [step], "batch_examples": [2], "examples_seen": [2 * step]}})
        if step % 2 == 0:
            w.append_snapshot(Snapshot(step=step, examples_seen=2 * step, energy=[step, step],
                                       sv=[np.ones(2), np.ones(1)], deltas={{0: np.full((3, 2), step)}}))
    w.flush()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _write(path, steps, snapshot_every=2):
    w = RunWriter(path, MODULES, delta_dtype="float32", overwrite=True).open()
    for step in range(1, steps + 1):
        w.append_steps({"step": [step], "examples_seen": [2 * step], "tokens_seen": [10 * step]})
        if step % snapshot_every == 0:
            w.append_snapshot(Snapshot(step=step, examples_seen=2 * step, energy=[step, step],
                                       sv=[np.ones(2), None], deltas={0: np.full((3, 2), step)}))
    return w


def test_reopen_drops_rows_after_the_resume_step(tmp_path):
    path = tmp_path / "run.h5"
    _write(path, 7).close()
    writer = RunWriter(path, MODULES, overwrite=True)
    assert writer.reopen(4) == (8, 40)
    writer.append_steps({"step": [5], "examples_seen": [10]})
    writer.close()
    with open_run(path) as run:
        assert run.complete
        np.testing.assert_array_equal(run.step_index, [1, 2, 3, 4, 5])
        np.testing.assert_array_equal(run.snapshot_index, [2, 4])
        np.testing.assert_array_equal(run.delta(0, 1), np.full((3, 2), 4))
        with pytest.raises(IndexError):
            run.delta(0, 2)


def test_reopen_rebuilds_a_file_left_by_a_killed_writer(tmp_path):
    path = tmp_path / "run.h5"
    script = WRITE_AND_DIE.format(tests=str(__import__("pathlib").Path(__file__).parent), path=str(path))
    subprocess.run([sys.executable, "-c", script], check=False)
    with open_run(path) as run:
        assert not run.complete and run.n_steps == 6
    writer = RunWriter(path, MODULES, overwrite=True)
    assert writer.reopen(5)[0] == 10
    writer.close()
    with open_run(path) as run:
        assert run.complete
        np.testing.assert_array_equal(run.step_index, [1, 2, 3, 4, 5])
        np.testing.assert_array_equal(run.snapshot_index, [2, 4])


def test_reopen_refuses_a_file_of_other_modules(tmp_path):
    path = tmp_path / "run.h5"
    _write(path, 2).close()
    other = [dict(m, name=m["name"] + "x") for m in MODULES]
    with pytest.raises(LorascopeError, match="other"):
        RunWriter(path, other, overwrite=True).reopen(1)
