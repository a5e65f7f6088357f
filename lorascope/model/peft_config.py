"""Write PEFT LoRA configurations for a lorascope target set, with per-module or per-kind ranks.

:func:`make_lora_config` returns a JSON-able dict of :class:`peft.LoraConfig` keyword arguments whose targets are
spelled out name by name (``target_modules`` for modules, ``target_parameters`` for fused MoE experts and other
parameters), so PEFT adapts exactly the matrices :func:`lorascope.model.lora_params.lora_parameters` counts.
Ranks that differ from ``r`` go into ``rank_pattern`` with ``^``-anchored full-name keys; PEFT matches them as
``re.match(rf"(.*\\.)?({key})$", name)`` and the first match wins, so an anchored key hits one name only.

Alpha convention: by default ``lora_alpha = 32`` for every adapter with PEFT's ``alpha / r`` scaling, the setting
of Schulman et al. (2025, "LoRA Without Regret") under which the optimal learning rate barely depends on the rank.
``alpha="2r"`` (Biderman et al., 2024) or ``alpha="r"`` tie alpha to each adapter's rank through
``alpha_pattern``; ``use_rslora=True`` switches PEFT to ``alpha / sqrt(r)``. Record which one a run used.
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from lorascope.errors import InvalidOptionError, LorascopeError
from lorascope.model.lora_params import LoraAdapter, lora_parameters
from lorascope.model.taxonomy import KINDS

__all__ = ["make_lora_config", "pattern_matches", "to_peft", "write_peft_config"]

_ALPHA_RULES = {"r": 1.0, "2r": 2.0}


def make_lora_config(
    model: nn.Module,
    *,
    target: str | Sequence[str],
    rank: int | Mapping[str, int],
    alpha: float | str = 32,
    use_rslora: bool = False,
    dropout: float = 0.0,
    task_type: str | None = "auto",
    layers: Collection[int] | None = None,
) -> dict[str, Any]:
    """PEFT ``LoraConfig`` keyword arguments adapting ``target`` of ``model`` with the given ranks.

    Parameters
    ----------
    model : torch.nn.Module
        The base model (a meta-device model from :func:`~lorascope.model.lora_params.model_from_config` works).
    target : str or sequence of str
        A target set of :data:`~lorascope.model.lora_params.LORA_TARGETS` or a sequence of kinds.
    rank : int or mapping of str to int
        One rank for all adapters, or ranks by kind (``"attention"``, ``"mlp"``, ``"moe_expert"``, ...) and/or by
        adapter name (full module name, or full parameter name such as ``"model.layers.0.mlp.experts.down_proj"``);
        names take precedence over kinds, kinds absent from the target are ignored, and ``"*"`` gives the rank
        of everything else. A fused expert tensor has one rank shared by all its experts.
    alpha : float or str, default 32
        ``lora_alpha`` for every adapter (a number or a numeric string), or ``"r"`` / ``"2r"`` for alpha equal
        to (twice) each adapter's rank.
    use_rslora : bool, default False
        Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    dropout : float, default 0.0
        ``lora_dropout``.
    task_type : str or None, default "auto"
        PEFT task type; ``"auto"`` gives ``"CAUSAL_LM"`` for a model with an output embedding layer.
    layers : collection of int, optional
        Adapt only the matrices of these transformer blocks (default: every block, and matrices outside blocks).

    Returns
    -------
    dict
        ``r``, ``lora_alpha``, ``target_modules`` (list of full module names), ``target_parameters`` (list,
        possibly empty), ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``lora_dropout`` and ``task_type``
        (when not None); ``r`` is the most common rank (the first adapter's on ties).

    Raises
    ------
    InvalidOptionError
        If a rank is not a positive int, a rank key is neither a kind nor an adapter name, an adapter has no
        rank, or ``alpha`` is invalid.
    SelectionError
        If ``target`` is invalid or adapts nothing.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    >>> cfg = make_lora_config(model, target=["other"], rank={"0": 4, "*": 2}, task_type=None)
    >>> cfg["r"], cfg["target_modules"], cfg["rank_pattern"]
    (4, ['0', '1'], {'^1$': 2})
    """
    adapters = _protect_from_moe_conversion(model, lora_parameters(model, target).adapters)
    if layers is not None:
        adapters = tuple(a for a in adapters if a.layer in set(layers))
        if not adapters:
            raise InvalidOptionError(f"The 'layers' parameter of make_lora_config selects no adapter of the target "
                                     f"{target!r}: blocks {sorted(set(layers))} hold none.")
    ranks = _ranks(adapters, rank)
    alpha_factor, fixed_alpha = _alpha(alpha)
    base_rank = Counter(ranks.values()).most_common(1)[0][0]
    base_alpha = fixed_alpha if fixed_alpha is not None else alpha_factor * base_rank
    rank_pattern = {_anchored(name): r for name, r in ranks.items() if r != base_rank}
    alpha_pattern = {} if fixed_alpha is not None else {
        _anchored(name): alpha_factor * r for name, r in ranks.items() if r != base_rank}
    config: dict[str, Any] = {
        "r": base_rank,
        "lora_alpha": _number(base_alpha),
        "target_modules": [a.name for a in adapters if a.via == "module"],
        "target_parameters": [a.name for a in adapters if a.via == "parameter"],
        "rank_pattern": rank_pattern,
        "alpha_pattern": {k: _number(v) for k, v in alpha_pattern.items()},
        "use_rslora": bool(use_rslora),
        "lora_dropout": float(dropout),
    }
    if task_type == "auto":
        getter = getattr(model, "get_output_embeddings", None)
        task_type = "CAUSAL_LM" if callable(getter) and getter() is not None else None
    if task_type is not None:
        config["task_type"] = task_type
    return config


def to_peft(config: Mapping[str, Any]) -> Any:
    """A :class:`peft.LoraConfig` from a dict of :func:`make_lora_config` (or a read ``adapter_config.json``).

    Raises
    ------
    LorascopeError
        If peft is not installed (install the ``peft`` extra).
    """
    try:
        import peft
    except ImportError:
        raise LorascopeError("to_peft needs peft: pip install 'lorascope[peft]' (or pip install peft).") from None
    return peft.LoraConfig(**dict(config))


def write_peft_config(config: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``config`` as an ``adapter_config.json`` that ``LoraConfig.from_pretrained(directory)`` reads.

    Parameters
    ----------
    config : mapping
        Output of :func:`make_lora_config`.
    path : str or os.PathLike
        A directory (created if needed; the file is ``adapter_config.json`` in it) or a ``.json`` file path.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    path = Path(path)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "adapter_config.json"
    content = {"peft_type": "LORA", **dict(config)}
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def pattern_matches(key: str, name: str) -> bool:
    """Whether a PEFT ``rank_pattern`` / ``alpha_pattern`` key matches a module or parameter name.

    PEFT's rule: ``re.match(rf"(.*\\.)?({key})$", name)``.

    Examples
    --------
    >>> pattern_matches(r"^model\\.layers\\.1\\.mlp\\.down_proj$", "model.layers.1.mlp.down_proj")
    True
    >>> pattern_matches(r"^model\\.layers\\.1\\.mlp\\.down_proj$", "model.layers.11.mlp.down_proj")
    False
    """
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _protect_from_moe_conversion(model: nn.Module, adapters: Sequence[LoraAdapter]) -> tuple[LoraAdapter, ...]:
    """Target Linear layers that PEFT would rewrite as parameters instead.

    For MoE architectures whose experts transformers 5 fused (Mixtral, Qwen3-MoE, DeepSeek-V3, OLMoE, ...), PEFT
    converts a transformers-4 style config when it builds the adapter: every ``target_modules`` entry ending in
    ``.gate_proj`` / ``.up_proj`` / ``.down_proj`` / ``.gate`` (``.w1`` / ``.w2`` / ``.w3`` for Mixtral) is moved
    to ``target_parameters`` as the fused expert tensor, with rank and alpha doubled on ``gate_up_proj``. A dense or
    shared-expert MLP layer named that way would silently lose its adapter and the experts' ranks would change.
    Such a Linear layer is therefore listed through ``target_parameters`` by its ``.weight`` (same LoRA shapes and
    parameter count; PEFT does not convert parameter targets).
    """
    renamed = _peft_converted_leaf_names(model)
    if not renamed:
        return tuple(adapters)
    return tuple(replace(a, name=f"{a.name}.weight", via="parameter")
                 if a.via == "module" and a.name.rsplit(".", 1)[-1] in renamed else a for a in adapters)


def _peft_converted_leaf_names(model: nn.Module) -> frozenset[str]:
    """The module leaf names PEFT rewrites for this model's type (empty when it rewrites none, or when this PEFT
    version has no such conversion)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not model_type:
        return frozenset()
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except Exception:  # no peft, transformers < 5, or a PEFT version without the conversion
        return frozenset()
    base = getattr(conversion, "_MODEL_TO_CONVERSION_PATTERN", {}).get(model_type)
    return frozenset(getattr(conversion, "_MOE_TARGET_MODULE_MAPPING", {}).get(base, {}))


