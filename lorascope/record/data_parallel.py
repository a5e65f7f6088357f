"""The recorder's side of a multi-process run: what every rank does at start, after each optimizer step, at
snapshots and at close (mixed into :class:`lorascope.record.core.Recorder`; the collectives themselves are in
:mod:`lorascope.record.distributed`, FSDP2's sharded state in :mod:`lorascope.record.sharded`).

Single-process recording never calls these methods: the recorder binds them only when it found a process group.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from lorascope.errors import RecordingError, RecordingWarning
from lorascope.record import distributed as D
from lorascope.record.gns import local_small_norms
from lorascope.store import schema as S
from lorascope.store.writer import check_writable


class DataParallelSteps:
    """Rank-aware start, step, snapshot and close of the recorder (see docs/distributed.md).

    A mixin of :class:`~lorascope.record.core.Recorder`, whose ``__init__`` sets every attribute used here:
    ``distributed`` (the process group), ``_sharded`` (FSDP2 state), ``_exchange`` (the per-step all-reduce),
    ``_reduced`` (DDP's reduced-gradient norms), ``_collectives`` (this rank still joins the exchange).
    """

    def _agree_on_path(self, path: str | os.PathLike[str]) -> Path:
        """Rank 0 checks the path it will write; every rank raises its error (a collective)."""
        assert self.distributed is not None
        error = None
        if self.distributed.is_writer:
            try:
                check_writable(path, overwrite=self.options.overwrite or self.options.resume)
            except Exception as exc:  # noqa: BLE001 - raised on every rank by agree()
                error = exc
        self.distributed.agree(error)
        return Path(path)

    def _start_distributed(self, resume_after: int | None, resumable: bool) -> None:
        """Every rank: W_0 where it is kept (rank 0 under DDP, each rank's shard under FSDP2); rank 0 opens the
        file; every rank raises rank 0's error (a collective)."""
        assert self.distributed is not None
        error = None
        try:
            if self._sharded is not None:
                self._sharded.capture_initial(self.model, "device" if self.options.w0_device == "device" else "cpu")
                if self.distributed.is_writer:
                    self._open_file(resume_after, False, keep_w0=False)
            elif self.distributed.is_writer:
                self._open_file(resume_after, resumable)
            elif resume_after is not None:
                self.step = self._last_snapshot = int(resume_after)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by agree()
            error = exc
        try:
            self.distributed.agree(error)
        except BaseException:
            if self._writer is not None:  # another rank failed after rank 0 opened the file
                writer, self._writer = self._writer, None
                writer.close(S.STATUS_FAILED)
            raise
        self._collectives = self._started = True

    def _capture_gradients_distributed(self) -> bool:
        """FSDP2: every rank keeps its shards' squared norms for the exchange. DDP: rank 0 reads the reduced
        gradients like a single process (True), the other ranks have nothing to read."""
        if self._sharded is not None:
            self._grads = {"local": self._sharded.local_grad_norms()}
            return False
        return self.distributed is not None and self.distributed.is_writer

    def _on_post_step_distributed(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._collectives:
            self._after_step_distributed()

    def _after_step_distributed(self) -> None:
        """Every rank after each optimizer step: the exchange, then rank 0 writes the global row; snapshots on
        the schedule. Collectives never depend on one rank's state: a rank that stopped still joins, with its
        stop flag set, until every rank sees the flag at a snapshot step."""
        assert self.distributed is not None and self._exchange is not None
        self.step += 1
        grads = self._grads
        loss_store = self._logged if "loss_count" in self._logged else self._auto
        shares = self._loss_shares_global_step and bool(loss_store.get("loss_share_of_step"))
        local = None
        if self.active:
            try:
                local = self._local_step()
            except Exception as exc:  # noqa: BLE001 - a recorder bug never kills training unless strict
                self._fail(exc)
        self._grads, self._logged, self._auto = None, {}, {}
        try:
            reduced = self._exchange.reduce(local)
        except Exception as exc:  # noqa: BLE001 - a rank is gone: nothing more can be exchanged
            self._collectives = False
            self._fail(exc)
            return
        if self.distributed.is_writer and self.active:
            self._guarded(lambda: self._write_row(reduced, grads, shares))
        if self._snapshot_due(self.step):
            if reduced.any_stopped():
                self._collectives = False  # every rank reads the same flag: all stop here, together
                self._stop()
                return
            self._snapshot_distributed()

    def _local_step(self) -> D.LocalStep:
        logged, auto = self._logged, self._auto
        local = D.LocalStep(
            examples=logged.get("examples", auto.get("examples")),
            tokens=logged.get("tokens", auto.get("tokens")),
            loss_tokens=logged.get("loss_tokens", auto.get("loss_tokens")),
            loss=self._step_loss(logged if "loss_count" in logged else auto),
        )
        if self._sharded is not None and self._grads is not None:
            local.grad_sq, local.grad_other = self._grads["local"]
        if self._micro is None:
            return local
        measured = self._micro.pop()
        per_example = self._per_example.pop() if self._per_example is not None else None
        if measured is not None:
            local.passes = len(measured[0])
            sizes = self._pass_sizes(local.examples, local.passes)
            small = local_small_norms(measured[0], sizes, self.options.gns_loss,
                                      None if per_example is None else per_example[0])
            if small is not None:
                local.small, local.samples, local.sample_examples = small
        return local

    def _write_row(self, reduced: D.ReducedStep, grads: dict[str, Any] | None, shares: bool) -> None:
        """Rank 0: the step row of the global batch (``shares``: each rank's loss is its share of the global
        step's loss, so the ranks' losses add up)."""
        row: dict[str, Any] = {S.INDEX: self.step, "lr": self.optimizer.param_groups[0].get("lr", float("nan"))}
        row.update(reduced.row(loss_across_ranks="sum" if shares else "mean"))
        row.update(reduced.gradients() if self._sharded is not None else (grads or {}))
        if self._reduced is not None:
            if self._reduced.error is not None:
                raise self._reduced.error
            row.update(reduced.gns(self._reduced.pop(), self.options.gns_loss) or {})
        if self._writer is not None and not self._writer.put_step(row):
            self._stop()

    def _snapshot_distributed(self) -> None:
        assert self.distributed is not None
        if self._sharded is None:  # DDP: every rank holds the weights; rank 0 alone measures them
            if self.distributed.is_writer and self.active:
                self._guarded(self._snapshot)
            self._last_snapshot = self.step
            return
        try:
            snapshot, error = self._sharded.snapshot(self.model, self.options, step=self.step, compute=self.active)
        except Exception as exc:  # noqa: BLE001 - a collective failed: a rank is gone
            self._collectives = False
            self._fail(exc)
            return
        self._last_snapshot = self.step
        if error is not None:
            self._fail(error)
        elif snapshot is not None and self._writer is not None:
            if not self._writer.put_snapshot(snapshot):
                self._stop()

    def _close_distributed(self, status: str | None) -> None:
        """Every rank: agree whether any rank stopped, take the final snapshot together, and detach; rank 0
        closes the file. ``status`` other than complete (an exception, interpreter exit) runs no collective."""
        if not self._started:
            return
        self._started = False
        try:
            if status == S.STATUS_COMPLETE and self._collectives:
                try:
                    stopped = self.distributed is not None and self.distributed.any_flag(not self.active)
                except Exception as exc:  # noqa: BLE001 - a rank is gone
                    stopped, self._collectives = True, False
                    self._fail(exc)
                if stopped:
                    self._stopped = True
                elif self.step > 0 and self._last_snapshot != self.step:
                    self._snapshot_distributed()
        finally:
            self._collectives = False
            self._detach()
            writer, self._writer = self._writer, None
            if writer is not None:
                if self._stopped and status == S.STATUS_COMPLETE:
                    status = S.STATUS_FAILED
                writer.close(status)

    def _distributed_config(self) -> dict[str, Any]:
        assert self.distributed is not None
        where = "cpu" if self.options.w0_device == "cpu" else "device"
        out = self.distributed.describe()
        if self._sharded is not None:
            out["w0"] = f"each rank keeps its float32 shard on the {where}"
            out["gradient_norms"] = "summed from the ranks' local gradient shards"
            out["gns"] = "not measured under FSDP2"
        else:
            out["w0"] = f"rank 0 keeps float32 W_0 on the {where}"
            out["gradient_norms"] = "of the all-reduced gradient (rank 0)"
            out["gns"] = ("per-rank local gradients before the all-reduce (B_small: examples of one backward pass "
                          "on one rank) vs the all-reduced gradient before clipping (B_big: the global batch)"
                          if self._micro is not None else "off")
        return out

    def _fail(self, exc: BaseException) -> None:
        """Stop recording on this rank after an error (raise it when strict), as :meth:`_guarded` does."""
        if self.options.strict or isinstance(exc, RecordingError):
            raise exc
        was_active = self.active
        self._stop()
        if was_active:
            warnings.warn(f"lorascope stopped recording to {self.path}: {type(exc).__name__}: {exc}; training "
                          "continues and the file keeps what was written.", RecordingWarning, stacklevel=4)
