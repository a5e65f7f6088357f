"""Recording a data-parallel run under ``torch.distributed``: which rank writes, what the ranks exchange, when.

The recorder looks at ``torch.distributed`` once, when it is built (:func:`detect`); a single-process run never
reaches this module. In a run of several processes:

- rank 0 alone creates and writes the run file; every rank keeps its recorder and its hooks, because every rank
  takes part in the collectives below (a rank that skipped one would hang the others);
- once per optimizer step, after the step, one ``all_reduce`` (sum) of a small float64 vector
  (:class:`StepExchange`): the examples, tokens and loss of each rank's local batch (so the file counts the
  global batch), each rank's small-batch noise-scale norms, each rank's local squared gradient norms under FSDP2,
  and a flag saying that a rank stopped recording;
- under DDP, rank 0 reads the gradients after DDP's all-reduce (every rank holds the same mean gradient), so
  gradient norms and snapshots need no communication; under FSDP2 snapshots gather one matrix at a time to
  rank 0 (:mod:`lorascope.record.sharded`).

A failure on one rank (a full disk on rank 0, a recorder bug) never leaves the others waiting in a collective:
the failing rank stops measuring but keeps joining the per-step exchange with its flag set, and at the next
snapshot step (or at close) every rank sees the flag and all stop together, before any snapshot collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from lorascope import errors
from lorascope.errors import InvalidOptionError, LorascopeError

MODE_DDP = "ddp"
MODE_FSDP2 = "fsdp2"

try:  # public since torch 2.5; torch 2.4 has it under a private name
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch 2.4, or a build without torch.distributed
    try:
        from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
    except ImportError:
        DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (a parameter sharded by ``fully_shard``)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@dataclass(frozen=True)
class DistributedContext:
    """The process group a recorder runs in.

    Attributes
    ----------
    rank, world_size
        Of the default process group.
    backend
        ``torch.distributed.get_backend()``, e.g. ``"gloo"`` or ``"nccl"``.
    mode
        ``"ddp"`` (every rank holds the full parameters; gradients are all-reduced during backward) or
        ``"fsdp2"`` (recorded parameters are DTensors sharded on dim 0 by ``fully_shard``).
    device
        Where the tensors exchanged by the recorder live: the parameters' device, except under gloo (the CPU).
    """

    rank: int
    world_size: int
    backend: str
    mode: str
    device: torch.device

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the run file."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """The ``distributed`` section of the run file's config."""
        return {"mode": self.mode, "world_size": self.world_size, "backend": self.backend, "writer_rank": 0}

    # -- collectives ---------------------------------------------------------------------------------------
    def agree(self, error: BaseException | None) -> None:
        """Every rank raises when any rank failed (see :func:`agree`)."""
        agree(error)

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a collective; syncs the host)."""
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(value)
        return bool(value.item() > 0)


def agree(error: BaseException | None) -> None:
    """Every rank raises when any rank failed (call on every rank, with its own error or None; a collective).

    The failing rank raises its own exception; the others raise the same lorascope error class with the
    message of the lowest failing rank, so that a bad path checked on rank 0 never leaves rank 1 waiting in
    the first collective of training.
    """
    report = None if error is None else (type(error).__name__, str(error))
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, report)
    failed = [(rank, item) for rank, item in enumerate(gathered) if item is not None]
    if not failed:
        return
    if error is not None:
        raise error
    rank, (name, message) = failed[0]
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, LorascopeError)):
        cls = LorascopeError
    raise cls(f"{message} (on rank {rank})")


def will_write(option: bool | None) -> bool:
    """Whether this process writes the run file, told before the process group exists (when a trainer's
    callback is attached): only rank 0 does, unless ``distributed=False`` (every process its own file).

    The rank comes from torch.distributed once initialized, else from the launcher's environment: ``RANK``
    (torchrun, accelerate) or ``SLURM_PROCID``, else Lightning's ``NODE_RANK`` and ``LOCAL_RANK``.
    """
    if option is False:
        return True
    if _initialized():
        return torch.distributed.get_rank() == 0
    env = os.environ
    for name in ("RANK", "SLURM_PROCID"):
        if env.get(name, "").isdigit():
            return int(env[name]) == 0
    return all(int(env.get(name, "0") or 0) == 0 for name in ("NODE_RANK", "LOCAL_RANK"))


def wanted(option: bool | None) -> bool:
    """Whether to record as one run of several processes: ``torch.distributed`` is initialized with more than
    one process and the ``distributed`` option is not False.

    Raises
    ------
    InvalidOptionError
        ``distributed=True`` without an initialized process group.
    """
    if option is False:
        return False
    if not _initialized():
        if option:
            raise InvalidOptionError(
                "The 'distributed' option of lorascope.record is True but torch.distributed is not initialized; "
                "call torch.distributed.init_process_group() first (torchrun sets up its environment), or leave "
                "distributed=None to record a single process")
        return False
    return torch.distributed.get_world_size() > 1


def detect(tensors: Sequence[dict[str, torch.Tensor]]) -> DistributedContext:
    """The process group to record in (when :func:`wanted`); the recorded tensors tell DDP from FSDP2 (DTensor
    parameters) and where the exchanged tensors live."""
    flat = [t for named in tensors for t in named.values()]
    mode = MODE_FSDP2 if any(is_dtensor(t) for t in flat) else MODE_DDP
    backend = str(torch.distributed.get_backend())
    device = torch.device("cpu")
    if flat and backend != "gloo":
        first = flat[0]
        # a DTensor's device_mesh is not on torch.Tensor's type
        device = torch.device(cast(Any, first).device_mesh.device_type) if is_dtensor(first) else first.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return DistributedContext(torch.distributed.get_rank(), torch.distributed.get_world_size(), backend, mode,
                              device)


# -- the per-step exchange -------------------------------------------------------------------------------------
_EXAMPLES, _TOKENS, _LOSS_TOKENS, _LOSS, _HAS_LOSS, _SAMPLES, _SAMPLE_EXAMPLES, _PASSES, _STOP = range(9)
_HEAD = 9  # host-known scalars, then the device scalars (tokens, loss tokens, loss), then the per-module blocks
_DEVICE_SCALARS = 3
_DEV_TOKENS, _DEV_LOSS_TOKENS, _DEV_LOSS = range(_HEAD, _HEAD + _DEVICE_SCALARS)


@dataclass
class LocalStep:
    """What one rank contributes to the exchange after an optimizer step (None fields are unknown)."""

    examples: int | None = None
    tokens: Any = None  # int or a device tensor (the attention-mask sum)
    loss_tokens: Any = None  # int or a device tensor (labels != -100)
    loss: Any = None  # float or a device tensor: this rank's loss of the step
    small: torch.Tensor | None = None  # (M,) summed small-batch squared norms of this rank's samples
    samples: float = 0.0
    sample_examples: float = 0.0
    passes: int = 0
    grad_sq: torch.Tensor | None = None  # (M,) local squared norms of the shards (FSDP2)
    grad_other: Any = None  # local squared norm of the other parameters' shards (FSDP2)


class StepExchange:
    """One ``all_reduce`` (sum) per optimizer step of everything rank 0 needs from the other ranks.

    Parameters
    ----------
    context
        The process group.
    n_modules
        Recorded matrices (M).
    gns
        Exchange the small-batch noise-scale norms (M values).
    sharded
        Exchange local squared gradient norms (M + 1 values; FSDP2).
    """

    def __init__(self, context: DistributedContext, n_modules: int, *, gns: bool, sharded: bool) -> None:
        self.context = context
        self.n = n_modules
        self.gns, self.sharded = gns, sharded
        self._small = _HEAD + _DEVICE_SCALARS
        self._grad = self._small + (n_modules if gns else 0)
        self.size = self._grad + (n_modules + 1 if sharded else 0)
        self._pin = context.device.type == "cuda"

    def reduce(self, local: LocalStep | None) -> ReducedStep:
        """Sum the contributions of all ranks. ``local=None``: this rank stopped recording (it still joins)."""
        device = self.context.device
        nan = float("nan")
        head = torch.full((_HEAD,), nan, dtype=torch.float64)
        head[_STOP] = 1.0
        body = torch.full((self.size - _HEAD,), nan, dtype=torch.float64, device=device)
        if local is not None:
            head[_STOP] = 0.0
            head[_EXAMPLES] = nan if local.examples is None else float(local.examples)
            _scalar(head, body, _TOKENS, _DEV_TOKENS - _HEAD, local.tokens)
            _scalar(head, body, _LOSS_TOKENS, _DEV_LOSS_TOKENS - _HEAD, local.loss_tokens)
            has_loss = local.loss is not None
            head[_HAS_LOSS] = 1.0 if has_loss else 0.0
            _scalar(head, body, _LOSS, _DEV_LOSS - _HEAD, local.loss if has_loss else 0.0)
            head[_SAMPLES], head[_SAMPLE_EXAMPLES] = local.samples, local.sample_examples
            head[_PASSES] = float(local.passes)
            if self.gns:
                block = body[self._small - _HEAD: self._grad - _HEAD]
                if local.small is not None:
                    block.copy_(local.small.to(device, torch.float64))
                else:
                    block.zero_()  # no samples from this rank; its count is zero too
            if self.sharded:
                block = body[self._grad - _HEAD:]
                block[: self.n].copy_(_as_tensor(local.grad_sq, device, self.n))
                block[self.n:].copy_(_as_tensor(local.grad_other, device, 1))
        if self._pin:
            head = head.pin_memory()
        packed = torch.cat([head.to(device, non_blocking=True), body])
        torch.distributed.all_reduce(packed)
        return ReducedStep(packed, self)


def _scalar(head: torch.Tensor, body: torch.Tensor, host_index: int, body_index: int, value: Any) -> None:
    # A device tensor goes to the device part (no host sync); a Python number to the host part; the other is 0.
    if isinstance(value, torch.Tensor):
        head[host_index] = 0.0
        body[body_index] = value.detach().reshape(()).to(body.device, torch.float64)
    else:
        head[host_index] = float("nan") if value is None else float(value)
        body[body_index] = 0.0


def _as_tensor(value: Any, device: torch.device, n: int) -> torch.Tensor:
    if value is None:
        return torch.full((n,), float("nan"), dtype=torch.float64, device=device)
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(n).to(device, torch.float64)
    return torch.full((n,), float(value), dtype=torch.float64, device=device)


class ReducedStep:
    """The summed contributions of one step; every accessor returns device tensors (no host sync) except
    :meth:`any_stopped`."""

    def __init__(self, packed: torch.Tensor, exchange: StepExchange) -> None:
        self.packed, self.exchange = packed, exchange

    def any_stopped(self) -> bool:
        """Whether any rank had stopped recording at this step (syncs the host: call at snapshot steps only)."""
        return bool(self.packed[_STOP].item() > 0)

    def row(self, *, loss_across_ranks: str) -> dict[str, Any]:
        """The step row's batch and loss columns for the global batch.

        ``loss_across_ranks``: ``"mean"`` (each rank's loss is the mean over its own batch) or ``"sum"`` (each
        rank's loss is its share of the global step, as with the HF Trainer's ``average_tokens_across_devices``).
        """
        p = self.packed
        world = float(self.exchange.context.world_size)
        loss_total = p[_LOSS] + p[_DEV_LOSS]
        if loss_across_ranks == "sum":
            loss = torch.where(p[_HAS_LOSS] == world, loss_total, torch.full_like(loss_total, float("nan")))
        else:
            loss = loss_total / p[_HAS_LOSS]  # 0 / 0: no rank knew its loss, stored as unknown
        return {"batch_examples": p[_EXAMPLES], "batch_tokens": p[_TOKENS] + p[_DEV_TOKENS],
                "batch_loss_tokens": p[_LOSS_TOKENS] + p[_DEV_LOSS_TOKENS], "loss": loss}

    def gns(self, big: torch.Tensor | None, convention: str) -> dict[str, Any] | None:
        """The noise-scale columns: B_small = examples per sample, B_big = the global batch; the big-batch norm
        ``big`` is the all-reduced step gradient's (under ``"sum"`` divided by the squared passes per rank)."""
        if not self.exchange.gns or big is None:
            return None
        p, ex = self.packed, self.exchange
        samples = p[_SAMPLES]
        small = p[ex._small: ex._grad] / samples
        big = big.to(p.device, torch.float64)
        if convention == "sum":
            big = big / (p[_PASSES] / ex.context.world_size) ** 2
        return {"gns_batch_small": p[_SAMPLE_EXAMPLES] / samples, "gns_batch_big": p[_EXAMPLES],
                "gns_sq_norm_small": small, "gns_sq_norm_big": big}

    def gradients(self) -> dict[str, Any]:
        """The gradient columns from the summed local squared norms of the shards (FSDP2)."""
        ex = self.exchange
        sq = self.packed[ex._grad: ex._grad + ex.n]
        return {"grad_sq_norm": sq, "grad_sq_norm_other": self.packed[ex._grad + ex.n],
                "grad_nonfinite_modules": torch.isinf(sq).sum(dtype=torch.int32)}


