"""Step rows reach the writer thread in batches (lorascope/record/background.py): one hand-off per step woke the
writer every step and cost the training thread the interpreter lock."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_record_offthread import train

import lorascope
from lorascope.record import background as B

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture
def handoffs(monkeypatch):
    """The kinds the training thread and the worker queue, in order."""
    seen: list[tuple[str, int]] = []
    real = B.BackgroundWriter._put_quietly

    def counted(self, kind, payload):
        seen.append((kind, len(payload) if kind == B._STEPS else 0))
        return real(self, kind, payload)

    monkeypatch.setattr(B.BackgroundWriter, "_put_quietly", counted)
    return seen


def test_fast_steps_are_handed_over_together_and_all_reach_the_file(seed, run_path, tiny_token_model, handoffs):
    train(tiny_token_model(), run_path, steps=12, seed=seed, snapshots=[12], flush_seconds=60)
    batches = [n for kind, n in handoffs if kind == B._STEPS]
    assert sum(batches) == 12 and len(batches) < 12  # held, then handed over before the final snapshot
    last = {kind: i for i, (kind, _) in enumerate(handoffs)}
    assert last[B._STEPS] < last[B._MARK]  # every row reached the writer before the final snapshot's mark
    with lorascope.open_run(run_path) as run:
        np.testing.assert_array_equal(run.steps["step"], np.arange(1, 13))
        assert int(run.snapshots["examples_seen"].values[-1]) == 12 * 4  # the snapshot saw every row before it


def test_flush_seconds_zero_hands_over_every_step(seed, run_path, tiny_token_model, handoffs):
    train(tiny_token_model(), run_path, steps=5, seed=seed, snapshots=[5], flush_seconds=0)
    assert [n for kind, n in handoffs if kind == B._STEPS] == [1] * 5


def test_held_rows_are_written_when_the_recorder_closes(seed, run_path, tiny_token_model):
    model = tiny_token_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with lorascope.record(model, run_path, optimizer=optimizer, snapshots=[10**9], flush_seconds=60) as recorder:
        for _ in range(3):
            ids = torch.randint(0, model.vocab, (4, 10))
            loss = model.loss(ids)
            loss.backward()
            recorder.log(loss=loss, examples=4)
            optimizer.step()
            optimizer.zero_grad()
        assert len(recorder._writer._held_steps) >= 2  # the first row may go at once; the rest wait
    with lorascope.open_run(run_path) as run:
        np.testing.assert_array_equal(run.steps["step"], [1, 2, 3])
        assert run.complete
