"""What a PEFT LoRA layer is: the one place lorascope decides it (duck-typed, so peft is never imported).

Recording (which matrices are LoRA updates, how to merge them), the taxonomy (which parameters are adapter
weights), per-example norms (which layers to hook), and the workflows (which names carry PEFT's prefix) all ask
these functions.
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn

__all__ = ["PEFT_PREFIX", "active_adapters", "base_layer_of", "is_lora_layer", "is_plain_lora", "lora_config_of",
           "without_peft_prefix"]

PEFT_PREFIX = "base_model.model."
"""The prefix ``get_peft_model`` puts before every module name of the wrapped model."""


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer (``peft.tuners.lora.LoraLayer``) holding at least one adapter."""
    lora_a = getattr(module, "lora_A", None)
    return (
        isinstance(lora_a, nn.ModuleDict)
        and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
        and isinstance(getattr(module, "base_layer", None), nn.Module)
        and callable(getattr(module, "get_delta_weight", None))
        and (bool(lora_a) or bool(getattr(module, "lora_embedding_A", None)))
    )


def base_layer_of(layer: nn.Module) -> nn.Module:
    """The innermost ``base_layer`` of a (possibly nested) LoRA layer; the module itself otherwise."""
    while isinstance(base := getattr(layer, "base_layer", None), nn.Module):
        layer = base
    return layer


def active_adapters(layer: nn.Module) -> list[str]:
    """Names of the active adapters a LoRA layer holds weights for."""
    active = getattr(layer, "active_adapters", None) or []
    return [a for a in active if a in cast(nn.ModuleDict, layer.lora_A)]


def is_plain_lora(layer: nn.Module) -> bool:
    """A LoRA on a Linear / Conv1D: ``lora_A`` / ``lora_B`` are Linear layers and ``B @ A`` is the (out, in)
    update. Anything else (PEFT's ParamWrapper on fused experts, embeddings, convolutions) merges through
    ``get_delta_weight``."""
    adapters = active_adapters(layer)
    lora_a, lora_b = cast(nn.ModuleDict, layer.lora_A), cast(nn.ModuleDict, layer.lora_B)
    return bool(adapters) and all(
        isinstance(lora_a[a], nn.Linear) and isinstance(lora_b[a], nn.Linear) for a in adapters
    ) and type(layer).__name__ in ("Linear",)


def without_peft_prefix(name: str) -> str:
    """A module or parameter name as the wrapped model names it (PEFT's prefix removed)."""
    return str(name).removeprefix(PEFT_PREFIX)


def lora_config_of(model: nn.Module) -> dict[str, Any] | None:
    """The LoRA settings of a PEFT model per adapter (rank, alpha, scaling rule, targets), JSON-able; None for
    a model that is not a PEFT model."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or not peft_config:
        return None
    out = {}
    for name, cfg in peft_config.items():
        out[name] = {
            "r": getattr(cfg, "r", None),
            "lora_alpha": getattr(cfg, "lora_alpha", None),
            "use_rslora": bool(getattr(cfg, "use_rslora", False)),
            "scaling_rule": "alpha/sqrt(r)" if getattr(cfg, "use_rslora", False) else "alpha/r",
            "use_dora": bool(getattr(cfg, "use_dora", False)),
            "target_modules": sorted(cfg.target_modules) if isinstance(cfg.target_modules, (set, list))
            else cfg.target_modules,
            "rank_pattern": dict(getattr(cfg, "rank_pattern", {}) or {}),
            "alpha_pattern": dict(getattr(cfg, "alpha_pattern", {}) or {}),
        }
    return out
