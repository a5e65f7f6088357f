"""The bookkeeping of :class:`~lorascope.record.per_example.hooks.PerExampleNorms`: the hooked modules (sites),
the parameters they share (groups), their forward calls waiting for a gradient, and the per-example buffers of
each micro-batch."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from lorascope.record.per_example.kernels import Stash


@dataclass(eq=False)
class Group:
    """One parameter, possibly shared by several modules (tying)."""

    column: int  # -1: the "other" total
    keep_stash: bool = False


@dataclass(eq=False)
class Site:
    """One supported module."""

    path: str
    module: nn.Module
    kind: str  # linear, conv1d, embedding, layer_norm, rms_norm
    parts: list[tuple[Group, str]] = field(default_factory=list)  # (group, "weight" | "bias")
    checked: bool = False
    contributed: bool = False
    deferred: weakref.ref[Call] | None = None

    def trainable(self, role: str) -> bool:
        """Whether the module's ``role`` parameter ("weight" or "bias") gets gradients."""
        param = getattr(self.module, role, None)
        return isinstance(param, torch.Tensor) and param.requires_grad


@dataclass(eq=False)
class Call:
    """One forward call of a module, waiting for its output gradient."""

    site: Site
    mb: MicroBatch
    input: torch.Tensor | None
    grad: torch.Tensor | None = None
    done: bool = False
    deferred: bool = False


@dataclass(eq=False)
class GroupState:
    """The calls of one parameter in one micro-batch."""

    calls: list[weakref.ref[Call]] = field(default_factory=list)
    done: list[tuple[int, Stash | None]] = field(default_factory=list)


class MicroBatch:
    """Per-example buffers of one forward/backward pass."""

    def __init__(self, n_examples: int | None, *, from_model: bool = True) -> None:
        self.n_examples = n_examples
        self.from_model = from_model
        self.per_target: torch.Tensor | None = None
        self.other: torch.Tensor | None = None
        self.groups: dict[int, GroupState] = {}
        self.invalid: set[Group] = set()  # parameters whose value is not exact for this micro-batch
        self.waiting: list[Call] = []  # checkpointed calls whose gradient came before their recomputed input

    def allocate(self, n_columns: int, n_examples: int, device: torch.device) -> None:
        self.per_target = torch.zeros(n_examples, n_columns, device=device)
        self.other = torch.zeros(n_examples, device=device)

    def add(self, column: int, value: torch.Tensor) -> None:
        assert self.per_target is not None and self.other is not None
        value = value.to(self.per_target.device)
        if column >= 0:
            self.per_target[:, column] += value
        else:
            self.other += value

