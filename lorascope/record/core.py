"""The one core recorder every integration shares.

It attaches to a model and its optimizer: the optimizer's step pre-hook sees the gradients (per-module squared
norms, one batched on-device reduction, no host sync), its post-hook sees the updated weights (step rows and,
on the snapshot schedule, the update spectra). Forward hooks on the model count examples and tokens and pick
up the loss of models that return one. Integrations only locate model and optimizer and add metadata.
"""

from __future__ import annotations

import atexit
import os
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorascope._version import __version__
from lorascope.errors import InvalidOptionError, RecordingError, RecordingWarning, SelectionError
from lorascope.model.peft import lora_config_of
from lorascope.model.taxonomy import MatrixRef, classify
from lorascope.record import distributed as D
from lorascope.record.background import BackgroundWriter
from lorascope.record.data_parallel import DataParallelSteps
from lorascope.record.gns import MicroBatchNorms, per_example_norms, two_batch_norms
from lorascope.record.options import RecordOptions
from lorascope.record.snapshot import capture_initial, from_storable, take_snapshot, tensors_of, to_storable
from lorascope.store import schema as S
from lorascope.store.initial import initial_weights_path, load_initial_weights, save_initial_weights
from lorascope.store.writer import RunWriter, check_writable

if TYPE_CHECKING:
    from lorascope.record.sharded import ShardedRecording

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
            f"optimizer must be a torch.optim.Optimizer (or a wrapper holding one in .optimizer). "
            f"Got {type(optimizer).__name__} instead."
        )
    return optimizer


