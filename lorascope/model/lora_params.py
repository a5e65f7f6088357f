"""How many parameters a LoRA of rank r has on a target set of a model, counted exactly as PEFT allocates them.

:func:`model_from_config` builds a transformers model from its ``config.json`` on the meta device (exact shapes,
no weights); :func:`lora_parameters` lists the adapters a target set gets and counts their parameters per rank.

Target sets (:data:`LORA_TARGETS`):

``"all-linear"``
    PEFT's ``target_modules="all-linear"`` rule: every ``nn.Linear`` / ``Conv1D`` module except the output head,
    whatever its kind (so also a Linear router such as Qwen2-MoE's ``shared_expert_gate``). Fused MoE experts are
    3-D ``nn.Parameter`` tensors, not modules, so this rule leaves them out.
``"all-linear+experts"``
    ``"all-linear"`` plus every fused expert tensor through PEFT ``target_parameters``.
``"attention-only"``, ``"mlp-only"``, ``"experts"``
    The matrices of kind attention; mlp and moe_expert (dense MLPs, shared experts, fused experts); moe_expert.
a sequence of kinds
    Every matrix of those kinds (:data:`lorascope.model.taxonomy.KINDS`), modules through ``target_modules`` and other
    parameters (fused experts, a router's ``gate.weight``) through ``target_parameters``.

PEFT facts this module relies on (peft 0.21, transformers 5.x): a ``ParamWrapper`` on a fused (E, out, in) tensor
holds one ``lora_A`` of shape (r E, in) and one ``lora_B`` of shape (out, r E), i.e. one rank-r adapter per expert
and one rank shared by all experts of a parameter; a 2-D parameter gets (r, in) and (out, r). For ``model_type``
``"mixtral"`` PEFT rewrites a *string* ``target_modules="all-linear"`` into the transformers-4 layout: attention
modules plus ``target_parameters={"gate.weight", "gate_up_proj", "down_proj"}`` with rank and alpha doubled on
``gate_up_proj`` (w1 and w3 fused). lorascope's configs list modules explicitly and are not rewritten that way.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorascope._checks import check_positive_int
from lorascope.errors import ModelConfigError, SelectionError
from lorascope.model.taxonomy import KINDS, MatrixRef, classify

__all__ = [
    "LORA_TARGETS",
    "LoraAdapter",
    "LoraParameterCount",
    "ModelConfigError",
    "lora_parameter_count",
    "lora_parameters",
    "model_from_config",
]

LORA_TARGETS: Mapping[str, tuple[str, ...]] = {
    "all-linear": ("attention", "mlp", "moe_expert", "router", "embedding", "norm", "other"),
    "all-linear+experts": ("attention", "mlp", "moe_expert", "router", "embedding", "norm", "other"),
    "attention-only": ("attention",),
    "mlp-only": ("mlp", "moe_expert"),
    "experts": ("moe_expert",),
}
"""The named target sets and the kinds they may adapt (``"all-linear"`` further keeps Linear/Conv1D modules only,
``"all-linear+experts"`` those plus fused experts; neither adapts the head)."""

_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")


@dataclass(frozen=True)
class LoraAdapter:
    """One LoRA adapter PEFT would create: on a module (``target_modules``) or a parameter (``target_parameters``).

    Parameters
    ----------
    name : str
        The module path (``via="module"``) or the full parameter name (``via="parameter"``), as PEFT matches
        ``rank_pattern`` / ``alpha_pattern`` keys against it.
    module : str
        Path of the module holding the adapted weight.
    parameter : str
        Attribute name of the adapted parameter (``"weight"``, ``"gate_up_proj"``, ...).
    via : str
        ``"module"`` or ``"parameter"``.
    kind : str
        Kind of the adapted matrices (:data:`lorascope.model.taxonomy.KINDS`).
    layer : int
        Block index, -1 outside the blocks.
    experts : int
        Number of experts sharing this adapter's rank (1 unless a fused expert tensor).
    out_features, in_features : int
        Shape of one adapted matrix (for ``gate_up_proj``, the fused 2I rows).
    matrices : int
        Number of recorded matrices (:class:`~lorascope.model.taxonomy.MatrixRef`) this adapter covers.
    """

    name: str
    module: str
    parameter: str
    via: str
    kind: str
    layer: int
    experts: int
    out_features: int
    in_features: int
    matrices: int

    @property
    def per_rank(self) -> int:
        """LoRA parameters per unit of rank: ``experts * (in_features + out_features)``."""
        return self.experts * (self.in_features + self.out_features)


@dataclass(frozen=True)
class LoraParameterCount:
    """The adapters of a LoRA target set and their parameter count.

    Parameters
    ----------
    target : str
        The target set's name, or the kinds joined with ``"+"``.
    rank : int
        The rank :attr:`total` is given for.
    adapters : tuple of LoraAdapter
        One per adapted module or parameter, in model order.
    """

    target: str
    rank: int
    adapters: tuple[LoraAdapter, ...]

    @property
    def per_rank(self) -> int:
        """LoRA parameters per unit of rank over all adapters."""
        return sum(a.per_rank for a in self.adapters)

    @property
    def total(self) -> int:
        """LoRA parameters at :attr:`rank`: ``rank * per_rank``."""
        return self.rank * self.per_rank

    @property
    def by_kind(self) -> dict[str, int]:
        """LoRA parameters per unit of rank for each kind present, in :data:`~lorascope.model.taxonomy.KINDS` order."""
        counts = {kind: 0 for kind in KINDS}
        for a in self.adapters:
            counts[a.kind] += a.per_rank
        return {kind: n for kind, n in counts.items() if any(a.kind == kind for a in self.adapters)}

    @property
    def num_matrices(self) -> int:
        """Number of adapted matrices (each expert, and each gate/up half, counted once)."""
        return sum(a.matrices for a in self.adapters)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Full names of the adapted modules, PEFT ``target_modules``."""
        return tuple(a.name for a in self.adapters if a.via == "module")

    @property
    def target_parameters(self) -> tuple[str, ...]:
        """Full names of the adapted parameters, PEFT ``target_parameters``."""
        return tuple(a.name for a in self.adapters if a.via == "parameter")

    @property
    def description(self) -> str:
        """A one-line PEFT-style description of the target set."""
        text = f"{self.target}: target_modules={len(self.target_modules)} modules"
        if self.target_parameters:
            text += f", target_parameters={len(self.target_parameters)} parameters"
        kinds = ", ".join(self.by_kind)
        return f"{text} ({kinds}; {self.num_matrices} matrices, {self.per_rank:,} parameters per rank)"


