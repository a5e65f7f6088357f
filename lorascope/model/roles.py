"""What a parameter's place in a model says about it: its kind, its role, its block and its expert.

The rules read the last components of a module path (``self_attn.q_proj`` is attention/q, ``attention.output.dense``
attention/o, ``output.dense`` mlp/fc_out, ``mlp.gate`` router) and the module's type; PEFT's wrapper components
(``base_layer``, ``original_module``, ``modules_to_save.<name>``) are ignored. :mod:`lorascope.model.taxonomy`
applies them to every matrix of a model.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["KINDS", "block_index", "expert_index", "kind_and_role", "mlp_role", "without_wrappers"]

KINDS = ("attention", "mlp", "moe_expert", "router", "embedding", "head", "norm", "other")
"""The module kinds, in report order."""

_LAYER_RE = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_EXPERT_RE = re.compile(r"\.experts\.(\d+)(?:\.|$)")
_WRAPPER_RE = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.|$)")

_ATTENTION_ROLES = {
    **dict.fromkeys(("q_proj", "query", "q", "wq", "to_q"), "q"),
    **dict.fromkeys(("k_proj", "key", "k", "wk", "to_k"), "k"),
    **dict.fromkeys(("v_proj", "value", "v", "wv", "to_v"), "v"),
    **dict.fromkeys(("o_proj", "out_proj", "o", "wo", "to_out", "c_proj", "dense"), "o"),
    **dict.fromkeys(("qkv_proj", "wqkv", "c_attn", "query_key_value", "qkv", "in_proj"), "qkv"),
}
_MLP_ROLES = {
    **dict.fromkeys(("gate_proj", "w1", "wi_0"), "gate"),
    **dict.fromkeys(("up_proj", "w3", "wi_1"), "up"),
    **dict.fromkeys(("down_proj", "w2"), "down"),
    **dict.fromkeys(("fc1", "c_fc", "dense_h_to_4h", "wi", "fc_in"), "fc_in"),
    **dict.fromkeys(("fc2", "c_proj", "dense_4h_to_h", "wo", "fc_out"), "fc_out"),
}
_ATTENTION_NAMES = {
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "wqkv",
    "query", "key", "value",
}
_MLP_NAMES = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "dense_h_to_4h", "dense_4h_to_h"}
_MLP_CONTEXT = {
    "mlp", "ffn", "feed_forward", "feedforward", "densereludense", "block_sparse_moe", "moe",
    "shared_expert", "shared_experts", "experts",
}
_HEAD_NAMES = {"lm_head", "score", "classifier", "qa_outputs", "embed_out"}
_EMBEDDING_ROLES = {
    **dict.fromkeys(("wte", "embed_tokens", "word_embeddings", "tok_embeddings"), "token_embedding"),
    **dict.fromkeys(("wpe", "position_embeddings", "embed_positions"), "position_embedding"),
    "token_type_embeddings": "token_type_embedding",
}


def kind_and_role(path: str, module: nn.Module, is_head: bool) -> tuple[str, str]:
    """Kind and role of a 2-D weight from its module type and the last components of its path.

    Examples
    --------
    >>> kind_and_role("model.layers.0.self_attn.q_proj", nn.Linear(4, 4), is_head=False)
    ('attention', 'q')
    >>> kind_and_role("encoder.layer.3.output.dense", nn.Linear(4, 4), is_head=False)
    ('mlp', 'fc_out')
    """
    parts = without_wrappers(path).lower().split(".")
    last, context = parts[-1], parts[:-1]
    cls = type(module).__name__.lower()
    if isinstance(module, nn.Embedding):
        return "embedding", _EMBEDDING_ROLES.get(last, "embedding")
    if is_head or _HEAD_NAMES.intersection(parts) or "cls" in parts:
        return "head", "head"
    in_attention = any("attn" in p or "attention" in p for p in context)
    if last == "shared_expert_gate":
        return "router", "shared_expert_gate"
    if "router" in cls or last == "router" or (last == "gate" and not in_attention):
        return "router", "router"
    if "pooler" in context:
        return "other", "pooler"
    if in_attention:
        return "attention", _ATTENTION_ROLES.get(last, "")
    if _EXPERT_RE.search("." + ".".join(parts)):
        return "moe_expert", _MLP_ROLES.get(last, "")
    if _MLP_CONTEXT.intersection(context):
        return "mlp", _MLP_ROLES.get(last, "")
    if context and context[-1] == "intermediate" and last == "dense":
        return "mlp", "fc_in"
    if context and context[-1] == "output" and last == "dense":
        return "mlp", "fc_out"
    if last in _ATTENTION_NAMES:
        return "attention", _ATTENTION_ROLES[last]
    if last in _MLP_NAMES:
        return "mlp", _MLP_ROLES[last]
    return "other", ""


def mlp_role(name: str) -> str:
    """The MLP role of a parameter or module name (``"gate_up_proj"`` has none: it holds two), ``""`` if unknown.

    >>> mlp_role("down_proj"), mlp_role("w1"), mlp_role("gate_up_proj")
    ('down', 'gate', '')
    """
    return _MLP_ROLES.get(name, "")


def block_index(path: str) -> int:
    """The transformer block number in a module path, -1 outside the blocks.

    >>> block_index("model.layers.12.mlp.down_proj"), block_index("lm_head")
    (12, -1)
    """
    return _index(_LAYER_RE, path)


def expert_index(path: str) -> int:
    """The MoE expert number in a module path (experts held as separate modules), -1 when there is none.

    >>> expert_index("model.layers.0.block_sparse_moe.experts.5.w1")
    5
    """
    return _index(_EXPERT_RE, path)


def without_wrappers(path: str) -> str:
    """A module path without PEFT's wrapper components.

    >>> without_wrappers("model.layers.0.mlp.experts.base_layer")
    'model.layers.0.mlp.experts'
    """
    return _WRAPPER_RE.sub("", "." + path)[1:]


def _index(pattern: re.Pattern[str], path: str) -> int:
    match = pattern.search("." + path)
    return int(match.group(1)) if match else -1
