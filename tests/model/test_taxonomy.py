"""Tests of lorascope.model.taxonomy on tiny locally built transformers / PEFT models and plain modules."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorascope.errors import SelectionError
from lorascope.model.lora_params import lora_parameter_count
from lorascope.model.taxonomy import KINDS, MatrixRef, classify

transformers = pytest.importorskip("transformers")
# peft 0.21 calls a transformers method deprecated in 5.x; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

RTOL, ATOL = 1e-5, 1e-6


def _by_name(tax):
    return {m.name: m for m in tax.matrices}


def _coverage(tax):
    return {e.parameter: e for e in tax.coverage}


def _assert_full_coverage(model, tax):
    """One entry per named parameter; the only extra entries are tied aliases."""
    names = [e.parameter for e in tax.coverage]
    assert len(names) == len(set(names))
    own = [e.parameter for e in tax.coverage if not e.tied_to]
    assert own == list(dict(model.named_parameters()))
    assert len(names) == len(list(model.named_parameters(remove_duplicate=False)))


def _assert_views_match_parameters(model, tax):
    """Every MatrixRef cuts an (out, in) view from the parameter it names."""
    for ref in tax.matrices:
        param = getattr(model.get_submodule(ref.module), ref.parameter)
        view = ref.matrix(param)
        assert view.shape == (ref.out_features, ref.in_features)
        assert view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()


# --------------------------------------------------------------------------------------------------------
# Dense transformers


@pytest.mark.parametrize("tied", [False, True])
def test_llama_roles_shapes_and_coverage(tiny_llama_config, tied):
    model = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied))
    tax = classify(model)
    refs = _by_name(tax)
    expected = {
        "self_attn.q_proj": ("attention", "q"), "self_attn.k_proj": ("attention", "k"),
        "self_attn.v_proj": ("attention", "v"), "self_attn.o_proj": ("attention", "o"),
        "mlp.gate_proj": ("mlp", "gate"), "mlp.up_proj": ("mlp", "up"), "mlp.down_proj": ("mlp", "down"),
    }
    for layer in (0, 1):
        for suffix, (kind, role) in expected.items():
            name = f"model.layers.{layer}.{suffix}"
            ref = refs[name]
            weight = model.get_submodule(name).weight
            assert (ref.kind, ref.role, ref.layer, ref.expert) == (kind, role, layer, -1)
            assert (ref.out_features, ref.in_features) == tuple(weight.shape)
            assert (ref.module, ref.parameter, ref.transposed, ref.lora) == (name, "weight", False, False)
    embed = refs["model.embed_tokens"]
    assert (embed.kind, embed.role, embed.layer, embed.out_features, embed.in_features) == (
        "embedding", "token_embedding", -1, 64, 32)
    coverage = _coverage(tax)
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert not coverage[name].recorded and "1-D parameter (norm" in coverage[name].reason
    if tied:
        assert "lm_head" not in refs
        head = coverage["lm_head.weight"]
        assert not head.recorded and head.tied_to == "model.embed_tokens.weight"
        assert head.reason == "tied to model.embed_tokens.weight"
        assert tax.by_kind() == {"attention": 8, "mlp": 6, "embedding": 1}
    else:
        assert (refs["lm_head"].kind, refs["lm_head"].role) == ("head", "head")
        assert tax.by_kind() == {"attention": 8, "mlp": 6, "embedding": 1, "head": 1}
    assert all(coverage[n].recorded == (n.removesuffix(".weight") in refs) for n in coverage)
    _assert_full_coverage(model, tax)
    _assert_views_match_parameters(model, tax)


def test_gpt2_conv1d_is_transposed_and_reproduces_the_module(seed):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    tax = classify(model)
    refs = _by_name(tax)
    expected = {"attn.c_attn": ("attention", "qkv", 96, 32), "attn.c_proj": ("attention", "o", 32, 32),
                "mlp.c_fc": ("mlp", "fc_in", 128, 32), "mlp.c_proj": ("mlp", "fc_out", 32, 128)}
    for suffix, (kind, role, out, in_) in expected.items():
        name = f"transformer.h.1.{suffix}"
        ref, module = refs[name], model.get_submodule(name)
        assert (ref.kind, ref.role, ref.layer, ref.out_features, ref.in_features) == (kind, role, 1, out, in_)
        assert ref.transposed
        view = ref.matrix(module.weight)
        torch.testing.assert_close(view, module.weight.T, rtol=0, atol=0)
        assert view.data_ptr() == module.weight.data_ptr()
        inputs = torch.randn(3, 5, in_)
        torch.testing.assert_close(F.linear(inputs, view, module.bias), module(inputs), rtol=RTOL, atol=ATOL)
    assert refs["transformer.wpe"].role == "position_embedding"
    assert _coverage(tax)["lm_head.weight"].tied_to == "transformer.wte.weight"
    _assert_full_coverage(model, tax)


def test_bert_roles():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, vocab_size=64, max_position_embeddings=16)
    model = transformers.BertForSequenceClassification(config)
    tax = classify(model)
    refs = _by_name(tax)
    prefix = "bert.encoder.layer.1."
    expected = {
        "attention.self.query": ("attention", "q"), "attention.self.key": ("attention", "k"),
        "attention.self.value": ("attention", "v"), "attention.output.dense": ("attention", "o"),
        "intermediate.dense": ("mlp", "fc_in"), "output.dense": ("mlp", "fc_out"),
    }
    for suffix, kind_role in expected.items():
        assert (refs[prefix + suffix].kind, refs[prefix + suffix].role) == kind_role
        assert refs[prefix + suffix].layer == 1
    assert (refs["bert.pooler.dense"].kind, refs["bert.pooler.dense"].role) == ("other", "pooler")
    assert (refs["classifier"].kind, refs["classifier"].out_features) == ("head", 2)
    roles = {refs[f"bert.embeddings.{n}"].role for n in
             ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    assert roles == {"token_embedding", "position_embedding", "token_type_embedding"}
    assert _coverage(tax)[prefix + "output.dense.bias"].reason == "bias (1-D)"
    _assert_full_coverage(model, tax)

    masked_lm = transformers.BertForMaskedLM(config)
    coverage = _coverage(classify(masked_lm))
    assert coverage["cls.predictions.decoder.weight"].tied_to == "bert.embeddings.word_embeddings.weight"


# --------------------------------------------------------------------------------------------------------
# Mixture of experts


def _moe_model(family):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=64, max_position_embeddings=64, num_experts_per_tok=2)
    if family == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=16, num_local_experts=4, **common)
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                             shared_expert_intermediate_size=24, **common)
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                             head_dim=8, **common)
    else:
        config = transformers.GptOssConfig(intermediate_size=16, num_local_experts=4, head_dim=8, **common)
    return transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")


def _expert_output_from_refs(experts, refs, expert, x):
    """One expert's output computed from the split MatrixRef views and the model's own activation."""
    param = {name: getattr(experts, name) for name in ("gate_up_proj", "down_proj")}
    gate_ref, up_ref, down_ref = (refs[f"{expert}.{part}"] for part in ("gate", "up", "down"))
    gate = F.linear(x, gate_ref.matrix(param["gate_up_proj"]))
    up = F.linear(x, up_ref.matrix(param["gate_up_proj"]))
    if hasattr(experts, "gate_up_proj_bias"):  # GPT-OSS: interleaved biases, clamped SwiGLU, (up + 1)
        bias = experts.gate_up_proj_bias[expert]
        gate, up = gate + bias[::2], up + bias[1::2]
        gate, up = gate.clamp(max=experts.limit), up.clamp(-experts.limit, experts.limit)
        hidden = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        return F.linear(hidden, down_ref.matrix(param["down_proj"]), experts.down_proj_bias[expert])
    return F.linear(experts.act_fn(gate) * up, down_ref.matrix(param["down_proj"]))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"])
def test_fused_experts_split_reproduces_the_expert(family, seed):
    model = _moe_model(family)
    tax = classify(model)
    num_experts, hidden, inter = 4, 32, 16
    for layer in (0, 1):
        experts_path = f"model.layers.{layer}.mlp.experts"
        experts = model.get_submodule(experts_path)
        refs = {}
        for ref in tax.matrices:
            if ref.module == experts_path:
                refs[f"{ref.expert}.{ref.role}"] = ref
        assert len(refs) == num_experts * 3
        for ref in refs.values():
            assert (ref.kind, ref.layer) == ("moe_expert", layer)
            shape = (hidden, inter) if ref.role == "down" else (inter, hidden)
            assert (ref.out_features, ref.in_features) == shape
            assert ref.transposed == (family == "gpt_oss")
            assert ref.interleaved == (family == "gpt_oss" and ref.role != "down")
        assert refs["3.gate"].name == f"{experts_path}.gate_up_proj[3].gate"
        assert refs["3.down"].name == f"{experts_path}.down_proj[3]"
        routers = [m for m in tax.matrices if m.kind == "router" and m.layer == layer]
        router_roles = sorted(m.role for m in routers)
        assert router_roles == (["router", "shared_expert_gate"] if family == "qwen2_moe" else ["router"])
        router = next(m for m in routers if m.role == "router")
        assert (router.out_features, router.in_features) == (num_experts, hidden)

        x = torch.randn(6, hidden)
        for expert in (0, 3):
            index = torch.full((6, 1), expert, dtype=torch.long)
            with torch.no_grad():
                reference = experts(x, index, torch.ones(6, 1))
                ours = _expert_output_from_refs(experts, refs, expert, x)
            torch.testing.assert_close(ours, reference, rtol=RTOL, atol=ATOL)

    coverage = _coverage(tax)
    gate_up = coverage["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.recorded and gate_up.reason.startswith("split into 8 matrices (4 experts")
    assert len(gate_up.matrices) == 8
    if family == "gpt_oss":
        assert coverage["model.layers.0.mlp.experts.gate_up_proj_bias"].reason == "expert bias (not a matrix)"
    if family == "qwen2_moe":
        shared = _by_name(tax)["model.layers.0.mlp.shared_expert.down_proj"]
        assert (shared.kind, shared.role, shared.expert) == ("mlp", "down", -1)
    _assert_full_coverage(model, tax)
    _assert_views_match_parameters(model, tax)


def test_undeclared_transposed_experts_are_inferred_from_shapes():
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    config = transformers.Llama4TextConfig(hidden_size=32, intermediate_size=16, num_local_experts=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    experts = Llama4TextExperts(config)
    nn.init.normal_(experts.gate_up_proj)
    nn.init.normal_(experts.down_proj)  # created with torch.empty
    tax = classify(experts)
    refs = {(m.expert, m.role): m for m in tax.matrices}
    assert all(m.transposed and not m.interleaved for m in tax.matrices)
    x = torch.randn(2 * 3, 32)  # three tokens per expert, sorted by expert
    with torch.no_grad():
        reference = experts(x).view(2, 3, 32)
        for e in (0, 1):
            gate = F.linear(x[3 * e: 3 * e + 3], refs[(e, "gate")].matrix(experts.gate_up_proj))
            up = F.linear(x[3 * e: 3 * e + 3], refs[(e, "up")].matrix(experts.gate_up_proj))
            out = F.linear(up * experts.act_fn(gate), refs[(e, "down")].matrix(experts.down_proj))
            torch.testing.assert_close(out, reference[e], rtol=RTOL, atol=ATOL)


def test_per_expert_linear_modules_get_their_expert_index():
    class SparseBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 3, bias=False)
            self.experts = nn.ModuleList(
                nn.ModuleDict({"w1": nn.Linear(8, 4), "w2": nn.Linear(4, 8), "w3": nn.Linear(8, 4)})
                for _ in range(3)
            )

    model = nn.Module()
    model.layers = nn.ModuleList([nn.ModuleDict({"block_sparse_moe": SparseBlock()})])
    refs = _by_name(classify(model))
    assert (refs["layers.0.block_sparse_moe.gate"].kind, refs["layers.0.block_sparse_moe.gate"].role) == (
        "router", "router")
    w2 = refs["layers.0.block_sparse_moe.experts.2.w2"]
    assert (w2.kind, w2.role, w2.expert, w2.layer) == ("moe_expert", "down", 2, 0)
    assert refs["layers.0.block_sparse_moe.experts.1.w3"].role == "up"


# --------------------------------------------------------------------------------------------------------
# Plain modules, overrides and validation


class _UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, kernel_size=3)
        self.layers = nn.ModuleList(nn.ModuleDict({"mix": nn.Linear(8, 8), "proj": nn.Linear(8, 6)})
                                    for _ in range(2))
        self.scale = nn.Parameter(torch.ones(()))
        self.table = nn.Parameter(torch.zeros(5, 7))
        self.frozen = nn.Linear(6, 2)
        self.frozen.requires_grad_(False)


def test_plain_module_is_other_with_layer_index():
    model = _UserNet()
    tax = classify(model)
    refs = _by_name(tax)
    proj = refs["layers.1.proj"]
    assert (proj.kind, proj.role, proj.layer) == ("other", "", 1)
    assert (refs["table"].module, refs["table"].parameter, refs["table"].layer) == ("", "table", -1)
    stem = refs["stem"]
    assert (stem.role, stem.out_features, stem.in_features) == ("conv", 4, 27)
    torch.testing.assert_close(stem.matrix(model.stem.weight), model.stem.weight.reshape(4, 27))
    coverage = _coverage(tax)
    assert coverage["scale"].reason == "0-D parameter (not a matrix)"
    assert coverage["frozen.weight"].reason == "frozen (requires_grad=False)"
    assert "frozen" not in refs
    assert "frozen" in _by_name(classify(model, include_frozen=True))
    _assert_full_coverage(model, tax)


def test_kind_map_overrides_and_validation():
    model = _UserNet()
    tax = classify(model, kind_map={r"\.proj$": "mlp", r"layers\.0\.": "attention", "mix": "router"})
    refs = _by_name(tax)
    assert refs["layers.0.proj"].kind == "mlp"  # first matching pattern wins
    assert refs["layers.0.mix"].kind == "attention"
    assert refs["layers.1.mix"].kind == "router"
    assert refs["stem"].kind == "other"
    with pytest.raises(SelectionError, match=r"must be one of \('attention'.*Got 'attn' for pattern 'mix'"):
        classify(model, kind_map={"mix": "attn"})
    with pytest.raises(SelectionError, match="valid regular expression"):
        classify(model, kind_map={"mix(": "mlp"})
    with pytest.raises(SelectionError, match="must be a mapping"):
        classify(model, kind_map=["mix"])
    with pytest.raises(SelectionError, match="must be a torch.nn.Module"):
        classify("model")


def test_matrix_rejects_a_tensor_of_another_layout():
    ref = MatrixRef("a", "a", "weight", "other", "", -1, -1, out_features=3, in_features=4)
    assert ref.matrix(torch.zeros(3, 4)).shape == (3, 4)
    with pytest.raises(ValueError, match=r"expected the full 'weight' tensor of 'a'.*\(4, 3\)"):
        ref.matrix(torch.zeros(4, 3))


def test_select_by_kind_regex_and_both(tiny_llama_config):
    tax = classify(transformers.LlamaForCausalLM(tiny_llama_config()))
    attention = tax.select(kinds=["attention"])
    assert attention.by_kind() == {"attention": 8}
    assert tax.select(kinds="mlp").by_kind() == {"mlp": 6}
    layer1 = tax.select(regex=r"layers\.1\.")
    assert {m.layer for m in layer1.matrices} == {1}
    both = tax.select(kinds=["mlp"], regex=r"layers\.1\.")
    assert [m.role for m in both.matrices] == ["gate", "up", "down"]
    coverage = _coverage(both)
    excluded = coverage["model.layers.0.self_attn.q_proj.weight"]
    assert not excluded.recorded and excluded.matrices == ()
    assert excluded.reason == "excluded by selection (kinds=['mlp'], regex='layers\\\\.1\\\\.')"
    assert coverage["model.layers.1.mlp.up_proj.weight"].recorded
    assert coverage["model.norm.weight"].reason.startswith("1-D parameter")
    assert [e.parameter for e in both.coverage] == [e.parameter for e in tax.coverage]
    assert tax.select() is tax


def test_select_errors_name_what_exists(tiny_llama_config):
    tax = classify(transformers.LlamaForCausalLM(tiny_llama_config()))
    present = r"Kinds present: attention \(8\), mlp \(6\), embedding \(1\), head \(1\)"
    example = r"model\.layers\.0\.self_attn\.q_proj"
    with pytest.raises(SelectionError, match=rf"matches none.*{present}.*Example names: .*{example}"):
        tax.select(kinds=["router"])
    with pytest.raises(SelectionError, match="matches none"):
        tax.select(kinds=["attention"], regex="gate_proj")
    with pytest.raises(SelectionError, match=re.escape(f"subset of {KINDS}. Got ['attn'] instead")):
        tax.select(kinds=["attention", "attn"])
    with pytest.raises(SelectionError, match="valid regular expression"):
        tax.select(regex="[")


def test_select_part_of_a_fused_tensor():
    tax = classify(_moe_model("mixtral"))
    first = tax.select(kinds=["moe_expert"], regex=r"\[0\]")
    assert len(first.matrices) == 2 * 3
    entry = _coverage(first)["model.layers.0.mlp.experts.gate_up_proj"]
    assert entry.recorded and entry.matrices == (
        "model.layers.0.mlp.experts.gate_up_proj[0].gate", "model.layers.0.mlp.experts.gate_up_proj[0].up")
    assert entry.reason.startswith("2 of 8 matrices kept by selection")


# --------------------------------------------------------------------------------------------------------
# LoRA parameter counts and PEFT models


def test_lora_parameter_count_validates_rank():
    refs = classify(nn.Linear(4, 3)).matrices
    assert lora_parameter_count(refs, 3) == 3 * (4 + 3)
    for bad in (0, -1, 1.5, True, "2"):
        message = ("The 'rank' parameter of lora_parameter_count must be an int in the range [1, inf). "
                   f"Got {bad!r} instead.")
        with pytest.raises(SelectionError, match=re.escape(message)):
            lora_parameter_count(refs, bad)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_lora_parameter_count_matches_peft_all_linear(tiny_llama_config, rank):
    peft = pytest.importorskip("peft")
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    predicted = lora_parameter_count(classify(model).select(kinds=["attention", "mlp"]).matrices, rank)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=rank, target_modules="all-linear"))
    assert predicted == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_classify_peft_model_gives_one_lora_matrix_per_adapted_layer(tiny_llama_config):
    peft = pytest.importorskip("peft")
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tax = classify(peft_model)
    adapted = [name for name, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert [m.name for m in tax.matrices] == adapted
    assert all(m.lora and m.module == m.name and m.parameter == "weight" for m in tax.matrices)
    refs = _by_name(tax)
    q = refs["base_model.model.model.layers.1.self_attn.q_proj"]
    assert (q.kind, q.role, q.layer, q.out_features, q.in_features) == ("attention", "q", 1, 32, 32)
    coverage = _coverage(tax)
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    for part in ("lora_A", "lora_B"):
        entry = coverage[f"{prefix}.{part}.default.weight"]
        assert entry.recorded and entry.matrices == (prefix,)
        assert entry.reason == f"recorded as the merged LoRA update of {prefix}"
    base = coverage[f"{prefix}.base_layer.weight"]
    assert not base.recorded and base.reason.startswith("base weight of a LoRA layer")
    assert coverage["base_model.model.model.embed_tokens.weight"].reason == "frozen (requires_grad=False)"
    _assert_full_coverage(peft_model, tax)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_delta_recipe_equals_what_merging_adds(tiny_llama_config, family, seed):
    """The recorder's recipe, ref.matrix(layer.get_delta_weight(adapter)), is the merged update."""
    peft = pytest.importorskip("peft")
    if family == "llama":
        model = transformers.LlamaForCausalLM(tiny_llama_config())
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    else:  # Conv1D: PEFT works on the stored (in, out) layout with fan_in_fan_out
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0))
        config = peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    peft_model = peft.get_peft_model(model, config)
    tax = classify(peft_model)
    assert len(tax.matrices) == 2 * (7 if family == "llama" else 4)
    assert all(m.transposed == (family == "gpt2") for m in tax.matrices)
    for module in peft_model.modules():
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B["default"].weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        deltas = {r.name: r.matrix(peft_model.get_submodule(r.module).get_delta_weight("default")).clone()
                  for r in tax.matrices}
    merged = peft_model.merge_and_unload()
    for ref in tax.matrices:
        short = ref.name.removeprefix("base_model.model.")
        change = merged.get_submodule(short).weight - before[f"{short}.base_layer.weight"]
        torch.testing.assert_close(deltas[ref.name], ref.matrix(change), rtol=RTOL, atol=ATOL)


