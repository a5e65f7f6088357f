"""Gradient norms at two batch sizes from gradient accumulation, for the gradient noise scale.

Tensor hooks see each backward pass's own gradient ``g_k`` of a parameter before it is added into
``param.grad``, which at that moment holds the sum ``A_{k-1}`` of the earlier passes of the step. So, with no copy
of any gradient, per recorded matrix and per pass:

.. math:: |g_k|^2 \\quad\\text{and}\\quad \\langle A_{k-1}, g_k \\rangle,
          \\qquad |G_{\\mathrm{step}}|^2 = \\sum_k |g_k|^2 + 2 \\sum_k \\langle A_{k-1}, g_k \\rangle

The second identity gives the accumulated gradient's norm before any clipping the framework applies later.
Turning these into the two noise-scale batch sizes (McCandlish et al. 2018) needs the loss convention; see
:func:`two_batch_norms`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from lorascope.errors import InvalidOptionError
from lorascope.model.taxonomy import MatrixRef

LOSS_MEAN = "mean"  # the step's gradient is the mean over its examples; each pass contributes its share
LOSS_SUM = "sum"  # each pass's loss is the mean over its own examples, summed over passes without division
LOSS_CONVENTIONS = (LOSS_MEAN, LOSS_SUM)


class MicroBatchNorms:
    """Per-pass squared gradient norms (and cross terms with the running sum) of every recorded matrix.

    Parameters
    ----------
    refs
        The recorder's matrices.
    tensors
        For each matrix, its trainable tensors (``{"weight": param}``, or a LoRA layer's adapter weights, whose
        squared norms add up into the matrix's slot).
    cross
        Also measure the cross terms with the running sum (needed for the accumulated gradient's norm). Without
        them the second tensor of :meth:`pop` is zeros.
    defer_first
        Measure a tensor's first pass only when a second one comes, from the running sum (which then is exactly
        the first pass's gradient). A step of one backward pass then costs nothing, and :meth:`pop` gives None
        for it: right when a single pass has no use (no two batch sizes), wrong under DDP or per-example norms.

    The time spent in the hooks (inside backward, where the recorder's step timers do not see it) accumulates
    until :meth:`take_seconds`.
    """

    def __init__(self, refs: Sequence[MatrixRef], tensors: Sequence[dict[str, torch.Tensor]], *,
                 cross: bool = True, defer_first: bool = False) -> None:
        self._n = len(refs)
        self._with_cross = cross  # under DDP the big-batch norm comes from the reduced gradient instead
        self._defer_first = defer_first
        self.seconds = 0.0
        # One hook per distinct trainable tensor, knowing which matrices (slots) it feeds and how to cut them.
        self._plan: dict[int, tuple[torch.Tensor, list[tuple[int, MatrixRef | None]]]] = {}
        for index, (ref, named) in enumerate(zip(refs, tensors)):
            for tensor in named.values():
                if not tensor.requires_grad:
                    continue
                entry = self._plan.setdefault(id(tensor), (tensor, []))
                entry[1].append((index, None if ref.lora else ref))
        self._handles: list[Any] = []
        self._index_cache: dict[int, torch.Tensor] = {}
        self.reset()

    def attach(self) -> None:
        for key, (tensor, _) in self._plan.items():
            self._handles.append(tensor.register_hook(lambda grad, key=key: self._on_grad(key, grad)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self._passes: list[torch.Tensor] = []  # per pass: (n,) squared norms
        self._cross: list[torch.Tensor] = []  # per pass: (n,) <A_{k-1}, g_k>
        self._seen: dict[int, int] = {}  # tensor -> passes it took part in

    def take_seconds(self) -> float:
        """The hooks' time since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def pop(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(squared norms (passes, n), cross terms (passes, n)) of the step so far, then reset; None if no pass."""
        passes, cross = self._passes, self._cross
        self.reset()  # also when nothing was measured: a deferred lone pass must not count as the next step's first
        return (torch.stack(passes), torch.stack(cross)) if passes else None

    def _on_grad(self, key: int, grad: torch.Tensor) -> None:
        started = time.perf_counter()
        try:
            self._measure(key, grad)
        finally:
            self.seconds += time.perf_counter() - started

    def _measure(self, key: int, grad: torch.Tensor) -> None:
        tensor, slots = self._plan[key]
        k = self._seen.get(key, 0)
        self._seen[key] = k + 1
        if k == 0 and self._defer_first:
            return  # measured at the second pass, if one comes, from the running sum
        running = tensor.grad  # the sum of the earlier passes of this step (None before the first)
        with torch.no_grad():
            views = [grad if ref is None else ref.matrix(grad) for _, ref in slots]
            if running is not None:
                before = [running if ref is None else ref.matrix(running) for _, ref in slots]
                if k == 1 and self._defer_first:  # the running sum is the first pass's gradient
                    self._add(0, key, slots, _squared_norms(before), None)
                cross = _dots(before, views) if self._with_cross else None
            else:
                cross = None
            self._add(k, key, slots, _squared_norms(views), cross)

    def _add(self, k: int, key: int, slots: list[tuple[int, Any]], sq: torch.Tensor,
             cross: torch.Tensor | None) -> None:
        while len(self._passes) <= k:
            self._passes.append(torch.zeros(self._n, device=sq.device))
            self._cross.append(torch.zeros(self._n, device=sq.device))
        index = self._index(key, slots, sq.device)
        self._passes[k].index_add_(0, index, sq)
        if cross is not None:
            self._cross[k].index_add_(0, index, cross)

    def _index(self, key: int, slots: list[tuple[int, Any]], device: torch.device) -> torch.Tensor:
        index = self._index_cache.get(key)
        if index is None or index.device != device:
            index = torch.tensor([i for i, _ in slots], device=device)
            self._index_cache[key] = index
        return index


def _float32_flat(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1)
    return flat if flat.dtype == torch.float32 else flat.float()


def _squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(len,) squared norms in float32, read without a temporary the size of the gradient (bf16 is upcast)."""
    return torch.stack([torch.linalg.vector_norm(_float32_flat(t)) for t in tensors]).square()


def _dots(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """(len,) inner products <a_i, b_i> in float32."""
    return torch.stack([torch.dot(_float32_flat(x), _float32_flat(y)) for x, y in zip(a, b, strict=True)])


def two_batch_norms(passes: torch.Tensor, cross: torch.Tensor, sizes: Sequence[float] | None,
                    convention: str = LOSS_MEAN) -> dict[str, Any] | None:
    """The noise-scale inputs of one optimizer step made of several backward passes.

    Under the ``"mean"`` convention (HF Trainer, Lightning, and loops that divide each pass's loss by the number
    of passes), the step gradient :math:`G = \\sum_k g_k` is the mean gradient over the step's :math:`B` examples
    and pass k (with :math:`b_k` examples) contributes its share, so its own mean gradient is
    :math:`\\hat g_k = (B / b_k)\\, g_k`. Under ``"sum"`` each pass's loss is already its own mean, so
    :math:`\\hat g_k = g_k` and the step's mean gradient is :math:`G / n`.

    Returns ``gns_batch_small`` (mean pass size), ``gns_batch_big`` (B), ``gns_sq_norm_small``
    (:math:`\\frac1n\\sum_k |\\hat g_k|^2` per matrix) and ``gns_sq_norm_big`` (squared norm of the step's mean
    gradient per matrix), or None with a single pass (both batch sizes would be equal) or unknown pass sizes.
    """
    n = passes.shape[0]
    if n < 2:
        return None
    _check_convention(convention, "two_batch_norms")
    if sizes is None or len(sizes) != n or min(sizes) <= 0:
        return None  # without the pass sizes there are no batch sizes to put the norms against
    total = float(sum(sizes))  # host arithmetic on host numbers: no device synchronisation in the step
    big = passes.sum(0) + 2.0 * cross.sum(0)
    if convention == LOSS_MEAN:
        small = _weighted_passes(passes, [(total / float(s)) ** 2 for s in sizes])
    else:
        small = passes
        big = big / n**2
    return {
        "gns_batch_small": total / n,
        "gns_batch_big": total,
        "gns_sq_norm_small": small.mean(0),
        "gns_sq_norm_big": big,
    }


def per_example_norms(passes: torch.Tensor, cross: torch.Tensor, per_example: torch.Tensor,
                      sizes: Sequence[float] | None, n_matrices: int, convention: str = LOSS_MEAN
                      ) -> dict[str, Any] | None:
    r"""The noise-scale inputs of one step from exact per-example norms (batch size 1 vs the step).

    ``per_example`` holds :math:`|\partial L_b / \partial W|^2` of each example's share of the backpropagated
    loss (:class:`lorascope.record.per_example.PerExampleNorms`). Under ``"mean"`` the step gradient is the mean
    over its :math:`N` examples, so example b's own gradient is :math:`N\, \partial L_b / \partial W`; under
    ``"sum"`` (each pass's loss the mean over its own :math:`b_k` examples) it is :math:`b_k\, \partial L_b /
    \partial W`. The big-batch norm is the step's (unclipped) mean gradient from the per-pass norms.
    """
    n_examples = per_example.shape[0]
    if n_examples < 2:
        return None
    _check_convention(convention, "per_example_norms")
    n_passes = passes.shape[0]
    big = passes.sum(0) + 2.0 * cross.sum(0)
    if convention == LOSS_MEAN:
        scale = torch.full((n_examples,), float(n_examples) ** 2, device=per_example.device)
    else:
        big = big / n_passes**2
        if sizes is None or len(sizes) != n_passes or round(sum(sizes)) != n_examples:
            sizes = [n_examples / n_passes] * n_passes
        scale = torch.cat([torch.full((round(b),), float(b) ** 2, device=per_example.device) for b in sizes])
    small = torch.full((n_matrices,), float("nan"), device=per_example.device)
    columns = min(per_example.shape[1], n_matrices)
    small[:columns] = (scale[:, None] * per_example[:, :columns]).mean(0)
    return {"gns_batch_small": 1.0, "gns_batch_big": float(n_examples), "gns_sq_norm_small": small,
            "gns_sq_norm_big": big}


def local_small_norms(passes: torch.Tensor, sizes: Sequence[float] | None, convention: str = LOSS_MEAN,
                      per_example: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, float, float] | None:
    r"""One data-parallel rank's share of the small-batch noise-scale norm of a step.

    Under DDP every rank's backward passes see only its local examples, before the gradient all-reduce. Each
    pass (or, with ``per_example``, each example) is one sample of a small-batch gradient: its own mean
    gradient :math:`\hat g` as in :func:`two_batch_norms` (under ``"mean"`` the rank's step gradient is the
    mean over its :math:`B_r` local examples, so :math:`\hat g_k = (B_r / b_k)\, g_k`). Unlike
    :func:`two_batch_norms` one pass is enough: the big batch is the global one across ranks.

    Parameters
    ----------
    passes
        (passes, n) squared norms :math:`|g_k|^2` of this rank's backward passes (:class:`MicroBatchNorms`).
    sizes
        Examples of each pass, or None when unknown.
    convention
        ``"mean"`` or ``"sum"`` (see :func:`two_batch_norms`).
    per_example
        (examples, n) squared norms of each example's share of the loss (:class:`PerExampleNorms`), when
        measured: then every example is a sample of batch size 1.

    Returns
    -------
    (sum, samples, examples) or None
        :math:`\sum |\hat g|^2` over this rank's samples per matrix, the number of samples and the examples
        they hold (summed over ranks, ``examples / samples`` is :math:`B_{small}`); None without pass sizes.
    """
    _check_convention(convention, "local_small_norms")
    n = passes.shape[0]
    if sizes is None or len(sizes) != n or min(sizes) <= 0:
        return None
    total = float(sum(sizes))
    if per_example is not None:
        count = per_example.shape[0]
        if convention == LOSS_MEAN:
            scale = torch.full((count,), float(count) ** 2, device=per_example.device)
        else:
            if round(total) != count:
                sizes = [count / n] * n
            scale = torch.cat([torch.full((round(b),), float(b) ** 2, device=per_example.device) for b in sizes])
        width = passes.shape[1]
        small = torch.full((width,), float("nan"), device=per_example.device)
        columns = min(per_example.shape[1], width)
        small[:columns] = (scale[:, None] * per_example[:, :columns]).sum(0)
        return small, float(count), float(count)
    scaled = _weighted_passes(passes, [(total / float(s)) ** 2 for s in sizes]) if convention == LOSS_MEAN else passes
    return scaled.sum(0), float(n), total


def _weighted_passes(passes: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """(passes, n) rows each multiplied by its host weight, without building a device tensor from host values
    (``torch.tensor(..., device=cuda)`` copies synchronously)."""
    return torch.stack([passes[k] * weight for k, weight in enumerate(weights)])


def _check_convention(convention: str, caller: str) -> None:
    if convention not in LOSS_CONVENTIONS:
        raise InvalidOptionError(f"The 'convention' parameter of {caller} must be one of {LOSS_CONVENTIONS}. "
                                 f"Got {convention!r} instead.")
