"""Live metrics: the recorder's own scalars, published while training where the user already logs.

Everything the scalars come from passes through the run file's writer, on the writer thread: each batch of
step rows (the noise-scale inputs, the losses and counts the capacity share reads) and each finished
:class:`~lorascope.store.payloads.Snapshot`. :meth:`LiveMetrics.tap` wraps the
:class:`~lorascope.store.writer.RunWriter` to see them there, so a single-process run and rank 0 of a
torch.distributed run (whose rows are the global batch's, docs/distributed.md) publish the same scalars, once,
and they are computed from the values the file stores. At each snapshot the scalars are computed there and queued;
:meth:`LiveMetrics.publish` hands them to the sink on the training thread, where the recorder (plain loop) or the
integration (the HF Trainer's ``on_step_end``, Lightning's ``on_train_batch_end``) calls it, since neither the
Trainer's logging nor Lightning's loggers are thread-safe.

This is the one module of ``record/`` that imports from ``analysis/`` (docs/design.md): the published numbers
are analyze's own (:mod:`lorascope.analysis.live`), not a second implementation of them.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from lorascope.analysis.live import (
    CapacityConstant,
    CapacityInputs,
    NoiseScaleEMA,
    capacity_constant,
    capacity_inputs,
    capacity_scalars,
    group_norms,
    live_ranks,
    noise_scale_scalars,
    snapshot_scalars,
)
from lorascope.model.taxonomy import MatrixRef
from lorascope.record.trackers import GuardedSink, Sink
from lorascope.store.payloads import Snapshot

__all__ = ["CAPACITY_COLUMNS", "LiveMetrics", "capacity_constant"]

CAPACITY_COLUMNS = ("loss", "lr", "batch_examples", "batch_tokens", "batch_loss_tokens", "examples_seen")
"""The step columns the capacity share reads (kept on the host, one float64 each per step)."""


class LiveMetrics:
    """Scalars of each snapshot the run file's writer appends, queued for :meth:`publish`.

    Parameters
    ----------
    refs
        The recorder's matrices (their kinds and shapes group and size the metrics).
    sink
        Where the scalars go: a function of (scalars, step); guarded, so a failing sink warns once and is off.
    where
        The sink in words, for that warning.
    on_step
        The recorder publishes after each optimizer step (a plain loop's tracker); otherwise the integration
        calls :meth:`publish` from its own hooks.
    constant
        Bits per LoRA parameter of the capacity share (:func:`capacity_constant`; default: lorascope's).
    """

    def __init__(self, refs: Sequence[MatrixRef], sink: Sink, *, where: str = "the tracker",
                 on_step: bool = True, constant: CapacityConstant | None = None) -> None:
        self._kinds = [ref.kind for ref in refs]
        self._shapes = ([ref.out_features for ref in refs], [ref.in_features for ref in refs])
        self._modules: dict[str, list[Any]] = {  # the run file's modules table, as analyze's forecast reads it
            "kind": self._kinds, "out_features": self._shapes[0], "in_features": self._shapes[1],
            "module": [ref.module for ref in refs], "parameter": [ref.parameter for ref in refs],
            "expert": [ref.expert for ref in refs]}
        self._ranks = live_ranks(*self._shapes)
        self._constant = constant or capacity_constant()
        self.sink = GuardedSink(sink, where)
        self.on_step_publishes = on_step
        self._lock = threading.Lock()
        self._ready: list[tuple[int, dict[str, float]]] = []  # (snapshot step, its scalars), in step order
        self._error: BaseException | None = None  # a failure computing them on the writer thread
        # Writer thread only, from here on:
        self._noise_rows: list[tuple[int, float, float, float | None, dict[str, tuple[float, float]]]] = []
        self._ema = NoiseScaleEMA()
        self._batch: float | None = None
        self._capacity: CapacityInputs | str = "no run config seen"
        self._steps: dict[str, list[np.ndarray]] = {name: [] for name in ("step", *CAPACITY_COLUMNS)}

    # -- what the recorder hands over ------------------------------------------------------------------------
    def on_step(self, row: dict[str, Any]) -> None:
        """The recorder's call after each step (training thread): nothing to do, the row is read where it is
        written (:meth:`tap`), already on the host, under torch.distributed as well."""

    def tap(self, writer: Any) -> _TappedWriter:
        """``writer`` (the run file's :class:`~lorascope.store.writer.RunWriter`), telling this object of every
        batch of step rows and every snapshot it appends: the one place they all pass, on the writer thread. The
        capacity share's inputs come from the config the writer stores (the one analyze reads back)."""
        config = getattr(writer, "_config", None)  # RunWriter keeps the run config it writes; no public accessor
        if isinstance(config, Mapping):
            self._capacity = capacity_inputs(config, self._modules, self._constant)
        return _TappedWriter(writer, self)

    def on_steps(self, columns: Mapping[str, Any]) -> None:
        """A batch of step rows as the writer appends them (writer thread): keep the noise-scale inputs of the
        measured steps, summed per group, and the columns the capacity share reads."""
        if self._error is not None or self.sink.failed:
            return
        try:
            self._keep_steps(columns)
        except Exception as exc:  # noqa: BLE001 - never into the writer thread
            self._error = exc

    def on_resume(self) -> None:
        """The file continues a run resumed from a checkpoint: the steps before it are not seen here, so the
        capacity share (which reads the first epoch) is off; the noise-scale averages start again."""
        self._capacity = "a resumed run (the steps before the resume are not seen)"

    def on_snapshot(self, snapshot: Snapshot) -> None:
        """A written snapshot (writer thread): its scalars, the noise scale and the capacity share as of its step,
        computed here, off the training thread, and queued for the next :meth:`publish`. A failure is kept and
        reported there; the writer goes on."""
        if self._error is not None or self.sink.failed:
            return
        try:
            step = int(snapshot.step)
            scalars = snapshot_scalars(snapshot.energy, snapshot.sv, *self._shapes, self._kinds,
                                       delta_nonfinite=snapshot.delta_nonfinite, ranks=self._ranks)
            scalars.update(self._noise_scale(until=step))
            if isinstance(self._capacity, CapacityInputs):
                scalars.update(capacity_scalars(self._steps_until(step), self._capacity, self._ranks))
        except Exception as exc:  # noqa: BLE001 - never into the writer thread
            self._error = exc
            return
        with self._lock:
            self._ready.append((step, scalars))

    @property
    def pending(self) -> bool:
        with self._lock:
            return bool(self._ready) or self._error is not None

    # -- publication (training thread) ---------------------------------------------------------------------
    def publish(self) -> None:
        """Hand the scalars of every snapshot written since the last call to the sink, oldest first."""
        with self._lock:
            ready, self._ready = self._ready, []
        if self._error is not None and not self.sink.failed:
            error, self._error = self._error, None
            self.sink.fail(error, "computing them")
        if self.sink.failed:
            return
        for step, scalars in ready:
            self.sink(scalars, step)

    # -- writer thread -------------------------------------------------------------------------------------
    def _keep_steps(self, columns: Mapping[str, Any]) -> None:
        index = np.asarray(columns["step"], dtype=np.int64).reshape(-1)
        n = index.shape[0]
        if isinstance(self._capacity, CapacityInputs):
            self._steps["step"].append(index)
            for name in CAPACITY_COLUMNS:
                value = columns.get(name)
                self._steps[name].append(np.full(n, np.nan) if value is None
                                         else np.asarray(value, dtype=np.float64).reshape(n))
        small, big = columns.get("gns_sq_norm_small"), columns.get("gns_sq_norm_big")
        b_small, b_big = columns.get("gns_batch_small"), columns.get("gns_batch_big")
        if small is None or big is None or b_small is None or b_big is None:
            return
        small, big = np.asarray(small, dtype=np.float64), np.asarray(big, dtype=np.float64)
        b_small, b_big = np.asarray(b_small, dtype=np.float64), np.asarray(b_big, dtype=np.float64)
        batch = columns.get("batch_examples")
        batch = np.full(n, -1.0) if batch is None else np.asarray(batch, dtype=np.float64)
        # measured as analyze's noise_scale counts a step: finite batch sizes with B_big > B_small
        for t in np.flatnonzero(np.isfinite(b_small) & np.isfinite(b_big) & (b_big > b_small)):
            self._noise_rows.append((int(index[t]), float(b_small[t]), float(b_big[t]),
                                     float(batch[t]) if batch[t] > 0 else None,
                                     group_norms(small[t], big[t], self._kinds)))

    def _noise_scale(self, until: int) -> dict[str, float]:
        """Fold the measured steps up to ``until`` into the noise-scale EMAs; the scalars as of then."""
        done = [row for row in self._noise_rows if row[0] <= until]
        self._noise_rows = self._noise_rows[len(done):]
        for _, b_small, b_big, batch, norms in done:
            self._ema = self._ema.update(norms, b_small, b_big)
            self._batch = batch
        return noise_scale_scalars(self._ema, self._batch)

    def _steps_until(self, until: int) -> xr.Dataset:
        """The kept step columns up to step ``until``, as the run file's steps view names them."""
        columns = {name: np.concatenate(parts) if parts else np.empty(0) for name, parts in self._steps.items()}
        self._steps = {name: [values] for name, values in columns.items()}  # one array each from now on
        keep = columns["step"] <= until
        return xr.Dataset({name: ("step", columns[name][keep]) for name in CAPACITY_COLUMNS},
                          coords={"step": columns["step"][keep]})


class _TappedWriter:
    """A :class:`~lorascope.store.writer.RunWriter` that tells :class:`LiveMetrics` what it appends."""

    def __init__(self, writer: Any, live: LiveMetrics) -> None:
        self._writer = writer
        self._live = live

    def append_steps(self, rows: Mapping[str, Any]) -> None:
        self._writer.append_steps(rows)
        self._live.on_steps(rows)

    def append_snapshot(self, snapshot: Snapshot) -> None:
        self._writer.append_snapshot(snapshot)
        self._live.on_snapshot(snapshot)

    def reopen(self, after_step: int) -> Any:
        self._live.on_resume()
        return self._writer.reopen(after_step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)
