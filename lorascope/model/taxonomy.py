"""Map every parameter of a torch model to the 2-D matrices lorascope records.

:func:`classify` walks a model once and returns a :class:`Taxonomy`: the recordable matrices
(:class:`MatrixRef`, each with a kind, a role, a layer and an expert index) and one
:class:`CoverageEntry` per parameter saying whether it is recorded and, when it is not, why.
Nothing is skipped silently.

What becomes a matrix:

- ``nn.Linear`` weights, stored (out, in).
- transformers ``Conv1D`` weights (GPT-2), stored (in, out) and read transposed.
- ``nn.Embedding`` weights, read as stored: (num_embeddings, embedding_dim).
- Fused 3-D expert tensors of transformers 5.x MoE blocks, split into one matrix per expert and, for
  ``gate_up_proj``, into its gate and up halves (concatenated ``[gate; up]`` or interleaved as in GPT-OSS).
- Any other 2-D parameter (routers, a user's own layers), and convolution kernels flattened to
  (out, in * kernel).
- PEFT LoRA layers: one matrix per adapted base parameter, marked ``lora=True``; its update is the merged
  ``scaling * B @ A`` and the adapter weights themselves are not separate matrices.

Biases, norms and other 1-D parameters are listed in the coverage with their reason. Kinds and roles come from
the rules of :mod:`lorascope.model.roles`; :func:`lorascope.model.lora_params.lora_parameter_count` counts the
LoRA parameters of a set of matrices.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from lorascope.errors import InvalidOptionError, SelectionError
from lorascope.model.peft import base_layer_of, is_lora_layer
from lorascope.model.roles import KINDS, block_index, expert_index, kind_and_role, mlp_role, without_wrappers

__all__ = ["KINDS", "CoverageEntry", "MatrixRef", "Taxonomy", "classify"]


@dataclass(frozen=True)
class MatrixRef:
    """One recordable matrix of a model, in (out_features, in_features) orientation.

    Parameters
    ----------
    name : str
        Unique id. The module path for ``nn.Linear``, ``Conv1D``, ``nn.Embedding`` and LoRA layers;
        ``f"{module}.{parameter}[{expert}]"`` for a fused expert tensor, plus ``".gate"`` / ``".up"`` when a
        ``gate_up_proj`` is split; ``f"{module}.{parameter}"`` for other parameters than ``weight``.
    module : str
        Dotted path of the owning module (for a LoRA matrix: the PEFT LoRA layer, whose
        ``get_delta_weight`` gives the update in the layout of the adapted parameter).
    parameter : str
        Attribute name of the parameter on the (base) module: ``"weight"``, ``"gate_up_proj"``, ...
    kind : str
        One of :data:`KINDS`.
    role : str
        q, k, v, o, qkv, gate, up, down, fc_in, fc_out, router, shared_expert_gate, token_embedding,
        position_embedding, token_type_embedding, head, pooler, conv, or ``""`` when unknown.
    layer : int
        Transformer block index, -1 when the matrix is outside the blocks.
    expert : int
        Expert index, -1 when the matrix does not belong to one MoE expert.
    out_features, in_features : int
        Shape of :meth:`matrix`.
    transposed : bool
        The parameter stores the matrix as (in, out) (GPT-2 ``Conv1D``, GPT-OSS experts).
    part : str
        ``""``, ``"gate"`` or ``"up"``: which half of a fused ``gate_up_proj`` this is.
    interleaved : bool
        The gate and up halves alternate along the 2I axis (GPT-OSS) instead of ``[gate; up]``.
    lora : bool
        The matrix is the merged update ``scaling * B @ A`` of a PEFT LoRA layer (summed over its active
        adapters), not ``W_t - W_0`` of a trainable weight.
    """

    name: str
    module: str
    parameter: str
    kind: str
    role: str
    layer: int
    expert: int
    out_features: int
    in_features: int
    transposed: bool = False
    part: str = ""
    interleaved: bool = False
    lora: bool = False

    def matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return this matrix, shape (out_features, in_features), cut from the full parameter tensor.

        Parameters
        ----------
        tensor : torch.Tensor
            The whole parameter (``getattr(module, parameter)``), or a tensor of the same layout such as
            ``W_t - W_0`` or a LoRA layer's ``get_delta_weight(adapter)``: (E, 2I, H) for a fused expert
            tensor, (in, out) for a ``Conv1D``, (out, in) for a ``Linear``.

        Returns
        -------
        torch.Tensor
            A view of ``tensor`` (a copy only for a non-contiguous convolution kernel).

        Raises
        ------
        InvalidOptionError
            If ``tensor`` does not have the layout this reference was built from (a ``ValueError`` too).
        """
        m = tensor
        if m.ndim == 3 and self.expert >= 0:
            m = m[self.expert]
        elif m.ndim > 2:
            m = m.reshape(m.shape[0], -1)
        if self.transposed:
            m = m.T
        if self.part:
            first = self.part == "gate"
            if self.interleaved:
                m = m[0::2] if first else m[1::2]
            else:
                half = m.shape[0] // 2
                m = m[:half] if first else m[half:]
        if tuple(m.shape) != (self.out_features, self.in_features):
            raise InvalidOptionError(
                f"MatrixRef {self.name!r} expected the full {self.parameter!r} tensor of {self.module!r}, "
                f"giving a ({self.out_features}, {self.in_features}) matrix; got a tensor of shape "
                f"{tuple(tensor.shape)}, giving {tuple(m.shape)}. Pass the whole parameter (or its update) "
                "in its stored layout."
            )
        return m


