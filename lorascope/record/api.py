"""``lorascope.record``: one call that attaches the recorder to whatever drives training."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from lorascope.errors import InvalidOptionError
from lorascope.model.taxonomy import classify
from lorascope.record.core import Recorder
from lorascope.record.options import RecordOptions, make_options
from lorascope.record.trackers import tracker_sink


def _is_instance_of(obj: Any, module_prefixes: tuple[str, ...], class_name: str) -> bool:
    # Duck-typed by class path so that neither transformers nor lightning is imported unless in use.
    return any(cls.__name__ == class_name and cls.__module__.startswith(module_prefixes) for cls in type(obj).__mro__)


def _check_selection(model: nn.Module, options: RecordOptions) -> None:
    """Fail at record() time, before training, when the selection is empty or invalid."""
    taxonomy = classify(model, kind_map=options.kind_map)
    if options.kinds is not None or options.modules is not None:
        taxonomy.select(kinds=options.kinds, regex=options.modules)


def record(target: Any, path: str | os.PathLike[str], *, optimizer: Any = None, tracker: Any = None,
           calibration: Any = None, options: RecordOptions | None = None, **overrides: Any) -> Any:
    """Record what training does to each weight matrix into the run file ``path``.

    Parameters
    ----------
    target
        A ``transformers.Trainer`` (a callback is added; recording runs from train begin to train end),
        a Lightning ``Trainer`` (likewise), or an ``nn.Module`` trained in a plain loop (pass ``optimizer=``;
        returns a started :class:`Recorder`, best used as a context manager).
    path
        The run file to create. Checked now: an existing file needs ``overwrite=True``.
    optimizer
        The optimizer of a plain loop.
    tracker
        Where the live metrics go (docs/recording.md, "Live metrics in your tracker"): a TensorBoard
        ``SummaryWriter``, a wandb run, an mlflow run (or the ``wandb`` / ``mlflow`` module), or a callable
        ``f(scalars, step)``. ``None`` (default): a Trainer's own logging (``report_to`` / its loggers), nowhere
        in a plain loop; ``False``: nowhere.
    calibration
        The live capacity share's bits per LoRA parameter: a calibration of this architecture
        (:func:`lorascope.load_calibration`) or a ``CapacityConstant``; default: lorascope's constant.
    options
        A reusable :class:`RecordOptions`; keyword arguments override its fields.
    **overrides
        Any field of :class:`RecordOptions` (``kinds``, ``modules``, ``snapshots``, ``top_k``, ...).

    Returns
    -------
    Recorder or callback
        The object recording the run; the callback's ``recorder`` attribute holds the core recorder once
        training started.

    Raises
    ------
    InvalidOptionError
        An unsupported target, a missing optimizer, a tracker it cannot write to, or an option out of range.
    RunFileExistsError, LorascopeError
        The path exists without ``overwrite=True``, or cannot be written.
    SelectionError
        ``kinds`` / ``modules`` select no matrix (the message lists what the model has).

    Notes
    -----
    Under ``torch.distributed`` with several processes (DDP, FSDP2, a Trainer launched by torchrun) call this on
    every rank: rank 0 writes one file for the whole run and every rank joins the recorder's collectives
    (docs/distributed.md).
    """
    opts = make_options(options, overrides)
    sink = None if tracker is None or tracker is False else tracker_sink(tracker)
    constant = None
    if calibration is not None:
        from lorascope.record.live_metrics import capacity_constant

        constant = capacity_constant(calibration)
    if _is_instance_of(target, ("transformers.",), "Trainer"):
        from lorascope.record.hf import LorascopeCallback

        _check_selection(target.model, opts)
        if opts.contributions and opts.loss_fn is None:
            from lorascope.record.hf import trainer_loss

            opts = opts.replace(loss_fn=trainer_loss(target))
        from lorascope.record.hf import trainer_log

        callback = LorascopeCallback(path, opts, tracker=None if tracker is False else sink or trainer_log(target),
                                     constant=constant)
        # First in line: at train end the recorder closes and publishes its last live metrics before the reporting
        # callbacks close their writers (TensorBoard) or end their runs (MLflow).
        target.callback_handler.callbacks.insert(0, callback)
        return callback
    if _is_instance_of(target, ("lightning.", "pytorch_lightning."), "Trainer"):
        from lorascope.record.lightning import LorascopeLightningCallback

        lightning_callback = LorascopeLightningCallback(path, opts, tracker=False if tracker is False else sink,
                                                        constant=constant)
        target.callbacks.append(lightning_callback)
        return lightning_callback
    if isinstance(target, nn.Module):
        if optimizer is None:
            raise InvalidOptionError(
                f"recording a plain {type(target).__name__} needs its optimizer: "
                "lorascope.record(model, path, optimizer=optimizer)"
            )
        recorder = Recorder(target, path, optimizer=optimizer, options=opts)
        if sink is not None:
            from lorascope.record.live_metrics import LiveMetrics

            recorder.publish_live(LiveMetrics(recorder.refs, sink, constant=constant))
        return recorder.start()
    raise InvalidOptionError(
        f"lorascope.record cannot record a {type(target).__module__}.{type(target).__name__}; expected a "
        "transformers.Trainer, a lightning.pytorch.Trainer, or a torch.nn.Module with optimizer="
    )
