"""Recording a real Lightning ``Trainer`` run with gradient accumulation; the run file is checked field by field
against what the LightningModule itself saw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import lorascope  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("torch_single_thread"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),  # lightning 2.6 on a newer torch
]

VOCAB, LENGTH, BATCH, ACCUMULATION, MAX_STEPS = 32, 8, 4, 2, 5
RECORDED = ("embed", "fc1", "fc2")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].roll(1)}


class _TinyModule(pl.LightningModule):
    """Embedding and two linear layers; remembers the losses, learning rates and gradients it saw."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Embedding(VOCAB, 16), nn.Linear(16, 24), nn.Linear(24, VOCAB)
        self.fail_at_step = fail_at_step
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.grad_sq_fc1: list[float] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.embed(input_ids))))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.fail_at_step is not None and self.global_step + 1 == self.fail_at_step:
            raise RuntimeError("simulated failure")
        loss = nn.functional.cross_entropy(self(batch["input_ids"]).reshape(-1, VOCAB), batch["labels"].reshape(-1))
        self.losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.grad_sq_fc1.append(float(self.fc1.weight.grad.double().square().sum()))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=MAX_STEPS, accumulate_grad_batches=ACCUMULATION, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def _loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_Tokens(64, seed=2), batch_size=BATCH)


def test_lightning_trainer_run(run_path, copy_weights, reference_update, check_recorded_update):
    torch.manual_seed(0)
    module = _TinyModule()
    before = copy_weights(module)
    trainer = _trainer()
    callback = lorascope.record(trainer, run_path)
    assert callback in trainer.callbacks
    trainer.fit(module, _loader())
    after = copy_weights(module)

    with lorascope.open_run(run_path) as run:
        assert run.complete
        assert run.attrs["framework"] == "lightning"
        assert list(run.modules["name"]) == list(RECORDED)
        steps = run.steps
        assert trainer.global_step == MAX_STEPS
        np.testing.assert_array_equal(run.step_index, np.arange(1, MAX_STEPS + 1))
        per_step = BATCH * ACCUMULATION
        np.testing.assert_array_equal(steps["batch_examples"], per_step)
        np.testing.assert_array_equal(steps["examples_seen"], per_step * np.arange(1, MAX_STEPS + 1))
        np.testing.assert_array_equal(steps["tokens_seen"], per_step * LENGTH * np.arange(1, MAX_STEPS + 1))
        np.testing.assert_array_equal(steps["batch_loss_tokens"], per_step * LENGTH)  # no label is -100
        # Lightning divides the loss by accumulate_grad_batches before backward; the record is the step's mean.
        np.testing.assert_allclose(steps["loss"], np.reshape(module.losses, (MAX_STEPS, ACCUMULATION)).mean(axis=1),
                                   rtol=1e-6)
        np.testing.assert_allclose(steps["lr"], module.lrs, rtol=1e-12)
        assert module.lrs[0] != module.lrs[-1]
        np.testing.assert_allclose(steps["grad_sq_norm"].sel(module="fc1"), module.grad_sq_fc1, rtol=1e-5)

        np.testing.assert_array_equal(run.snapshot_index, np.arange(1, MAX_STEPS + 1))
        for name in RECORDED:
            check_recorded_update(run, name, reference_update(before, after, name))

        config = run.config
        assert config["trainer"]["accumulate_grad_batches"] == ACCUMULATION
        assert config["trainer"]["max_steps"] == MAX_STEPS
        assert config["dataset"] == {"examples": 64}
        assert config["recorder"]["total_steps"] == MAX_STEPS
        assert config["optimizer"]["class"] == "torch.optim.sgd.SGD" and config["optimizer"]["defaults"]["lr"] == 0.2
        assert "before clipping" in config["recorder"]["grad_timing"]
        assert set(run.coverage["parameter"]) == {name for name, _ in module.named_parameters()}


def test_lightning_exception_marks_the_run_failed_and_keeps_earlier_steps(run_path):
    torch.manual_seed(0)
    module = _TinyModule(fail_at_step=3)
    trainer = _trainer()
    lorascope.record(trainer, run_path)
    with pytest.raises(RuntimeError, match="simulated failure"):
        trainer.fit(module, _loader())
    with lorascope.open_run(run_path) as run:
        assert run.status == "failed" and not run.complete
        np.testing.assert_array_equal(run.step_index, [1, 2])
        np.testing.assert_array_equal(run.snapshot_index, [1, 2])
        assert np.all(np.isfinite(run.snapshots["energy"]))
