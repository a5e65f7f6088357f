"""Recording what issue 18 needs: the update's singular vectors off the training thread, the intruder dimensions of
each weight (Shuttleworth et al. 2024, Def. 3.1) and the gradient's singular vectors, written by the real recorder
to a real run file and read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorascope
from lorascope.errors import InvalidOptionError

pytestmark = [
    pytest.mark.usefixtures("torch_single_thread"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),  # raised inside peft
]


# -- planted intruders ---------------------------------------------------------------------------------------------

def orthogonal(n: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def hadamard4() -> np.ndarray:
    h = np.array([[1.0, 1.0], [1.0, -1.0]])
    return np.kron(h, h) / 2.0


def planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W_0, W_t, expected intruder_cos): W_t's left singular vectors are y_j = X_0 R e_j with R = blockdiag(H_4 / 2,
    a rotation by 0.3 rad, I): the first four spread evenly over four of W_0's vectors (max |cos| 0.5), the next two
    rotated by 0.3 rad (cos 0.3), the rest W_0's own (1). Singular values are well apart, so each y_j is defined."""
    x0, z0 = orthogonal(n, seed), orthogonal(n, seed + 1)
    w0 = x0 @ np.diag(np.linspace(4.0, 0.5, n)) @ z0.T
    rotation = np.eye(n)
    rotation[:4, :4] = hadamard4()
    c, s = np.cos(0.3), np.sin(0.3)
    rotation[4:6, 4:6] = [[c, -s], [s, c]]
    st = 10.0 + 2.0 * np.arange(n)[::-1]  # 10 + 2(n-1), ..., 12, 10: descending
    wt = x0 @ rotation @ np.diag(st) @ z0.T
    expected = np.array([0.5] * 4 + [c, c] + [1.0] * (n - 6))
    return w0, wt, expected


class Planted(torch.nn.Module):
    def __init__(self, w0: np.ndarray) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.from_numpy(w0))


def assign_and_step(model: torch.nn.Module, weights: list[np.ndarray], path, **options) -> None:
    """A fake training loop: each step assigns the next weight, then a real (lr 0) optimizer step fires the hooks."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with lorascope.record(model, path, optimizer=optimizer, total_steps=len(weights), time_budget=None,
                          **options) as recorder:
        for w in weights:
            with torch.no_grad():
                model.proj.weight.copy_(torch.from_numpy(w))
            model.proj.weight.grad = torch.ones_like(model.proj.weight)
            recorder.log(loss=1.0, examples=1)
            optimizer.step()


@pytest.mark.parametrize("worker", [True, False])
@pytest.mark.parametrize(("n", "k", "min_size"), [(8, 8, 1_000_000), (40, 6, 0)])  # exact; randomized (40x40)
def test_planted_intruder_dimensions_are_found(run_path, worker, n, k, min_size):
    w0, wt, expected = planted(n, seed=n)
    assign_and_step(Planted(w0), [w0, wt], run_path, snapshots=[1, 2], intruder_k=k, top_k_min_size=min_size,
                    snapshot_worker=worker)
    with lorascope.open_run(run_path) as run:
        assert run.intruder_k == k
        cos, sv = run.snapshots["intruder_cos"].values[:, 0], run.snapshots["weight_sv"].values[:, 0]
        # Step 1: W_t = W_0, every direction is W_0's own.
        np.testing.assert_allclose(cos[0], 1.0, atol=1e-5)
        np.testing.assert_allclose(sv[0], np.linspace(4.0, 0.5, n)[:k], rtol=1e-5)
        # Step 2: the planted rotation.
        np.testing.assert_allclose(cos[1], expected[:k], atol=1e-5)
        np.testing.assert_allclose(sv[1], (10.0 + 2.0 * np.arange(n)[::-1])[:k], rtol=1e-5)
        assert run.config["recorder"]["intruder_k"] == k


def test_a_recording_without_intruder_k_has_no_intruder_columns(run_path):
    w0, wt, _ = planted(8, seed=8)
    assign_and_step(Planted(w0), [w0, wt], run_path, snapshots=[2])
    with lorascope.open_run(run_path) as run:
        assert run.intruder_k == 0 and "intruder_cos" not in run.snapshots
        assert run.grad_factors(0, 0) is None and run.factors(0, 0) is None


@pytest.mark.parametrize("bad", [-1, "x", True, 2.5])
def test_a_bad_intruder_k_is_one_clear_line(run_path, tiny_token_model, bad):
    with pytest.raises(InvalidOptionError) as info:
        lorascope.record(tiny_token_model(), run_path, optimizer=None, intruder_k=bad)
    message = str(info.value)
    assert message == (f"The 'intruder_k' option of lorascope.record must be an int in the range [0, inf). "
                       f"Got {bad!r} instead.")
    assert "\n" not in message and not run_path.exists()


# -- the update's and the gradient's vectors ------------------------------------------------------------------------

def train_tiny(model, path, *, steps: int, seed: int, watch: str | None = None, **options) -> list[np.ndarray]:
    """A few AdamW steps on seeded random tokens; returns the gradient of ``watch`` at every step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    data = torch.Generator().manual_seed(seed)
    grads = []
    with lorascope.record(model, path, optimizer=optimizer, total_steps=steps, time_budget=None,
                          **options) as recorder:
        for _ in range(steps):
            ids = torch.randint(0, 40, (4, 10), generator=data)
            loss = model.loss(ids)
            loss.backward()
            if watch is not None:
                grads.append(model.get_parameter(watch).grad.detach().double().numpy().copy())
            recorder.log(loss=loss, examples=4)
            optimizer.step()
            optimizer.zero_grad()
    return grads


