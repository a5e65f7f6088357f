"""The recording's time budget (issue 16, item 2): the log-spaced schedule is thinned when snapshots cost more
than ``time_budget`` of the training time, never its final snapshot; the file says which steps were thinned and
why, and what recording cost. Costs are made large on purpose (a slow capture); nothing here asserts a time."""

from __future__ import annotations

import json
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import missing_rows

import lorascope
from lorascope.errors import InvalidOptionError
from lorascope.model.taxonomy import MatrixRef
from lorascope.record import snapshot_taker
from lorascope.record.schedule import BUDGET_GRACE_SECONDS, SnapshotSchedule, within_budget
from lorascope.record.snapshot_worker import snapshot_flops
from lorascope.store import RunWriter
from lorascope.store import schema as S
from lorascope.store.payloads import Snapshot

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def cost_of(path) -> dict:
    with h5py.File(path, "r", locking=False) as f:
        return json.loads(f["config"].attrs["recording_cost"])


def slow_capture(monkeypatch, seconds: float) -> None:
    """Every snapshot costs the training thread ``seconds`` (as a large model's copies would)."""
    real = snapshot_taker.capture

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(snapshot_taker, "capture", slow)


def train(model, path, *, steps: int, seed: int, **options):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(seed)
    with lorascope.record(model, path, optimizer=optimizer, **options) as recorder:
        for _ in range(steps):
            model.loss(torch.randint(0, model.vocab, (4, 10), generator=data)).backward()
            recorder.log(examples=4)
            optimizer.step()
            optimizer.zero_grad()


def test_within_budget_reserves_the_final_snapshot_and_counts_the_per_step_work():
    # 100 s of training at 5%: 5 s for the whole recording.
    assert within_budget(4.0, 0.5, 100.0, 0.05)  # 4 + 2 x 0.5 (the next and the final) <= 5
    assert not within_budget(4.1, 0.5, 100.0, 0.05)
    assert within_budget(3.0, 0.5, 100.0, 0.05, other_seconds=1.0)  # 4 <= 5 - 1 (the per-step work)
    assert not within_budget(3.0, 0.5, 100.0, 0.05, other_seconds=1.5)
    # The grace of small recordings: snapshots that cost 2 s in all, whatever the per-step work.
    assert within_budget(BUDGET_GRACE_SECONDS - 1, 0.5, 1.0, 0.05, other_seconds=10.0)
    assert not within_budget(BUDGET_GRACE_SECONDS - 1, 0.6, 1.0, 0.05)


def test_only_the_log_schedule_is_thinnable():
    assert SnapshotSchedule.log(24, 100).thinnable
    assert not SnapshotSchedule.every(5).thinnable
    assert not SnapshotSchedule.explicit([1, 2]).thinnable


def test_over_budget_snapshots_are_thinned_never_the_final_one(seed, run_path, tiny_token_model, monkeypatch):
    # Each snapshot costs 1.5 s: the grace holds the first one, the budget (0.05 of a few seconds) no other.
    slow_capture(monkeypatch, 1.5)
    steps = 12
    train(tiny_token_model(), run_path, steps=steps, seed=seed, total_steps=steps, time_budget=0.05)
    planned = SnapshotSchedule.log(24, steps).planned(steps)
    with lorascope.open_run(run_path) as run:
        assert run.complete
        taken = run.snapshot_index.tolist()
    rows = missing_rows(run_path)
    assert taken[0] == 1 and taken[-1] == steps
    assert sorted(taken + [s for s, _ in rows]) == planned  # every planned step is taken or said thinned
    assert len(rows) >= len(planned) - 3
    assert all(r.startswith("thinned: time_budget=0.05; snapshots had cost") for _, r in rows)
    cost = cost_of(run_path)
    assert cost["time_budget"] == 0.05
    assert (cost["snapshots_taken"], cost["snapshots_thinned"]) == (len(taken), len(rows))
    assert cost["snapshot_training_thread_seconds"] >= 1.5 * len(taken)
    assert cost["writer_cpu_seconds"] is None or cost["writer_cpu_seconds"] >= 0
    assert cost["share_of_training"] > 0.5  # the slow captures dominate this run


def test_before_a_snapshot_is_measured_its_cost_is_estimated_from_the_shapes(seed, run_path, tiny_token_model,
                                                                            monkeypatch):
    # A kernel of 1 flop/s makes the estimate of the tiny model's first snapshot thousands of seconds: the budget
    # thins every planned step before any snapshot is measured, and keeps the final one.
    monkeypatch.setattr(snapshot_taker, "gram_flops_per_second", lambda threads: 1.0)
    steps = 6
    train(tiny_token_model(), run_path, steps=steps, seed=seed, total_steps=steps, time_budget=0.05)
    with lorascope.open_run(run_path) as run:
        np.testing.assert_array_equal(run.snapshot_index, [steps])
    rows = missing_rows(run_path)
    assert [s for s, _ in rows] == list(range(1, steps))
    assert all("the next and the final snapshot were expected to cost" in r for _, r in rows)


