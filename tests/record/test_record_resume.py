"""A transformers.Trainer run resumed from a checkpoint continues the same run file: no step duplicated or lost,
updates still measured against the W_0 of the very first start."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorascope  # noqa: E402
from lorascope.errors import LorascopeError  # noqa: E402
from lorascope.store.initial import initial_weights_path  # noqa: E402

VOCAB, SEQ, BATCH = 64, 12, 4


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.ids[i]}


class _CrashAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB)
    return transformers.LlamaForCausalLM(config)


def _trainer(model, out_dir, callbacks=()):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=10, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, logging_steps=1, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(64, seed=1), callbacks=list(callbacks))


@pytest.mark.parametrize("w0_dtype", ["float32", "parameter"])
def test_resumed_trainer_continues_the_same_file(tmp_path, w0_dtype):
    path = tmp_path / "run.h5"
    model = _model()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    first = _trainer(model, tmp_path / "out", callbacks=[_CrashAt(6)])
    lorascope.record(first, path, snapshots=[2, 5, 8], w0_dtype=w0_dtype)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.train()
    assert initial_weights_path(path).is_file()  # resumable by default: the Trainer saves checkpoints

    resumed_model = _model(seed=123)  # weights come from the checkpoint, not from this init
    second = _trainer(resumed_model, tmp_path / "out")
    lorascope.record(second, path, resume=True, snapshots=[2, 5, 8], w0_dtype=w0_dtype)
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))

    with lorascope.open_run(path) as run:
        assert run.complete
        np.testing.assert_array_equal(run.step_index, np.arange(1, 11))
        np.testing.assert_array_equal(run.steps.examples_seen.values, BATCH * np.arange(1, 11))
        np.testing.assert_array_equal(run.snapshot_index, [2, 5, 8, 10])
        final = run.snapshots.isel(snapshot=-1)
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            delta = resumed_model.state_dict()[name + ".weight"].double() - w0[name + ".weight"].double()
            np.testing.assert_allclose(float(final.energy.sel(module=name)), float((delta**2).sum()), rtol=1e-5)


def test_resume_needs_a_checkpointed_start(tmp_path):
    path = tmp_path / "run.h5"
    trainer = _trainer(_model(), tmp_path / "out")
    lorascope.record(trainer, path, resume=True)
    with pytest.raises(LorascopeError, match="starts at step 0"):
        trainer.train()
    assert not path.exists()
