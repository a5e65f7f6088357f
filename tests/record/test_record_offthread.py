"""Snapshots off the training thread (issue 16, item 1): the worker's spectra equal the training-thread path's,
a snapshot or matrix that cannot be computed is recorded as missing with its reason, the backlog policy is
explicit, and recording leaves the loop's thread settings alone."""

from __future__ import annotations

import json
import threading

import h5py
import numpy as np
import pytest
import torch
from conftest import missing_rows

import lorascope
from lorascope.model.taxonomy import MatrixRef
from lorascope.record import snapshot_worker as W
from lorascope.record.snapshot_worker import SnapshotWorker, factored_measure, gram_measure

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def config_section(path, name: str) -> dict:
    with h5py.File(path, "r", locking=False) as f:
        return json.loads(f["config"].attrs[name])


def train(model, path, *, steps: int, seed: int, **options):
    """A few AdamW steps of a TinyTokenModel on seeded random tokens, recorded to ``path``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(seed)
    with lorascope.record(model, path, optimizer=optimizer, **options) as recorder:
        for _ in range(steps):
            ids = torch.randint(0, model.vocab, (4, 10), generator=data)
            loss = model.loss(ids)
            loss.backward()
            recorder.log(loss=loss, examples=4)
            optimizer.step()
            optimizer.zero_grad()
    return model


# -- the kernel --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (300, 7), (1, 5), (6, 6)])
def test_gram_measure_matches_float64_lapack(seed, shape, monkeypatch):
    monkeypatch.setattr(W, "_GRAM_BLOCK", 16)  # several blocks of rows even for small matrices
    rng = np.random.default_rng(seed)
    delta = (rng.standard_normal(shape) * rng.uniform(0.01, 10)).astype(np.float32)
    energy, nonfinite, spectrum = gram_measure(delta)
    reference = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    assert nonfinite == 0
    np.testing.assert_allclose(energy, np.sum(delta.astype(np.float64) ** 2), rtol=1e-12)
    np.testing.assert_allclose(spectrum, reference, rtol=0, atol=1e-9 * reference[0])
    np.testing.assert_allclose(np.sum(spectrum ** 2), energy, rtol=1e-10)  # sum of s_i^2 = ||M||_F^2


def test_gram_measure_counts_nonfinite_entries_and_gives_no_spectrum():
    delta = np.ones((5, 3), dtype=np.float32)
    delta[1, 2], delta[4, 0] = np.nan, np.inf
    energy, nonfinite, spectrum = gram_measure(delta)
    assert nonfinite == 2 and spectrum is None and not np.isfinite(energy)


def test_factored_measure_equals_the_dense_spectrum(seed):
    rng = np.random.default_rng(seed)
    left, right = rng.standard_normal((30, 4)).astype(np.float32), rng.standard_normal((4, 20)).astype(np.float32)
    energy, nonfinite, spectrum = factored_measure(left, right, 20)
    dense = left.astype(np.float64) @ right.astype(np.float64)
    reference = np.linalg.svd(dense, compute_uv=False)
    assert nonfinite == 0 and spectrum.shape == (20,)
    np.testing.assert_allclose(spectrum, reference, rtol=0, atol=1e-9 * reference[0])
    np.testing.assert_allclose(energy, np.sum(dense ** 2), rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float32])
def test_host_copies_convert_to_float32_exactly(seed, dtype):
    tensor = (torch.randn(7, 5, dtype=torch.float64) * 3).to(dtype)
    np.testing.assert_array_equal(W._float32(tensor), tensor.float().numpy())


# -- recorded runs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_worker_spectra_equal_the_training_thread_spectra(seed, tmp_path, tiny_token_model, dtype):
    """The same training recorded twice, with the worker and on the training thread (the recorder before issue
    16): steps, totals and energies agree, and every singular value within 1e-6 of s_1."""
    runs = {}
    for worker in (True, False):
        torch.manual_seed(seed)
        model = tiny_token_model().to(dtype)
        path = tmp_path / f"worker_{worker}.h5"
        train(model, path, steps=8, seed=seed, total_steps=8, snapshot_worker=worker, time_budget=None)
        runs[worker] = path
    with lorascope.open_run(runs[True]) as new, lorascope.open_run(runs[False]) as old:
        assert new.complete and old.complete
        a, b = new.snapshots, old.snapshots
        np.testing.assert_array_equal(a["step"], np.arange(1, 9))
        np.testing.assert_array_equal(a["step"], b["step"])
        np.testing.assert_array_equal(a["examples_seen"], b["examples_seen"])
        np.testing.assert_array_equal(a["sv_count"], b["sv_count"])
        np.testing.assert_allclose(a["energy"], b["energy"], rtol=1e-9)
        s1 = b["sv"].values[..., :1]
        np.testing.assert_array_less(np.nan_to_num(np.abs(a["sv"].values - b["sv"].values) / s1), 1e-6)
        assert np.array_equal(np.isnan(a["sv"].values), np.isnan(b["sv"].values))
    assert config_section(runs[True], "recording_cost")["snapshot_worker"] is True
    assert config_section(runs[False], "recording_cost")["snapshot_worker"] is False
    assert missing_rows(runs[True]) == []


def test_recording_leaves_the_loops_thread_settings_alone(seed, run_path, tiny_token_model):
    from threadpoolctl import threadpool_info

    torch.set_num_threads(2)  # the fixture restores the session's setting afterwards
    before = (torch.get_num_threads(), torch.get_num_interop_threads(),
              sorted((i["internal_api"], i["num_threads"]) for i in threadpool_info()))
    train(tiny_token_model(), run_path, steps=6, seed=seed, total_steps=6, snapshot_threads=1)
    after = (torch.get_num_threads(), torch.get_num_interop_threads(),
             sorted((i["internal_api"], i["num_threads"]) for i in threadpool_info()))
    assert after == before
    assert not [t for t in threading.enumerate() if t.name.startswith("lorascope-")]


def test_a_nonfinite_update_has_no_spectrum_and_training_goes_on(seed, run_path, tiny_token_model):
    model = tiny_token_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(seed)
    with lorascope.record(model, run_path, optimizer=optimizer, snapshots=[2, 3], time_budget=None) as recorder:
        for step in range(1, 5):
            model.loss(torch.randint(0, model.vocab, (4, 10), generator=data)).backward()
            if step == 3:
                model.mlp[0].weight.grad[0, 0] = float("nan")
            recorder.log(examples=4)
            optimizer.step()
            optimizer.zero_grad()
    with lorascope.open_run(run_path) as run:
        assert run.complete
        snaps = run.snapshots
        np.testing.assert_array_equal(snaps["step"], [2, 3, 4])
        i = list(run.modules["name"]).index("mlp.0")
        assert snaps["delta_nonfinite"].values[0, i] == 0 and snaps["sv_count"].values[0, i] > 0
        assert snaps["delta_nonfinite"].values[1, i] == 1 and snaps["sv_count"].values[1, i] == 0
        others = [j for j in range(len(run.modules)) if j != i]
        assert (snaps["sv_count"].values[1, others] > 0).all()


def test_a_matrix_that_fails_is_missing_with_its_reason(seed, run_path, tiny_token_model, monkeypatch):
    real = W.gram_measure

    def failing(delta):
        if delta.shape == (36, 24):  # mlp.0
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return real(delta)

    monkeypatch.setattr(W, "gram_measure", failing)
    train(tiny_token_model(), run_path, steps=3, seed=seed, snapshots=[1, 3], time_budget=None)
    with lorascope.open_run(run_path) as run:
        assert run.complete
        i = list(run.modules["name"]).index("mlp.0")
        assert (run.snapshots["sv_count"].values[:, i] == 0).all()
        assert np.isnan(run.snapshots["energy"].values[:, i]).all()
        assert (np.delete(run.snapshots["sv_count"].values, i, axis=1) > 0).all()
    rows = missing_rows(run_path)
    assert [s for s, _ in rows] == [1, 3]
    assert all(r.startswith("failed: matrix mlp.0: LinAlgError: Eigenvalues did not converge") for _, r in rows)


def test_a_snapshot_that_fails_is_missing_and_the_file_stays_readable(seed, run_path, tiny_token_model, monkeypatch):
    def broken(self, job):
        raise MemoryError("cannot allocate the Gram matrix")

    monkeypatch.setattr(SnapshotWorker, "compute", broken)
    train(tiny_token_model(), run_path, steps=4, seed=seed, snapshots=[2], time_budget=None)
    with lorascope.open_run(run_path) as run:
        assert run.complete and run.n_steps == 4 and run.n_snapshots == 0
    assert missing_rows(run_path) == [(2, "failed: MemoryError: cannot allocate the Gram matrix"),
                                      (4, "failed: MemoryError: cannot allocate the Gram matrix")]


def hold_the_worker(monkeypatch) -> threading.Event:
    """Make the worker wait for the returned event before computing anything."""
    release = threading.Event()
    real = SnapshotWorker.compute

    def held(self, job):
        release.wait(timeout=60)
        return real(self, job)

    monkeypatch.setattr(SnapshotWorker, "compute", held)
    return release


def test_skip_policy_records_the_skipped_steps_and_keeps_the_final_snapshot(seed, run_path, tiny_token_model,
                                                                            monkeypatch):
    release = hold_the_worker(monkeypatch)
    model = tiny_token_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(seed)
    recorder = lorascope.record(model, run_path, optimizer=optimizer, snapshots=[1, 2, 3, 4, 5],
                                snapshot_backlog="skip", time_budget=None)
    for _ in range(6):
        model.loss(torch.randint(0, model.vocab, (4, 10), generator=data)).backward()
        recorder.log(examples=4)
        optimizer.step()
        optimizer.zero_grad()
    release.set()
    recorder.close()  # the final snapshot waits for room
    with lorascope.open_run(run_path) as run:
        assert run.complete
        np.testing.assert_array_equal(run.snapshots["step"], [1, 6])
        # the snapshot of step 1 reached the writer after later step rows: its totals are still those of step 1
        np.testing.assert_array_equal(run.snapshots["examples_seen"], [4, 24])
    rows = missing_rows(run_path)
    assert [s for s, _ in rows] == [2, 3, 4, 5]
    assert all(r.startswith("skipped: the snapshot worker was behind") for _, r in rows)
    assert config_section(run_path, "recording_cost")["snapshots_skipped"] == 4


def test_snapshots_pending_at_close_use_the_threads_training_used(seed, monkeypatch):
    """While training runs the worker keeps to ``snapshot_threads``; once the recorder closes, training is over and
    the snapshots still pending use as many BLAS threads as training did."""
    limits: list[int] = []
    real_blas = W.blas_threads
    monkeypatch.setattr(W, "blas_threads", lambda limit: (limits.append(limit), real_blas(limit))[1])
    monkeypatch.setattr(W.torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(W.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(W.os, "getloadavg", lambda: (3.0, 3.0, 3.0))  # training's own three threads, nothing else
    release, real_compute = threading.Event(), SnapshotWorker.compute

    def held(self, job):
        if job.step == 2:
            release.wait(timeout=60)
        return real_compute(self, job)

    monkeypatch.setattr(SnapshotWorker, "compute", held)
    ref = MatrixRef("q", "q", "weight", "attention", "q", 0, -1, out_features=6, in_features=4)
    delivered: list = []
    worker = SnapshotWorker([ref], deliver=delivered.append, missing=lambda *args: None, buffer_bytes=1 << 20,
                            threads=1)
    worker.start()
    for step in (1, 2):
        worker.reserve(0, wait=True)
        worker.submit(W.SnapshotJob(step=step, matrices=[W.HostMatrix(dense=torch.randn(6, 4))], nbytes=0))
        while step == 1 and worker.computed < 1:
            threading.Event().wait(0.01)
    closing = threading.Thread(target=worker.close)
    closing.start()
    while not worker._closing.is_set():
        threading.Event().wait(0.01)
    release.set()
    closing.join()
    assert [snapshot.step for snapshot in delivered] == [1, 2]
    assert limits == [1, 3]  # step 1 during training, step 2 after close
    assert worker.close_wait_seconds > 0 and 0 <= worker.close_uncounted_seconds <= worker.close_wait_seconds


@pytest.mark.parametrize(("load", "threads"), [(3.0, 3), (2.0, 3), (5.0, 2), (6.6, 1), (9.0, 1)])
def test_threads_after_training_leave_the_cores_outside_load_keeps_busy(monkeypatch, load, threads):
    """Four cores, training on three: after training the worker takes the cores no other process keeps busy (the
    load average beyond training's own three threads), between its own one thread and training's three."""
    monkeypatch.setattr(W.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(W.os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert W.threads_after_training(1, 3) == threads


def test_threads_after_training_without_a_load_average(monkeypatch):
    def unavailable():
        raise OSError("no load average here")

    monkeypatch.setattr(W.os, "getloadavg", unavailable)
    assert W.threads_after_training(1, 8) == 1


def test_wait_policy_takes_every_snapshot(seed, run_path, tiny_token_model, monkeypatch):
    release = hold_the_worker(monkeypatch)
    timer = threading.Timer(0.2, release.set)
    timer.start()
    train(tiny_token_model(), run_path, steps=5, seed=seed, snapshots=[1, 2, 3], time_budget=None)
    timer.join()
    with lorascope.open_run(run_path) as run:
        np.testing.assert_array_equal(run.snapshots["step"], [1, 2, 3, 5])
        np.testing.assert_array_equal(run.snapshots["examples_seen"], [4, 8, 12, 20])
    assert missing_rows(run_path) == []


def test_randomized_measure_finds_the_top_values_and_the_exact_energy(seed):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((300, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((120, 40)))
    s = np.geomspace(10.0, 0.01, 40)
    delta = ((u * s) @ v.T).astype(np.float32)
    energy, nonfinite, top = W.randomized_measure(delta, 5, np.random.default_rng(0))
    reference = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    assert nonfinite == 0 and top.shape == (5,)
    np.testing.assert_allclose(energy, np.sum(delta.astype(np.float64) ** 2), rtol=1e-12)
    np.testing.assert_allclose(top, reference[:5], rtol=1e-5)
    delta[3, 4] = np.nan
    assert W.randomized_measure(delta, 5, np.random.default_rng(0))[1:] == (1, None)


def test_top_k_runs_on_the_worker_without_touching_torchs_random_stream(seed, run_path, tiny_token_model):
    torch.manual_seed(seed)
    model = tiny_token_model()
    state = torch.random.get_rng_state()
    train(model, run_path, steps=3, seed=seed, snapshots=[2], top_k=3, top_k_min_size=0, time_budget=None)
    assert torch.equal(torch.random.get_rng_state(), state)  # the loop here draws nothing from torch
    with lorascope.open_run(run_path) as run:
        np.testing.assert_array_equal(run.snapshots["sv_count"], 3)
    assert config_section(run_path, "recording_cost")["snapshot_worker"] is True


@pytest.mark.parametrize("worker", [True, False], ids=["worker", "training thread"])
def test_w0_in_the_parameter_dtype_gives_the_same_snapshots_in_half_the_memory(seed, tmp_path, tiny_token_model,
                                                                                 worker):
    """``w0_dtype="parameter"`` keeps a bf16 model's W_0 in bf16: the same values, so the same updates and spectra
    as the float32 copy, in half its bytes."""
    runs, kept = {}, {}
    for w0_dtype in ("float32", "parameter"):
        torch.manual_seed(seed)
        model = tiny_token_model().to(torch.bfloat16)
        path = tmp_path / f"{w0_dtype}.h5"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        data = torch.Generator().manual_seed(seed)
        with lorascope.record(model, path, optimizer=optimizer, total_steps=5, snapshot_worker=worker,
                              time_budget=None, w0_dtype=w0_dtype) as recorder:
            kept[w0_dtype] = sum(w.numel() * w.element_size() for w in recorder._w0 if w is not None)
            assert {w.dtype for w in recorder._w0} == {torch.float32 if w0_dtype == "float32" else torch.bfloat16}
            for _ in range(5):
                loss = model.loss(torch.randint(0, model.vocab, (4, 10), generator=data))
                loss.backward()
                recorder.log(loss=loss, examples=4)
                optimizer.step()
                optimizer.zero_grad()
        runs[w0_dtype] = path
    assert kept["parameter"] * 2 == kept["float32"]
    with lorascope.open_run(runs["float32"]) as wide, lorascope.open_run(runs["parameter"]) as narrow:
        np.testing.assert_array_equal(narrow.snapshots["energy"], wide.snapshots["energy"])
        np.testing.assert_array_equal(narrow.snapshots["sv"], wide.snapshots["sv"])


def test_w0_dtype_is_checked(run_path, tiny_token_model):
    with pytest.raises(lorascope.InvalidOptionError, match="w0_dtype"):
        lorascope.record(tiny_token_model(), run_path, w0_dtype="bfloat16")
