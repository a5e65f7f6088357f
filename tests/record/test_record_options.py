"""Recorder options and the snapshot schedule, each checked on a real (tiny) training run reopened from its file:
log-spaced / every-N / explicit snapshots plus the final step, top-k spectra with exact energy, singular vectors,
gradient spectra, full updates, and module selection by kind or regex."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorascope
from lorascope.record.schedule import SnapshotSchedule

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _train(model, path, n_steps, *, seed=0, grads_of=None, **options):
    """Train ``model`` for ``n_steps`` with recording; returns the gradient of ``grads_of`` (a parameter name)
    at every step, as float64 numpy, taken where the optimizer steps."""
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(seed)
    grads = []
    with lorascope.record(model, path, optimizer=optimizer, **options):
        for _ in range(n_steps):
            model.loss(torch.randint(0, model.vocab, (4, 8), generator=data)).backward()
            if grads_of is not None:
                grads.append(params[grads_of].grad.double().numpy().copy())
            optimizer.step()
            optimizer.zero_grad()
    return grads


# -- snapshot schedule ------------------------------------------------------------------------------------------

def test_default_log_schedule_with_known_total(run_path, tiny_token_model):
    torch.manual_seed(0)
    total, points = 12, 4
    _train(tiny_token_model(), run_path, total, total_steps=total, snapshot_points=points)
    expected = sorted({round(total ** (i / (points - 1))) for i in range(points)})
    assert expected == [1, 2, 5, 12]
    with lorascope.open_run(run_path) as run:
        assert run.config["recorder"]["snapshots"] == "log"
        np.testing.assert_array_equal(run.snapshot_index, expected)
        np.testing.assert_array_equal(run.snapshots["examples_seen"], 4 * np.asarray(expected))


def test_log_schedule_fitted_to_total_is_log_spaced():
    planned = SnapshotSchedule.log(24, 10_000).planned(10_000)
    assert planned[0] == 1 and planned[-1] == 10_000 and 20 <= len(planned) <= 24
    ratios = np.diff(np.log(planned[len(planned) // 2:]))  # past the integer-rounding region: equal log steps
    np.testing.assert_allclose(ratios, np.log(10_000) / 23, rtol=0.05)


def test_open_ended_log_schedule_thins_out_and_keeps_the_final_step(run_path, tiny_token_model):
    torch.manual_seed(0)
    n_steps = 30
    _train(tiny_token_model(), run_path, n_steps)
    with lorascope.open_run(run_path) as run:
        snapshots = run.snapshot_index.tolist()
    assert snapshots[0] == 1 and snapshots[-1] == n_steps
    assert snapshots[:-1] == SnapshotSchedule.log(24).planned(n_steps)
    assert len(snapshots) < n_steps / 2  # log-spaced: sparser as steps grow
    gaps = np.diff(snapshots[:-1])
    assert np.all(np.diff(gaps) >= 0)


@pytest.mark.parametrize(("snapshots", "n_steps", "expected"), [
    (3, 7, [3, 6, 7]),                             # every N, plus the final step
    (3, 6, [3, 6]),                                # the final step is not snapshotted twice
    ([2, 5, 40], 6, [2, 5, 6]),                    # explicit list; steps past the end never come
    (SnapshotSchedule.every(2), 5, [2, 4, 5]),     # a schedule object
    (SnapshotSchedule.explicit([1, 4]), 4, [1, 4]),
])
def test_every_n_and_explicit_schedules(snapshots, n_steps, expected, run_path, tiny_token_model):
    torch.manual_seed(0)
    _train(tiny_token_model(), run_path, n_steps, snapshots=snapshots)
    with lorascope.open_run(run_path) as run:
        np.testing.assert_array_equal(run.snapshot_index, expected)
        np.testing.assert_array_equal(run.step_index, np.arange(1, n_steps + 1))


def test_reusable_options_with_keyword_override(run_path, tiny_token_model):
    torch.manual_seed(0)
    options = lorascope.RecordOptions(snapshots=2, kinds=["mlp"])
    _train(tiny_token_model(), run_path, 3, options=options, snapshots=[1])
    with lorascope.open_run(run_path) as run:
        np.testing.assert_array_equal(run.snapshot_index, [1, 3])
        assert list(run.modules["name"]) == ["mlp.0", "mlp.2"]
        assert run.config["recorder"]["snapshots"] == [1] and run.config["recorder"]["kinds"] == ["mlp"]


# -- spectra, factors, gradients, full updates --------------------------------------------------------------------

def test_top_k_keeps_exact_energy_and_approximates_the_top_values(run_path, tiny_token_model, copy_weights,
                                                                  reference_update):
    torch.manual_seed(0)
    model = tiny_token_model()
    before = copy_weights(model)
    k = 3
    _train(model, run_path, 5, snapshots=[5], top_k=k, top_k_min_size=0)
    after = copy_weights(model)
    with lorascope.open_run(run_path) as run:
        snapshots = run.snapshots
        assert run.config["recorder"]["top_k"] == k
        np.testing.assert_array_equal(snapshots["sv_count"], k)
        assert snapshots.sizes["sv_index"] == k  # the file's spectrum axis is only as long as needed
        for i, name in enumerate(run.modules["name"]):
            delta = reference_update(before, after, name)
            exact = np.linalg.svd(delta, compute_uv=False)
            np.testing.assert_allclose(snapshots["energy"].values[0, i], np.sum(delta**2), rtol=1e-5)
            top = snapshots["sv"].values[0, i]
            assert np.all(np.diff(top) <= 0) and np.all(top <= exact[0] * (1 + 1e-5))
            np.testing.assert_allclose(top, exact[:k], rtol=0.05, err_msg=name)
            np.testing.assert_allclose(top[0], exact[0], rtol=1e-3, err_msg=name)


def test_top_k_spares_small_matrices_by_default(run_path, tiny_token_model):
    torch.manual_seed(0)
    _train(tiny_token_model(), run_path, 2, top_k=3)  # every matrix is far below top_k_min_size
    with lorascope.open_run(run_path) as run:
        full = np.minimum(run.modules["out_features"], run.modules["in_features"]).to_numpy()
        np.testing.assert_array_equal(run.snapshots["sv_count"].values, np.broadcast_to(full, (run.n_snapshots, 4)))


@pytest.mark.parametrize("randomized", [False, True])
def test_factors_are_the_top_singular_vectors(randomized, run_path, tiny_token_model, copy_weights,
                                              reference_update):
    torch.manual_seed(0)
    model = tiny_token_model()
    before = copy_weights(model)
    k = 2
    _train(model, run_path, 4, snapshots=[4], factors_k=k, top_k_min_size=0 if randomized else 1_000_000)
    after = copy_weights(model)
    with lorascope.open_run(run_path) as run:
        assert run.config["recorder"]["factors_k"] == k
        for name in run.modules["name"]:
            delta = reference_update(before, after, name)
            u_ref, s_ref, vt_ref = np.linalg.svd(delta)
            u, v = run.factors(name, 0)
            assert u.shape == (delta.shape[0], k) and v.shape == (delta.shape[1], k)
            np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-4)
            np.testing.assert_allclose(v.T @ v, np.eye(k), atol=1e-4)
            # Sign-insensitive: each vector matches numpy's up to a joint sign flip of u_i and v_i.
            cos_u = np.abs(np.sum(u * u_ref[:, :k], axis=0))
            cos_v = np.abs(np.sum(v * vt_ref[:k].T, axis=0))
            tolerance = 1e-2 if randomized else 1e-4
            np.testing.assert_allclose(cos_u, 1, atol=tolerance, err_msg=name)
            np.testing.assert_allclose(cos_v, 1, atol=tolerance, err_msg=name)
            assert np.all(np.sign(np.sum(u * u_ref[:, :k], axis=0)) == np.sign(np.sum(v * vt_ref[:k].T, axis=0)))


@pytest.mark.parametrize("worker", [True, False], ids=["on the worker", "on the training thread"])
def test_grad_sv_matches_numpy_on_the_gradient_at_snapshot_steps(run_path, tiny_token_model, worker):
    torch.manual_seed(0)
    # total_steps tells the recorder that step 4 is the last one, so its gradient is kept for the final snapshot
    # (without it the final snapshot is taken at close, when the gradients are gone). On the worker the gradients
    # are copied before the optimizer step and their spectra computed there (float64 Gram route).
    grads = _train(tiny_token_model(), run_path, 4, snapshots=[2, 3], total_steps=4, grad_sv=True,
                   grads_of="mlp.0.weight", snapshot_worker=worker)
    with lorascope.open_run(run_path) as run:
        snapshots = run.snapshots
        np.testing.assert_array_equal(run.snapshot_index, [2, 3, 4])
        i = list(run.modules["name"]).index("mlp.0")
        for row, step in enumerate([2, 3, 4]):
            expected = np.linalg.svd(grads[step - 1], compute_uv=False)
            assert snapshots["grad_sv_count"].values[row, i] == len(expected)
            np.testing.assert_allclose(snapshots["grad_sv"].values[row, i, : len(expected)], expected, rtol=0,
                                       atol=1e-6 * expected[0])
            assert np.all(snapshots["grad_sv_count"].values[row] > 0)


def test_store_delta_float16(run_path, tiny_token_model, copy_weights, reference_update):
    torch.manual_seed(0)
    model = tiny_token_model()
    before = copy_weights(model)
    _train(model, run_path, 3, store_delta="float16")
    after = copy_weights(model)
    with lorascope.open_run(run_path) as run:
        last = run.n_snapshots - 1
        for name in run.modules["name"]:
            delta = reference_update(before, after, name)
            stored = run.delta(name, last)
            assert stored.dtype == np.float16 and stored.shape == delta.shape
            np.testing.assert_allclose(stored, delta, rtol=2e-3, atol=1e-3 * np.abs(delta).max(), err_msg=name)


def test_randomized_spectra_leave_the_training_random_stream_alone(run_path, tiny_token_model):
    """Top-k spectra and singular vectors use a randomized SVD; drawing its random matrices from torch's global
    generator would change dropout masks and data order of the training being recorded."""

    def train(record: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(11)
        model = tiny_token_model()
        model.mlp.insert(2, torch.nn.Dropout(0.3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        recorder = lorascope.record(model, run_path, optimizer=optimizer, snapshots=1, top_k=2, factors_k=2,
                                    top_k_min_size=0, overwrite=True) if record else None
        for _ in range(3):
            model.loss(torch.randint(0, model.vocab, (4, 8))).backward()
            optimizer.step()
            optimizer.zero_grad()
        if recorder is not None:
            recorder.close()
        return {k: v.clone() for k, v in model.state_dict().items()} | {"next draw": torch.rand(3)}

    plain, recorded = train(record=False), train(record=True)
    for key in plain:
        assert torch.equal(plain[key], recorded[key]), key


# -- selection ----------------------------------------------------------------------------------------------------

def _llama_run(path, tiny_llama_config, **options):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with lorascope.record(model, path, optimizer=optimizer, **options):
        for _ in range(2):
            ids = torch.randint(0, 64, (2, 8))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return lorascope.open_run(path)


@pytest.mark.parametrize(("options", "expected"), [
    ({"kinds": ["mlp"]}, [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]),
    ({"modules": r"self_attn"}, [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]),
    ({"kinds": ["attention", "head"], "modules": r"layers\.1\.|lm_head"},
     [f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"] + ["lm_head"]),
    ({"kinds": "embedding"}, ["model.embed_tokens"]),
])
def test_selection_by_kind_and_regex(options, expected, run_path, tiny_llama_config):
    with _llama_run(run_path, tiny_llama_config, **options) as run:
        assert list(run.modules["name"]) == expected
        assert run.steps.sizes["module"] == len(expected)
        assert np.all(np.isfinite(run.steps["grad_sq_norm"])) and np.all(run.snapshots["energy"] > 0)
        coverage = run.coverage.set_index("parameter")
        assert set(coverage.index[coverage["recorded"]]) == {f"{name}.weight" for name in expected}
        excluded = coverage[~coverage["recorded"] & (coverage["shape"].str.count("x") == 1)]
        assert len(excluded) == 16 - len(expected)  # every 2-D weight not selected says why
        assert excluded["reason"].str.startswith("excluded by selection").all()
        # Gradients of everything not selected still count, as "other".
        assert np.all(run.steps["grad_sq_norm_other"] > 0)


def test_kind_map_overrides_the_heuristics(run_path, tiny_token_model):
    torch.manual_seed(0)
    _train(tiny_token_model(), run_path, 1, kind_map={r"^out$": "head", r"^mlp\.": "attention"})
    with lorascope.open_run(run_path) as run:
        assert dict(zip(run.modules["name"], run.modules["kind"])) == {
            "embed": "embedding", "mlp.0": "attention", "mlp.2": "attention", "out": "head"}
