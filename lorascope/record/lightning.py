"""Lightning integration: a callback that finds the module and optimizer, counts each batch, reads gradients
where Lightning exposes them, and opens / closes the core recorder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorascope.errors import InvalidOptionError
from lorascope.record.batches import count_batch, count_loss_tokens, dataset_config
from lorascope.record.core import Recorder
from lorascope.record.distributed import will_write
from lorascope.record.options import RecordOptions
from lorascope.record.trackers import Sink
from lorascope.store import schema as S
from lorascope.store.writer import check_writable

if TYPE_CHECKING:
    from lorascope.record.live_metrics import LiveMetrics

try:  # lightning is an optional extra
    from lightning.pytorch.callbacks import Callback as _Base
except ImportError:  # pragma: no cover - exercised only without the lightning extra
    _Base = object  # type: ignore[assignment,misc]


class LorascopeLightningCallback(_Base):  # type: ignore[misc,valid-type]
    """Records a Lightning ``Trainer`` run; added by :func:`lorascope.record`.

    Lightning runs ``training_step`` and ``backward`` inside ``optimizer.step(closure)``, after the optimizer's
    pre-hooks, so gradients are read in ``on_before_optimizer_step`` instead: accumulated over
    ``accumulate_grad_batches``, unscaled, not yet clipped. The loss comes from ``on_before_backward``
    (Lightning divides it by the accumulation count; it is multiplied back).
    """

    def __init__(self, path: str | os.PathLike[str], options: RecordOptions, *,
                 tracker: Sink | bool | None = None, constant: Any = None) -> None:
        # Checked now where the file will be written: on rank 0 (another node may not even have the folder).
        self.path = check_writable(path, overwrite=options.overwrite) if will_write(options.distributed) else Path(path)
        self.options = options
        self.recorder: Recorder | None = None
        self._tracker = tracker  # the live metrics' sink; None: the Trainer's loggers; False: nowhere
        self._live: LiveMetrics | None = None
        self._constant = constant  # the live capacity share's bits per LoRA parameter (None: the default)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        import lightning

        if self.recorder is not None:
            return
        # Every rank builds a recorder (they all join its collectives); rank 0 alone writes the file.
        if len(trainer.optimizers) != 1:
            raise InvalidOptionError(f"lorascope records one optimizer; this Trainer has {len(trainer.optimizers)}. "
                                     "Record a LightningModule whose configure_optimizers returns one optimizer.")
        total = trainer.estimated_stepping_batches
        recorder = Recorder(
            pl_module,
            self.path,
            optimizer=trainer.optimizers[0],
            options=self.options,
            framework="lightning",
            framework_version=lightning.__version__,
            grad_timing="on_before_optimizer_step: accumulated, unscaled, before clipping",
            gradients_from_optimizer=False,
            count_batches=False,
            config={"trainer": {
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "gradient_clip_val": trainer.gradient_clip_val,
                "precision": str(trainer.precision),
                "max_steps": trainer.max_steps,
                "max_epochs": trainer.max_epochs,
            }, **dataset_config(trainer.train_dataloader)},
        )
        sink, where = self._tracker, "the tracker"
        if sink is None and trainer.loggers:
            sink, where = _loggers_sink(list(trainer.loggers)), "the Trainer's loggers"
        if callable(sink):
            from lorascope.record.live_metrics import LiveMetrics

            self._live = LiveMetrics(recorder.refs, sink, where=where, on_step=False, constant=self._constant)
            recorder.publish_live(self._live)
        self.recorder = recorder.start(total_steps=int(total) if total and total != float("inf") else None)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.recorder is not None:
            args, kwargs = _as_call(batch)
            examples, tokens = count_batch(args, kwargs)
            self.recorder.log(examples=examples, tokens=tokens, loss_tokens=count_loss_tokens(kwargs))

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self.recorder is not None:
            self.recorder.log(loss=loss.detach() * trainer.accumulate_grad_batches)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.recorder is not None:
            self.recorder.capture_gradients()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._live is not None:  # on the training thread, after the optimizer step: the loggers are not thread-safe
            self._live.publish()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close(S.STATUS_COMPLETE)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close(S.STATUS_FAILED)

    def _close(self, status: str) -> None:
        if self.recorder is not None:
            self.recorder.close(status)
            self.recorder = None
        if self._live is not None:
            self._live.publish()  # the final snapshot's
            self._live = None


def _loggers_sink(loggers: list[Any]) -> Sink:
    """The live metrics' sink through the Trainer's loggers (TensorBoardLogger, CSVLogger, WandbLogger, ...)."""

    def log(scalars: dict[str, float], step: int) -> None:
        for logger in loggers:
            logger.log_metrics(scalars, step=step)

    return log


def _as_call(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A batch as (args, kwargs) for :func:`count_batch`: dicts are keyword inputs, sequences positional."""
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (list, tuple)):
        return tuple(batch), {}
    return (batch,), {}
