"""Which modules :class:`~lorascope.record.per_example.hooks.PerExampleNorms` measures, and why not the others:
the supported kinds, the adapters of a targeted PEFT LoRA layer, the ``targets`` argument, what a call's input is,
and the one-time check that a module computes the formula its norms assume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from lorascope.errors import InvalidOptionError
from lorascope.model.peft import is_lora_layer
from lorascope.record.per_example.kernels import normalized

SUPPORTED = "nn.Linear, transformers Conv1D, nn.Embedding, nn.LayerNorm or an RMSNorm"


def kind_of(module: nn.Module) -> tuple[str, str]:
    """The kind of a supported module, or ("", why not)."""
    cls = type(module).__name__
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        if hasattr(module, "parametrizations"):
            return "", f"{cls} with a parametrized weight"
        return "", f"{cls} is not a supported module ({SUPPORTED})"
    if isinstance(module, nn.Linear):
        return "linear", ""
    if cls == "Conv1D" and hasattr(module, "nf") and weight.ndim == 2:
        return "conv1d", ""
    if isinstance(module, nn.Embedding):
        if module.scale_grad_by_freq:
            return "", "nn.Embedding with scale_grad_by_freq=True (the scale mixes the batch's examples)"
        return "embedding", ""
    if isinstance(module, nn.LayerNorm):
        return "layer_norm", ""
    if isinstance(module, getattr(nn, "RMSNorm", ())) or cls.endswith("RMSNorm"):
        return "rms_norm", ""
    if is_lora_layer(module):
        return "", "PEFT LoRA layer (not targeted: its lora_A / lora_B Linear modules go to 'other')"
    return "", f"{cls} is not a supported module ({SUPPORTED})"


def lora_adapters(path: str, module: nn.Module) -> list[str] | str:
    """Paths of the adapter Linear modules of a PEFT LoRA layer (none for another module), or why not."""
    if not is_lora_layer(module):
        return []
    if len(getattr(module, "lora_embedding_A", None) or {}):
        return "PEFT LoRA embedding layer (its adapters are parameters read through F.embedding, not modules)"
    found = [f"{path}.{part}.{name}" for part in ("lora_A", "lora_B")
             for name, sub in getattr(module, part).items() if isinstance(sub, nn.Linear)]
    if len(found) != 2 * len(cast(nn.ModuleDict, module.lora_A)):
        return "PEFT LoRA layer whose adapters are not nn.Linear"
    return found


def check_targets(model: nn.Module, targets: Mapping[str, Sequence[int]] | None) -> dict[str, int] | None:
    if targets is None:
        return None
    if not isinstance(targets, Mapping):
        raise InvalidOptionError("The 'targets' parameter of PerExampleNorms must be None or a mapping "
                                 f"{{module path: [column]}}. Got {type(targets).__name__} instead.")
    paths = dict(model.named_modules())
    out: dict[str, int] = {}
    for path, columns in targets.items():
        if path not in paths:
            raise InvalidOptionError(f"The 'targets' parameter of PerExampleNorms names module {path!r}, which "
                                     f"{type(model).__name__} does not have. Use paths from model.named_modules().")
        cols = list(columns) if isinstance(columns, Sequence) and not isinstance(columns, str) else [columns]
        if len(cols) != 1 or isinstance(cols[0], bool) or not isinstance(cols[0], int) or cols[0] < 0:
            raise InvalidOptionError(f"The 'targets' parameter of PerExampleNorms must map each module to one "
                                     f"column index >= 0. Got {columns!r} for {path!r} instead.")
        out[path] = int(cols[0])
    return out



def examples_of(args: tuple[Any, ...], kwargs: dict[str, Any], batch_dim: int) -> int | None:
    """Examples of one model call: the size along ``batch_dim`` of ``input_ids`` or the first tensor input."""
    x = kwargs.get("input_ids")
    if not isinstance(x, torch.Tensor):
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if x is None:
        x = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    return int(x.shape[batch_dim]) if isinstance(x, torch.Tensor) and x.ndim > batch_dim else None


def input_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0] if len(args) == 1 and not kwargs else _only_tensor(args, kwargs)
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else None


def _only_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The input when a module gets extra arguments: only a single tensor argument is understood."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)] + [
        v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else args[0]



def check_formula(kind: str, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> str:
    """Check that a module of ``kind`` computes what the norms assume, from one call's input and output; "" when
    it does, else why not."""
    weight = cast(torch.Tensor, module.weight)  # nn.Module's attributes type as Tensor | Module
    bias = cast("torch.Tensor | None", getattr(module, "bias", None))
    with torch.no_grad():
        if kind == "linear":
            expected = [nn.functional.linear(x, weight, bias)]
        elif kind == "conv1d":
            y = x.reshape(-1, x.shape[-1]) @ weight
            expected = [(y if bias is None else y + bias).reshape(output.shape)]
        elif kind == "embedding":
            expected = [nn.functional.embedding(x, weight)]
        else:
            x_hat = normalized(kind, module, x)
            w = weight.float()
            shift: torch.Tensor | float = bias.float() if bias is not None else 0.0
            expected = [w * x_hat + shift]
            if kind == "rms_norm":
                expected.append((1.0 + w) * x_hat)  # Gemma-style scale, same weight gradient
        out = output.detach().float()
        tol = 1e-2 if output.dtype in (torch.float32, torch.float64) else 5e-2
        for ref in expected:
            if ref.shape == out.shape:
                ref = ref.float()
                if bool(((out - ref).abs().max() <= tol * (ref.abs().max() + 1e-12)).item()):
                    return ""
    formula = {"linear": "x W^T + b", "conv1d": "x W + b", "embedding": "W[ids]",
               "layer_norm": "w * (x - mean) / std + b", "rms_norm": "w * x / rms(x) (or (1 + w) * x / rms(x))"}
    return f"its output is not {formula[kind]} of its input"

