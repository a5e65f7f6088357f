"""PEFT rewrites transformers-4 style MoE targets for fused-expert architectures; lorascope's configs must come out
of that conversion with every adapter at its intended rank."""

from __future__ import annotations

import pytest
import torch

from lorascope.model.lora_params import lora_parameters
from lorascope.model.peft_config import make_lora_config, pattern_matches, to_peft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _qwen3_moe_with_a_dense_layer():
    config = transformers.Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _adapter_ranks(peft_model) -> dict[str, int]:
    """Rank of each adapted module or parameter, read from PEFT's own lora_A shapes (fused experts: r x E rows)."""
    ranks = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or "default" not in lora_a:
            continue
        rows = lora_a["default"].weight.shape[0]
        experts = 1
        param = getattr(module, "parameter_name", None)
        if param is not None:  # a ParamWrapper: one rank-r block per expert of a 3-D tensor
            tensor = getattr(module.get_base_layer(), param)
            experts = tensor.shape[0] if tensor.ndim == 3 else 1
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        ranks[f"{key}.{param}" if param and not key.endswith(param) else key] = rows // experts
    return ranks


def test_dense_mlp_of_a_qwen3_moe_keeps_its_adapter_and_rank():
    model = _qwen3_moe_with_a_dense_layer()
    config = make_lora_config(model, target="all-linear+experts", rank={"*": 4, "moe_expert": 2})
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    # The dense MLP Linear layers go through target_parameters, where PEFT does not rewrite them.
    assert "model.layers.0.mlp.gate_proj.weight" in config["target_parameters"]
    assert not any(name.endswith(("gate_proj", "up_proj", "down_proj")) for name in config["target_modules"])
    ranks_by_kind = {"attention": 4, "mlp": 4, "moe_expert": 2}
    counted = sum(ranks_by_kind[a.kind] * a.per_rank for a in lora_parameters(model, "all-linear+experts").adapters)
    wrapped = peft.get_peft_model(model, to_peft(config))
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == counted  # PEFT's count is lorascope's
    converted = wrapped.peft_config["default"]
    assert set(converted.rank_pattern) == set(config["rank_pattern"])  # PEFT added no doubled-rank pattern
    ranks = _adapter_ranks(wrapped)
    dense = {k: v for k, v in ranks.items() if ".layers.0.mlp." in k}
    assert len(dense) == 3 and set(dense.values()) == {4}, ranks
    experts = {k: v for k, v in ranks.items() if "experts" in k}
    assert experts and set(experts.values()) == {2}, ranks
    attention = {k: v for k, v in ranks.items() if "self_attn" in k}
    assert len(attention) == 8 and set(attention.values()) == {4}
    for key in config["rank_pattern"]:
        assert any(pattern_matches(key, n) for n in names), key


def test_plain_module_targets_would_be_rewritten_by_peft():
    """Why the guard exists: listed as modules, PEFT moves the dense MLP into the experts' target_parameters."""
    model = _qwen3_moe_with_a_dense_layer()
    config = {"r": 4, "lora_alpha": 32, "target_modules": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                                           "model.layers.0.mlp.down_proj"]}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
    assert not any(".layers.0.mlp.gate_proj" in k for k in _adapter_ranks(wrapped))
