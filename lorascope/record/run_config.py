"""What a recorder writes into a new run file before the first step: the config sections, the coverage table and
the length of the singular-value axis."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lorascope._version import __version__
from lorascope.model.peft import lora_config_of
from lorascope.model.taxonomy import MatrixRef
from lorascope.record.options import RecordOptions


def run_config(model: nn.Module, optimizer: torch.optim.Optimizer, options: RecordOptions, *, grad_timing: str,
               total_steps: int | None, schedule: Any, distributed: dict[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config sections of a run file: ``recorder`` (the options and how they were applied), ``optimizer``,
    ``model`` (its class and, for a transformers model, its config), ``lora`` (a PEFT model's adapters),
    ``distributed`` (when given) and the ``extra`` sections, which win over the others."""
    optimizer_section = {
        "class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "defaults": {k: v for k, v in optimizer.defaults.items() if _jsonable(v)},
        "param_groups": len(optimizer.param_groups),
    }
    recorder = options.to_config()
    recorder.update({
        "lorascope_version": __version__,
        "grad_timing": grad_timing,
        "total_steps": total_steps,
        "schedule": repr(schedule),
        "w0_dtype": "float32",
        "grad_sq_norm_lora": "|grad A|^2 + |grad B|^2 of the adapter factors",
    })
    config = {"recorder": recorder, "optimizer": optimizer_section, "model": {"class": type(model).__name__}}
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "to_dict"):
        config["model"]["config"] = model_config.to_dict()
    lora = lora_config_of(model)
    if lora:
        config["lora"] = lora
    if distributed is not None:
        config["distributed"] = distributed
    config.update(extra or {})
    return config


def sv_capacity(refs: Sequence[MatrixRef], options: RecordOptions) -> int:
    """Length of the singular-value axis: the longest spectrum recorded (a top-k spectrum for large matrices)."""
    top_k = options.top_k
    caps = []
    for ref in refs:
        full = min(ref.out_features, ref.in_features)
        large = ref.out_features * ref.in_features > options.top_k_min_size
        caps.append(min(full, top_k) if (top_k is not None and large) else full)
    return max(caps, default=0)


def coverage_rows(coverage: Sequence[Any]) -> list[dict[str, Any]]:
    """The coverage table's rows: every model parameter, whether it is recorded, and why not."""
    return [{"parameter": entry.parameter, "shape": "x".join(map(str, entry.shape)), "recorded": entry.recorded,
             "reason": entry.reason} for entry in coverage]


def _jsonable(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None))) or (
        isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, str, bool)) for v in value))
