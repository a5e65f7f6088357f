"""The snapshot copies' host buffers (issue 16): reused from one snapshot to the next once the worker has computed
a snapshot, never while a pending snapshot still holds them, with the same spectra as the training-thread path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import missing_rows

import lorascope
from lorascope.record.host_buffers import HostBuffers
from lorascope.record.snapshot_worker import SnapshotWorker

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_a_buffer_given_back_takes_the_next_copy_of_its_shape_and_dtype():
    buffers = HostBuffers()
    source = torch.randn(6, 4)
    first = buffers.copy(source)
    assert torch.equal(first, source) and first.data_ptr() != source.data_ptr()
    buffers.give_back([first, None])
    assert buffers.kept_bytes == 6 * 4 * 4
    again = buffers.copy(source * 2)
    assert again.data_ptr() == first.data_ptr() and torch.equal(again, source * 2)
    assert (buffers.allocated, buffers.reused, buffers.kept_bytes) == (1, 1, 0)
    other_dtype = buffers.copy(source.bfloat16())  # another dtype, or shape, gets its own buffer
    other_shape = buffers.copy(source.T)
    assert other_dtype.dtype == torch.bfloat16 and other_shape.shape == (4, 6) and buffers.allocated == 3
    buffers.give_back([again, other_dtype, other_shape])
    buffers.clear()
    assert buffers.kept_bytes == 0
    assert buffers.copy(source).data_ptr() not in {again.data_ptr(), other_dtype.data_ptr(), other_shape.data_ptr()}


def test_a_copy_of_a_noncontiguous_tensor_is_a_contiguous_host_tensor():
    source = torch.randn(5, 7)[:, ::2]
    copy = HostBuffers().copy(source)
    assert copy.is_contiguous() and torch.equal(copy, source)


def record(model, path, *, steps: int, seed: int, held: threading.Event | None = None, **options):
    """AdamW steps of a TinyTokenModel on seeded random tokens, a snapshot at every step; with ``held`` the worker
    computes nothing until the loop is over, so every snapshot is pending at once. Returns the worker's buffers."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(seed)
    recorder = lorascope.record(model, path, optimizer=optimizer, snapshots=list(range(1, steps + 1)),
                                time_budget=None, **options)
    for _ in range(steps):
        model.loss(torch.randint(0, model.vocab, (4, 10), generator=data)).backward()
        recorder.log(examples=4)
        optimizer.step()
        optimizer.zero_grad()
    if held is not None:
        held.set()
    recorder.close()
    worker = recorder._taker.worker
    return None if worker is None else worker.buffers


@pytest.mark.parametrize("pending", ["one at a time", "all at once"])
def test_reused_buffers_give_the_training_thread_paths_spectra(seed, tmp_path, tiny_token_model, monkeypatch,
                                                                pending):
    """Six snapshots with the worker, either each computed before the next is taken (the default buffer of one
    snapshot: the copies reuse the buffers the worker gave back) or all six pending at once, with gradient spectra
    (a buffer that holds them all: no buffer is reused while a pending snapshot holds it); the spectra equal the
    training-thread path's to 1e-6 of s_1. (One at a time, a gradient copy, taken before the optimizer step, may
    find the previous snapshot still computing: the exact counts are asserted without gradients.)"""
    steps, held = 6, None
    options = {}
    if pending == "all at once":
        held = threading.Event()
        real = SnapshotWorker.compute
        monkeypatch.setattr(SnapshotWorker, "compute", lambda self, job: (held.wait(60), real(self, job))[1])
        options.update(snapshot_buffer_mib=1024, grad_sv=True)
    torch.manual_seed(seed)
    buffers = record(tiny_token_model(), tmp_path / "worker.h5", steps=steps, seed=seed, held=held, **options)
    torch.manual_seed(seed)
    record(tiny_token_model(), tmp_path / "thread.h5", steps=steps, seed=seed, snapshot_worker=False,
           grad_sv=options.get("grad_sv", False))

    assert buffers is not None and buffers.kept_bytes == 0  # dropped at close
    per_snapshot = (buffers.allocated + buffers.reused) // steps
    if pending == "all at once":
        assert (buffers.allocated, buffers.reused) == (steps * per_snapshot, 0)
    else:
        assert (buffers.allocated, buffers.reused) == (per_snapshot, (steps - 1) * per_snapshot)
    with lorascope.open_run(tmp_path / "worker.h5") as new, lorascope.open_run(tmp_path / "thread.h5") as old:
        a, b = new.snapshots, old.snapshots
        np.testing.assert_array_equal(a["step"], np.arange(1, steps + 1))
        np.testing.assert_allclose(a["energy"], b["energy"], rtol=1e-9)
        for name in ("sv", "grad_sv") if options.get("grad_sv") else ("sv",):
            s1 = b[name].values[..., :1]
            np.testing.assert_array_less(np.nan_to_num(np.abs(a[name].values - b[name].values) / s1), 1e-6)
            assert np.array_equal(np.isnan(a[name].values), np.isnan(b[name].values))
    assert missing_rows(tmp_path / "worker.h5") == []