def model_from_config(config: str | os.PathLike[str] | Mapping[str, Any] | Any) -> nn.Module:
    """Build a transformers model from its configuration on the meta device: exact shapes, no weights.

    Parameters
    ----------
    config : str, os.PathLike, mapping or transformers.PretrainedConfig
        A ``config.json`` path, a directory holding one, its content as a mapping (with ``model_type``), or a
        config object. Nothing is downloaded.

    Returns
    -------
    torch.nn.Module
        ``AutoModelForCausalLM.from_config(config)`` (``AutoModel`` for architectures without a causal LM head)
        whose parameters live on the meta device.

    Raises
    ------
    ModelConfigError
        If the file is missing or not JSON, the ``model_type`` is unknown to transformers, sizes are missing,
        or transformers cannot build the architecture.
    """
    import transformers

    cfg = _load_config(config, transformers)
    try:
        with torch.device("meta"):
            try:
                return transformers.AutoModelForCausalLM.from_config(cfg)
            except ValueError as exc:
                if "Unrecognized configuration class" not in str(exc):
                    raise
                return transformers.AutoModel.from_config(cfg)
    except Exception as exc:  # transformers raises many types for an unbuildable config
        raise ModelConfigError(
            f"transformers cannot build a model of type {getattr(cfg, 'model_type', '?')!r} from this config "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Check the config's sizes."
        ) from None