def test_snapshot_flops_counts_the_worker_kernels():
    dense = MatrixRef("q", "q", "weight", "attention", "q", 0, -1, out_features=8, in_features=4)
    lora = MatrixRef("v", "v", "weight", "attention", "v", 0, -1, out_features=8, in_features=4, lora=True)
    gram = 8 * 4 * 4 + 4 / 3 * 4 ** 3  # the Gram matrix of the smaller side and its eigenvalues
    assert snapshot_flops([dense, lora]) == pytest.approx(gram)
    assert snapshot_flops([dense], grad_sv=True) == pytest.approx(2 * gram)
    assert snapshot_flops([dense], factors_k=2) == pytest.approx(8 * 4 * 4 + 9 * 4 ** 3)  # eigenvectors too
    assert snapshot_flops([dense], top_k=2) == pytest.approx(20 * 8 * 4 * 12)  # the randomized range finder
    assert snapshot_flops([dense], top_k=2, top_k_min_size=32) == pytest.approx(gram)  # not above the size


def test_no_budget_takes_every_planned_snapshot(seed, run_path, tiny_token_model, monkeypatch):
    slow_capture(monkeypatch, 0.3)
    train(tiny_token_model(), run_path, steps=8, seed=seed, total_steps=8, time_budget=None)
    with lorascope.open_run(run_path) as run:
        np.testing.assert_array_equal(run.snapshot_index, np.arange(1, 9))
    assert missing_rows(run_path) == []
    assert cost_of(run_path)["snapshots_thinned"] == 0


def test_explicit_steps_are_taken_as_asked(seed, run_path, tiny_token_model, monkeypatch):
    slow_capture(monkeypatch, 1.2)
    train(tiny_token_model(), run_path, steps=4, seed=seed, snapshots=[1, 2, 3], time_budget=0.01)
    with lorascope.open_run(run_path) as run:
        np.testing.assert_array_equal(run.snapshot_index, [1, 2, 3, 4])
    assert missing_rows(run_path) == []


@pytest.mark.parametrize(("name", "value"), [
    ("time_budget", 0), ("time_budget", 1.5), ("time_budget", True), ("time_budget", "5%"),
    ("snapshot_threads", 0), ("snapshot_buffer_mib", 0), ("snapshot_buffer_mib", float("inf")),
    ("snapshot_backlog", "drop"), ("snapshot_worker", 1),
])
def test_bad_snapshot_options_are_refused_with_the_usual_message(name, value):
    with pytest.raises(InvalidOptionError, match=f"The '{name}' option of lorascope.record must be"):
        lorascope.RecordOptions(**{name: value})


def test_files_without_the_missing_table_are_continued(tmp_path):
    """A file written before ``snapshots_missing`` existed reads as before, and a resumed run adds the table."""
    path = tmp_path / "run.h5"
    modules = [dict(name="q", module="q", parameter="weight", kind="attention", role="q", layer=0, expert=-1,
                    out_features=3, in_features=2)]
    with RunWriter(path, modules) as writer:
        writer.append_steps({"step": [1, 2, 3], "loss": [2.0, 1.5, 1.2]})
        writer.append_snapshot(Snapshot(step=2, energy=[5.0], sv=[np.array([2.0, 1.0])]))
        writer.append_missing(3, "thinned: a test")
    with h5py.File(path, "r+", locking=False) as f:
        assert [int(s) for s in f["snapshots_missing/step"]] == [3]
        del f[S.GROUP_MISSING]  # as an older file
    with lorascope.open_run(path) as run:
        assert run.n_snapshots == 1
    writer = RunWriter(path, modules, overwrite=True)
    writer.reopen(2)
    writer.append_missing(3, "skipped: again")
    writer.close()
    assert missing_rows(path) == [(3, "skipped: again")]
    writer = RunWriter(path, modules, overwrite=True)
    writer.reopen(2)  # rows after the resumed step are dropped
    writer.close()
    assert missing_rows(path) == []


def test_analyze_reports_the_recordings_own_cost(tmp_path):
    import lorascope

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.h5"
    with lorascope.record(model, path, optimizer=optimizer) as recorder:
        for _ in range(10):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            loss.backward()
            recorder.log(loss=loss)
            optimizer.step()
            optimizer.zero_grad()
    with lorascope.open_run(path) as run:
        cost = run.config["recording_cost"]
    note = next(n for n in lorascope.analyze(path).notes if "recording cost" in n)
    assert f"{cost['share_of_training']:.1%} of the training time ({cost['snapshots_taken']} snapshot(s) taken" in note
