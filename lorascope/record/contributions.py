"""What each part of the update contributes: the loss of a held batch with parts of the update reverted to W_0.

At a snapshot step, on a batch the recorder keeps, with the model in eval mode and no gradients:

- ``held_loss`` L: the loss now;
- ``held_loss_start`` L_0: the loss with every recorded matrix reverted to its start value W_0;
- ``held_loss_without_kind`` L_-k: the loss with the recorded matrices of one kind (attention, mlp, ...) reverted,
  stored for each matrix of that kind;
- ``held_loss_without_layer`` (``contributions="layers"``): the same per transformer layer.

Reverting writes W_0 into the parameter (for a fused MoE tensor, into each recorded expert's slice of it); the
values the parameter held are saved first and copied back after the loss, so the weights after a snapshot are
bit-identical to those before. What the losses mean (the share of the loss reduction each part accounts for) is
:mod:`lorascope.analysis.contributions`.

Not under torch.distributed (a reverted shard or replica would have to be reverted on every rank at once), nor
for a PEFT LoRA model (its recorded update is the adapter's ``scaling * B @ A``, not ``W - W_0`` of a weight).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lorascope.errors import InvalidOptionError
from lorascope.model.taxonomy import MatrixRef
from lorascope.store.payloads import Snapshot

__all__ = ["HeldLoss", "HeldLosses", "default_loss", "refuse_contributions", "to_device", "with_held_losses"]

LossFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class HeldLosses:
    """The held batch's losses at one snapshot (NaN where not measured); per-matrix arrays follow the refs."""

    held_loss: float
    held_loss_start: float
    held_loss_without_kind: np.ndarray
    held_loss_without_layer: np.ndarray | None = None


def with_held_losses(snapshot: Snapshot, losses: HeldLosses) -> Snapshot:
    """The snapshot with its held-batch loss columns filled in."""
    return dataclasses.replace(snapshot, held_loss=losses.held_loss, held_loss_start=losses.held_loss_start,
                               held_loss_without_kind=losses.held_loss_without_kind,
                               held_loss_without_layer=losses.held_loss_without_layer)


