"""Hugging Face ``transformers.Trainer`` integration: a callback that only finds model, optimizer, the planned
number of steps and the trainer's arguments, and opens / closes the core recorder."""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorascope.errors import LorascopeError
from lorascope.record.batches import dataset_config
from lorascope.record.core import Recorder
from lorascope.record.distributed import agree, wanted, will_write
from lorascope.record.options import RecordOptions
from lorascope.record.trackers import Sink
from lorascope.record.trl import trl_config
from lorascope.store.writer import check_writable

if TYPE_CHECKING:
    from lorascope.record.live_metrics import LiveMetrics

try:  # transformers is an optional extra; without it this class is never handed out by lorascope.record
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - exercised only without the hf extra
    _Base = object  # type: ignore[assignment,misc]

_TRAINER_ARGS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "num_train_epochs", "max_steps",
    "lr_scheduler_type", "warmup_steps", "optim", "seed", "bf16", "fp16", "world_size",
)


class LorascopeCallback(_Base):  # type: ignore[misc,valid-type]
    """Records a ``transformers.Trainer`` run; added by :func:`lorascope.record`.

    Gradients are read by the optimizer's step pre-hook, which the Trainer reaches after clipping; examples,
    tokens (``attention_mask`` sum) and the per-step loss come from forward hooks on the model, summed over
    the micro-batches of gradient accumulation. The recorder opens at train begin and closes at train end.
    """

    def __init__(self, path: str | os.PathLike[str], options: RecordOptions, *, tracker: Sink | None = None,
                 constant: Any = None) -> None:
        # Checked now where the file will be written: on rank 0 (another node may not even have the folder).
        overwrite = options.overwrite or options.resume
        self.path = check_writable(path, overwrite=overwrite) if will_write(options.distributed) else Path(path)
        self.options = options
        self.recorder: Recorder | None = None
        self._tracker = tracker  # where the live metrics go (trainer_log: the Trainer's own logging), or None
        self._live: LiveMetrics | None = None
        self._constant = constant  # the live capacity share's bits per LoRA parameter (None: the default)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        import transformers

        if self.recorder is not None:
            return
        # Every rank builds a recorder (they all join its collectives); rank 0 alone writes the file.
        clipping = f"after clipping to max_grad_norm={args.max_grad_norm}" if args.max_grad_norm else "no clipping"
        trainer_config = {k: getattr(args, k, None) for k in _TRAINER_ARGS}
        resume_after = self._resume_step(state.global_step, state.is_world_process_zero, self.options.distributed)
        resumable = self.options.resumable
        if resumable is None:
            resumable = str(getattr(args, "save_strategy", "no")) not in ("no", "SaveStrategy.NO")
        options = self.options
        if options.contributions and options.held_batch is None:
            options = options.replace(held_batch=first_batch(kwargs.get("train_dataloader"),
                                                             args.per_device_train_batch_size))
        recorder = Recorder(
            model,
            self.path,
            optimizer=optimizer,
            options=options,
            framework="transformers",
            framework_version=transformers.__version__,
            grad_timing=f"at optimizer.step(), {clipping}",
            # TRL's trainers: the task, and for RL the dataset in episodes (record/trl.py)
            config={"trainer": trainer_config, **dataset_config(kwargs.get("train_dataloader")),
                    **trl_config(args, kwargs.get("train_dataloader"))},
            # With average_tokens_across_devices a model given num_items_in_batch returns its share of the loss
            # of the whole global step: the ranks' losses add up.
            loss_shares_global_step=bool(getattr(args, "average_tokens_across_devices", False)),
        )
        if self._tracker is not None:
            from lorascope.record.live_metrics import LiveMetrics

            where = "the Trainer's logging (report_to)" if isinstance(self._tracker, _TrainerLog) else "the tracker"
            self._live = LiveMetrics(recorder.refs, self._tracker, where=where, on_step=False,
                                     constant=self._constant)
            recorder.publish_live(self._live)
        self.recorder = recorder.start(total_steps=state.max_steps or None, resume_after=resume_after,
                                       resumable=resumable)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # After the optimizer step and the global step's increment: the Trainer's logging reports this step.
        if self._live is not None and self._live.pending:
            should_log = control.should_log  # trainer.log clears it: the Trainer's own log of this step must stay
            self._live.publish()
            control.should_log = should_log

    def _resume_step(self, global_step: int, writer: bool, distributed: bool | None) -> int | None:
        """The step to continue the run file after, or None for a fresh file (see ``RecordOptions.resume``).

        Only the process that writes (rank 0) looks for the file; under torch.distributed every rank raises
        its error."""
        if not self.options.resume:
            return None
        if global_step == 0:
            raise LorascopeError(f"{self.path}: resume=True but the Trainer starts at step 0, not from a "
                                 "checkpoint; pass overwrite=True instead to replace the recording")
        error = None
        if writer and not self.path.is_file():
            error = LorascopeError(f"{self.path}: resume=True but there is no run file to continue")
        if wanted(distributed):
            agree(error)
        elif error is not None:
            raise error
        return int(global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        if self._live is not None:
            self._live.publish()  # the final snapshot's
            self._live = None


class _TrainerLog:
    """The live metrics' sink through the Trainer's logging (so ``report_to`` decides where they go), the Trainer
    held weakly. The Trainer logs them at its current global step and prefixes them as it does its own (``train/``
    under TensorBoard and W&B); ``lorascope/step`` is the optimizer step of the snapshot they come from."""

    def __init__(self, trainer: Any) -> None:
        self._owner = weakref.ref(trainer)

    def __call__(self, scalars: dict[str, float], step: int) -> None:
        import transformers

        trainer = self._owner()
        if trainer is not None:
            # transformers.Trainer's own log, not a subclass's: TRL's trainers merge (and then clear) the metrics
            # they accumulate between their logging steps into every log call, which ours must leave alone.
            transformers.Trainer.log(trainer, {**scalars, "lorascope/step": step})


def trainer_log(trainer: Any) -> Sink:
    """The sink of the live metrics through ``trainer``'s own logging (see :class:`_TrainerLog`)."""
    return _TrainerLog(trainer)


def trainer_loss(trainer: Any) -> Callable[[Any, Any], Any]:
    """``trainer.compute_loss(model, batch)``, the Trainer held weakly (the options never keep a Trainer alive)."""
    owner = weakref.ref(trainer)

    def compute_loss(model: Any, batch: Any) -> Any:
        live = owner()
        if live is None:
            raise RuntimeError("the transformers.Trainer whose compute_loss measures the held batch is gone")
        return live.compute_loss(model, batch)

    compute_loss.__qualname__ = f"{type(trainer).__name__}.compute_loss"
    return compute_loss


def first_batch(dataloader: Any, batch_size: int) -> Any:
    """The held batch of ``contributions=True``: the training dataset's first ``batch_size`` examples, collated
    by the Trainer's collator. Read from the dataset, not by iterating the data loader, so that neither its
    sampler's nor the global random stream moves (the training order stays what it would have been)."""
    if dataloader is None:
        raise LorascopeError("contributions=True: the Trainer gave no train_dataloader at train begin; pass "
                             "held_batch= to lorascope.record")
    dataset = dataloader.dataset
    with torch.random.fork_rng(devices=[]):
        if isinstance(dataset, torch.utils.data.IterableDataset):
            examples = list(itertools.islice(iter(dataset), batch_size))
        else:
            examples = [dataset[i] for i in range(min(batch_size, len(dataset)))]
        return dataloader.collate_fn(examples)

