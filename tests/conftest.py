"""Shared fixtures: seeds and tiny, locally built transformers configurations (never downloaded)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread_per_worker():
    """One intra-op thread per test process: the suite runs in two xdist workers on two cores, and the tiny
    models here gain nothing from more threads, while oversubscribed OpenMP workers waiting for a descheduled
    peer make each step orders of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[0, 1])
def seed(request: pytest.FixtureRequest) -> int:
    """A seed; tests using it must hold for every value. Also seeds torch's global generator."""
    torch.manual_seed(request.param)
    return request.param


@pytest.fixture
def tiny_llama_config():
    """Factory of tiny Llama configs: hidden 32, 2 layers, 4 heads, 2 KV heads, intermediate 48, vocab 64."""
    transformers = pytest.importorskip("transformers")

    def make(**overrides):
        kwargs = dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False,
        )
        kwargs.update(overrides)
        return transformers.LlamaConfig(**kwargs)

    return make


# -- recording tests (tests/test_record_*.py) -----------------------------------------------------------------

import re  # noqa: E402 - this section is appended to the shared conftest

import numpy as np  # noqa: E402

_FUSED_EXPERT_NAME = re.compile(r"^(?P<parameter>.+)\[(?P<expert>\d+)\](?:\.(?P<part>gate|up))?$")


@pytest.fixture
def tiny_mixtral_config():
    """Factory of tiny Mixtral configs (fused experts): hidden 32, 2 layers, 4 experts of intermediate 24, top-2."""
    transformers = pytest.importorskip("transformers")

    def make(**overrides):
        kwargs = dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=24, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False,
            num_local_experts=4, num_experts_per_tok=2,
        )
        kwargs.update(overrides)
        return transformers.MixtralConfig(**kwargs)

    return make


class TinyTokenModel(torch.nn.Module):
    """A user's own language model, no transformers: embedding, one residual MLP block, a norm, an output layer.

    Recorded matrices: ``embed`` (embedding), ``mlp.0`` and ``mlp.2`` (mlp), ``out`` (other).
    """

    def __init__(self, vocab: int = 40, dim: int = 24, hidden: int = 36) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, dim))
        self.norm = torch.nn.LayerNorm(dim)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.out(self.norm(x + self.mlp(x)))

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of a batch of token ids."""
        logits = self(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, self.vocab), ids[:, 1:].reshape(-1))


@pytest.fixture
def tiny_token_model():
    """Factory of :class:`TinyTokenModel` (seed torch first for reproducible weights)."""
    return TinyTokenModel


@pytest.fixture
def run_path(tmp_path):
    """Where a test's run file goes (not created)."""
    return tmp_path / "run.h5"


def write_loss_run(path, loss: np.ndarray, rank: int | None):
    """A run file holding only a loss curve (8 examples a step) of one MLP matrix: full fine-tuning, or a rank-``rank``
    PEFT LoRA run (its config's lora section), for the commands that read loss curves."""
    from lorascope.store.writer import RunWriter

    name = ("base_model.model." if rank else "") + "model.layers.0.mlp.up_proj"
    module = dict(name=name, module=name, parameter="weight", kind="mlp", role="up", layer=0, expert=-1,
                  out_features=8, in_features=4, lora=bool(rank))
    config = {"lora": {"default": {"r": rank, "lora_alpha": 32, "use_rslora": False, "scaling_rule": "alpha/r",
                                   "rank_pattern": {}, "alpha_pattern": {}}}} if rank else {}
    steps = np.arange(1, loss.size + 1)
    with RunWriter(path, [module], config=config, overwrite=True) as writer:
        writer.append_steps({"step": steps, "examples_seen": 8 * steps, "tokens_seen": 128 * steps, "loss": loss,
                             "batch_examples": np.full(loss.size, 8)})
    return path


def missing_rows(path) -> list[tuple[int, str]]:
    """The (step, reason) rows of a run file's ``snapshots_missing`` table."""
    import h5py

    with h5py.File(path, "r", locking=False) as f:
        group = f["snapshots_missing"]
        n = group["step"].shape[0]
        return [(int(s), r.decode()) for s, r in zip(group["step"][:n], group["reason"][:n], strict=True)]


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached float64 copy of every parameter, by name, for independent reference updates."""
    return {name: p.detach().to("cpu", torch.float64, copy=True) for name, p in model.named_parameters()}


def matrix_of(state: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """The (out, in) matrix a recorded name stands for, cut from a parameter dict without lorascope's help.

    ``"a.b"`` is ``state["a.b.weight"]``; ``"x.gate_up_proj[e].gate"`` / ``.up`` is the first / second half of
    expert ``e`` of the fused (E, 2I, H) tensor; ``"x.down_proj[e]"`` is expert ``e`` of (E, H, I).
    """
    fused = _FUSED_EXPERT_NAME.match(name)
    if fused is None:
        return state[name + ".weight"].numpy()
    tensor = state[fused["parameter"]][int(fused["expert"])]
    if fused["part"]:
        half = tensor.shape[0] // 2
        tensor = tensor[:half] if fused["part"] == "gate" else tensor[half:]
    return tensor.numpy()


@pytest.fixture
def reference_update():
    """``reference_update(before, after, name)``: W_after - W_before of a recorded matrix, float64 numpy."""

    def update(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], name: str) -> np.ndarray:
        return matrix_of(after, name) - matrix_of(before, name)

    return update


@pytest.fixture
def check_recorded_update():
    """``check(run, name, delta, snapshot=-1)``: the snapshot's energy of ``name`` equals ||delta||_F^2 (rtol 1e-5)
    and its singular values equal numpy's float64 SVD of ``delta`` (full spectrum, atol 1e-5 * s_1)."""

    def check(run, name: str, delta: np.ndarray, snapshot: int = -1) -> None:
        snapshots = run.snapshots
        i = list(run.modules["name"]).index(name)
        expected_sv = np.linalg.svd(np.asarray(delta, dtype=np.float64), compute_uv=False)
        energy = float(snapshots["energy"].values[snapshot, i])
        np.testing.assert_allclose(energy, float(np.sum(np.square(delta))), rtol=1e-5, atol=1e-30, err_msg=name)
        count = int(snapshots["sv_count"].values[snapshot, i])
        assert count == min(delta.shape), name
        recorded_sv = snapshots["sv"].values[snapshot, i]
        assert np.all(np.isnan(recorded_sv[count:])), f"{name}: padding past sv_count must be NaN"
        np.testing.assert_allclose(recorded_sv[:count], expected_sv, rtol=0, atol=1e-5 * expected_sv[0] + 1e-30,
                                   err_msg=name)
        np.testing.assert_allclose(np.sum(recorded_sv[:count].astype(np.float64) ** 2), energy, rtol=1e-4,
                                   err_msg=f"{name}: sum of s_i^2 must equal the energy")

    return check


@pytest.fixture
def copy_weights():
    """``copy_weights(model)``: a detached float64 copy of every parameter by name (see :func:`state_copy`)."""
    return state_copy


@pytest.fixture
def torch_single_thread():
    """Run torch ops on one intra-op thread for the test: tiny models gain nothing from more, and on a loaded
    2-core machine OpenMP workers waiting for a descheduled peer make each step orders of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reproduce_scripts():
    """``import_module`` for the reproduction study's scripts (examples/reproduce): they import each other by name,
    so their folder is on ``sys.path`` for the test module's duration."""
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "examples" / "reproduce")
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(folder)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the long tests (marked ``long``) first: with two workers, a four-minute study scheduled last would
    leave the other worker idle while it runs."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
