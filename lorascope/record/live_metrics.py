"""Live metrics: the recorder's own scalars, published while training where the user already logs.

The recorder hands :class:`LiveMetrics` what it takes anyway: each step row (for the noise-scale inputs) and
each finished :class:`~lorascope.store.payloads.Snapshot`. A snapshot may arrive from any thread (a spectrum
computed off the training thread); it is only queued there. The scalars are computed and handed to the sink by
:meth:`LiveMetrics.publish`, which the recorder (plain loop) or the integration (the HF Trainer's
``on_step_end``, Lightning's ``on_train_batch_end``) calls on the training thread, since neither the Trainer's
logging nor Lightning's loggers are thread-safe.

This is the one module of ``record/`` that imports from ``analysis/`` (docs/design.md): the published numbers
are analyze's own (:mod:`lorascope.analysis.live`), not a second implementation of them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from lorascope.analysis.live import NoiseScaleEMA, group_norms, live_ranks, noise_scale_scalars, snapshot_scalars
from lorascope.model.taxonomy import MatrixRef
from lorascope.record.trackers import GuardedSink, Sink
from lorascope.store.payloads import Snapshot

HOST_BATCH = 256  # steps of noise-scale inputs kept on the device before one transfer to the host


class _NoiseInputs(NamedTuple):
    """One step's noise-scale inputs (the squared norms still on the training device)."""

    step: int
    b_small: float
    b_big: float
    batch: float | None  # the step's examples
    small: Any
    big: Any


class LiveMetrics:
    """Queue of what the recorder saw since the last publication, turned into scalars on :meth:`publish`.

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
    """

    def __init__(self, refs: Sequence[MatrixRef], sink: Sink, *, where: str = "the tracker",
                 on_step: bool = True) -> None:
        self._kinds = [ref.kind for ref in refs]
        self._shapes = ([ref.out_features for ref in refs], [ref.in_features for ref in refs])
        self._ranks = live_ranks(*self._shapes)
        self.sink = GuardedSink(sink, where)
        self.on_step_publishes = on_step
        self._lock = threading.Lock()
        self._ready: list[tuple[int, dict[str, float]]] = []  # (snapshot step, its scalars), in step order
        self._error: BaseException | None = None  # a failure computing them on the writer thread
        self._on_device: list[_NoiseInputs] = []
        self._on_host: list[tuple[int, float, float, float | None, dict[str, tuple[float, float]]]] = []
        self._ema = NoiseScaleEMA()
        self._batch: float | None = None

    # -- what the recorder hands over ------------------------------------------------------------------------
    def on_step(self, row: dict[str, Any]) -> None:
        """A step row (training thread): keep its noise-scale inputs, on the device (moved to the host in
        batches of :data:`HOST_BATCH` steps, or at publication)."""
        small, big = row.get("gns_sq_norm_small"), row.get("gns_sq_norm_big")
        if small is None or big is None or self.sink.failed:
            return
        batch = row.get("batch_examples")
        self._on_device.append(_NoiseInputs(
            int(row["step"]), float(row["gns_batch_small"]), float(row["gns_batch_big"]),
            float(batch) if isinstance(batch, (int, float)) and batch > 0 else None, small, big))
        if len(self._on_device) >= HOST_BATCH:
            self._to_host()

    def on_snapshot(self, snapshot: Snapshot) -> None:
        """A written snapshot (the writer thread): its scalars are computed here, off the training thread, and
        queued for the next :meth:`publish`. A failure is kept and reported there; the writer goes on."""
        if self._error is not None or self.sink.failed:
            return
        try:
            scalars = snapshot_scalars(snapshot.energy, snapshot.sv, *self._shapes, self._kinds,
                                       delta_nonfinite=snapshot.delta_nonfinite, ranks=self._ranks)
        except Exception as exc:  # noqa: BLE001 - never into the writer thread
            self._error = exc
            return
        with self._lock:
            self._ready.append((int(snapshot.step), scalars))

    def tap(self, writer: Any) -> _TappedWriter:
        """``writer`` (the run file's :class:`~lorascope.store.writer.RunWriter`), telling this object of every
        snapshot it appends: the one place every snapshot passes, on the writer thread."""
        return _TappedWriter(writer, self.on_snapshot)

    @property
    def pending(self) -> bool:
        with self._lock:
            return bool(self._ready) or self._error is not None

    # -- publication (training thread) ---------------------------------------------------------------------
    def publish(self) -> None:
        """Hand the scalars of every snapshot written since the last call to the sink, oldest first, each with
        the noise scale as of its step."""
        with self._lock:
            ready, self._ready = self._ready, []
        if self._error is not None and not self.sink.failed:
            error, self._error = self._error, None
            self.sink.fail(error, "computing them")
        if self.sink.failed:
            return
        for step, scalars in ready:
            self.sink({**scalars, **self._noise_scale(until=step)}, step)

    def _to_host(self) -> None:
        """Move the kept noise-scale inputs to the host, summed per group (one transfer)."""
        inputs, self._on_device = self._on_device, []
        if not inputs:
            return
        small = torch.stack([torch.as_tensor(e.small, dtype=torch.float64) for e in inputs]).cpu().numpy()
        big = torch.stack([torch.as_tensor(e.big, dtype=torch.float64) for e in inputs]).cpu().numpy()
        self._on_host.extend((e.step, e.b_small, e.b_big, e.batch, group_norms(small[t], big[t], self._kinds))
                             for t, e in enumerate(inputs))

    def _noise_scale(self, until: int) -> dict[str, float]:
        """Fold the steps up to ``until`` into the noise-scale EMAs; the scalars as of then."""
        self._to_host()
        done = [entry for entry in self._on_host if entry[0] <= until]
        self._on_host = self._on_host[len(done):]
        for _, b_small, b_big, batch, norms in done:
            self._ema = self._ema.update(norms, b_small, b_big)
            self._batch = batch
        return noise_scale_scalars(self._ema, self._batch)


class _TappedWriter:
    """A :class:`~lorascope.store.writer.RunWriter` that, after appending a snapshot, hands it to ``on_snapshot``."""

    def __init__(self, writer: Any, on_snapshot: Any) -> None:
        self._writer = writer
        self._on_snapshot = on_snapshot

    def append_snapshot(self, snapshot: Snapshot) -> None:
        self._writer.append_snapshot(snapshot)
        self._on_snapshot(snapshot)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)
