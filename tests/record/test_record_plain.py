"""Recording a plain PyTorch loop: a user's own model and a transformers Llama, trained for real, the run file
reopened and checked field by field against quantities computed independently in the loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorascope

pytestmark = pytest.mark.usefixtures("torch_single_thread")

RECORDED = ("embed", "mlp.0", "mlp.2", "out")  # the matrices of TinyTokenModel


def test_user_model_loop_records_steps_and_exact_updates(seed, run_path, tiny_token_model, copy_weights,
                                                         reference_update, check_recorded_update):
    model = tiny_token_model()
    before = copy_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    data = torch.Generator().manual_seed(seed)
    n_steps, batch = 6, 4
    fed_tokens, losses, lrs, grad_sq_mlp0, grad_sq_other = [], [], [], [], []

    # no time budget: on starved cores (the suite at low priority beside a study) it thinned step 5's snapshot
    with lorascope.record(model, run_path, optimizer=optimizer, total_steps=n_steps, time_budget=None) as recorder:
        for _ in range(n_steps):
            ids = torch.randint(0, model.vocab, (batch, 10), generator=data)
            real_tokens = int(torch.randint(5, 11, (batch,), generator=data).sum())  # e.g. tokens before padding
            loss = model.loss(ids)
            loss.backward()
            recorder.log(loss=loss, examples=batch, tokens=real_tokens)
            fed_tokens.append(real_tokens)
            losses.append(loss.item())
            lrs.append(scheduler.get_last_lr()[0])
            grad_sq_mlp0.append(float(model.mlp[0].weight.grad.double().square().sum()))
            grad_sq_other.append(sum(float(p.grad.double().square().sum()) for name, p in model.named_parameters()
                                     if name.removesuffix(".weight") not in RECORDED))
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    after = copy_weights(model)

    with lorascope.open_run(run_path) as run:
        assert run.complete and run.status == "complete"
        assert run.attrs["framework"] == "plain"
        assert list(run.modules["name"]) == list(RECORDED)
        assert dict(zip(run.modules["name"], run.modules["kind"])) == {
            "embed": "embedding", "mlp.0": "mlp", "mlp.2": "mlp", "out": "other"}
        assert (run.modules["out_features"].tolist(), run.modules["in_features"].tolist()) == (
            [40, 36, 24, 40], [24, 24, 36, 24])

        steps = run.steps
        np.testing.assert_array_equal(steps["step"], np.arange(1, n_steps + 1))
        np.testing.assert_array_equal(steps["batch_examples"], batch)
        np.testing.assert_array_equal(steps["examples_seen"], batch * np.arange(1, n_steps + 1))
        np.testing.assert_array_equal(steps["batch_tokens"], fed_tokens)
        np.testing.assert_array_equal(steps["tokens_seen"], np.cumsum(fed_tokens))
        np.testing.assert_allclose(steps["loss"], losses, rtol=1e-6)
        np.testing.assert_allclose(steps["lr"], lrs, rtol=1e-12)
        assert len(set(lrs)) == n_steps  # the schedule really moved
        np.testing.assert_allclose(steps["grad_sq_norm"].sel(module="mlp.0"), grad_sq_mlp0, rtol=1e-5)
        np.testing.assert_allclose(steps["grad_sq_norm_other"], grad_sq_other, rtol=1e-5)
        np.testing.assert_array_equal(steps["grad_nonfinite_modules"], 0)

        # total_steps <= snapshot_points: the log schedule snapshots every step.
        np.testing.assert_array_equal(run.snapshot_index, np.arange(1, n_steps + 1))
        np.testing.assert_array_equal(run.snapshots["examples_seen"], steps["examples_seen"])
        np.testing.assert_array_equal(run.snapshots["delta_nonfinite"], 0)
        for name in RECORDED:
            check_recorded_update(run, name, reference_update(before, after, name))

        recorder_config, optimizer_config = run.config["recorder"], run.config["optimizer"]
        assert recorder_config["total_steps"] == n_steps and recorder_config["snapshots"] == "log"
        assert optimizer_config["class"] == "torch.optim.adamw.AdamW"
        assert optimizer_config["defaults"]["lr"] == 1e-2 and optimizer_config["defaults"]["weight_decay"] == 0.01

        coverage = dict(zip(run.coverage["parameter"], run.coverage["recorded"]))
        assert set(coverage) == {name for name, _ in model.named_parameters()}
        assert {name for name, recorded in coverage.items() if recorded} == {f"{n}.weight" for n in RECORDED}


def test_llama_loop_counts_micro_batches_and_takes_the_model_loss(run_path, tiny_llama_config, copy_weights,
                                                                  reference_update, check_recorded_update):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    before = copy_weights(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    data = torch.Generator().manual_seed(3)
    n_steps, micro_batches, batch, length = 4, 2, 3, 12
    step_losses, step_tokens = [], []

    # No rec.log: examples, tokens (attention_mask sum) and loss (output.loss) come from the forward hooks.
    with lorascope.record(model, run_path, optimizer=optimizer):
        for _ in range(n_steps):
            micro_losses, tokens = [], 0
            for _ in range(micro_batches):
                ids = torch.randint(0, 64, (batch, length), generator=data)
                mask = (torch.arange(length) < torch.randint(3, length + 1, (batch, 1), generator=data)).long()
                out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
                (out.loss / micro_batches).backward()
                micro_losses.append(out.loss.item())
                tokens += int(mask.sum())
            with torch.no_grad():  # an evaluation forward in the middle of the step is not training data
                model(input_ids=ids)
            model.eval()
            model(input_ids=ids[:1])
            model.train()
            step_losses.append(np.mean(micro_losses))
            step_tokens.append(tokens)
            optimizer.step()
            optimizer.zero_grad()
    after = copy_weights(model)

    with lorascope.open_run(run_path) as run:
        assert run.complete
        steps = run.steps
        np.testing.assert_array_equal(run.step_index, np.arange(1, n_steps + 1))
        np.testing.assert_array_equal(steps["batch_examples"], micro_batches * batch)
        np.testing.assert_array_equal(steps["examples_seen"], micro_batches * batch * np.arange(1, n_steps + 1))
        np.testing.assert_array_equal(steps["tokens_seen"], np.cumsum(step_tokens))
        np.testing.assert_allclose(steps["loss"], step_losses, rtol=1e-6)
        np.testing.assert_allclose(steps["lr"], 0.5)
        assert set(run.coverage["parameter"]) == {name for name, _ in model.named_parameters()}
        assert run.config["model"]["class"] == "LlamaForCausalLM"
        assert run.config["model"]["config"]["hidden_size"] == 32
        # Open-ended log schedule (no total_steps): its first points are 1, 2, 3, 4; the final step is included.
        np.testing.assert_array_equal(run.snapshot_index, np.arange(1, n_steps + 1))
        for name in ("model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                     "model.layers.1.mlp.down_proj", "lm_head"):
            delta = reference_update(before, after, name)
            assert np.abs(delta).max() > 0
            check_recorded_update(run, name, delta)


def test_recording_leaves_training_bit_for_bit_unchanged(run_path, tiny_token_model):
    def train(record: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(5)
        model = tiny_token_model()
        model.mlp.insert(2, torch.nn.Dropout(0.2))  # draws from the global generator during training
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        recorder = lorascope.record(model, run_path, optimizer=optimizer, snapshots=1, overwrite=True) if record \
            else None
        for _ in range(4):
            model.loss(torch.randint(0, model.vocab, (4, 8))).backward()
            optimizer.step()
            optimizer.zero_grad()
        if recorder is not None:
            recorder.close()
        return {k: v.clone() for k, v in model.state_dict().items()} | {"rng": torch.rand(4)}

    plain, recorded = train(record=False), train(record=True)
    assert plain.keys() == recorded.keys()
    for key in plain:
        assert torch.equal(plain[key], recorded[key]), key


def test_close_without_context_manager_and_log_after_close_are_harmless(run_path, tiny_token_model):
    torch.manual_seed(0)
    model = tiny_token_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = lorascope.record(model, run_path, optimizer=optimizer, snapshots=[100])
    for _ in range(3):
        model.loss(torch.randint(0, model.vocab, (2, 6))).backward()
        optimizer.step()
        optimizer.zero_grad()
    recorder.close()
    recorder.close()  # idempotent
    # Detached: more training is not recorded and does not fail.
    model.loss(torch.randint(0, model.vocab, (2, 6))).backward()
    optimizer.step()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    with lorascope.open_run(run_path) as run:
        assert run.complete and run.n_steps == 3
        np.testing.assert_array_equal(run.snapshot_index, [3])  # none scheduled in range: only the final step
