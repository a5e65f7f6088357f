"""Where the live metrics go in a plain loop: the user's own tracker, recognised once, at ``record()``.

A tracker is a TensorBoard ``SummaryWriter`` (``torch.utils.tensorboard`` or ``tensorboardX``: anything with
``add_scalar``), a Weights & Biases run (or the ``wandb`` module, for its current run), an MLflow run (or the
``mlflow`` module, for its active run), or any callable ``f(scalars: dict[str, float], step: int)``. Each is
turned into one :data:`Sink`, a function of (scalars, step). Nothing here imports the trackers' packages: they
are recognised by the module their class (or they) come from. Writing happens on the training thread
(:class:`lorascope.record.live_metrics.LiveMetrics` calls the sink there); a tracker that raises is reported by
one :class:`~lorascope.errors.RecordingWarning` and is not called again (:class:`GuardedSink`), while training
and recording go on.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any

from lorascope.errors import InvalidOptionError, RecordingWarning

Sink = Callable[[dict[str, float], int], None]

STEP_METRIC = "lorascope/step"  # W&B: the x axis of lorascope's curves (its own step counter stays the user's)


def _origin(obj: Any) -> str:
    """The top-level package ``obj`` (a module, or an instance) comes from: ``"wandb"``, ``"mlflow"``, ..."""
    name = obj.__name__ if isinstance(obj, types.ModuleType) else type(obj).__module__
    return (name or "").split(".")[0]


def tracker_sink(tracker: Any) -> Sink:
    """The :data:`Sink` writing to ``tracker``; raises :class:`InvalidOptionError` for an object it cannot use.

    >>> seen = []
    >>> tracker_sink(lambda scalars, step: seen.append((step, scalars)))({"lorascope/all/signal_rank": 3.0}, 7)
    >>> seen
    [(7, {'lorascope/all/signal_rank': 3.0})]
    """
    origin = _origin(tracker)
    if origin == "wandb" and callable(getattr(tracker, "log", None)):
        return _wandb_sink(tracker)
    if origin == "mlflow":
        if callable(getattr(tracker, "log_metrics", None)):  # the module: its active run
            return lambda scalars, step: tracker.log_metrics(scalars, step=step)
        run_id = getattr(getattr(tracker, "info", None), "run_id", None)
        if isinstance(run_id, str):  # an ActiveRun or a Run
            import mlflow

            def log_to_run(scalars: dict[str, float], step: int) -> None:
                mlflow.log_metrics(scalars, step=step, run_id=run_id)

            return log_to_run
    if callable(getattr(tracker, "add_scalar", None)):  # a TensorBoard SummaryWriter (torch or tensorboardX)
        return _tensorboard_sink(tracker)
    if callable(tracker) and not isinstance(tracker, (type, types.ModuleType)):
        return tracker
    raise InvalidOptionError(
        f"The 'tracker' parameter of lorascope.record must be a TensorBoard SummaryWriter, a wandb run, an mlflow "
        f"run (or the wandb / mlflow module), or a callable taking (scalars: dict, step: int). Got "
        f"{type(tracker).__module__}.{type(tracker).__name__} instead.")


def _tensorboard_sink(writer: Any) -> Sink:
    def publish(scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            writer.add_scalar(name, value, global_step=step)

    return publish


def _wandb_sink(run: Any) -> Sink:
    defined: list[bool] = []

    def publish(scalars: dict[str, float], step: int) -> None:
        if not defined:  # lorascope's curves against the optimizer step, whatever else the run logs
            run.define_metric(STEP_METRIC)
            run.define_metric("lorascope/*", step_metric=STEP_METRIC)
            defined.append(True)
        run.log({**scalars, STEP_METRIC: step})

    return publish


class GuardedSink:
    """A sink that never raises into training: the first failure warns once and turns it off.

    ``where`` names the destination in the warning (``"the tracker"``, ``"the Trainer's logging"``).
    """

    def __init__(self, sink: Sink, where: str) -> None:
        self._sink = sink
        self.where = where
        self.failed = False

    def __call__(self, scalars: dict[str, float], step: int) -> None:
        if self.failed or not scalars:
            return
        try:
            self._sink(scalars, step)
        except Exception as exc:  # noqa: BLE001 - a tracker's failure must not stop training or recording
            self.fail(exc, f"publishing them to {self.where} at step {step}")

    def fail(self, exc: BaseException, doing: str) -> None:
        """Say once why the live metrics stop (``doing``: what failed), and stop them."""
        self.failed = True
        warnings.warn(f"lorascope's live metrics failed {doing}: {type(exc).__name__}: {exc}; they stop, training "
                      "and recording go on.", RecordingWarning, stacklevel=3)
