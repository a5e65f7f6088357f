"""The HF Trainer with gradient accumulation and Lightning with accumulate_grad_batches record the same noise-scale
inputs, step by step, as a plain loop fed the same micro-batches (weights held fixed with lr = 0, so every
framework sees the same gradients)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

import lorascope  # noqa: E402
from lorascope.analysis.noise import noise_scale  # noqa: E402

N, SEQ, VOCAB, MICRO, PASSES = 48, 8, 64, 4, 3
STEPS = N // (MICRO * PASSES)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (N, SEQ), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.ids[i]}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB))


def _plain(path, model):
    loader = torch.utils.data.DataLoader(_Tokens(), batch_size=MICRO, shuffle=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    with lorascope.record(model, path, optimizer=opt):
        batches = iter(loader)
        for _ in range(STEPS):
            for _ in range(PASSES):
                (model(**next(batches)).loss / PASSES).backward()
            opt.step()
            opt.zero_grad()


class _SequentialTrainer(transformers.Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _hf(path, model, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=STEPS, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=PASSES, learning_rate=0.0, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, max_grad_norm=1e-6,  # clipping must not touch the recorded (pre-clip) norms
    )
    trainer = _SequentialTrainer(model=model, args=args, train_dataset=_Tokens())
    lorascope.record(trainer, path)
    trainer.train()


class _Module(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Tokens(), batch_size=MICRO, shuffle=False)


def _lightning(path, model):
    trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, accumulate_grad_batches=PASSES, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    lorascope.record(trainer, path)
    trainer.fit(_Module(model))


def test_frameworks_record_the_same_noise_scale_inputs(tmp_path):
    base = _model()
    paths = {name: tmp_path / f"{name}.h5" for name in ("plain", "hf", "lightning")}
    _plain(paths["plain"], copy.deepcopy(base))
    _hf(paths["hf"], copy.deepcopy(base), tmp_path)
    _lightning(paths["lightning"], copy.deepcopy(base))
    views = {}
    for name, path in paths.items():
        with lorascope.open_run(path) as run:
            views[name] = run.steps
    reference = views["plain"]
    assert reference.sizes["step"] == STEPS
    np.testing.assert_array_equal(reference.gns_batch_small.values, MICRO)
    np.testing.assert_array_equal(reference.gns_batch_big.values, MICRO * PASSES)
    # Lightning names modules under its LightningModule ("model." prefix): compare by position.
    for name in ("hf", "lightning"):
        other = views[name]
        np.testing.assert_array_equal(other.gns_batch_small.values, MICRO)
        np.testing.assert_array_equal(other.gns_batch_big.values, MICRO * PASSES)
        for column in ("gns_sq_norm_small", "gns_sq_norm_big"):
            np.testing.assert_allclose(other[column].values, reference[column].values, rtol=2e-4, err_msg=name)
        expected = noise_scale(reference).final["all"]["b_simple"]
        assert noise_scale(other).final["all"]["b_simple"] == pytest.approx(expected, rel=1e-3)
