"""The recorder's side of a multi-process run: what every rank does at start, after each optimizer step, at
snapshots and at close (the collectives themselves are in :mod:`lorascope.record.distributed`, FSDP2's sharded
state in :mod:`lorascope.record.sharded`).

A :class:`~lorascope.record.core.Recorder` holds one :class:`DistributedSteps` when it found a process group, and
hands it what it needs: the process group, the model and options, the sharded state, and the recorder's own
work as callbacks (:class:`RecorderCalls`). Single-process recording never builds one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorascope.record import distributed as D
from lorascope.record.batches import StepBatch
from lorascope.record.gns import LOSS_MEAN, local_small_norms
from lorascope.record.options import RecordOptions
from lorascope.record.sharded import ShardedRecording
from lorascope.store import schema as S
from lorascope.store.payloads import Snapshot
from lorascope.store.writer import check_writable


@dataclass(frozen=True)
class RecorderCalls:
    """What :class:`DistributedSteps` asks of the recorder that holds it.

    Attributes
    ----------
    is_active
        Whether this rank still records.
    stop
        Stop recording on this rank (the hooks go inert; training goes on).
    fail
        Stop recording after an error: raise it when strict, else stop and warn once.
    guarded
        Run a piece of recording work; an error in it stops recording (raised when strict).
    put_step, put_snapshot
        Hand a step row / a snapshot to the writer thread (rank 0); recording stops if the writer has failed.
    snapshot
        Measure and write the snapshot of the whole model in this process (DDP, on rank 0).
    snapshot_taken
        The given step counts as snapshotted (every rank went through its snapshot).
    """

    is_active: Callable[[], bool]
    stop: Callable[[], None]
    fail: Callable[[BaseException], None]
    guarded: Callable[[Callable[[], None]], None]
    put_step: Callable[[dict[str, Any]], object]
    put_snapshot: Callable[[Snapshot], None]
    snapshot: Callable[[], None]
    snapshot_taken: Callable[[int], None]


def agree_on_path(context: D.DistributedContext, path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Rank 0 checks the path it will write; every rank raises its error (a collective)."""
    error = None
    if context.is_writer:
        try:
            check_writable(path, overwrite=overwrite)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by agree()
            error = exc
    context.agree(error)
    return Path(path)


def local_step(batch: StepBatch, *, shard_grads: tuple[torch.Tensor, Any] | None = None,
               passes: tuple[torch.Tensor, torch.Tensor] | None = None, per_example: torch.Tensor | None = None,
               convention: str = LOSS_MEAN) -> D.LocalStep:
    """What this rank contributes to the step's exchange: its batch, its shards' squared gradient norms
    (``shard_grads``, FSDP2) and its small-batch noise-scale norms from the step's per-pass norms (``passes``,
    :meth:`~lorascope.record.gns.MicroBatchNorms.pop`) and, when measured, per-example norms."""
    local = D.LocalStep(examples=batch.examples, tokens=batch.tokens, loss_tokens=batch.loss_tokens,
                        loss=batch.loss)
    if shard_grads is not None:
        local.grad_sq, local.grad_other = shard_grads
    if passes is not None:
        local.passes = len(passes[0])
        small = local_small_norms(passes[0], batch.pass_sizes(local.passes), convention, per_example)
        if small is not None:
            local.small, local.samples, local.sample_examples = small
    return local


