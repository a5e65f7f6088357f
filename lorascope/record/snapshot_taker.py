"""How the recorder takes a snapshot: where (the worker thread, or the training thread), whether (the time
budget, the backlog policy), and what it cost.

The recorder is composed with one :class:`SnapshotTaker`; it calls :meth:`SnapshotTaker.take` at every scheduled
step and reads :meth:`SnapshotTaker.cost_section` when it closes the file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lorascope.model.taxonomy import MatrixRef
from lorascope.record.background import BackgroundWriter
from lorascope.record.contributions import HeldLoss, with_held_losses
from lorascope.record.device_spectra import device_gram_flops_per_second, spectra_devices
from lorascope.record.options import RecordOptions
from lorascope.record.schedule import within_budget
from lorascope.record.snapshot import take_snapshot
from lorascope.record.snapshot_worker import (
    SnapshotWorker,
    capture,
    gradient_copies,
    gram_flops_per_second,
    host_copy_bytes,
    snapshot_flops,
)
from lorascope.record.subspace import InitialBasis, gradient_spectra
from lorascope.store.payloads import Snapshot

_MIB = 1 << 20


@dataclass
class RecordingCost:
    """What recording has cost the training loop so far (seconds), and what the snapshots became."""

    budget: float | None
    started: float
    step_seconds: float = 0.0  # training thread in the per-step hooks, snapshots excluded
    snapshot_seconds: float = 0.0  # training thread at snapshot steps: copies, waits, spectra taken in place
    taken: int = 0
    thinned: int = 0
    skipped: int = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass
class GradientCapture:
    """``grad_sv``'s input to the next snapshot, read before the optimizer step: host copies of the gradients for
    the worker, or their spectra (and vectors) computed on the training thread when no worker runs."""

    copies: list[torch.Tensor | None] | None = None
    nbytes: int = 0
    spectra: list[Any] | None = None
    factors: dict[int, tuple[np.ndarray, np.ndarray]] | None = None

    def measured(self, k: int) -> tuple[list[Any] | None, dict[int, tuple[np.ndarray, np.ndarray]] | None]:
        """(spectra, vectors), computed here from the copies when there are copies (the worker stopped)."""
        if self.copies is not None:
            return gradient_spectra(self.copies, k)
        return self.spectra, self.factors


@dataclass(frozen=True)
class WriterCalls:
    """What the taker may ask of the writer thread (the recorder's :class:`BackgroundWriter`)."""

    put_snapshot: Callable[[Snapshot], Any]  # training thread
    deliver: Callable[[Snapshot], Any]  # worker thread
    missing: Callable[[int, str], Any]  # any thread
    mark: Callable[[int], Any]  # training thread: remember the totals of this step for a later snapshot
    cpu_seconds: Callable[[], float] = lambda: 0.0  # the writer thread's CPU time so far (NaN: unknown)

    @classmethod
    def of(cls, writer: BackgroundWriter, put_snapshot: Callable[[Snapshot], Any]) -> WriterCalls:
        """The calls of a recorder's writer thread; ``put_snapshot``: the recorder's own (it stops recording when
        the writer has failed)."""
        return cls(put_snapshot=put_snapshot, deliver=writer.deliver_snapshot, missing=writer.put_missing,
                   mark=writer.mark_snapshot, cpu_seconds=lambda: writer.cpu_seconds)


def uses_worker(options: RecordOptions, refs: Sequence[MatrixRef]) -> bool:
    """Whether snapshots go to the worker (``snapshot_worker``; singular vectors and intruder dimensions too)."""
    return options.snapshot_worker


class SnapshotTaker:
    """Takes the snapshots of one recording.

    Parameters
    ----------
    refs, tensors
        The recorded matrices and their trainable tensors.
    options
        The recorder's options (``snapshot_worker``, ``snapshot_threads``, ``snapshot_buffer_mib``,
        ``snapshot_backlog``, ``time_budget``, ...).
    """

    def __init__(self, refs: Sequence[MatrixRef], tensors: Sequence[dict[str, torch.Tensor]],
                 options: RecordOptions) -> None:
        self.refs, self.options = tuple(refs), options
        self._thinnable = False
        self._may_skip = False
        self._nbytes = host_copy_bytes(self.refs, tensors, options.w0_device == "device")
        self._devices = spectra_devices(tensors, options.spectra_device)
        self._use_worker = uses_worker(options, self.refs)
        self.worker: SnapshotWorker | None = None
        self.bases: list[InitialBasis | None] | None = None
        self._calls: WriterCalls | None = None
        self._estimate: float | None = None
        self.cost = RecordingCost(options.time_budget, time.monotonic())

    @property
    def uses_worker(self) -> bool:
        return self._use_worker

    def capture_gradients(self, grads: Sequence[torch.Tensor | None]) -> GradientCapture:
        """``grad_sv``'s input for the snapshot after this optimizer step (training thread, before the step): host
        copies when the worker computes the spectra, else the spectra themselves."""
        worker = self.worker
        if worker is not None and worker.alive:
            copies, nbytes = gradient_copies(grads, worker.buffers)
            return GradientCapture(copies=copies, nbytes=nbytes)
        spectra, factors = gradient_spectra(grads, self.options.factors_k)
        return GradientCapture(spectra=spectra, factors=factors)

    def start(self, calls: WriterCalls, *, thinnable: bool, may_skip: bool,
              bases: Sequence[InitialBasis | None] | None = None) -> None:
        """Start the worker (when used) and the clock. ``thinnable``: the schedule may be thinned by the time
        budget (the log-spaced one, in a single process); ``may_skip``: ``snapshot_backlog="skip"`` may skip;
        ``bases``: the starting weights' vectors of ``intruder_k``, one per matrix."""
        self._calls = calls
        self.bases = None if bases is None else list(bases)
        self._thinnable = thinnable and self.options.time_budget is not None
        self._may_skip = may_skip and self.options.snapshot_backlog == "skip"
        self.cost = RecordingCost(self.options.time_budget, time.monotonic())
        if self._use_worker:
            mib = self.options.snapshot_buffer_mib
            buffer = self._nbytes if mib is None else int(mib * _MIB)
            self.worker = SnapshotWorker(self.refs, deliver=calls.deliver, missing=calls.missing,
                                         buffer_bytes=buffer, threads=self.options.snapshot_threads,
                                         store_delta=self.options.store_delta, top_k=self.options.top_k,
                                         top_k_min_size=self.options.top_k_min_size,
                                         factors_k=self.options.factors_k, intruder_k=self.options.intruder_k,
                                         bases=self.bases, devices=self._devices)
            self.worker.start()

    def close(self) -> None:
        """Finish the pending snapshots (the writer must still be open)."""
        if self.worker is not None:
            self.worker.close()

    # -- training thread -------------------------------------------------------------------------------------
    def take(self, model: nn.Module, w0: list[Any], *, step: int, final: bool,
             gradients: GradientCapture | None = None, held: HeldLoss | None = None) -> bool:
        """The snapshot of optimizer step ``step``; False when it was thinned or skipped (its reason is in the
        file's ``snapshots_missing``). The final snapshot is never thinned nor skipped. ``gradients``: what
        :meth:`capture_gradients` read before the step (``grad_sv``)."""
        assert self._calls is not None
        started = time.perf_counter()
        try:
            if not final and self._thinnable and not self._within_budget():
                self.cost.thinned += 1
                self._calls.missing(step, self._thinned_reason())
                return False
            worker = self.worker
            if worker is not None and worker.alive:
                taken = self._to_worker(worker, model, w0, step=step, final=final, gradients=gradients, held=held)
            else:
                grad_sv, grad_factors = (None, None) if gradients is None else gradients.measured(
                    self.options.factors_k)
                snapshot = take_snapshot(self.refs, model, w0, options=self.options, step=step, grad_sv=grad_sv,
                                         grad_factors=grad_factors, bases=self.bases)
                if held is not None:
                    snapshot = with_held_losses(snapshot, held.measure(w0))
                self._calls.put_snapshot(snapshot)
                taken = True
            self.cost.taken += taken
            return taken
        finally:
            self.cost.snapshot_seconds += time.perf_counter() - started

    def _to_worker(self, worker: SnapshotWorker, model: nn.Module, w0: list[Any], *, step: int, final: bool,
                   gradients: GradientCapture | None, held: HeldLoss | None) -> bool:
        assert self._calls is not None
        gradients = gradients or GradientCapture()
        nbytes = self._nbytes + gradients.nbytes
        if not worker.reserve(nbytes, wait=final or not self._may_skip):
            self.cost.skipped += 1
            self._calls.missing(step, f"skipped: the snapshot worker was behind (snapshot_backlog='skip'; "
                                      f"{worker.in_flight} snapshot(s) pending, buffer {worker.buffer_bytes / _MIB:.1f}"
                                      " MiB)")
            return False
        try:
            job = capture(self.refs, model, w0, step=step, nbytes=nbytes, buffers=worker.buffers)
            job.grad_copies, job.grad_sv, job.grad_factors = gradients.copies, gradients.spectra, gradients.factors
            if held is not None:
                job.held = held.measure(w0)  # after the copies: it reverts and restores the weights
            self._calls.mark(step)
        except BaseException:
            worker.release(nbytes)
            raise
        worker.submit(job)
        return True

    def _snapshot_cost(self) -> tuple[float, float]:
        """(seconds spent on snapshots so far, expected seconds of the next one): the training thread's time at
        snapshot steps plus the worker's CPU time, counted in full as if taken from training (true when training
        uses every core; an overestimate when a core is spare). Until the worker has finished a snapshot, its
        share is :meth:`estimated_seconds`."""
        cost, worker = self.cost, self.worker
        worker_seconds = worker_each = 0.0
        pending = 0
        if worker is not None:
            worker_seconds = worker.cost_seconds
            worker_each = worker_seconds / worker.computed if worker.computed else self.estimated_seconds()
            pending = max(0, worker.in_flight)
        elif not cost.taken:
            worker_each = self.estimated_seconds()  # spectra in place: nothing measured yet
        thread_each = cost.snapshot_seconds / cost.taken if cost.taken else 0.0
        spent = cost.snapshot_seconds + worker_seconds + pending * worker_each
        return spent, thread_each + worker_each

    def estimated_seconds(self) -> float:
        """What one snapshot's spectra should cost before any has been measured: their operations counted from the
        matrices' shapes (:func:`~lorascope.record.snapshot_worker.snapshot_flops`) at the kernel's speed measured
        here once (:func:`~lorascope.record.snapshot_worker.gram_flops_per_second`)."""
        if self._estimate is None:
            o = self.options
            flops = snapshot_flops(self.refs, top_k=o.top_k, top_k_min_size=o.top_k_min_size, grad_sv=o.grad_sv,
                                   factors_k=o.factors_k, intruder_k=o.intruder_k)
            on_device = self._worker_devices()
            speed = (device_gram_flops_per_second(on_device[0]) if on_device and len(on_device) == len(self.refs)
                     else gram_flops_per_second(o.snapshot_threads))
            self._estimate = flops / speed if flops else 0.0
        return self._estimate

    def _worker_devices(self) -> list[torch.device]:
        """The CUDA devices of the worker's device route, one per matrix computed there."""
        return [d for d in self._devices if d is not None] if self._use_worker else []

    def _other_seconds(self) -> float:
        """The recording's cost outside snapshots: the per-step hooks and the writer thread."""
        assert self._calls is not None
        writer = self._calls.cpu_seconds()
        return self.cost.step_seconds + (writer if writer == writer else 0.0)

    def _within_budget(self) -> bool:
        spent, expected = self._snapshot_cost()
        assert self.cost.budget is not None
        return within_budget(spent, expected, self.cost.elapsed(), self.cost.budget, self._other_seconds())

    def _thinned_reason(self) -> str:
        spent, expected = self._snapshot_cost()
        return (f"thinned: time_budget={self.cost.budget:g}; snapshots had cost {spent:.3g} s and the per-step "
                f"work {self._other_seconds():.3g} s of {self.cost.elapsed():.3g} s of training, and the next and "
                f"the final snapshot were expected to cost {expected:.3g} s each")

    def cost_section(self, writer_cpu_seconds: float = float("nan")) -> dict[str, Any]:
        """The ``recording_cost`` config section written when the file is closed (``writer_cpu_seconds``: the
        writer thread's CPU time, counted in the share when known)."""
        cost, worker = self.cost, self.worker
        elapsed = cost.elapsed()
        worker_seconds = 0.0 if worker is None else worker.cost_seconds
        close_wait = 0.0 if worker is None else worker.close_wait_seconds
        close_uncounted = 0.0 if worker is None else worker.close_uncounted_seconds
        writer_seconds = writer_cpu_seconds if writer_cpu_seconds == writer_cpu_seconds else 0.0  # NaN: unknown
        total = cost.step_seconds + cost.snapshot_seconds + worker_seconds + close_uncounted + writer_seconds
        return {
            "time_budget": cost.budget,
            "training_seconds": elapsed,
            "step_hooks_seconds": cost.step_seconds,
            "snapshot_training_thread_seconds": cost.snapshot_seconds,
            "snapshot_worker_cpu_seconds": 0.0 if worker is None else worker.cpu_seconds,
            "snapshot_worker_device_seconds": 0.0 if worker is None else worker.device_seconds,
            "spectra_device": sorted({str(d) for d in self._worker_devices()}) or "host",
            "writer_cpu_seconds": None if writer_cpu_seconds != writer_cpu_seconds else writer_cpu_seconds,
            "close_wait_seconds": close_wait,
            "share_of_training": total / elapsed if elapsed > 0 else None,
            "snapshot_worker": worker is not None,
            "snapshots_taken": cost.taken,
            "snapshots_thinned": cost.thinned,
            "snapshots_skipped": cost.skipped,
        }