def _anchored(name: str) -> str:
    return f"^{re.escape(name)}$"


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _alpha(alpha: float | str) -> tuple[float, float | None]:
    """(factor on r, fixed alpha): exactly one is used."""
    if isinstance(alpha, str) and alpha.strip() in _ALPHA_RULES:
        return _ALPHA_RULES[alpha.strip()], None
    try:
        value = float(alpha) if not isinstance(alpha, bool) else float("nan")
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise InvalidOptionError(
            "The 'alpha' parameter of make_lora_config must be a positive number or one of "
            f"{sorted(_ALPHA_RULES)}. Got {alpha!r} instead."
        )
    return 1.0, value


def _valid_rank(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidOptionError(
            f"The {what} of make_lora_config must be an int in the range [1, inf). Got {value!r} instead."
        )
    return int(value)


def _ranks(adapters: Sequence[LoraAdapter], rank: int | Mapping[str, int]) -> dict[str, int]:
    if not isinstance(rank, Mapping):
        r = _valid_rank(rank, "'rank' parameter")
        return {a.name: r for a in adapters}
    names = {a.name for a in adapters}
    kinds = {a.kind for a in adapters}
    for key, value in rank.items():
        _valid_rank(value, f"rank for {key!r} in the 'rank' parameter")
        if key != "*" and key not in names and key not in KINDS:  # a kind absent from this model is fine
            raise InvalidOptionError(
                f"The key {key!r} of the 'rank' parameter of make_lora_config is neither a kind nor an adapter "
                f"name. Kinds adapted: {sorted(kinds, key=KINDS.index)}; adapter names look like "
                f"{next(iter(names))!r}."
            )
    ranks = {}
    for a in adapters:
        given: int | None = next((rank[key] for key in (a.name, a.kind, "*") if key in rank), None)
        if given is None:
            raise InvalidOptionError(
                f"The 'rank' parameter of make_lora_config gives no rank for {a.name!r} (kind {a.kind!r}); "
                "add its kind, its name or '*'."
            )
        ranks[a.name] = int(given)
    return ranks