class DistributedSteps:
    """Rank-aware start, step, snapshot and close of one recorder (see docs/distributed.md).

    Collectives never depend on one rank's state: a rank that stopped recording still joins the per-step
    exchange, with its stop flag set, until every rank sees the flag at a snapshot step (or at close).

    Parameters
    ----------
    context
        The process group.
    model, options
        The recorded model and the recorder's options.
    calls
        The recorder's side (:class:`RecorderCalls`).
    n_modules
        Recorded matrices.
    sharded
        FSDP2's W_0 shards, local gradient norms and snapshot gathers; None under DDP.
    gns
        Measure the noise-scale inputs (DDP only): the small-batch norms go through the exchange, and rank 0
        measures the big-batch norm of the all-reduced gradient by calling ``measure()`` once the backward pass
        that produced the gradients of ``grad_tensors`` has ended.
    grad_tensors, measure
        The recorded trainable tensors, and a function returning the (M,) squared norms of their gradients.

    Attributes
    ----------
    collectives : bool
        This rank joins the per-step exchange (from start until every rank stopped).
    reduced : ReducedGradNorms or None
        DDP's big-batch norms (rank 0, with ``gns``); its hooks are attached and detached by the recorder.
    """

    def __init__(self, context: D.DistributedContext, model: nn.Module, options: RecordOptions,
                 calls: RecorderCalls, *, n_modules: int, sharded: ShardedRecording | None = None,
                 gns: bool = False, grad_tensors: Sequence[torch.Tensor] = (),
                 measure: Callable[[], torch.Tensor] | None = None) -> None:
        self.context, self.model, self.options, self.calls, self.sharded = context, model, options, calls, sharded
        ddp = sharded is None
        self.reduced: D.ReducedGradNorms | None = None
        if ddp and gns and context.is_writer and measure is not None:
            self.reduced = D.ReducedGradNorms(grad_tensors, measure)
        self.exchange = D.StepExchange(context, n_modules, gns=ddp and gns, sharded=not ddp)
        self.collectives = False
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self, open_file: Callable[[bool], None], abandon_file: Callable[[], None]) -> None:
        """Every rank: W_0 where it is kept (rank 0 under DDP, each rank's shard under FSDP2); rank 0 opens the
        file with ``open_file(keep_w0)``; every rank raises rank 0's error (a collective). When another rank
        failed after rank 0 opened the file, ``abandon_file`` closes it, marked failed."""
        error = None
        try:
            if self.sharded is not None:
                self.sharded.capture_initial(self.model, "device" if self.options.w0_device == "device" else "cpu")
                if self.context.is_writer:
                    open_file(False)
            elif self.context.is_writer:
                open_file(True)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by agree()
            error = exc
        try:
            self.context.agree(error)
        except BaseException:
            abandon_file()
            raise
        self.collectives = self._started = True

    @property
    def started(self) -> bool:
        """Started and not yet ended."""
        return self._started

    def any_stopped(self) -> bool:
        """Every rank at close: whether any rank stopped recording (a collective). Raises when a rank is gone,
        after which this rank joins no more collectives."""
        try:
            return self.context.any_flag(not self.calls.is_active())
        except Exception:
            self.collectives = False
            raise

    def end(self) -> None:
        """No more collectives from this rank."""
        self.collectives = self._started = False

    # -- per step --------------------------------------------------------------------------------------------
    def after_step(self, step: int, measure: Callable[[], D.LocalStep], *, lr: Any, grads: dict[str, Any] | None,
                   loss_across_ranks: str, snapshot_due: bool) -> bool:
        """Every rank after each optimizer step: this rank's ``measure()`` goes into the exchange, then rank 0
        writes the global row (``grads``: its gradient columns under DDP). Returns whether the ranks take a
        snapshot now (``snapshot_due`` and none stopped; at a due step, every rank reads the same stop flag)."""
        local = None
        if self.calls.is_active():
            try:
                local = measure()
            except Exception as exc:  # noqa: BLE001 - a recorder bug never kills training unless strict
                self.calls.fail(exc)
        try:
            reduced = self.exchange.reduce(local)
        except Exception as exc:  # noqa: BLE001 - a rank is gone: nothing more can be exchanged
            self.collectives = False
            self.calls.fail(exc)
            return False
        if self.context.is_writer and self.calls.is_active():
            self.calls.guarded(lambda: self._put_row(step, lr, reduced, grads, loss_across_ranks))
        if not snapshot_due:
            return False
        if reduced.any_stopped():
            self.collectives = False  # every rank reads the same flag: all stop here, together
            self.calls.stop()
            return False
        return True

    def _put_row(self, step: int, lr: Any, reduced: D.ReducedStep, grads: dict[str, Any] | None,
                 loss_across_ranks: str) -> None:
        """Rank 0: the step row of the global batch (``loss_across_ranks="sum"``: each rank's loss is its share
        of the global step's loss, so the ranks' losses add up)."""
        row: dict[str, Any] = {S.INDEX: step, "lr": lr}
        row.update(reduced.row(loss_across_ranks=loss_across_ranks))
        row.update(reduced.gradients() if self.sharded is not None else (grads or {}))
        if self.reduced is not None:
            if self.reduced.error is not None:
                raise self.reduced.error
            row.update(reduced.gns(self.reduced.pop(), self.options.gns_loss) or {})
        self.calls.put_step(row)

    def snapshot(self, step: int) -> None:
        """Every rank at a snapshot step: under DDP rank 0 measures its own weights; under FSDP2 the ranks gather
        each matrix to rank 0 (collectives), which measures and writes it. The step counts as snapshotted unless
        a rank is gone."""
        if self.sharded is None:  # DDP: every rank holds the weights; rank 0 alone measures them
            if self.context.is_writer and self.calls.is_active():
                self.calls.guarded(self.calls.snapshot)
            self.calls.snapshot_taken(step)
            return
        try:
            snapshot, error = self.sharded.snapshot(self.model, self.options, step=step,
                                                    compute=self.calls.is_active())
        except Exception as exc:  # noqa: BLE001 - a collective failed: a rank is gone
            self.collectives = False
            self.calls.fail(exc)
            return
        self.calls.snapshot_taken(step)
        if error is not None:
            self.calls.fail(error)
        elif snapshot is not None:
            self.calls.put_snapshot(snapshot)

    # -- the run file's config -------------------------------------------------------------------------------
    def describe(self, *, noise_scale: bool) -> dict[str, Any]:
        """The ``distributed`` section of the run file's config (``noise_scale``: DDP measures its inputs)."""
        where = "cpu" if self.options.w0_device == "cpu" else "device"
        out = self.context.describe()
        if self.sharded is not None:
            out["w0"] = f"each rank keeps its float32 shard on the {where}"
            out["gradient_norms"] = "summed from the ranks' local gradient shards"
            out["gns"] = "not measured under FSDP2"
        else:
            out["w0"] = f"rank 0 keeps float32 W_0 on the {where}"
            out["gradient_norms"] = "of the all-reduced gradient (rank 0)"
            out["gns"] = ("per-rank local gradients before the all-reduce (B_small: examples of one backward pass "
                          "on one rank) vs the all-reduced gradient before clipping (B_big: the global batch)"
                          if noise_scale else "off")
        return out

