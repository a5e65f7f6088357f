"""The one core recorder every integration shares.

It attaches to a model and its optimizer: the optimizer's step pre-hook sees the gradients (per-module squared
norms, one batched on-device reduction, no host sync), its post-hook sees the updated weights (step rows and,
on the snapshot schedule, the update spectra). Forward hooks on the model count examples and tokens and pick
up the loss of models that return one. Integrations only locate model and optimizer and add metadata.
"""

from __future__ import annotations

import atexit
import os
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorascope.errors import InvalidOptionError, RecordingError, RecordingWarning, SelectionError
from lorascope.model.taxonomy import MatrixRef, classify
from lorascope.record import distributed as D
from lorascope.record.background import BackgroundWriter
from lorascope.record.batches import BatchTally, StepBatch
from lorascope.record.contributions import HeldLoss, refuse_contributions
from lorascope.record.data_parallel import DistributedSteps, RecorderCalls, agree_on_path, local_step
from lorascope.record.gns import MicroBatchNorms, per_example_norms, two_batch_norms
from lorascope.record.grad_norms import GradientNorms, uncovered_parameters
from lorascope.record.options import RecordOptions
from lorascope.record.run_config import coverage_rows, run_config, sv_capacity
from lorascope.record.sharded import ShardedRecording, check_options
from lorascope.record.snapshot import capture_initial, from_storable, in_kept_dtype, tensors_of, to_storable
from lorascope.record.snapshot_taker import GradientCapture, SnapshotTaker, WriterCalls
from lorascope.record.subspace import initial_basis
from lorascope.store import schema as S
from lorascope.store.initial import initial_weights_path, load_initial_weights, save_initial_weights
from lorascope.store.payloads import Snapshot
from lorascope.store.writer import RunWriter, check_writable

# Where the recorded gradient is seen relative to gradient clipping, stored in the config.
GRAD_AT_OPTIMIZER_STEP = "at optimizer.step(), after any clipping the training loop applies"

_OPEN_RECORDERS: weakref.WeakSet[Recorder] = weakref.WeakSet()


def _close_open_recorders() -> None:
    # At interpreter exit, flush what is queued; the status stays "recording": we cannot tell a finished run
    # from one that died, so the file is honestly marked incomplete.
    for recorder in list(_OPEN_RECORDERS):
        recorder.close(status=None)


def _close_recorders_of(path: Any) -> None:
    for recorder in list(_OPEN_RECORDERS):
        if os.path.realpath(recorder.path) == os.path.realpath(path):
            recorder.close(status=None)


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside framework wrappers (accelerate's AcceleratedOptimizer, Lightning's)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) or (
        isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and seen < 8
    ):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidOptionError(
            f"The 'optimizer' parameter of lorascope.record must be a torch.optim.Optimizer (or a wrapper holding "
            f"one in .optimizer). Got {type(optimizer).__name__} instead."
        )
    return optimizer


