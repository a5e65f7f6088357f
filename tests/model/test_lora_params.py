"""LoRA parameter counts and PEFT configurations, checked against real PEFT models built from tiny configs."""

from __future__ import annotations

import json
import re
import warnings

import pytest
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lorascope.errors import InvalidOptionError, SelectionError  # noqa: E402
from lorascope.model.lora_params import (  # noqa: E402
    LORA_TARGETS,
    ModelConfigError,
    lora_parameters,
    model_from_config,
)
from lorascope.model.peft_config import make_lora_config, pattern_matches, to_peft, write_peft_config  # noqa: E402

_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
               max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS = {
    "llama": dict(model_type="llama", intermediate_size=48, **_COMMON),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16),
    "mixtral": dict(model_type="mixtral", intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **_COMMON),
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                      num_experts_per_tok=2, shared_expert_intermediate_size=24, **_COMMON),
}


def _model(family):
    values = dict(CONFIGS[family])
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    return transformers.AutoModelForCausalLM.from_config(config)


def _peft(model, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**config))


def _trainable(peft_model):
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _adapted(peft_model):
    """{base-model name of the adapted module or parameter: rank} read from the lora_A shapes."""
    found = {}
    for path, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or "default" not in lora_a:
            continue
        rows = lora_a["default"].weight.shape[0]
        name = re.sub(r"\.base_layer", "", path.removeprefix("base_model.model."))
        if type(module).__name__ == "ParamWrapper":
            base = module.get_base_layer()
            param = getattr(base, module.parameter_name)
            experts = param.shape[0] if param.ndim == 3 else 1
            found[f"{name}.{module.parameter_name}"] = rows // experts
        else:
            found[name] = rows
    return found


# --------------------------------------------------------------------------------------------------------
# Counts


@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_moe"])
def test_all_linear_count_equals_peft_all_linear(family, rank):
    model = _model(family)
    count = lora_parameters(model, "all-linear", rank)
    meta = lora_parameters(model_from_config(CONFIGS[family]), "all-linear", rank)
    assert meta == count
    assert count.total == _trainable(_peft(model, r=rank, target_modules="all-linear"))


@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("target", ["all-linear+experts", "experts", "mlp-only", "attention-only", ["router"]])
def test_moe_counts_equal_peft_with_target_parameters(target, rank):
    for family in ("mixtral", "qwen2_moe"):
        model = _model(family)
        count = lora_parameters(model, target, rank)
        cfg = make_lora_config(model, target=target, rank=rank)
        assert count.total == _trainable(_peft(model, **cfg)), (family, target)


def test_fused_experts_count_one_rank_r_adapter_per_expert():
    """PEFT's ParamWrapper on an (E, out, in) tensor: lora_A (r E, in), lora_B (out, r E)."""
    model = _model("mixtral")
    count = lora_parameters(model, "experts", rank=3)
    gate_up = next(a for a in count.adapters if a.parameter == "gate_up_proj")
    assert (gate_up.experts, gate_up.out_features, gate_up.in_features, gate_up.matrices) == (4, 48, 32, 8)
    assert count.per_rank == 2 * 4 * ((48 + 32) + (32 + 24))
    peft_model = _peft(model, r=3, target_modules=[], target_parameters=list(count.target_parameters))
    shapes = {n: tuple(p.shape) for n, p in peft_model.named_parameters() if p.requires_grad}
    outer = "base_model.model.model.layers.0.mlp.experts"
    assert shapes[f"{outer}.base_layer.lora_A.default.weight"] == (12, 32)  # gate_up_proj: (r E, H)
    assert shapes[f"{outer}.base_layer.lora_B.default.weight"] == (48, 12)
    assert shapes[f"{outer}.lora_A.default.weight"] == (12, 24)  # down_proj: (r E, I)


def test_peft_all_linear_string_on_mixtral_adds_router_and_doubled_gate_up():
    """Pins PEFT's v4-to-v5 rewrite of target_modules="all-linear" for model_type mixtral."""
    model = _model("mixtral")
    rank = 2
    attention_router_experts = lora_parameters(model, ["attention", "router", "moe_expert"], rank)
    gate_up = sum(a.per_rank for a in attention_router_experts.adapters if a.parameter == "gate_up_proj")
    assert lora_parameters(model, "all-linear", rank).by_kind == {"attention": 2 * (2 * (32 + 32) + 2 * (32 + 16))}
    peft_total = _trainable(_peft(model, r=rank, target_modules="all-linear"))
    assert peft_total == attention_router_experts.total + rank * gate_up