def same_up_to_sign(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> int:
    """Check, column by column, |cos| > 1 - 1e-6 for the singular vectors whose value stands apart from its
    neighbours (relative gap above 1e-3); returns how many were compared."""
    compared = 0
    for j in range(a.shape[1]):
        gaps = [abs(s[j] - s[i]) / s[0] for i in (j - 1, j + 1) if 0 <= i < len(s)]
        if min(gaps, default=1.0) < 1e-3 or not np.isfinite(a[:, j]).all():
            continue
        cos = abs(float(a[:, j] @ b[:, j])) / (np.linalg.norm(a[:, j]) * np.linalg.norm(b[:, j]))
        assert cos > 1 - 1e-6, (j, cos)
        compared += 1
    return compared


def test_worker_vectors_equal_the_training_thread_ones(tmp_path, tiny_token_model, seed):
    paths = {}
    for worker in (True, False):
        torch.manual_seed(seed)
        paths[worker] = tmp_path / f"worker_{worker}.h5"
        train_tiny(tiny_token_model(), paths[worker], steps=4, seed=seed, snapshots=[1, 4], factors_k=5,
                   snapshot_worker=worker)
    with lorascope.open_run(paths[True]) as on_worker, lorascope.open_run(paths[False]) as on_thread:
        assert on_worker.config["recording_cost"]["snapshot_worker"] is True
        assert on_thread.config["recording_cost"]["snapshot_worker"] is False
        compared = 0
        for name in on_worker.modules["name"]:
            for snapshot in range(2):
                s = on_thread.snapshots["sv"].sel(module=name).values[snapshot]
                for a, b in zip(on_worker.factors(name, snapshot), on_thread.factors(name, snapshot), strict=True):
                    compared += same_up_to_sign(a, b, s)
        assert compared >= 30  # 4 matrices x 2 snapshots x U and V, most of their 5 columns


def test_gradient_vectors_are_stored_at_snapshot_steps(run_path, tiny_token_model):
    torch.manual_seed(0)
    grads = train_tiny(tiny_token_model(), run_path, steps=3, seed=0, watch="mlp.0.weight", snapshots=[2, 3],
                       factors_k=4, grad_sv=True)
    with lorascope.open_run(run_path) as run:
        for snapshot, step in enumerate(run.snapshot_index):
            u_ref, s_ref, vh_ref = np.linalg.svd(grads[step - 1], full_matrices=False)
            np.testing.assert_allclose(run.snapshots["grad_sv"].sel(module="mlp.0").values[snapshot, :4], s_ref[:4],
                                       rtol=1e-4)
            u, v = run.grad_factors("mlp.0", snapshot)
            assert u.shape == (36, 4) and v.shape == (24, 4)
            assert same_up_to_sign(u, u_ref[:, :4], s_ref) >= 3
            assert same_up_to_sign(v, vh_ref[:4].T, s_ref) >= 3


# -- a PEFT LoRA layer: W_0 is the base weight -------------------------------------------------------------------

@pytest.mark.parametrize("worker", [True, False])
def test_lora_intruders_use_the_base_weight_plus_the_merged_update(run_path, tiny_llama_config, worker):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_llama_config())
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=64, target_modules=["q_proj", "down_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    start = layer.base_layer.weight.detach().double().numpy().copy()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    data = torch.Generator().manual_seed(1)
    with lorascope.record(model, run_path, optimizer=optimizer, total_steps=4, snapshots=[4], intruder_k=5,
                          factors_k=2, snapshot_worker=worker, time_budget=None):
        for _ in range(4):
            ids = torch.randint(0, 64, (3, 10), generator=data)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        merged = (layer.base_layer.weight + layer.get_delta_weight("default")).double().numpy()
    assert np.abs(merged - start).max() > 1e-3  # the adapter moved
    x0 = np.linalg.svd(start)[0]
    y, s, _ = np.linalg.svd(merged)
    expected = np.abs(x0.T @ y[:, :5]).max(axis=0)
    with lorascope.open_run(run_path) as run:
        name = "base_model.model.model.layers.0.self_attn.q_proj"
        np.testing.assert_allclose(run.snapshots["intruder_cos"].sel(module=name).values[0], expected, atol=1e-4)
        np.testing.assert_allclose(run.snapshots["weight_sv"].sel(module=name).values[0], s[:5], rtol=1e-5)
        # The factored update has rank 2: two vectors, the rest NaN.
        u, v = run.factors(name, 0)
        assert np.isfinite(u[:, :2]).all() and np.isfinite(v[:, :2]).all()
        if worker:
            assert np.isnan(u[:, 2:]).all()


def test_lora_factors_on_the_worker_equal_the_training_thread_ones(tmp_path, tiny_llama_config):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    paths = {}
    for worker in (True, False):
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(tiny_llama_config())
        model = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        data = torch.Generator().manual_seed(1)
        paths[worker] = tmp_path / f"worker_{worker}.h5"
        with lorascope.record(model, paths[worker], optimizer=optimizer, total_steps=3, snapshots=[3], factors_k=3,
                              snapshot_worker=worker, time_budget=None):
            for _ in range(3):
                ids = torch.randint(0, 64, (3, 10), generator=data)
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    with lorascope.open_run(paths[True]) as on_worker, lorascope.open_run(paths[False]) as on_thread:
        compared = 0
        for name in on_worker.modules["name"]:
            s = on_thread.snapshots["sv"].sel(module=name).values[0]
            for a, b in zip(on_worker.factors(name, 0), on_thread.factors(name, 0), strict=True):
                compared += same_up_to_sign(a, b, s)
        assert compared >= 20  # 4 LoRA layers x U and V x most of their 3 columns