class Recorder:
    """Records one training run of ``model`` driven by ``optimizer`` into the run file ``path``.

    Build it with :func:`lorascope.record`. Usable as a context manager in a plain loop::

        with lorascope.record(model, "run.h5", optimizer=opt) as rec:
            for batch in data:
                loss = model(batch).loss
                loss.backward()
                rec.log(loss=loss, examples=len(batch))   # optional; call before optimizer.step()
                opt.step()
                opt.zero_grad()

    Everything that can be wrong with the arguments (unwritable path, existing file, empty selection, bad
    options) raises here, before any training step.

    Under ``torch.distributed`` (several processes, see docs/distributed.md) build one recorder on every rank:
    rank 0 writes the file, every rank takes part in the per-step exchange (and, under FSDP2, in the snapshot
    gathers). A path error found on rank 0 is raised on every rank.
    """

    _live: Any = None  # LiveMetrics (record/live_metrics.py) when the run publishes live metrics: publish_live()

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str],
        *,
        optimizer: Any,
        options: RecordOptions,
        framework: str = "plain",
        framework_version: str = "",
        grad_timing: str = GRAD_AT_OPTIMIZER_STEP,
        gradients_from_optimizer: bool = True,
        count_batches: bool = True,
        config: dict[str, Any] | None = None,
        loss_shares_global_step: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidOptionError(f"The 'model' parameter of Recorder must be a torch.nn.Module. "
                                     f"Got {type(model).__name__} instead.")
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # the names of a single-process run; DDP's forward calls the module's hooks
        self.model = model
        self.optimizer = innermost_optimizer(optimizer)
        self.options = options
        # torch.distributed is looked at once, here: a single-process run never pays for it afterwards.
        parallel = D.wanted(options.distributed)
        if not parallel:
            self.path = check_writable(path, overwrite=options.overwrite or options.resume)
        self._select_matrices()
        self.framework, self.framework_version = framework, framework_version
        self.grad_timing = grad_timing
        self._gradients_from_optimizer = gradients_from_optimizer
        self._count_batches = count_batches
        self._loss_shares_global_step = loss_shares_global_step
        # The user's extra_config sections are stored at the top of the config group and win over an
        # integration's own (e.g. a user's "dataset" over the size an integration read from its data loader).
        self._extra_config = {**dict(config or {}), **dict(self.options.extra_config)}
        self._tensors = [tensors_of(model, ref) for ref in self.refs]
        self._other_params = uncovered_parameters(model, self._tensors)
        self._norms = GradientNorms(self.refs, self._tensors, self._other_params)
        self.distributed = D.detect(self._tensors) if parallel else None
        self._sharded: ShardedRecording | None = None
        if self.distributed is not None:
            self.path = agree_on_path(self.distributed, path, overwrite=options.overwrite or options.resume)
            self._sharded = self._shard(self.distributed)
        self._init_run_state()
        self._held = self._set_up_contributions(parallel)
        self._set_up_noise_scale()
        self._distributed_steps = None if self.distributed is None else self._set_up_distributed(self.distributed)

    # -- set-up steps of __init__ ----------------------------------------------------------------------
    def _select_matrices(self) -> None:
        """The recorded matrices (``refs``) and the model's coverage; raises when the selection is empty."""
        taxonomy = classify(self.model, kind_map=self.options.kind_map)
        if self.options.kinds is not None or self.options.modules is not None:
            taxonomy = taxonomy.select(kinds=self.options.kinds, regex=self.options.modules)
        if not taxonomy.matrices:
            raise SelectionError(f"{type(self.model).__name__} has no trainable matrix to record; coverage: "
                                 + "; ".join(f"{c.parameter}: {c.reason}" for c in taxonomy.coverage[:8]))
        self.refs: tuple[MatrixRef, ...] = taxonomy.matrices
        self.coverage = taxonomy.coverage

    def _shard(self, context: D.DistributedContext) -> ShardedRecording | None:
        """Under FSDP2: refuse the options it cannot serve, and keep the state of this rank's shards."""
        if context.mode != D.MODE_FSDP2:
            return None
        check_options(self.options, self.refs, self.model)
        return ShardedRecording(self.refs, self._tensors, self._other_params, context)

    def _init_run_state(self) -> None:
        """What changes while recording: the step, the schedule, the writer, the hooks and one step's inputs."""
        self.total_steps = self.options.total_steps
        self.schedule = self.options.schedule()
        self.step = 0
        self.active = False
        self._stopped = False  # recording stopped early (a recorder error or a write failure)
        self._writer: BackgroundWriter | None = None
        self._handles: list[Any] = []
        self._w0: list[Any] = []
        self._last_snapshot = -1
        self._grads: dict[str, Any] | None = None  # the gradient columns of the step row
        self._shard_grads: tuple[torch.Tensor, Any] | None = None  # FSDP2: this rank's local squared norms
        self._grad_capture: GradientCapture | None = None  # grad_sv's input to the next snapshot
        self._closing = False  # close() is taking the final snapshot
        self._taker = SnapshotTaker(self.refs, self._tensors, self.options)
        self._logged, self._counted = BatchTally(), BatchTally()  # the loop's log() calls; the forward hooks

    def _set_up_contributions(self, parallel: bool) -> HeldLoss | None:
        """The held batch's losses of ``contributions=True``, checked once now (one clear error before training)."""
        options = self.options
        if not options.contributions:
            return None
        several = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        refuse_contributions(self.refs, distributed=parallel or several)
        if options.held_batch is None:
            raise InvalidOptionError("contributions=True needs held_batch= (a batch kept for measuring the loss; a "
                                     "transformers.Trainer takes the first batch of its training data by itself)")
        held = HeldLoss(self.model, self.refs, options.held_batch, options.loss_fn,
                        layers=options.contributions == "layers", keep_on=options.w0_device)
        held.check()
        return held

    def _set_up_noise_scale(self) -> None:
        """The tensor hooks of the gradient noise scale: per-pass norms, and per-example norms when asked."""
        # Per-pass norms also give the per-example source its step norm before clipping. Under DDP each rank's
        # passes give the small-batch norms (its local gradients before the all-reduce); under FSDP2 the sharded
        # parameters see no per-pass gradient (the noise scale is off there, see sharded.check_options). Otherwise a
        # lone pass gives no noise scale: measure a pass only once a second one comes (``defer_first``).
        gns, single = self.options.gns is not None and self._sharded is None, self.distributed is None
        defer = single and self.options.gns != "per_example"
        self._micro = MicroBatchNorms(self.refs, self._tensors, cross=single, defer_first=defer) if gns else None
        self._per_example = None
        if self.options.gns == "per_example" and gns:
            from lorascope.record.per_example import PerExampleNorms

            # One column per matrix that is a whole module weight; split fused experts have no per-example
            # norms (their columns stay NaN).
            targets = {ref.module: [i] for i, ref in enumerate(self.refs)
                       if ref.expert < 0 and not ref.part and (ref.lora or ref.parameter == "weight")}
            self._per_example = PerExampleNorms(self.model, targets)

    def _set_up_distributed(self, context: D.DistributedContext) -> DistributedSteps:
        """The rank-aware steps, handed the recorder's own work (writing, stopping, single-process snapshots)."""
        calls = RecorderCalls(is_active=lambda: self.active, stop=self._stop, fail=self._fail,
                              guarded=self._guarded, put_step=self._put_step, put_snapshot=self._put_snapshot,
                              snapshot=self._snapshot, snapshot_taken=self._snapshot_taken)
        return DistributedSteps(
            context, self.model, self.options, calls, n_modules=len(self.refs), sharded=self._sharded,
            gns=self.options.gns is not None, grad_tensors=[t for named in self._tensors for t in named.values()],
            measure=self._norms.squared_now)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, *, total_steps: int | None = None, config: dict[str, Any] | None = None,
              resume_after: int | None = None, resumable: bool = False) -> Recorder:
        """Keep W_0, create the run file and attach the hooks. Idempotent.

        ``resume_after=g`` continues an existing run file after optimizer step g (a run resumed from a
        checkpoint), with W_0 read from the initial-weights file that ``resumable=True`` wrote at the start.
        """
        if self.active:
            return self
        if total_steps:
            self.total_steps = int(total_steps)
            self.schedule = self.options.schedule(self.total_steps)
        self._extra_config.update(config or {})
        _close_recorders_of(self.path)  # a crashed run in this process may still hold the file
        if self._distributed_steps is None:
            self._open_file(resume_after, resumable)
        else:
            self._distributed_steps.start(
                lambda keep_w0: self._open_file(resume_after, resumable and keep_w0, keep_w0=keep_w0),
                lambda: self._close_writer(S.STATUS_FAILED))
            if resume_after is not None and self._sharded is None:
                self.step = self._last_snapshot = int(resume_after)
        if self._gradients_from_optimizer:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_pre_step))
        post_step = self._on_post_step if self._distributed_steps is None else self._on_post_step_distributed
        self._handles.append(self.optimizer.register_step_post_hook(post_step))
        for hooks in self._tensor_hooks():
            hooks.attach()
        if self._count_batches:
            self._handles.append(self.model.register_forward_pre_hook(self._on_forward_pre, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._on_forward, with_kwargs=True))
        self.active = True
        if not _OPEN_RECORDERS:  # the exit handler is registered once per batch of open recorders
            atexit.unregister(_close_open_recorders)
            atexit.register(_close_open_recorders)
        _OPEN_RECORDERS.add(self)
        return self

    def _open_file(self, resume_after: int | None, resumable: bool, *, keep_w0: bool = True) -> None:
        """Keep W_0 (or read it back to resume), create (or continue) the run file, start the writer thread.

        ``keep_w0=False``: W_0 is kept elsewhere (FSDP2: in the ranks' shards)."""
        keep_on = "device" if self.options.w0_device == "device" else "cpu"
        names = [ref.name for ref in self.refs]
        if keep_w0 and resume_after is None:
            self._w0 = [capture_initial(self.model, ref, keep_on=keep_on, dtype=self.options.w0_dtype)
                        for ref in self.refs]
            if resumable:
                save_initial_weights(initial_weights_path(self.path), names, [to_storable(w) for w in self._w0])
        elif keep_w0:
            assert resume_after is not None  # the branch above took the fresh start
            stored = load_initial_weights(initial_weights_path(self.path), names)
            device = self._tensors[0][next(iter(self._tensors[0]))].device if keep_on == "device" else "cpu"
            self._w0 = [in_kept_dtype(self.model, ref, from_storable(w, device), self.options.w0_dtype)
                        for ref, w in zip(self.refs, stored, strict=True)]
            self.step = self._last_snapshot = int(resume_after)
        bases = None
        if keep_w0 and self.options.intruder_k:  # the starting weights' vectors, once (lorascope.record.subspace)
            bases = [initial_basis(self.model, ref, self._w0[i], keep_weight=self._taker.uses_worker and (
                ref.lora or keep_on == "device")) for i, ref in enumerate(self.refs)]
        writer = RunWriter(
            self.path,
            self.refs,
            coverage=coverage_rows(self.coverage),
            config=run_config(self.model, self.optimizer, self.options, grad_timing=self.grad_timing,
                              total_steps=self.total_steps, schedule=self.schedule, extra=self._extra_config,
                              distributed=None if self._distributed_steps is None
                              else self._distributed_steps.describe(noise_scale=self._micro is not None)),
            framework=self.framework,
            framework_version=self.framework_version,
            sv_capacity=sv_capacity(self.refs, self.options),
            grad_sv=self.options.grad_sv,
            factors_k=self.options.factors_k,
            delta_dtype=self.options.store_delta,
            intruder_k=self.options.intruder_k,
            overwrite=self.options.overwrite or resume_after is not None,
        )
        if self._live is not None:
            writer = self._live.tap(writer)  # the snapshots written, whichever thread computed them
        self._writer = BackgroundWriter(writer, queue_size=self.options.queue_size, strict=self.options.strict,
                                        flush_seconds=self.options.flush_seconds)
        self._writer.start(resume_after)
        # Under torch.distributed every rank must agree on which steps were snapshotted: no thinning, no skipping.
        single = self._distributed_steps is None
        self._taker.start(WriterCalls.of(self._writer, self._put_snapshot),
                          thinnable=single and self.schedule.thinnable, may_skip=single, bases=bases)

    def close(self, status: str | None = S.STATUS_COMPLETE) -> None:
        """Take the final snapshot (if the last step has none), detach, drain the queue and close the file.

        ``status=None`` leaves the file marked incomplete (``recording``)."""
        if self._distributed_steps is not None:
            self._close_distributed(self._distributed_steps, status)
            _OPEN_RECORDERS.discard(self)
            self._publish_live()  # rank 0: the snapshots the writer finished at close, the final one's included
            return
        if self._writer is None:
            return
        self._closing = True
        try:
            if self.active and status == S.STATUS_COMPLETE and self.step > 0 and self._last_snapshot != self.step:
                self._guarded(self._snapshot)
        finally:
            self._detach()
            _OPEN_RECORDERS.discard(self)
            self._close_writer(status)
            self._publish_live()

    def _close_distributed(self, distributed: DistributedSteps, status: str | None) -> None:
        """Every rank: agree whether any rank stopped, take the final snapshot together, and detach; rank 0
        closes the file. ``status`` other than complete (an exception, interpreter exit) runs no collective."""
        if not distributed.started:
            return
        try:
            if status == S.STATUS_COMPLETE and distributed.collectives:
                try:
                    stopped = distributed.any_stopped()
                except Exception as exc:  # noqa: BLE001 - a rank is gone
                    stopped = True
                    self._fail(exc)
                if stopped:
                    self._stopped = True
                elif self.step > 0 and self._last_snapshot != self.step:
                    self._closing = True
                    self._snapshot_distributed()
        finally:
            distributed.end()
            self._detach()
            self._close_writer(status)

    def _close_writer(self, status: str | None) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._taker.close()  # the pending snapshots reach the writer before it closes
        if self._stopped and status == S.STATUS_COMPLETE:
            status = S.STATUS_FAILED  # the file lacks the steps after the stop: never claim it complete
        writer.close(status, config={"recording_cost": self._taker.cost_section(writer.cpu_seconds)})

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(S.STATUS_COMPLETE if exc_type is None else S.STATUS_FAILED)

    # -- live metrics ------------------------------------------------------------------------------------
    def publish_live(self, live: Any) -> Recorder:
        """Hand every step row and written snapshot to ``live`` (a :class:`~lorascope.record.live_metrics.LiveMetrics`,
        docs/recording.md "Live metrics in your tracker"); call before :meth:`start`."""
        self._live = live
        return self

    def _publish_live(self) -> None:
        if self._live is not None and self._live.on_step_publishes:
            self._live.publish()

    # -- metadata from the training loop -----------------------------------------------------------------
    def log(self, *, loss: Any = None, examples: int | None = None, tokens: Any = None,
            loss_tokens: Any = None) -> None:
        """Tell the recorder what the current optimizer step consumed; call before ``optimizer.step()``.

        Several calls within one step (one per micro-batch) add up examples and tokens and average the loss.
        ``loss_tokens`` counts the tokens the loss is computed on (the completion tokens of SFT), which the
        information estimate of ``lorascope recommend`` needs when the model is not given ``labels``.
        Values given here take precedence over what the forward hooks count. ``loss`` may be a tensor: it is
        moved to the host on the writer thread, so no synchronization happens here.
        """
        if examples is not None:
            if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
                raise InvalidOptionError(f"The 'examples' parameter of Recorder.log must be an int in the range "
                                         f"[0, inf). Got {examples!r} instead.")
            self._logged.add_examples(examples)
        if tokens is not None:
            self._logged.add_tokens(tokens)
        if loss_tokens is not None:
            self._logged.add_loss_tokens(loss_tokens)
        if loss is not None:
            self._logged.add_loss(loss)

    # -- hooks -----------------------------------------------------------------------------------------
    def capture_gradients(self) -> None:
        """Read the gradients now (called by the optimizer pre-hook, or by an integration whose framework
        computes gradients inside ``optimizer.step(closure)``, such as Lightning)."""
        if self.active:
            self._guarded(self._capture_gradients)

    def _on_pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        started = time.perf_counter()
        self.capture_gradients()
        self._taker.cost.step_seconds += time.perf_counter() - started

    def _on_post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.active:
            started, cost = time.perf_counter(), self._taker.cost
            in_snapshots = cost.snapshot_seconds
            self._guarded(self._after_step)
            cost.step_seconds += time.perf_counter() - started - (cost.snapshot_seconds - in_snapshots)
            cost.step_seconds += self._micro.take_seconds() if self._micro is not None else 0.0  # inside backward

    def _on_post_step_distributed(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Every rank after each optimizer step (see :meth:`DistributedSteps.after_step`)."""
        distributed = self._distributed_steps
        if distributed is None or not distributed.collectives:
            return
        self.step += 1
        shares = self._loss_shares_global_step and self._step_batch().loss_shares_step
        try:
            snapshot_now = distributed.after_step(
                self.step, self._local_step, lr=self._lr(), grads=self._grads,
                loss_across_ranks="sum" if shares else "mean", snapshot_due=self._snapshot_due(self.step))
        finally:
            self._end_step()
        if snapshot_now:
            self._snapshot_distributed()
        self._publish_live()  # rank 0's written snapshots (the other ranks have none)

    def _on_forward_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.active and module.training and torch.is_grad_enabled():
            self._counted.add_call(args, kwargs)

    def _on_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.active and module.training and torch.is_grad_enabled():
            loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                # Given ``num_items_in_batch`` (transformers Trainer), a model divides its summed loss by the item
                # count of the whole optimizer step, so the step's loss is the sum over micro-batches.
                self._counted.add_loss(loss, share_of_step=kwargs.get("num_items_in_batch") is not None)

    # -- work ------------------------------------------------------------------------------------------
    def _guarded(self, fn: Callable[[], None]) -> None:
        # A recorder bug or a write failure must never kill training (unless strict).
        try:
            fn()
        except RecordingError:
            raise
        except Exception as exc:
            if self.options.strict:
                raise
            self._stop()
            warnings.warn(self._stop_message(exc), RecordingWarning, stacklevel=3)

    def _fail(self, exc: BaseException) -> None:
        """Stop recording on this rank after an error (raise it when strict), as :meth:`_guarded` does."""
        if self.options.strict or isinstance(exc, RecordingError):
            raise exc
        was_active = self.active
        self._stop()
        if was_active:
            warnings.warn(self._stop_message(exc), RecordingWarning, stacklevel=4)

    def _stop_message(self, exc: BaseException) -> str:
        return (f"lorascope stopped recording to {self.path}: {type(exc).__name__}: {exc}; training continues and "
                "the file keeps what was written.")

    def _capture_gradients(self) -> None:
        if self._sharded is not None:  # FSDP2: every rank keeps its shards' squared norms for the exchange
            self._shard_grads = self._sharded.local_grad_norms()
            return
        if self.distributed is not None and not self.distributed.is_writer:
            return  # DDP: rank 0 reads the reduced gradients like a single process, the others have none to read
        grads = self._norms.gradients()
        self._grads = self._norms.step_columns(grads)
        if self.options.grad_sv and self._snapshot_due(self.step + 1):
            self._grad_capture = self._taker.capture_gradients(grads)

    def _after_step(self) -> None:
        self.step += 1
        if self._grads is None and self._gradients_from_optimizer is False:
            warnings.warn("no gradients were captured before this optimizer step", RecordingWarning, stacklevel=2)
        batch = self._step_batch()
        row: dict[str, Any] = {S.INDEX: self.step, "lr": self._lr(), "batch_examples": batch.examples,
                               "batch_tokens": batch.tokens, "batch_loss_tokens": batch.loss_tokens,
                               "loss": batch.loss}
        row.update(self._grads or {})
        row.update(self._noise_scale_inputs(batch) or {})
        if self._live is not None:
            self._live.on_step(row)
        self._end_step()
        if self._put_step(row) and self._snapshot_due(self.step):
            self._snapshot()
        self._publish_live()

    def _step_batch(self) -> StepBatch:
        return StepBatch.of(self._logged, self._counted)

    def _end_step(self) -> None:
        """Forget the inputs of the step just recorded."""
        self._grads, self._shard_grads = None, None
        self._logged, self._counted = BatchTally(), BatchTally()

    def _lr(self) -> Any:
        return self.optimizer.param_groups[0].get("lr", float("nan"))

    def _put_step(self, row: dict[str, Any]) -> bool:
        """Queue a step row; False when the writer failed (it said so once): recording stops, training goes on."""
        if self._writer is not None and not self._writer.put_step(row):
            self._stop()
            return False
        return True

    def _put_snapshot(self, snapshot: Snapshot) -> None:
        if self._writer is not None and not self._writer.put_snapshot(snapshot):
            self._stop()

    def _snapshot(self) -> None:
        """The snapshot of this step (see :class:`SnapshotTaker`: on the worker thread by default; thinned by the
        time budget unless it is the final one)."""
        final = self._closing or self.step == self.total_steps
        gradients, self._grad_capture = self._grad_capture, None
        if self._taker.take(self.model, self._w0, step=self.step, final=final, gradients=gradients, held=self._held):
            self._last_snapshot = self.step

    def _snapshot_distributed(self) -> None:
        """Every rank at a snapshot step (see :meth:`DistributedSteps.snapshot`)."""
        if self._distributed_steps is not None:
            self._distributed_steps.snapshot(self.step)

    def _snapshot_taken(self, step: int) -> None:
        self._last_snapshot = step

    def _snapshot_due(self, step: int) -> bool:
        return self.schedule.is_due(step) or step == self.total_steps

    def _local_step(self) -> D.LocalStep:
        """This rank's contribution to the step's exchange (under torch.distributed)."""
        passes = per_example = None
        if self._micro is not None:
            passes = self._micro.pop()
            measured = self._per_example.pop() if self._per_example is not None else None
            per_example = None if measured is None else measured[0]
        return local_step(self._step_batch(), shard_grads=self._shard_grads, passes=passes, per_example=per_example,
                          convention=self.options.gns_loss)

    def _noise_scale_inputs(self, batch: StepBatch) -> dict[str, Any] | None:
        """Two-batch-size norms of this step from its backward passes (see lorascope.record.gns)."""
        if self._micro is None:
            return None
        measured = self._micro.pop()
        per_example = self._per_example.pop() if self._per_example is not None else None
        if measured is None:
            return None
        sizes = batch.pass_sizes(len(measured[0]))
        if per_example is None:
            return two_batch_norms(*measured, sizes, self.options.gns_loss)
        return per_example_norms(*measured, per_example[0], sizes, len(self.refs), self.options.gns_loss)

    def _tensor_hooks(self) -> list[Any]:
        """The tensor and module hooks of the noise scale (attached at start, detached at a stop)."""
        reduced = None if self._distributed_steps is None else self._distributed_steps.reduced
        return [hooks for hooks in (self._micro, self._per_example, reduced) if hooks is not None]

    def _stop(self) -> None:
        # Called from inside the optimizer's step hooks, while torch iterates its hook dicts: removing a hook now
        # would raise "OrderedDict mutated during iteration" in the training loop. Go inert instead (every hook
        # checks ``active``); close() removes the hooks.
        self.active = False
        self._stopped = True
        for hooks in self._tensor_hooks():
            hooks.detach()  # tensor and module hooks, not the optimizer's: safe to remove here

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for hooks in self._tensor_hooks():
            hooks.detach()
        self.active = False