class Recorder(DataParallelSteps):
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
            raise InvalidOptionError(f"model must be a torch.nn.Module. Got {type(model).__name__} instead.")
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # the names of a single-process run; DDP's forward calls the module's hooks
        self.model = model
        self.optimizer = innermost_optimizer(optimizer)
        self.options = options
        # torch.distributed is looked at once, here: a single-process run never pays for it afterwards.
        parallel = D.wanted(options.distributed)
        if not parallel:
            self.path = check_writable(path, overwrite=options.overwrite or options.resume)
        taxonomy = classify(model, kind_map=options.kind_map)
        if options.kinds is not None or options.modules is not None:
            taxonomy = taxonomy.select(kinds=options.kinds, regex=options.modules)
        if not taxonomy.matrices:
            raise SelectionError(f"{type(model).__name__} has no trainable matrix to record; coverage: "
                                 + "; ".join(f"{c.parameter}: {c.reason}" for c in taxonomy.coverage[:8]))
        self.refs: tuple[MatrixRef, ...] = taxonomy.matrices
        self.coverage = taxonomy.coverage
        self.framework, self.framework_version = framework, framework_version
        self.grad_timing = grad_timing
        self._gradients_from_optimizer = gradients_from_optimizer
        self._count_batches = count_batches
        # The user's extra_config sections are stored at the top of the config group and win over an
        # integration's own (e.g. a user's "dataset" over the size an integration read from its data loader).
        self._extra_config = {**dict(config or {}), **dict(self.options.extra_config)}
        self._tensors = [tensors_of(model, ref) for ref in self.refs]
        self._other_params = self._uncovered_trainable_parameters()
        self.distributed = D.detect(self._tensors) if parallel else None
        self._sharded: ShardedRecording | None = None
        if self.distributed is not None:
            self.path = self._agree_on_path(path)
            if self.distributed.mode == D.MODE_FSDP2:
                from lorascope.record.sharded import ShardedRecording, check_options

                check_options(options, self.refs, model)
                self._sharded = ShardedRecording(self.refs, self._tensors, self._other_params, self.distributed)
        self.total_steps = options.total_steps
        self.schedule = options.schedule()
        self.step = 0
        self.active = False
        self._stopped = False  # recording stopped early (a recorder error or a write failure)
        self._writer: BackgroundWriter | None = None
        self._handles: list[Any] = []
        self._w0: list[torch.Tensor | None] = []
        self._last_snapshot = -1
        self._grads: dict[str, torch.Tensor] | None = None
        self._grad_sv: list[torch.Tensor | None] | None = None
        self._auto: dict[str, Any] = {}
        self._logged: dict[str, Any] = {}
        self._present_cache: dict[tuple[bool, ...], torch.Tensor] = {}
        # Per-pass norms also give the per-example source its step norm before clipping. Under DDP each rank's
        # passes give the small-batch norms (its local gradients before the all-reduce); under FSDP2 the sharded
        # parameters see no per-pass gradient (the noise scale is off there, see sharded.check_options).
        gns = options.gns is not None and self._sharded is None
        self._micro = MicroBatchNorms(self.refs, self._tensors, cross=self.distributed is None) if gns else None
        self._per_example = None
        if options.gns == "per_example" and gns:
            from lorascope.record.per_example import PerExampleNorms

            # One column per matrix that is a whole module weight; split fused experts have no per-example
            # norms (their columns stay NaN).
            targets = {ref.module: [i] for i, ref in enumerate(self.refs)
                       if ref.expert < 0 and not ref.part and (ref.lora or ref.parameter == "weight")}
            self._per_example = PerExampleNorms(model, targets)
        self._reduced: D.ReducedGradNorms | None = None
        self._exchange: D.StepExchange | None = None
        self._collectives = False  # this rank joins the per-step exchange (from start until all ranks stop)
        self._started = False
        self._loss_shares_global_step = loss_shares_global_step
        if self.distributed is not None:
            ddp = self._sharded is None
            if ddp and gns and self.distributed.is_writer:
                self._reduced = D.ReducedGradNorms(
                    [t for named in self._tensors for t in named.values()],
                    lambda: self._squared_norms([_grad_view(r, t) for r, t in zip(self.refs, self._tensors)]))
            self._exchange = D.StepExchange(self.distributed, len(self.refs), gns=ddp and gns, sharded=not ddp)

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
        if self.distributed is None:
            self._open_file(resume_after, resumable)
        else:
            self._start_distributed(resume_after, resumable)
        if self._gradients_from_optimizer:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_pre_step))
        post_step = self._on_post_step if self.distributed is None else self._on_post_step_distributed
        self._handles.append(self.optimizer.register_step_post_hook(post_step))
        for hooks in (self._micro, self._per_example, self._reduced):
            if hooks is not None:
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
            self._w0 = [capture_initial(self.model, ref, keep_on=keep_on) for ref in self.refs]
            if resumable:
                save_initial_weights(initial_weights_path(self.path), names, [to_storable(w) for w in self._w0])
        elif keep_w0:
            stored = load_initial_weights(initial_weights_path(self.path), names)
            device = self._tensors[0][next(iter(self._tensors[0]))].device if keep_on == "device" else "cpu"
            self._w0 = [from_storable(w, device) for w in stored]
            self.step = self._last_snapshot = int(resume_after)
        writer = RunWriter(
            self.path,
            self.refs,
            coverage=[_coverage_row(c) for c in self.coverage],
            config=self._config(),
            framework=self.framework,
            framework_version=self.framework_version,
            sv_capacity=self._sv_capacity(),
            grad_sv=self.options.grad_sv,
            factors_k=self.options.factors_k,
            delta_dtype=self.options.store_delta,
            overwrite=self.options.overwrite or resume_after is not None,
        )
        self._writer = BackgroundWriter(writer, queue_size=self.options.queue_size, strict=self.options.strict,
                                        flush_seconds=self.options.flush_seconds)
        self._writer.start(resume_after)

    def close(self, status: str | None = S.STATUS_COMPLETE) -> None:
        """Take the final snapshot (if the last step has none), detach, drain the queue and close the file.

        ``status=None`` leaves the file marked incomplete (``recording``)."""
        if self.distributed is not None:
            self._close_distributed(status)
            _OPEN_RECORDERS.discard(self)
            return
        if self._writer is None:
            return
        try:
            if self.active and status == S.STATUS_COMPLETE and self.step > 0 and self._last_snapshot != self.step:
                self._guarded(self._snapshot)
        finally:
            self._detach()
            writer, self._writer = self._writer, None
            _OPEN_RECORDERS.discard(self)
            if self._stopped and status == S.STATUS_COMPLETE:
                status = S.STATUS_FAILED  # the file lacks the steps after the stop: never claim it complete
            writer.close(status)

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(S.STATUS_COMPLETE if exc_type is None else S.STATUS_FAILED)

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
                raise InvalidOptionError(f"examples must be an int >= 0. Got {examples!r} instead.")
            self._logged["examples"] = self._logged.get("examples", 0) + examples
            self._logged.setdefault("passes", []).append(examples)
        if tokens is not None:
            self._logged["tokens"] = self._logged.get("tokens", 0) + _detached(tokens)
        if loss_tokens is not None:
            self._logged["loss_tokens"] = self._logged.get("loss_tokens", 0) + _detached(loss_tokens)
        if loss is not None:
            _accumulate_loss(self._logged, loss)

    # -- hooks -----------------------------------------------------------------------------------------
    def capture_gradients(self) -> None:
        """Read the gradients now (called by the optimizer pre-hook, or by an integration whose framework
        computes gradients inside ``optimizer.step(closure)``, such as Lightning)."""
        if self.active:
            self._guarded(self._capture_gradients)

    def _on_pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.capture_gradients()

    def _on_post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.active:
            self._guarded(self._after_step)

    def _on_forward_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.active and module.training and torch.is_grad_enabled():
            examples, tokens = count_batch(args, kwargs)
            if examples is not None:
                self._auto["examples"] = self._auto.get("examples", 0) + examples
                self._auto.setdefault("passes", []).append(examples)
            if tokens is not None:
                self._auto["tokens"] = self._auto.get("tokens", 0) + tokens
            loss_tokens = count_loss_tokens(kwargs)
            if loss_tokens is not None:
                self._auto["loss_tokens"] = self._auto.get("loss_tokens", 0) + loss_tokens

    def _on_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.active and module.training and torch.is_grad_enabled():
            loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                # Given ``num_items_in_batch`` (transformers Trainer), a model divides its summed loss by the item
                # count of the whole optimizer step, so the step's loss is the sum over micro-batches.
                _accumulate_loss(self._auto, loss, share_of_step=kwargs.get("num_items_in_batch") is not None)

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
            warnings.warn(f"lorascope stopped recording to {self.path}: {type(exc).__name__}: {exc}; training "
                          "continues and the file keeps what was written.", RecordingWarning, stacklevel=3)

    def _capture_gradients(self) -> None:
        if self.distributed is not None and not self._capture_gradients_distributed():
            return
        grads: list[torch.Tensor | None] = [_grad_view(ref, tensors) for ref, tensors in
                                           zip(self.refs, self._tensors, strict=True)]
        self._grads = {"grad_sq_norm": self._squared_norms(grads),
                       "grad_sq_norm_other": self._other_squared_norm()}
        sq = self._grads["grad_sq_norm"]
        self._grads["grad_nonfinite_modules"] = (~torch.isfinite(sq)).sum(dtype=torch.int32)
        if self.options.grad_sv and self._snapshot_due(self.step + 1):
            from lorascope.spectrum import singular_values

            self._grad_sv = [None if g is None or g.ndim != 2 else singular_values(g).cpu() for g in grads]

    def _after_step(self) -> None:
        self.step += 1
        if self._grads is None and self._gradients_from_optimizer is False:
            warnings.warn("no gradients were captured before this optimizer step", RecordingWarning, stacklevel=2)
        row: dict[str, Any] = {
            S.INDEX: self.step,
            "lr": self.optimizer.param_groups[0].get("lr", float("nan")),
            "batch_examples": self._logged.get("examples", self._auto.get("examples")),
            "batch_tokens": self._logged.get("tokens", self._auto.get("tokens")),
            "batch_loss_tokens": self._logged.get("loss_tokens", self._auto.get("loss_tokens")),
            "loss": _mean_loss(self._logged) if "loss_count" in self._logged else _mean_loss(self._auto),
        }
        row.update(self._grads or {})
        row.update(self._noise_scale_inputs(row["batch_examples"]) or {})
        self._grads, self._logged, self._auto = None, {}, {}
        if self._writer is not None and not self._writer.put_step(row):
            self._stop()  # the writer failed and said so once: stop recording (no more snapshots), train on
            return
        if self._snapshot_due(self.step):
            self._snapshot()

    def _snapshot(self) -> None:
        snapshot = take_snapshot(self.refs, self.model, self._w0, options=self.options, step=self.step,
                                 grad_sv=self._grad_sv)
        self._grad_sv = None
        self._last_snapshot = self.step
        if self._writer is not None and not self._writer.put_snapshot(snapshot):
            self._stop()

    @staticmethod
    def _step_loss(store: dict[str, Any]) -> Any:
        return _mean_loss(store)

    def _snapshot_due(self, step: int) -> bool:
        return self.schedule.is_due(step) or step == self.total_steps

    def _squared_norms(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        present = tuple(g is not None for g in grads)
        tensors = [g for g in grads if g is not None]
        if not tensors:
            return torch.full((len(grads),), float("nan"))
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        device = norms[0].device
        sq = torch.stack([n.to(device) for n in norms]).square()
        if all(present):
            return sq
        index = self._present_cache.get(present)
        if index is None:
            index = torch.tensor([i for i, p in enumerate(present) if p], device=device)
            self._present_cache[present] = index
        full = torch.full((len(grads),), float("nan"), device=device)
        return full.index_copy_(0, index, sq)

    def _other_squared_norm(self) -> torch.Tensor | float:
        grads = [p.grad for p in self._other_params if p.grad is not None]
        if not grads:
            return float("nan") if not self._other_params else 0.0
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).double().square().sum()

    def _noise_scale_inputs(self, batch_examples: Any) -> dict[str, Any] | None:
        """Two-batch-size norms of this step from its backward passes (see lorascope.record.gns)."""
        if self._micro is None:
            return None
        measured = self._micro.pop()
        per_example = self._per_example.pop() if self._per_example is not None else None
        if measured is None:
            return None
        sizes = self._pass_sizes(batch_examples, len(measured[0]))
        if per_example is None:
            return two_batch_norms(*measured, sizes, self.options.gns_loss)
        return per_example_norms(*measured, per_example[0], sizes, len(self.refs), self.options.gns_loss)

    def _pass_sizes(self, batch_examples: Any, passes: int) -> list[float] | None:
        sizes = self._logged.get("passes", self._auto.get("passes"))
        if (sizes is None or len(sizes) != passes) and isinstance(batch_examples, int) and batch_examples > 0:
            sizes = [batch_examples / passes] * passes  # pass sizes not seen one by one: taken as equal
        return sizes

    def _uncovered_trainable_parameters(self) -> list[nn.Parameter]:
        covered = {id(t) for tensors in self._tensors for t in tensors.values()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in covered]

    def _stop(self) -> None:
        # Called from inside the optimizer's step hooks, while torch iterates its hook dicts: removing a hook now
        # would raise "OrderedDict mutated during iteration" in the training loop. Go inert instead (every hook
        # checks ``active``); close() removes the hooks.
        self.active = False
        self._stopped = True
        for hooks in (self._micro, self._per_example, self._reduced):
            if hooks is not None:
                hooks.detach()  # tensor and module hooks, not the optimizer's: safe to remove here

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for hooks in (self._micro, self._per_example, self._reduced):
            if hooks is not None:
                hooks.detach()
        self.active = False

    def _sv_capacity(self) -> int:
        top_k = self.options.top_k
        caps = []
        for ref in self.refs:
            full = min(ref.out_features, ref.in_features)
            large = ref.out_features * ref.in_features > self.options.top_k_min_size
            caps.append(min(full, top_k) if (top_k is not None and large) else full)
        return max(caps, default=0)

    def _config(self) -> dict[str, Any]:
        optimizer = {
            "class": f"{type(self.optimizer).__module__}.{type(self.optimizer).__name__}",
            "defaults": {k: v for k, v in self.optimizer.defaults.items() if _jsonable(v)},
            "param_groups": len(self.optimizer.param_groups),
        }
        recorder = self.options.to_config()
        recorder.update({
            "lorascope_version": __version__,
            "grad_timing": self.grad_timing,
            "total_steps": self.total_steps,
            "schedule": repr(self.schedule),
            "w0_dtype": "float32",
            "grad_sq_norm_lora": "|grad A|^2 + |grad B|^2 of the adapter factors",
        })
        config = {"recorder": recorder, "optimizer": optimizer, "model": {"class": type(self.model).__name__}}
        model_config = getattr(self.model, "config", None)
        if model_config is not None and hasattr(model_config, "to_dict"):
            config["model"]["config"] = model_config.to_dict()
        lora = lora_config_of(self.model)
        if lora:
            config["lora"] = lora
        if self.distributed is not None:
            config["distributed"] = self._distributed_config()
        config.update(self._extra_config)
        return config