def test_classify_peft_target_parameters_on_fused_experts(seed):
    peft = pytest.importorskip("peft")
    model = _moe_model("mixtral")
    config = peft.LoraConfig(r=2, target_modules=["q_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}
    peft_model = peft.get_peft_model(model, config)
    tax = classify(peft_model)
    assert tax.by_kind() == {"attention": 2, "moe_expert": 2 * 4 * 3}
    assert all(m.lora for m in tax.matrices)
    experts_path = "base_model.model.model.layers.0.mlp.experts"
    refs = _by_name(tax)
    gate = refs[f"{experts_path}.gate_up_proj[3].gate"]
    assert (gate.expert, gate.part, gate.out_features, gate.in_features) == (3, "gate", 16, 32)
    assert gate.module.startswith(experts_path)  # the (possibly nested) PEFT ParamWrapper
    assert lora_parameter_count(tax.matrices, 2) == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad)
    coverage = _coverage(tax)
    lora_entries = [e for e in coverage.values() if ".lora_" in e.parameter]
    assert lora_entries and all(e.recorded and "merged LoRA update" in e.reason for e in lora_entries)
    bases = [e for n, e in coverage.items() if n.endswith(("gate_up_proj", "down_proj"))]
    assert len(bases) == 4 and all(e.reason.startswith("base weight of a LoRA layer") for e in bases)
    _assert_full_coverage(peft_model, tax)

    for module in peft_model.modules():
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B["default"].weight)
    with torch.no_grad():
        deltas = {r.name: r.matrix(peft_model.get_submodule(r.module).get_delta_weight("default")).clone()
                  for r in tax.matrices if r.kind == "moe_expert"}
    merged = peft_model.merge_and_unload()
    for ref in tax.matrices:
        if ref.kind != "moe_expert":
            continue
        short = ref.name.removeprefix("base_model.model.").split("[")[0]
        change = merged.get_parameter(short) - before[short]
        torch.testing.assert_close(deltas[ref.name], ref.matrix(change), rtol=RTOL, atol=ATOL)
