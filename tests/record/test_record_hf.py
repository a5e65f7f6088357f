"""Recording a real ``transformers.Trainer`` run with gradient accumulation, on a tiny Llama and on a tiny Mixtral
whose fused experts must be recorded per expert (gate and up halves apart); the run file is checked field by field
against what the Trainer fed, logged and computed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorascope  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

VOCAB, LENGTH = 64, 12
BATCH, ACCUMULATION, MAX_STEPS = 2, 2, 4


class _PaddedTokens(torch.utils.data.Dataset):
    """In-memory causal-LM examples of random length, right-padded: input_ids, attention_mask, labels."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        lengths = torch.randint(3, LENGTH + 1, (n, 1), generator=g)
        self.mask = (torch.arange(LENGTH) < lengths).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.ids[i].masked_fill(self.mask[i] == 0, -100)}


class _CountingCollator:
    """Stacks examples and remembers the tokens (attention_mask sum) of every batch it built, in order."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {key: torch.stack([f[key] for f in features]) for key in features[0]}
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


class _GradientProbe(transformers.TrainerCallback):
    """Squared gradient norms of chosen matrices where the Trainer steps the optimizer (after clipping)."""

    def __init__(self, model: torch.nn.Module, matrices: dict[str, tuple[str, slice | tuple]]) -> None:
        self.params = dict(model.named_parameters())
        self.matrices = matrices
        self.grad_sq: dict[str, list[float]] = {name: [] for name in matrices}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for name, (parameter, index) in self.matrices.items():
            grad = self.params[parameter].grad[index]
            self.grad_sq[name].append(float(grad.double().square().sum()))


def _train(model, out_dir, run_path, probe_matrices):
    collator = _CountingCollator()
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=MAX_STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION, learning_rate=3e-3, lr_scheduler_type="linear",
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
    )
    probe = _GradientProbe(model, probe_matrices)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_PaddedTokens(32, seed=1),
                                   data_collator=collator, callbacks=[probe])
    callback = lorascope.record(trainer, run_path)
    assert callback in trainer.callback_handler.callbacks
    trainer.train()
    return trainer, collator, probe


def _check_trainer_run(run, trainer, collator, probe, model, before, after, names, check_recorded_update,
                       reference_update):
    assert run.complete
    assert run.attrs["framework"] == "transformers"
    assert run.attrs["framework_version"] == transformers.__version__

    steps = run.steps
    assert trainer.state.global_step == MAX_STEPS
    np.testing.assert_array_equal(run.step_index, np.arange(1, MAX_STEPS + 1))
    per_step = BATCH * ACCUMULATION
    np.testing.assert_array_equal(steps["batch_examples"], per_step)
    np.testing.assert_array_equal(steps["examples_seen"], per_step * np.arange(1, MAX_STEPS + 1))
    # The collator may build a batch ahead (end-of-data lookahead); the first MAX_STEPS * ACCUMULATION were fed.
    fed = np.asarray(collator.tokens[: MAX_STEPS * ACCUMULATION]).reshape(MAX_STEPS, ACCUMULATION).sum(axis=1)
    np.testing.assert_array_equal(steps["batch_tokens"], fed)
    np.testing.assert_array_equal(steps["tokens_seen"], np.cumsum(fed))

    # With gradient accumulation the Trainer passes num_items_in_batch, so each micro-batch loss is its share of
    # the step's token mean, and the Trainer logs their sum for the step (logging_steps=1). The recorder must log
    # the same number, not the average of the shares (which would be 1/ACCUMULATION of it).
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == MAX_STEPS
    np.testing.assert_allclose(steps["loss"], [entry["loss"] for entry in logged], rtol=1e-4)
    assert np.all(np.isfinite(steps["loss"]))
    np.testing.assert_allclose(steps["lr"], [entry["learning_rate"] for entry in logged], rtol=1e-9)
    assert len(set(steps["lr"].values.tolist())) > 1  # the linear schedule moved

    for name, expected in probe.grad_sq.items():
        np.testing.assert_allclose(steps["grad_sq_norm"].sel(module=name), expected, rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(steps["grad_nonfinite_modules"], 0)

    np.testing.assert_array_equal(run.snapshot_index, np.arange(1, MAX_STEPS + 1))  # log schedule over 4 steps
    for name in names:
        delta = reference_update(before, after, name)
        assert np.abs(delta).max() > 0, name
        check_recorded_update(run, name, delta)

    config = run.config
    assert config["trainer"]["gradient_accumulation_steps"] == ACCUMULATION
    assert config["trainer"]["per_device_train_batch_size"] == BATCH
    assert config["trainer"]["max_steps"] == MAX_STEPS
    assert config["dataset"] == {"examples": 32}
    assert "max_grad_norm=1.0" in config["recorder"]["grad_timing"]
    assert config["recorder"]["total_steps"] == MAX_STEPS
    assert "AdamW" in config["optimizer"]["class"] and config["optimizer"]["defaults"]["lr"] == 3e-3
    assert set(run.coverage["parameter"]) == {name for name, _ in model.named_parameters()}


def test_trainer_on_llama(tmp_path, run_path, tiny_llama_config, copy_weights, reference_update,
                          check_recorded_update):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    before = copy_weights(model)
    probe_matrices = {"model.layers.0.self_attn.q_proj": ("model.layers.0.self_attn.q_proj.weight", slice(None)),
                      "lm_head": ("lm_head.weight", slice(None))}
    trainer, collator, probe = _train(model, tmp_path / "out", run_path, probe_matrices)
    after = copy_weights(model)
    names = ("model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
             "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj", "lm_head")
    with lorascope.open_run(run_path) as run:
        assert len(run.modules) == 16
        _check_trainer_run(run, trainer, collator, probe, model, before, after, names, check_recorded_update,
                           reference_update)


def test_trainer_on_mixtral_records_every_expert(tmp_path, run_path, tiny_mixtral_config, copy_weights,
                                                 reference_update, check_recorded_update):
    torch.manual_seed(0)
    config = tiny_mixtral_config()
    model = transformers.MixtralForCausalLM(config)
    before = copy_weights(model)
    experts, inter = config.num_local_experts, config.intermediate_size
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    probe_matrices = {f"{gate_up}[1].gate": (gate_up, (1, slice(0, inter))),
                      f"{gate_up}[1].up": (gate_up, (1, slice(inter, None))),
                      "model.layers.1.mlp.experts.down_proj[2]": ("model.layers.1.mlp.experts.down_proj", 2),
                      "model.layers.0.mlp.gate": ("model.layers.0.mlp.gate.weight", slice(None))}
    trainer, collator, probe = _train(model, tmp_path / "out", run_path, probe_matrices)
    after = copy_weights(model)
    names = (f"{gate_up}[1].gate", f"{gate_up}[1].up", f"{gate_up}[3].gate", "model.layers.1.mlp.experts.down_proj[2]",
             "model.layers.0.mlp.gate", "model.layers.1.self_attn.o_proj")
    with lorascope.open_run(run_path) as run:
        modules = run.modules.set_index("name")
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}.mlp.experts"
            for expert in range(experts):
                for part, role in (("gate", "gate"), ("up", "up")):
                    row = modules.loc[f"{prefix}.gate_up_proj[{expert}].{part}"]
                    assert (row["kind"], row["role"], row["expert"], row["layer"]) == ("moe_expert", role, expert,
                                                                                       layer)
                    assert (row["out_features"], row["in_features"]) == (inter, config.hidden_size)
                row = modules.loc[f"{prefix}.down_proj[{expert}]"]
                assert (row["kind"], row["role"], row["expert"]) == ("moe_expert", "down", expert)
                assert (row["out_features"], row["in_features"]) == (config.hidden_size, inter)
        assert modules.loc["model.layers.0.mlp.gate", "kind"] == "router"
        assert (modules["kind"] == "moe_expert").sum() == config.num_hidden_layers * experts * 3
        _check_trainer_run(run, trainer, collator, probe, model, before, after, names, check_recorded_update,
                           reference_update)