@dataclass(frozen=True)
class CoverageEntry:
    """What happened to one parameter of the model.

    Parameters
    ----------
    parameter : str
        Full name as in ``model.named_parameters()`` (tied aliases use their own path).
    shape : tuple of int
        Shape of the parameter.
    recorded : bool
        Whether at least one recorded matrix comes from this parameter.
    reason : str
        Why it is not recorded; for a recorded parameter a note on how (split, transposed, merged LoRA)
        or ``""``.
    matrices : tuple of str
        Names of the :class:`MatrixRef` recorded from this parameter (empty when not recorded).
    tied_to : str
        Name of the first owner when this entry is a tied alias (e.g. a tied ``lm_head.weight``), else ``""``.
        Aliases are absent from ``named_parameters()``.
    """

    parameter: str
    shape: tuple[int, ...]
    recorded: bool
    reason: str
    matrices: tuple[str, ...] = ()
    tied_to: str = ""


@dataclass(frozen=True)
class Taxonomy:
    """The recordable matrices of a model and the coverage of all its parameters.

    Parameters
    ----------
    matrices : tuple of MatrixRef
        Recorded matrices in model order; names are unique.
    coverage : tuple of CoverageEntry
        One entry per name of ``dict(model.named_parameters())``, plus one per tied alias.
    """

    matrices: tuple[MatrixRef, ...]
    coverage: tuple[CoverageEntry, ...]

    def by_kind(self) -> dict[str, int]:
        """Number of matrices of each kind present, in :data:`KINDS` order."""
        counts = Counter(m.kind for m in self.matrices)
        return {kind: counts[kind] for kind in KINDS if counts[kind]}

    def select(
        self, kinds: Iterable[str] | str | None = None, regex: str | re.Pattern[str] | None = None
    ) -> Taxonomy:
        """Keep the matrices of the given kinds whose name matches ``regex`` (both: the intersection).

        Parameters
        ----------
        kinds : iterable of str or str, optional
            Kinds from :data:`KINDS` to keep; all when None.
        regex : str or re.Pattern, optional
            Kept matrices satisfy ``re.search(regex, ref.name)``; all when None.

        Returns
        -------
        Taxonomy
            The selected matrices; coverage entries of parameters left without a matrix become
            ``recorded=False`` with reason ``"excluded by selection (...)"``.

        Raises
        ------
        SelectionError
            If a kind is not in :data:`KINDS`, the regex does not compile, or nothing is selected.

        Examples
        --------
        >>> tax = classify(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
        >>> [m.name for m in tax.select(regex=r"^1$").matrices]
        ['1']
        """
        if kinds is None and regex is None:
            return self
        criteria = []
        wanted = None
        if kinds is not None:
            wanted = _validate_kinds(kinds)
            criteria.append(f"kinds={sorted(wanted, key=KINDS.index)}")
        pattern = None
        if regex is not None:
            pattern = _compile_pattern(regex, "The 'regex' parameter of Taxonomy.select")
            criteria.append(f"regex={pattern.pattern!r}")
        kept = tuple(
            m for m in self.matrices
            if (wanted is None or m.kind in wanted) and (pattern is None or pattern.search(m.name))
        )
        if not kept:
            counts = self.by_kind()
            present = ", ".join(f"{kind} ({n})" for kind, n in counts.items())
            examples = ", ".join(next(m.name for m in self.matrices if m.kind == kind) for kind in counts)
            raise SelectionError(
                f"The selection {', '.join(criteria)} matches none of the {len(self.matrices)} matrices "
                f"of this model. Kinds present: {present or 'none'}. Example names: {examples or 'none'}. "
                "Choose kinds that are present or loosen the regex."
            )
        kept_names = {m.name for m in kept}
        coverage = tuple(_narrow_entry(e, kept_names, ", ".join(criteria)) for e in self.coverage)
        return Taxonomy(kept, coverage)


