"""Squared gradient norms of the recorded matrices, one batched on-device reduction and no host sync.

The gradient of a recorded matrix is its parameter's gradient cut to the matrix (a fused expert's slice), or for
a PEFT LoRA layer the adapter factors' gradients together, whose squared norm is
:math:`|\\nabla A|^2 + |\\nabla B|^2`. The trainable parameters outside the recorded matrices add up to one total.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorascope.model.taxonomy import MatrixRef


def grad_view(ref: MatrixRef, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The gradient of one recorded matrix (the LoRA factors' gradients flattened into one vector), or None
    before any."""
    if ref.lora:
        grads = [t.grad for t in tensors.values() if t.grad is not None]
        return torch.cat([g.reshape(-1) for g in grads]) if grads else None
    grad = tensors["weight"].grad
    return None if grad is None else ref.matrix(grad)


def uncovered_parameters(model: nn.Module, tensors: Sequence[dict[str, torch.Tensor]]) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` outside the recorded matrices' ``tensors``."""
    covered = {id(t) for named in tensors for t in named.values()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in covered]


class GradientNorms:
    """Reads the squared gradient norms of the recorded matrices and of the other trainable parameters.

    Parameters
    ----------
    refs, tensors
        The recorder's matrices and, per matrix, its trainable tensors (:func:`lorascope.record.snapshot.tensors_of`).
    other
        The trainable parameters outside them.
    """

    def __init__(self, refs: Sequence[MatrixRef], tensors: Sequence[dict[str, torch.Tensor]],
                 other: Sequence[torch.Tensor]) -> None:
        self.refs, self.tensors, self.other = tuple(refs), list(tensors), list(other)
        self._present_cache: dict[tuple[bool, ...], torch.Tensor] = {}

    def gradients(self) -> list[torch.Tensor | None]:
        """Each recorded matrix's gradient now (:func:`grad_view`)."""
        return [grad_view(ref, named) for ref, named in zip(self.refs, self.tensors, strict=True)]

    def step_columns(self, grads: list[torch.Tensor | None]) -> dict[str, Any]:
        """The gradient columns of a step row: ``grad_sq_norm`` (M,) (NaN for a matrix without gradient, +Inf for
        a gradient holding NaN or Inf), ``grad_sq_norm_other`` and ``grad_nonfinite_modules`` (the +Inf ones: a
        matrix without a gradient is not counted), as device tensors."""
        sq = self.squared(grads)
        return {"grad_sq_norm": sq, "grad_sq_norm_other": self.other_squared(),
                "grad_nonfinite_modules": torch.isinf(sq).sum(dtype=torch.int32)}

    def squared(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """(M,) squared norms of ``grads`` in float32: NaN where a gradient is None (no gradient), +Inf where it
        holds NaN or Inf (a non-finite gradient), so that the two stay apart in the file."""
        present = tuple(g is not None for g in grads)
        tensors = [g for g in grads if g is not None]
        if not tensors:
            return torch.full((len(grads),), float("nan"))
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        device = norms[0].device
        sq = torch.stack([n.to(device) for n in norms]).square()
        sq = torch.where(torch.isnan(sq), torch.inf, sq)  # a NaN entry makes the norm NaN: a non-finite gradient
        if all(present):
            return sq
        index = self._present_cache.get(present)
        if index is None:
            index = torch.tensor([i for i, p in enumerate(present) if p], device=device)
            self._present_cache[present] = index
        full = torch.full((len(grads),), float("nan"), device=device)
        return full.index_copy_(0, index, sq)

    def squared_now(self) -> torch.Tensor:
        """(M,) squared norms of the recorded matrices' gradients now."""
        return self.squared(self.gradients())

    def other_squared(self) -> torch.Tensor | float:
        """Summed squared gradient norm of the other parameters, in float64 (0 while none has a gradient; NaN
        without any other trainable parameter)."""
        grads = [p.grad for p in self.other if p.grad is not None]
        if not grads:
            return float("nan") if not self.other else 0.0
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).double().square().sum()