def _load_config(config: Any, transformers: Any) -> Any:
    if isinstance(config, transformers.PretrainedConfig):
        return config
    source = "the config mapping"
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"No model config at {str(path)!r}: pass a config.json file or its directory.")
        source = str(path)
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelConfigError(f"{source!r} is not valid JSON ({exc}); pass a transformers config.json.") from None
    if not isinstance(config, Mapping):
        raise ModelConfigError(
            "The 'config' parameter of model_from_config must be a config.json path or directory, a mapping or a "
            f"transformers.PretrainedConfig. Got {type(config).__name__} instead."
        )
    values = dict(config)
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ModelConfigError(f"{source} has no 'model_type'; transformers needs it to choose the architecture.")
    sized = [values, *(v for v in values.values() if isinstance(v, Mapping))]  # text_config of multimodal models
    if not any(key in part for part in sized for key in _SIZE_KEYS):
        raise ModelConfigError(
            f"{source} gives no hidden size (one of {', '.join(_SIZE_KEYS)}); without it transformers would "
            "silently use its defaults. Pass the model's own config.json."
        )
    if model_type not in transformers.CONFIG_MAPPING:
        raise ModelConfigError(
            f"transformers {transformers.__version__} does not know model_type {model_type!r} (from {source}); "
            "upgrade transformers or check the config."
        )
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except Exception as exc:  # config classes validate sizes with ValueError, TypeError or their own types
        message = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise ModelConfigError(f"{source} is not a valid {model_type!r} config: {message}") from None


def lora_parameters(model: nn.Module, target: str | Sequence[str], rank: int = 1) -> LoraParameterCount:
    """List the LoRA adapters a target set gets on ``model`` and count their parameters.

    .. math:: N(r) = r \\sum_{\\text{adapters } a} E_a \\, (d_{\\text{in},a} + d_{\\text{out},a})

    with :math:`E_a` the number of experts of a fused expert tensor (1 otherwise).

    Parameters
    ----------
    model : torch.nn.Module
        The base model (not PEFT-wrapped); meta-device models (:func:`model_from_config`) work.
    target : str or sequence of str
        A name from :data:`LORA_TARGETS` or a non-empty sequence of kinds from :data:`lorascope.model.taxonomy.KINDS`.
    rank : int, default 1
        LoRA rank r for :attr:`LoraParameterCount.total`.

    Returns
    -------
    LoraParameterCount

    Raises
    ------
    SelectionError
        If ``target`` is unknown or selects nothing on this model, or the model is already PEFT-wrapped.
    InvalidOptionError
        If ``rank`` is not a positive int.

    Notes
    -----
    The count equals PEFT's trainable parameters for the same adapters: (r, in) and (out, r) per module,
    (r E, in) and (out, r E) per fused expert tensor, (r, num_embeddings) and (dim, r) per embedding. GPT-2
    ``Conv1D`` weights are stored (in, out); the count uses the matrix orientation.

    Examples
    --------
    >>> count = lora_parameters(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), ["other"], rank=2)
    >>> count.per_rank, count.total, count.target_modules
    (12, 24, ('0', '1'))
    """
    check_positive_int("rank", rank, "lora_parameters")
    name, kinds, mode = _parse_target(target)
    tax = classify(model, include_frozen=True)
    if any(m.lora for m in tax.matrices):
        raise SelectionError("lora_parameters needs the base model; got a PEFT-wrapped model. Pass its base model.")
    adapters = []
    for (module_path, pname), refs in _by_adapter(tax.matrices).items():
        module = model.get_submodule(module_path)
        via = "module" if pname == "weight" and _is_module_target(module) else "parameter"
        kind = refs[0].kind
        if kind not in kinds or (mode != "kinds" and kind == "head"):
            continue
        linear = via == "module" and _is_linear(module)
        fused = via == "parameter" and refs[0].expert >= 0 and kind == "moe_expert"
        if (mode == "all-linear" and not linear) or (mode == "all-linear+experts" and not (linear or fused)):
            continue
        adapters.append(_adapter(module_path, pname, via, refs))
    if not adapters:
        counts = tax.by_kind()
        raise SelectionError(
            f"The target {name!r} adapts no matrix of this model. Kinds present: "
            f"{', '.join(f'{k} ({n})' for k, n in counts.items()) or 'none'}. Choose a target with those kinds."
        )
    return LoraParameterCount(name, int(rank), tuple(adapters))


