"""Recording a PEFT LoRA model in a plain loop: the recorded update of each adapted matrix is the merged LoRA update,
checked against PEFT's own merge (in float64), for the energy, the spectrum and the stored full update."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lorascope  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("torch_single_thread"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),  # raised inside peft
]

RANK, ALPHA, STEPS = 4, 8, 4
PREFIX = "base_model.model."


@pytest.mark.parametrize(("use_rslora", "rule", "scaling"), [(False, "alpha/r", ALPHA / RANK),
                                                             (True, "alpha/sqrt(r)", ALPHA / RANK**0.5)])
def test_lora_update_equals_peft_merge(use_rslora, rule, scaling, run_path, tiny_llama_config, check_recorded_update):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_llama_config())
    base_weights = {k: v.detach().double().clone() for k, v in base.state_dict().items()}
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", use_rslora=use_rslora)
    model = peft.get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    q_layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_layer.scaling["default"] == pytest.approx(scaling)
    data = torch.Generator().manual_seed(1)
    grad_sq_q, losses = [], []

    with lorascope.record(model, run_path, optimizer=optimizer, store_delta="float32", total_steps=STEPS):
        for _ in range(STEPS):
            ids = torch.randint(0, 64, (3, 10), generator=data)
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            losses.append(out.loss.item())
            grad_sq_q.append(sum(float(p.grad.double().square().sum())
                                 for p in (q_layer.lora_A["default"].weight, q_layer.lora_B["default"].weight)))
            optimizer.step()
            optimizer.zero_grad()

    merged = copy.deepcopy(model).double().merge_and_unload().state_dict()
    with lorascope.open_run(run_path) as run:
        assert run.complete
        names = list(run.modules["name"])
        adapted = [f"{PREFIX}model.layers.{i}.{m}" for i in range(2) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        assert names == adapted  # exactly the LoRA layers: frozen base weights are not separate matrices
        assert run.modules["lora"].all()

        lora = run.config["lora"]["default"]
        assert (lora["r"], lora["lora_alpha"], lora["use_rslora"], lora["scaling_rule"]) == (RANK, ALPHA, use_rslora,
                                                                                           rule)
        steps = run.steps
        np.testing.assert_array_equal(run.step_index, np.arange(1, STEPS + 1))
        np.testing.assert_allclose(steps["loss"], losses, rtol=1e-6)
        np.testing.assert_allclose(steps["grad_sq_norm"].sel(module=f"{PREFIX}model.layers.0.self_attn.q_proj"),
                                   grad_sq_q, rtol=1e-5)

        last = run.n_snapshots - 1
        assert run.snapshot_index[last] == STEPS
        for name in names:
            key = name.removeprefix(PREFIX) + ".weight"
            delta = (merged[key] - base_weights[key]).numpy()
            assert np.abs(delta).max() > 0, name
            check_recorded_update(run, name, delta, snapshot=last)
            # A LoRA update has rank <= r: the spectrum past r is zero.
            i = names.index(name)
            s_1 = run.snapshots["sv"].values[last, i, 0]
            assert np.all(run.snapshots["sv"].values[last, i, RANK:run.snapshots["sv_count"].values[last, i]]
                          <= 1e-5 * s_1)
            stored = run.delta(name, last)
            assert stored.dtype == np.float32 and stored.shape == delta.shape
            np.testing.assert_allclose(stored, delta, rtol=1e-4, atol=1e-6 * np.abs(delta).max(), err_msg=name)

        coverage = run.coverage.set_index("parameter")
        assert set(coverage.index) == {name for name, _ in model.named_parameters()}
        base_q = f"{PREFIX}model.layers.0.self_attn.q_proj.base_layer.weight"
        assert not coverage.loc[base_q, "recorded"] and "LoRA" in coverage.loc[base_q, "reason"]
        assert coverage.loc[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.default.weight", "recorded"]