def count_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int | None, Any]:
    """Examples and tokens of one forward call: the leading dimension of ``input_ids`` (or of the first tensor
    argument) and the number of unmasked tokens (``attention_mask.sum()``, kept on the device) or, for integer
    token-id input without a mask, its number of elements."""
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if ids is None:
        ids = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    if not isinstance(ids, torch.Tensor) or ids.ndim == 0:
        return None, None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape[:2] == ids.shape[:2]:
        tokens: Any = mask.detach().sum()
    elif not ids.is_floating_point() and ids.ndim == 2:
        tokens = ids.numel()
    else:
        tokens = None
    return int(ids.shape[0]), tokens


def dataset_config(loader: Any) -> dict[str, Any]:
    """``{"dataset": {"examples": N}}`` for a training data loader whose dataset has a length (the epoch size
    that ``recommend`` needs to find a probe run's first epoch), else ``{}``."""
    try:
        return {"dataset": {"examples": int(len(loader.dataset))}}
    except (AttributeError, TypeError):
        return {}


def count_loss_tokens(kwargs: dict[str, Any]) -> Any:
    """Tokens the loss of one forward call is computed on: ``(labels != -100).sum()`` (kept on the device), or
    None without integer ``labels``. For a causal LM whose first label is not masked this counts one token per
    sequence more than the shifted loss uses."""
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.ndim >= 1:
        return labels.detach().ne(-100).sum()
    return None