# -- the reduced gradient before clipping (DDP) ------------------------------------------------------------------
class ReducedGradNorms:
    """Squared norms of the recorded gradients at the end of each backward pass, after DDP's all-reduce and
    before anything the training loop does next (gradient clipping): the big-batch norm of the noise scale.

    DDP finishes its all-reduce in an autograd-engine final callback, queued during the backward pass. A tensor
    hook queues a callback on the first gradient of each backward pass; that callback queues the measurement,
    which so runs after every callback queued meanwhile, DDP's included. Under ``no_sync`` (gradient
    accumulation) the passes before the last measure local sums; :meth:`pop` returns the last pass's.

    Parameters
    ----------
    tensors
        The recorded trainable tensors.
    measure
        Returns the (M,) squared norms of the recorded gradients now.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], measure: Callable[[], torch.Tensor]) -> None:
        unique = {id(t): t for t in tensors if t.requires_grad}
        self._tensors = list(unique.values())
        self._measure = measure
        self._handles: list[Any] = []
        self._queued = False
        self._last: torch.Tensor | None = None
        self.error: BaseException | None = None

    def attach(self) -> None:
        for tensor in self._tensors:
            self._handles.append(tensor.register_hook(self._on_grad))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def pop(self) -> torch.Tensor | None:
        """The last measurement since the previous call (None if no backward pass ended), then forget it."""
        out, self._last = self._last, None
        self._queued = False  # a backward pass that raised never ran its callbacks
        return out

    def _on_grad(self, grad: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._requeue)

    def _requeue(self) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._read)

    def _read(self) -> None:
        self._queued = False
        try:
            self._last = self._measure()
        except Exception as exc:  # noqa: BLE001 - never break the training loop's backward; reported by the recorder
            self._last, self.error = None, exc
