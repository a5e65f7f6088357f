"""The writer thread: the training thread enqueues rows, this thread turns them into host arrays and appends
them to the run file. The training thread only waits when the bounded queue is full.

Step rows are handed over in batches, at most ``flush_seconds / 2`` apart (or before anything else the training
thread queues): one queue hand-off per step woke the writer every step, and its waking took the interpreter lock
from the training thread (about 0.4 ms a step, a third of the per-step hooks: ``benchmarks/step_handoff.py``).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import warnings
from typing import Any

import numpy as np
import torch

from lorascope.errors import RecordingError, RecordingWarning
from lorascope.store import schema as S
from lorascope.store.payloads import Snapshot
from lorascope.store.writer import RunWriter

_CLOSE = "close"
_STEPS = "steps"  # a batch of step rows, in order
_SNAPSHOT = "snapshot"
_MARK = "mark"
_MISSING = "missing"
_STEP_BATCH = 256  # step rows appended per HDF5 write at most
_COUNTS = ("batch_examples", "batch_tokens", "batch_loss_tokens")


def to_host(value: Any) -> Any:
    """A tensor (on any device) as a numpy array; anything else unchanged. Runs on the writer thread, so a
    device-to-host copy here never stalls the training thread."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").numpy()
    return value


def thread_cpu_seconds(thread: threading.Thread | None) -> float:
    """The CPU time of a running ``thread`` so far (Linux: its own CPU clock; NaN where unavailable)."""
    try:
        assert thread is not None and thread.ident is not None
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (AssertionError, AttributeError, OSError):
        return float("nan")