def _parse_target(target: str | Sequence[str]) -> tuple[str, tuple[str, ...], str]:
    if isinstance(target, str):
        if target not in LORA_TARGETS:
            raise SelectionError(
                f"The 'target' parameter must be one of {sorted(LORA_TARGETS)} or a sequence of kinds from {KINDS}. "
                f"Got {target!r} instead."
            )
        mode = target if target.startswith("all-linear") else "kinds"
        return target, LORA_TARGETS[target], mode
    kinds = tuple(target) if isinstance(target, Sequence) else ()
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise SelectionError(
            f"The 'target' parameter must be one of {sorted(LORA_TARGETS)} or a non-empty sequence of kinds from "
            f"{KINDS}. Got {list(bad) if bad else target!r} instead."
        )
    return "+".join(kinds), kinds, "kinds"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_module_target(module: nn.Module) -> bool:
    """Modules PEFT LoRA replaces through ``target_modules`` (others need ``target_parameters``)."""
    return _is_linear(module) or isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _by_adapter(matrices: Iterable[MatrixRef]) -> dict[tuple[str, str], list[MatrixRef]]:
    """The matrices grouped by the adapter PEFT gives them: one per (module, parameter), in model order."""
    groups: dict[tuple[str, str], list[MatrixRef]] = {}
    for ref in matrices:
        groups.setdefault((ref.module, ref.parameter), []).append(ref)
    return groups


def _adapter_shape(refs: Sequence[MatrixRef]) -> tuple[int, int, int]:
    """(experts, out, in) of the adapter on one parameter's matrices: a fused tensor's experts share one adapter
    whose rows are one expert's matrices (its gate and up halves) together."""
    experts = sorted({r.expert for r in refs})
    out = sum(r.out_features for r in refs if r.expert == experts[0])
    return len(experts), out, refs[0].in_features


def _adapter(module_path: str, pname: str, via: str, refs: list[MatrixRef]) -> LoraAdapter:
    experts, out, in_features = _adapter_shape(refs)
    name = module_path if via == "module" else f"{module_path}.{pname}"
    return LoraAdapter(name, module_path, pname, via, refs[0].kind, refs[0].layer, experts, out, in_features,
                       len(refs))


def lora_parameter_count(matrices: Iterable[MatrixRef], rank: int) -> int:
    """Number of trainable parameters of a rank-``rank`` LoRA on the given matrices.

    .. math:: N = r \\sum_{\\text{adapters}} E \\, (d_\\text{in} + d_\\text{out})

    The matrices are grouped into adapters as :func:`lora_parameters` groups them (so it works on the matrices of
    a PEFT-wrapped model too, where it counts PEFT's trainable parameters).

    Parameters
    ----------
    matrices : iterable of MatrixRef
        The adapted matrices, e.g. ``classify(model).select(kinds=["attention", "mlp"]).matrices``.
    rank : int
        LoRA rank r, at least 1.

    Returns
    -------
    int

    Raises
    ------
    SelectionError
        If ``rank`` is not an int >= 1.

    Notes
    -----
    The gate and up halves of one expert's fused ``gate_up_proj`` count as one adapter of shape
    (2I, H), as PEFT ``target_parameters`` adapts the fused tensor: one A of (r, H) and one B of (2I, r).

    Examples
    --------
    >>> lora_parameter_count(classify(nn.Linear(4, 3)).matrices, rank=2)
    14
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise SelectionError("The 'rank' parameter of lora_parameter_count must be an int in the range [1, inf). "
                             f"Got {rank!r} instead.")
    shapes = [_adapter_shape(refs) for refs in _by_adapter(matrices).values()]
    return int(rank) * sum(experts * (out + in_features) for experts, out, in_features in shapes)