def test_count_fields_and_description():
    count = lora_parameters(_model("qwen2_moe"), "mlp-only", rank=4)
    assert set(count.by_kind) == {"mlp", "moe_expert"}
    assert sum(count.by_kind.values()) == count.per_rank and count.total == 4 * count.per_rank
    assert count.num_matrices == 2 * (3 + 4 * 3)  # shared expert gate/up/down + 4 experts x (gate, up, down)
    assert count.target_parameters == tuple(f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                            for p in ("gate_up_proj", "down_proj"))
    assert "target_parameters=4 parameters" in count.description
    assert set(LORA_TARGETS) == {"all-linear", "all-linear+experts", "attention-only", "mlp-only", "experts"}


def test_count_validation():
    model = _model("llama")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidOptionError, match=re.escape(f"Got {bad!r} instead.")):
            lora_parameters(model, "all-linear", bad)
    with pytest.raises(SelectionError, match="'target' parameter must be one of"):
        lora_parameters(model, "all_linear")
    with pytest.raises(SelectionError, match=r"Got \['mlps'\] instead"):
        lora_parameters(model, ["mlps"])
    with pytest.raises(SelectionError, match="adapts no matrix of this model. Kinds present: attention "):
        lora_parameters(model, "experts")
    with pytest.raises(SelectionError, match="needs the base model"):
        lora_parameters(_peft(model, r=2, target_modules="all-linear"), "all-linear")


# --------------------------------------------------------------------------------------------------------
# model_from_config


def test_model_from_config_file_dir_mapping_and_object(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["mixtral"]))
    for source in (tmp_path, tmp_path / "config.json", str(tmp_path), CONFIGS["mixtral"]):
        model = model_from_config(source)
        assert type(model).__name__ == "MixtralForCausalLM"
        assert all(p.device.type == "meta" for p in model.parameters())
    assert model_from_config(model.config).config.num_local_experts == 4
    bert = model_from_config(dict(model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=37, vocab_size=50))
    assert lora_parameters(bert, "mlp-only").per_rank == (32 + 37) * 2


def test_model_from_config_errors(tmp_path):
    with pytest.raises(ModelConfigError, match="No model config at .*config.json"):
        model_from_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="is not valid JSON"):
        model_from_config(tmp_path)
    with pytest.raises(ModelConfigError, match="does not know model_type 'zzz'"):
        model_from_config({"model_type": "zzz", "hidden_size": 8})
    with pytest.raises(ModelConfigError, match="has no 'model_type'"):
        model_from_config({"hidden_size": 8})
    with pytest.raises(ModelConfigError, match="gives no hidden size"):
        model_from_config({"model_type": "llama"})
    with pytest.raises(ModelConfigError, match="not a valid 'llama' config: .*hidden size .30. is not a multiple"):
        model_from_config({"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4})
    with pytest.raises(ModelConfigError, match="must be a config.json path"):
        model_from_config(3)


# --------------------------------------------------------------------------------------------------------
# PEFT configurations


def _check_config_against_peft(model, cfg, intended):
    """Every intended adapter with its rank, nothing else, and every key matches something."""
    names = set(intended)
    for key in (*cfg["rank_pattern"], *cfg["alpha_pattern"]):
        assert key.startswith("^") and sum(pattern_matches(key, n) for n in names) == 1, key
    module_names = [n for n, _ in model.named_modules()]
    for target in cfg["target_modules"]:
        assert [n for n in module_names if n == target or n.endswith("." + target)] == [target]
    params = dict(model.named_parameters())
    assert all(p in params for p in cfg["target_parameters"])
    peft_model = _peft(model, **cfg)
    assert _adapted(peft_model) == intended
    return peft_model


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "qwen2_moe"])
def test_make_lora_config_ranks_per_kind_and_per_module(family):
    model = _model(family)
    target = "all-linear" if family in ("llama", "gpt2") else "all-linear+experts"
    adapters = lora_parameters(model, target).adapters
    one = adapters[-1].name
    ranks = {"attention": 2, "mlp": 4, "moe_expert": 3, "*": 5, one: 7}
    cfg = make_lora_config(model, target=target, rank=ranks, alpha="2r")
    intended = {a.name: ranks.get(a.name, ranks.get(a.kind, 5)) for a in adapters}
    peft_model = _check_config_against_peft(model, cfg, intended)
    assert cfg["task_type"] == "CAUSAL_LM" and not cfg["use_rslora"]
    for path, module in peft_model.named_modules():  # alpha = 2 r, scaling 2 everywhere
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and "default" in module.lora_A:
            assert module.scaling["default"] == pytest.approx(2.0), path
    expected = sum(a.per_rank * intended[a.name] for a in adapters)
    assert _trainable(peft_model) == expected