def default_loss(model: nn.Module, batch: Any) -> Any:
    """``model(**batch).loss``: the loss a transformers model returns when the batch holds ``labels``."""
    output = model(**batch)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise InvalidOptionError("contributions=True: model(**held_batch) returned no loss (does the batch hold "
                                 "'labels'?); pass loss_fn=lambda model, batch: ... returning the scalar loss")
    return loss


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor moved to ``device`` (mappings, tuples and lists walked)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()}) if isinstance(batch, dict) \
            else {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def refuse_contributions(refs: Sequence[MatrixRef], distributed: bool) -> None:
    """Raise when contributions cannot be measured: under torch.distributed, or for a PEFT LoRA model."""
    if distributed:
        raise InvalidOptionError("contributions=True is not supported under torch.distributed (every rank would "
                                 "have to revert its replica or shard at once); record with contributions=False, "
                                 "or measure contributions in a single-process run")
    lora = [ref.name for ref in refs if ref.lora]
    if lora:
        raise InvalidOptionError(f"contributions=True needs a full fine-tuning run; {lora[0]} (and "
                                 f"{len(lora) - 1} more) is a PEFT LoRA layer, whose update is the adapter's "
                                 "scaling * B @ A, not W - W_0 of a base weight; record contributions=False")


class HeldLoss:
    """Measures :class:`HeldLosses` on a held batch, reverting groups of recorded matrices to W_0.

    Parameters
    ----------
    model
        The model being trained (not a DDP wrapper).
    refs
        The recorded matrices (full fine-tuning: no LoRA layer).
    batch
        The held batch: a mapping of tensors, a tuple or a list; moved once to the model's device.
    loss_fn
        ``(model, batch) -> scalar loss tensor``; ``None``: :func:`default_loss` (a mapping batch only).
    layers
        Also revert each transformer layer's matrices (``contributions="layers"``).
    keep_on
        Where the values saved while a group is reverted are kept: ``"cpu"`` or ``"device"``.
    """

    def __init__(self, model: nn.Module, refs: Sequence[MatrixRef], batch: Any, loss_fn: LossFn | None, *,
                 layers: bool = False, keep_on: str = "cpu") -> None:
        if loss_fn is None and not isinstance(batch, Mapping):
            raise InvalidOptionError(f"contributions=True with a held_batch of type {type(batch).__name__}: pass "
                                     "loss_fn=(model, batch) -> scalar loss (only a mapping batch has the default "
                                     "model(**batch).loss)")
        self.model, self.refs = model, tuple(refs)
        self.loss_fn: LossFn = loss_fn or default_loss
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.batch = to_device(batch, device)
        self.keep_on = keep_on
        kinds = [ref.kind for ref in self.refs]
        self._kind_groups = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in dict.fromkeys(kinds)}
        self._layer_groups: dict[int, list[int]] | None = None
        if layers:
            numbers = sorted({ref.layer for ref in self.refs if ref.layer >= 0})
            self._layer_groups = {n: [i for i, ref in enumerate(self.refs) if ref.layer == n] for n in numbers}

    def check(self) -> float:
        """Compute the loss once, before training: raise one clear error when ``loss_fn`` cannot give it."""
        try:
            loss = self._loss()
        except InvalidOptionError:
            raise
        except Exception as exc:
            raise InvalidOptionError(f"contributions=True: the loss of the held batch failed ({type(exc).__name__}: "
                                     f"{exc}); check held_batch and loss_fn") from exc
        return loss

    def measure(self, w0: Sequence[Any]) -> HeldLosses:
        """The held losses now, with everything, each kind and (optionally) each layer reverted to ``w0``."""
        n = len(self.refs)
        loss = self._loss()
        start = self._loss_without(range(n), w0)
        without_kind = np.full(n, np.nan)
        for indices in self._kind_groups.values():
            without_kind[indices] = self._loss_without(indices, w0)
        without_layer = None
        if self._layer_groups is not None:
            without_layer = np.full(n, np.nan)
            for indices in self._layer_groups.values():
                without_layer[indices] = self._loss_without(indices, w0)
        return HeldLosses(loss, start, without_kind, without_layer)

    def _loss_without(self, indices: Sequence[int] | range, w0: Sequence[Any]) -> float:
        """The loss with the matrices ``indices`` at W_0; every parameter touched is restored exactly after."""
        saved: dict[tuple[str, str], torch.Tensor] = {}
        params: dict[tuple[str, str], torch.Tensor] = {}
        for i in indices:
            ref = self.refs[i]
            key = (ref.module, ref.parameter)
            if key not in params:
                params[key] = getattr(self.model.get_submodule(ref.module), ref.parameter)
                data = params[key].detach()
                saved[key] = data.to("cpu", copy=True) if self.keep_on == "cpu" else data.clone()
        try:
            with torch.no_grad():
                for i in indices:
                    ref = self.refs[i]
                    _write_matrix(params[(ref.module, ref.parameter)].detach(), ref, w0[i])
            return self._loss()
        finally:
            with torch.no_grad():
                for key, value in saved.items():
                    params[key].detach().copy_(value)

    def _loss(self) -> float:
        """The held batch's loss in eval mode without gradients; module modes and the random streams kept."""
        modes = [(m, m.training) for m in self.model.modules()]
        devices = sorted({p.device.index for p in self.model.parameters()
                          if p.device.type == "cuda" and p.device.index is not None})
        try:
            self.model.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                loss = self.loss_fn(self.model, self.batch)
        finally:
            for module, training in modes:
                module.training = training
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise InvalidOptionError(f"contributions=True: loss_fn must return a scalar loss tensor. Got "
                                     f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))} instead.")
        return float(loss.detach().float())


def _write_matrix(param: torch.Tensor, ref: MatrixRef, value: torch.Tensor) -> None:
    """Write ``value`` (out, in) into the slice of ``param`` that ``ref`` reads (a whole flattened kernel when
    the matrix is a reshaped copy)."""
    view = ref.matrix(param)
    if view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr():
        view.copy_(value.to(device=view.device, dtype=view.dtype))
    else:  # a non-contiguous convolution kernel read as (out, in * k): write the whole kernel back
        param.copy_(value.to(device=param.device, dtype=param.dtype).reshape(param.shape))