def classify(
    model: nn.Module, *, kind_map: Mapping[str, str] | None = None, include_frozen: bool = False
) -> Taxonomy:
    """Find every recordable matrix of ``model`` and account for every parameter.

    Parameters
    ----------
    model : torch.nn.Module
        Any model: transformers, PEFT-wrapped, or a user's own module.
    kind_map : mapping of str to str, optional
        Overrides of the kind, ``{regex: kind}``; the first regex that ``re.search``-es a matrix name wins.
    include_frozen : bool, default False
        Also record matrices whose parameter has ``requires_grad=False`` (their update stays zero under
        plain training). Base weights of LoRA layers are never recorded: their LoRA update is.

    Returns
    -------
    Taxonomy

    Raises
    ------
    SelectionError
        If ``model`` is not a module or ``kind_map`` is malformed.

    Notes
    -----
    Kinds and roles come from the module type and from the last components of the module path (for
    example ``self_attn.q_proj`` is attention/q, ``attention.output.dense`` attention/o, ``output.dense``
    mlp/fc_out, ``mlp.gate`` router). Unrecognized 2-D parameters are recorded as kind ``"other"``.
    The layer index is the first ``.layers.N`` / ``.layer.N`` / ``.h.N`` / ``.blocks.N`` / ``.block.N``.
    Embeddings are read as stored, (num_embeddings, embedding_dim).

    Examples
    --------
    >>> tax = classify(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)))
    >>> [(m.name, m.kind, m.out_features, m.in_features) for m in tax.matrices]
    [('0', 'other', 3, 4)]
    >>> for entry in tax.coverage:
    ...     print(entry.parameter, entry.recorded, repr(entry.reason))
    0.weight True ''
    0.bias False 'bias (1-D)'
    1.weight False '1-D parameter (norm weight)'
    1.bias False 'bias (1-D)'
    """
    if not isinstance(model, nn.Module):
        raise SelectionError(
            "The 'model' parameter of classify must be a torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    rules = _compile_kind_map(kind_map)
    heads = _output_module_ids(model)
    lora_layers = {path: m for path, m in model.named_modules() if is_lora_layer(m)}
    adapted: dict[tuple[int, str], str] = {}  # (id(base module), parameter) -> LoRA layer path
    lora_names: dict[str, tuple[tuple[str, ...], bool]] = {}  # LoRA layer path -> (matrix names, recorded)
    for path, layer in lora_layers.items():
        adapted[(id(base_layer_of(layer)), getattr(layer, "parameter_name", "weight"))] = path

    matrices: list[MatrixRef] = []
    coverage: list[CoverageEntry] = []
    first_owner: dict[int, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if path in lora_layers and path not in lora_names:
            refs = _lora_refs(path, lora_layers[path], heads)
            adapter = [p for n, p in module.named_parameters() if not n.startswith("base_layer.")]
            recorded = include_frozen or any(p.requires_grad for p in adapter)
            lora_names[path] = (tuple(r.name for r in refs), recorded)
            matrices.extend(refs if recorded else [])
        for pname, param in module.named_parameters(recurse=False):
            full = _join(path, pname)
            shape = tuple(param.shape)
            if id(param) in first_owner:
                owner = first_owner[id(param)]
                coverage.append(CoverageEntry(full, shape, False, f"tied to {owner}", tied_to=owner))
                continue
            first_owner[id(param)] = full
            lora_path = _adapter_owner(path, lora_layers)
            if lora_path is not None:
                coverage.append(_adapter_entry(full, shape, pname, lora_path, *lora_names[lora_path]))
                continue
            if (id(module), pname) in adapted:
                names, lora_recorded = lora_names[adapted[(id(module), pname)]]
                how = f"is recorded as {_describe(names)}" if lora_recorded else "is frozen and not recorded"
                reason = f"base weight of a LoRA layer; its merged LoRA update {how}"
                coverage.append(CoverageEntry(full, shape, False, reason))
                continue
            refs, note = _parameter_refs(path, module, pname, param, heads)
            if not refs:
                coverage.append(CoverageEntry(full, shape, False, note))
            elif not (param.requires_grad or include_frozen):
                coverage.append(CoverageEntry(full, shape, False, "frozen (requires_grad=False)"))
            else:
                matrices.extend(refs)
                coverage.append(CoverageEntry(full, shape, True, note, tuple(r.name for r in refs)))
    return Taxonomy(tuple(_apply_kind_map(ref, rules) for ref in matrices), tuple(coverage))


# ----------------------------------------------------------------------------------------------------------
# Parameters to matrices


def _parameter_refs(
    path: str, module: nn.Module, pname: str, param: torch.Tensor, heads: set[int]
) -> tuple[list[MatrixRef], str]:
    """Matrices of one parameter, and the coverage note (why none, or how they were cut)."""
    cls = type(module).__name__
    if pname.endswith("bias"):
        if _is_fused_experts(module) and param.ndim == 2:
            return [], "expert bias (not a matrix)"
        return [], "bias (1-D)" if param.ndim == 1 else f"bias ({param.ndim}-D, not a matrix)"
    if param.ndim < 2:
        if "norm" in cls.lower():
            return [], f"1-D parameter (norm {pname})"
        return [], f"{param.ndim}-D parameter (not a matrix)"
    if param.ndim == 3 and _is_fused_experts(module):
        return _expert_refs(path, module, pname, param)
    if param.ndim > 2 and not (isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and pname == "weight"):
        return [], f"{param.ndim}-D parameter of {cls} (not a matrix, convolution kernel or fused experts)"
    if param.ndim > 2:
        kind, role = "other", "conv"
        out, in_ = param.shape[0], math.prod(param.shape[1:])
        note = "convolution kernel flattened to (out, in * kernel)"
    else:
        kind, role = kind_and_role(path, module, id(module) in heads)
        out, in_ = param.shape
        note = ""
    transposed = cls == "Conv1D" and hasattr(module, "nf") and pname == "weight"
    if transposed:
        out, in_ = in_, out
        note = "Conv1D weight stored (in, out); recorded transposed to (out, in)"
    name = path if pname == "weight" and path else _join(path, pname)
    layer, expert = block_index(path), expert_index(path)
    return [MatrixRef(name, path, pname, kind, role, layer, expert, int(out), int(in_), transposed)], note


def _expert_refs(
    path: str, module: nn.Module, pname: str, param: torch.Tensor
) -> tuple[list[MatrixRef], str]:
    """Split a fused (E, ., .) expert tensor into per-expert (and gate/up) matrices."""
    transposed = _experts_transposed(module)
    num_experts, rows, cols = param.shape
    out, in_ = (cols, rows) if transposed else (rows, cols)
    split = pname == "gate_up_proj" and getattr(module, "has_gate", True)
    interleaved = split and not getattr(module, "is_concatenated", True)
    parts = ("gate", "up") if split else ("",)
    if split:
        out //= 2
    role_of = {"gate": "gate", "up": "up", "": mlp_role(pname)}
    if pname == "gate_up_proj" and not split:
        role_of[""] = "up"
    layer = block_index(path)
    refs = [
        MatrixRef(f"{_join(path, pname)}[{expert}]" + (f".{part}" if part else ""), path, pname, "moe_expert",
                  role_of[part], layer, expert, int(out), int(in_), transposed, part, interleaved)
        for expert in range(num_experts)
        for part in parts
    ]
    how = "interleaved gate/up halves separated" if interleaved else "gate/up halves separated"
    note = f"split into {len(refs)} matrices ({num_experts} experts" + (f", {how})" if split else ")")
    return refs, note


def _lora_refs(path: str, layer: nn.Module, heads: set[int]) -> list[MatrixRef]:
    """One LoRA matrix (or one per expert, for a PEFT ``ParamWrapper`` on a fused tensor) of a LoRA layer."""
    base = base_layer_of(layer)
    pname = getattr(layer, "parameter_name", "weight")
    outer = without_wrappers(path)  # nested ParamWrappers sit at path.base_layer
    refs, _ = _parameter_refs(outer, base, pname, getattr(base, pname), heads)
    return [replace(ref, module=path, lora=True) for ref in refs]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_fused_experts(module: nn.Module) -> bool:
    return "Experts" in type(module).__name__ or hasattr(module, "num_experts")


def _experts_transposed(module: nn.Module) -> bool:
    """Whether a fused experts module stores (E, in, out); inferred from shapes when not declared."""
    if hasattr(module, "is_transposed"):
        return bool(module.is_transposed)
    hidden = getattr(module, "hidden_size", getattr(module, "hidden_dim", None))
    down = getattr(module, "down_proj", None)
    if isinstance(hidden, int) and isinstance(down, torch.Tensor) and down.ndim == 3:
        return down.shape[2] == hidden and down.shape[1] != hidden  # (E, I, H) instead of (E, H, I)
    return False


def _output_module_ids(model: nn.Module) -> set[int]:
    """Ids of the output-embedding module (and its LoRA base) of a transformers model, if it has one."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        head = None
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(head)}
    if is_lora_layer(head):
        ids.add(id(base_layer_of(head)))
    return ids


def _adapter_owner(path: str, lora_layers: Mapping[str, nn.Module]) -> str | None:
    """Path of the LoRA layer whose adapter weights live in module ``path``, if any."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in lora_layers:
            return None if parts[i] == "base_layer" else prefix
    return None


def _adapter_entry(
    full: str, shape: tuple[int, ...], pname: str, lora_path: str, names: tuple[str, ...], recorded: bool
) -> CoverageEntry:
    if pname.endswith("bias"):
        return CoverageEntry(full, shape, False, f"LoRA bias of {lora_path} (not part of the merged matrix)")
    if not names:
        return CoverageEntry(full, shape, False, f"LoRA weight of {lora_path}, whose base is not a matrix")
    if not recorded:
        return CoverageEntry(full, shape, False, f"frozen (requires_grad=False) LoRA weight of {lora_path}")
    reason = f"recorded as the merged LoRA update of {_describe(names)}"
    return CoverageEntry(full, shape, True, reason, names)


def _describe(names: tuple[str, ...]) -> str:
    if len(names) <= 1:
        return names[0] if names else "no matrix"
    return f"{names[0]} and {len(names) - 1} more matrices"


# ----------------------------------------------------------------------------------------------------------
# Argument validation and selection


def _apply_kind_map(ref: MatrixRef, rules: list[tuple[re.Pattern[str], str]]) -> MatrixRef:
    for pattern, kind in rules:
        if pattern.search(ref.name):
            return replace(ref, kind=kind)
    return ref


def _compile_kind_map(kind_map: Mapping[str, str] | None) -> list[tuple[re.Pattern[str], str]]:
    if kind_map is None:
        return []
    if not isinstance(kind_map, Mapping):
        raise SelectionError(
            "The 'kind_map' parameter of classify must be a mapping {regex: kind}. "
            f"Got {type(kind_map).__name__} instead."
        )
    rules = []
    for key, kind in kind_map.items():
        if kind not in KINDS:
            raise SelectionError(
                f"The values of the 'kind_map' parameter of classify must be one of {KINDS}. "
                f"Got {kind!r} for pattern {key!r} instead."
            )
        what = f"The key {key!r} of the 'kind_map' parameter of classify"
        rules.append((_compile_pattern(key, what), kind))
    return rules


def _compile_pattern(pattern: str | re.Pattern[str], what: str) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise SelectionError(f"{what} must be a regular expression. Got {type(pattern).__name__} instead.")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise SelectionError(
            f"{what} must be a valid regular expression. Got {pattern!r} ({exc}) instead; "
            "fix it or use re.escape."
        ) from None


def _validate_kinds(kinds: Iterable[str] | str) -> set[str]:
    wanted = {kinds} if isinstance(kinds, str) else set(kinds)
    unknown = sorted(k for k in wanted if k not in KINDS)
    if unknown or not wanted:
        raise SelectionError(
            f"The 'kinds' parameter of Taxonomy.select must be a non-empty subset of {KINDS}. "
            f"Got {sorted(wanted) if not unknown else unknown} instead."
        )
    return wanted


def _narrow_entry(entry: CoverageEntry, kept: set[str], criteria: str) -> CoverageEntry:
    if not entry.recorded or not entry.matrices:
        return entry
    remaining = tuple(n for n in entry.matrices if n in kept)
    if len(remaining) == len(entry.matrices):
        return entry
    if not remaining:
        return replace(entry, recorded=False, reason=f"excluded by selection ({criteria})", matrices=())
    reason = f"{len(remaining)} of {len(entry.matrices)} matrices kept by selection ({criteria})"
    return replace(entry, reason=reason, matrices=remaining)
