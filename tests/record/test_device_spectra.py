"""The snapshot worker's device route (lorascope.record.device_spectra). CUDA is not available here: the route's
torch code runs on a CPU device (no stream), the same arithmetic the worker sends to a GPU;
benchmarks/gpu_check.py checks it on CUDA against a float64 LAPACK SVD."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from test_record_offthread import train

import lorascope
from lorascope.errors import InvalidOptionError
from lorascope.record import device_spectra as D
from lorascope.record import snapshot_taker
from lorascope.record.snapshot_worker import gram_measure, snapshot_flops

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (300, 7), (7, 300), (1, 5), (6, 6)])
def test_device_route_matches_the_host_route_and_lapack(seed, shape, monkeypatch):
    monkeypatch.setattr(D, "_BLOCK", 16)  # several blocks of rows (or columns) even for small matrices
    rng = np.random.default_rng(seed)
    delta = (rng.standard_normal(shape) * rng.uniform(0.01, 10)).astype(np.float32)
    energy, nonfinite, spectrum = D.device_gram_measure(delta, CPU)
    host_energy, _, host_spectrum = gram_measure(delta)
    reference = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    assert nonfinite == 0 and spectrum.dtype == np.float64 and spectrum.shape == reference.shape
    np.testing.assert_allclose(energy, host_energy, rtol=1e-12)
    np.testing.assert_allclose(spectrum, reference, rtol=0, atol=1e-9 * reference[0])
    np.testing.assert_allclose(spectrum, host_spectrum, rtol=0, atol=1e-12 * reference[0])


def test_device_route_counts_nonfinite_entries_and_gives_no_spectrum():
    delta = np.ones((5, 3), dtype=np.float32)
    delta[1, 2], delta[4, 0] = np.nan, np.inf
    _, nonfinite, spectrum = D.device_gram_measure(delta, CPU)
    assert nonfinite == 2 and spectrum is None
    assert D.device_gram_measure(np.zeros((4, 0), dtype=np.float32), CPU) == (0.0, 0, pytest.approx(np.zeros(0)))


def test_auto_keeps_cpu_matrices_on_the_host_and_host_keeps_every_one_there():
    tensors = [{"weight": torch.zeros(3, 2)}, {"lora_A": torch.zeros(1, 2), "lora_B": torch.zeros(3, 1)}]
    assert D.spectra_devices(tensors, "auto") == [None, None]
    assert D.spectra_devices(tensors, "host") == [None, None]


def test_spectra_device_is_checked(run_path, tiny_token_model):
    with pytest.raises(InvalidOptionError, match="spectra_device"):
        lorascope.record(tiny_token_model(), run_path, spectra_device="gpu")


def test_a_recording_through_the_device_route_equals_the_host_route(seed, tmp_path, tiny_token_model, monkeypatch):
    """The whole recorder with every matrix sent to the device route (a CPU device here): the same snapshots as
    the host route to 1e-9 of s_1, and the route's own time in ``recording_cost``."""
    paths = {}
    for route in ("host", "device"):
        if route == "device":
            monkeypatch.setattr(snapshot_taker, "spectra_devices", lambda tensors, option: [CPU] * len(tensors))
        torch.manual_seed(seed)
        paths[route] = tmp_path / f"{route}.h5"
        train(tiny_token_model(), paths[route], steps=6, seed=seed, total_steps=6, time_budget=None)
    with lorascope.open_run(paths["host"]) as host, lorascope.open_run(paths["device"]) as device:
        a, b = device.snapshots, host.snapshots
        np.testing.assert_array_equal(a["step"], b["step"])
        np.testing.assert_allclose(a["energy"], b["energy"], rtol=1e-9)
        s1 = b["sv"].values[..., :1]
        np.testing.assert_array_less(np.nan_to_num(np.abs(a["sv"].values - b["sv"].values) / s1), 1e-9)
    costs = {}
    for route, path in paths.items():
        with h5py.File(path, "r", locking=False) as f:
            costs[route] = json.loads(f["config"].attrs["recording_cost"])
    assert costs["device"]["spectra_device"] == ["cpu"] and costs["host"]["spectra_device"] == "host"
    assert costs["device"]["snapshot_worker_device_seconds"] > 0 == costs["host"]["snapshot_worker_device_seconds"]


def test_the_budget_expects_the_device_routes_speed_before_a_snapshot_is_measured(monkeypatch, tiny_token_model,
                                                                                  run_path):
    monkeypatch.setattr(snapshot_taker, "spectra_devices", lambda tensors, option: [CPU] * len(tensors))
    monkeypatch.setattr(snapshot_taker, "device_gram_flops_per_second", lambda device: 1e3)
    monkeypatch.setattr(snapshot_taker, "gram_flops_per_second", lambda threads: 1e12)
    model = tiny_token_model()
    recorder = lorascope.record(model, run_path, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    try:
        taker = recorder._taker
        flops = snapshot_flops(taker.refs)
        assert flops > 1e3 and taker.estimated_seconds() == pytest.approx(flops / 1e3)  # the device's speed
    finally:
        recorder.close()