def _grad_view(ref: MatrixRef, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if ref.lora:
        grads = [t.grad for t in tensors.values() if t.grad is not None]
        return torch.cat([g.reshape(-1) for g in grads]) if grads else None
    grad = tensors["weight"].grad
    return None if grad is None else ref.matrix(grad)


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _accumulate_loss(store: dict[str, Any], loss: Any, *, share_of_step: bool = False) -> None:
    value = loss.detach().float().reshape(()) if isinstance(loss, torch.Tensor) else float(loss)
    store["loss_sum"] = store.get("loss_sum", 0.0) + value
    store["loss_count"] = store.get("loss_count", 0) + 1
    store["loss_share_of_step"] = store.get("loss_share_of_step", True) and share_of_step


def _mean_loss(store: dict[str, Any]) -> Any:
    if not store.get("loss_count"):
        return None
    if store.get("loss_share_of_step"):  # each micro-batch loss is already normalized over the whole step
        return store["loss_sum"]
    return store["loss_sum"] / store["loss_count"]


def _coverage_row(entry: Any) -> dict[str, Any]:
    return {"parameter": entry.parameter, "shape": "x".join(map(str, entry.shape)), "recorded": entry.recorded,
            "reason": entry.reason}


def _jsonable(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None))) or (
        isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, str, bool)) for v in value))