def test_make_lora_config_default_alpha_and_single_rank():
    model = _model("mixtral")
    cfg = make_lora_config(model, target="experts", rank=4, use_rslora=True)
    assert cfg == {
        "r": 4, "lora_alpha": 32, "target_modules": [],
        "target_parameters": [f"model.layers.{i}.mlp.experts.{p}"
                              for i in (0, 1) for p in ("gate_up_proj", "down_proj")],
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": True, "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
    }
    peft_model = _check_config_against_peft(model, cfg, dict.fromkeys(cfg["target_parameters"], 4))
    wrapper = peft_model.get_submodule("base_model.model.model.layers.0.mlp.experts")
    assert wrapper.scaling["default"] == pytest.approx(32 / 4 ** 0.5)
    assert json.loads(json.dumps(cfg)) == cfg


def test_make_lora_config_on_a_meta_model_equals_the_real_one():
    cfg_meta = make_lora_config(model_from_config(CONFIGS["qwen2_moe"]), target="mlp-only", rank={"*": 2, "mlp": 8})
    assert cfg_meta == make_lora_config(_model("qwen2_moe"), target="mlp-only", rank={"*": 2, "mlp": 8})


def test_write_peft_config_round_trip(tmp_path):
    model = _model("qwen2_moe")
    cfg = make_lora_config(model, target="all-linear+experts", rank={"*": 4, "attention": 2}, alpha=16.5)
    path = write_peft_config(cfg, tmp_path / "adapter")
    assert path == tmp_path / "adapter" / "adapter_config.json"
    loaded = peft.LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    direct = to_peft({k: v for k, v in json.loads(path.read_text()).items() if k != "peft_type"})
    for config in (loaded, direct):
        assert config.r == 4 and config.lora_alpha == 16.5 and config.rank_pattern == cfg["rank_pattern"]
        assert set(config.target_modules) == set(cfg["target_modules"])
        assert set(config.target_parameters) == set(cfg["target_parameters"])
    intended = {a.name: 2 if a.kind == "attention" else 4
                for a in lora_parameters(model, "all-linear+experts").adapters}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _adapted(peft.get_peft_model(_model("qwen2_moe"), loaded)) == intended
    assert write_peft_config(cfg, tmp_path / "x.json") == tmp_path / "x.json"


def test_make_lora_config_validation():
    model = _model("llama")
    assert make_lora_config(model, target="all-linear", rank={"moe_expert": 2, "*": 1})["r"] == 1
    with pytest.raises(InvalidOptionError, match="neither a kind nor an adapter name"):
        make_lora_config(model, target="all-linear", rank={"q_proj": 2})
    with pytest.raises(InvalidOptionError, match="gives no rank for 'model.layers.0.mlp.gate_proj'"):
        make_lora_config(model, target="all-linear", rank={"attention": 2})
    with pytest.raises(InvalidOptionError, match=r"range \[1, inf\). Got 0 instead"):
        make_lora_config(model, target="all-linear", rank={"*": 0})
    for bad in ("3r", -1, 0, True):
        with pytest.raises(InvalidOptionError, match="'alpha' parameter"):
            make_lora_config(model, target="all-linear", rank=2, alpha=bad)
    assert make_lora_config(model, target="attention-only", rank=2, alpha="16")["lora_alpha"] == 16
    assert "task_type" not in make_lora_config(model, target="attention-only", rank=2, task_type=None)