class BackgroundWriter:
    """Owns a :class:`RunWriter` and the thread that feeds it.

    Keeps the running totals ``examples_seen`` / ``tokens_seen`` (a step of unknown size makes every later
    total unknown, -1, rather than silently undercounted).
    """

    def __init__(self, writer: RunWriter, *, queue_size: int, strict: bool, flush_seconds: float = 1.0,
                 examples_seen: int = 0, tokens_seen: int = 0) -> None:
        self.writer = writer
        self.flush_seconds = flush_seconds
        self._last_write = time.monotonic()
        self.strict = strict
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._warned = False
        self.examples_seen = examples_seen
        self.tokens_seen = tokens_seen
        self._pending_steps: list[dict[str, Any]] = []
        self._held_steps: list[dict[str, Any]] = []  # training thread: step rows not yet handed over
        self._last_handoff = time.monotonic()
        # Running totals at the steps of snapshots still being computed by the snapshot worker: a snapshot
        # arrives after later step rows, and must carry the totals of its own step.
        self._marked: dict[int, tuple[int, int]] = {}

    # -- training thread -------------------------------------------------------------------------------
    def start(self, resume_after: int | None = None) -> None:
        """Open the file (or continue it after optimizer step ``resume_after``) and start the thread."""
        if resume_after is None:
            self.writer.open()
        else:
            self.examples_seen, self.tokens_seen = self.writer.reopen(resume_after)
        self._thread = threading.Thread(target=self._run, name="lorascope-writer", daemon=True)
        self._thread.start()

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def cpu_seconds(self) -> float:
        """CPU time of the writer thread so far (Linux: its own CPU clock; NaN where unavailable)."""
        return thread_cpu_seconds(self._thread)

    def put_step(self, row: dict[str, Any]) -> bool:
        """Queue a step row (training thread): held with the rows before it until half the flush interval has
        passed since the last hand-off, or until the training thread queues something else."""
        if not self.check():
            return False
        self._held_steps.append(row)
        due = time.monotonic() - self._last_handoff >= self.flush_seconds / 2
        return self.hand_over_steps() if due or len(self._held_steps) >= _STEP_BATCH else True

    def hand_over_steps(self) -> bool:
        """Queue the held step rows now (training thread)."""
        self._last_handoff = time.monotonic()
        if not self._held_steps:
            return True
        rows, self._held_steps = self._held_steps, []
        return self._put(_STEPS, rows)

    def put_snapshot(self, snapshot: Snapshot) -> bool:
        return self.hand_over_steps() and self._put(_SNAPSHOT, snapshot)

    def mark_snapshot(self, step: int) -> bool:
        """The snapshot of ``step`` (the last step queued) will arrive later, from the snapshot worker."""
        return self.hand_over_steps() and self._put(_MARK, step)

    def deliver_snapshot(self, snapshot: Snapshot) -> bool:
        """Queue a snapshot from another thread (the snapshot worker): never raises nor warns; False when the
        writer has failed (the training thread says so at its next row)."""
        return self._put_quietly(_SNAPSHOT, snapshot)

    def put_missing(self, step: int, reason: str) -> bool:
        """Queue a row of ``snapshots_missing`` (from any thread, quietly as :meth:`deliver_snapshot`)."""
        return self._put_quietly(_MISSING, (step, reason))

    def close(self, status: str | None = S.STATUS_COMPLETE, *, config: dict[str, Any] | None = None) -> None:
        """Drain the queue, close the file with ``status`` (None: leave it incomplete) and stop the thread;
        ``config``: sections to add to the config group (stamped with the status)."""
        if self._thread is None:
            return
        if self._thread.is_alive():
            self.hand_over_steps()
            self._queue.put((_CLOSE, (status, config)))
            self._thread.join()
        self._thread = None
        self.check()

    def check(self) -> bool:
        """Surface a writer failure in the training thread: raise when strict, else warn once."""
        if self.error is None:
            return True
        if self.strict:
            raise RecordingError(f"{self.writer.path}: recording failed: {self.error}") from self.error
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"lorascope stopped recording to {self.writer.path} after a write error ({self.error}); training "
                "continues and the file keeps every row written before the error. Pass strict=True to raise instead.",
                RecordingWarning,
                stacklevel=3,
            )
        return False

    def _put(self, kind: str, payload: Any) -> bool:
        if not self.check():
            return False
        return self._put_quietly(kind, payload) or self.check()

    def _put_quietly(self, kind: str, payload: Any) -> bool:
        if self.error is not None:
            return False
        while True:
            try:
                self._queue.put((kind, payload), timeout=0.5)
                return True
            except queue.Full:
                # A full queue means the writer is slow (expected backpressure) or dead (then stop waiting).
                if self._thread is None or not self._thread.is_alive():
                    return self.error is None

    # -- writer thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        status: str | None = S.STATUS_FAILED
        config = None
        try:
            while True:
                # Step rows are appended in batches, at most flush_seconds apart: one HDF5 append and flush per
                # step cost the training loop several percent on two cores.
                wait = None
                if self._pending_steps:
                    wait = max(0.0, self.flush_seconds - (time.monotonic() - self._last_write))
                try:
                    kind, payload = self._queue.get(timeout=wait)
                except queue.Empty:
                    self._write_steps()
                    continue
                if kind == _CLOSE:
                    status, config = payload
                    self._write_steps()
                    break
                if kind == _STEPS:
                    self._pending_steps.extend(self._host_step(row) for row in payload)
                    due = time.monotonic() - self._last_write >= self.flush_seconds
                    if len(self._pending_steps) >= _STEP_BATCH or due:
                        self._write_steps()
                elif kind == _MARK:
                    self._write_steps()  # as a snapshot does: the step rows reach the file at snapshot steps
                    self._marked[payload] = (self.examples_seen, self.tokens_seen)
                elif kind == _MISSING:
                    self._write_steps()
                    self.writer.append_missing(*payload)
                else:
                    self._write_steps()
                    self._write_snapshot(payload)
        except BaseException as exc:  # noqa: BLE001 - recorded and surfaced in the training thread
            self.error = exc
            self._drain()
            try:
                self.writer.close(S.STATUS_FAILED)
            except BaseException:  # noqa: BLE001 - the file keeps what was flushed
                self.writer.abandon()
            return
        self.writer.close(status, config=config)

    def _drain(self) -> None:
        """Discard what is queued so a blocked training thread can go on."""
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _host_step(self, row: dict[str, Any]) -> dict[str, Any]:
        host = {key: to_host(value) for key, value in row.items()}
        for key in _COUNTS:  # summed over ranks in float64 (torch.distributed): NaN means unknown
            value = host.get(key)
            if isinstance(value, (np.ndarray, np.floating)) and np.issubdtype(value.dtype, np.floating):
                host[key] = int(value) if np.isfinite(value) else None
        self.examples_seen = _advance(self.examples_seen, host.get("batch_examples"))
        self.tokens_seen = _advance(self.tokens_seen, host.get("batch_tokens"))
        host["examples_seen"] = self.examples_seen
        host["tokens_seen"] = self.tokens_seen
        return host

    def _write_steps(self) -> None:
        self._last_write = time.monotonic()
        if not self._pending_steps:
            return
        rows, self._pending_steps = self._pending_steps, []
        columns: dict[str, Any] = {}
        for column in S.STEP_COLUMNS:
            values = [row.get(column.name) for row in rows]
            known = [np.asarray(v, dtype=column.numpy_dtype) for v in values if v is not None]
            if not known:
                continue  # the writer fills the whole column with "unknown"
            blank = np.full(known[0].shape, column.fill, dtype=column.numpy_dtype)
            columns[column.name] = np.stack([blank if v is None else np.asarray(v, dtype=column.numpy_dtype)
                                             for v in values])
        self.writer.append_steps(columns)

    def _write_snapshot(self, snapshot: Snapshot) -> None:
        # The recorder's arrays are on the host already, except the gradient spectra (CPU tensors).
        grad_sv = None if snapshot.grad_sv is None else [to_host(s) for s in snapshot.grad_sv]
        examples, tokens = self._marked.pop(snapshot.step, (self.examples_seen, self.tokens_seen))
        self.writer.append_snapshot(dataclasses.replace(snapshot, grad_sv=grad_sv, examples_seen=examples,
                                                        tokens_seen=tokens))


def _advance(total: int, batch: Any) -> int:
    if total < 0 or batch is None:
        return -1
    batch = int(np.asarray(batch))
    return -1 if batch < 0 else total + batch

