"""Recorder options: one validated, reusable value object shared by every way of attaching."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lorascope.errors import InvalidOptionError
from lorascope.model.taxonomy import KINDS
from lorascope.record.device_spectra import SPECTRA_DEVICES
from lorascope.record.gns import LOSS_CONVENTIONS
from lorascope.record.schedule import SnapshotSchedule

DELTA_DTYPES = ("float16", "float32")
GNS_SOURCES = ("auto", "accumulation", "per_example", None)
W0_DEVICES = ("cpu", "device")
W0_DTYPES = ("float32", "parameter")
CONTRIBUTIONS = (False, True, "layers")
SNAPSHOT_BACKLOG = ("wait", "skip")


def _bad(name: str, expected: str, got: Any) -> InvalidOptionError:
    return InvalidOptionError(f"The '{name}' option of lorascope.record must be {expected}. Got {got!r} instead.")


@dataclass(frozen=True)
class RecordOptions:
    """What to record and how. Pass to :func:`lorascope.record` as keywords or as ``options=``.

    Parameters
    ----------
    kinds
        Record only matrices of these kinds (attention, mlp, moe_expert, router, embedding, head, other).
        ``None`` records every matrix.
    modules
        A regular expression (``re.search`` on the matrix name) restricting the recorded matrices.
    kind_map
        ``{regex: kind}`` overrides of the naming heuristics, for a user's own model.
    snapshots
        ``"log"`` (default: about ``snapshot_points`` log-spaced steps over the planned run, plus the final
        step), an int N (every N steps), a list of steps, or a :class:`SnapshotSchedule`.
    snapshot_points
        Number of points of the log schedule.
    total_steps
        Planned optimizer steps, when the trainer cannot tell (plain loops).
    top_k
        ``None``: full spectra. An int k: for matrices with more than ``top_k_min_size`` entries, only the top k
        singular values by a randomized method (the exact energy is still stored).
    top_k_min_size
        Matrices with at most this many entries always get their full spectrum.
    factors_k
        Also store the top ``factors_k`` singular vectors of every update (0: none); with ``grad_sv``, also those
        of every gradient at snapshot steps.
    intruder_k
        Intruder dimensions (Shuttleworth et al. 2024, Def. 3.1; 10 is the paper's k): at every snapshot, for the
        top ``intruder_k`` left singular vectors y_j of each weight W_t = W_0 + Delta, the largest |cos(y_j, x_i)|
        over every left singular vector x_i of W_0, and their singular values (0, the default: none). Keeps one
        (out, min(out, in)) float32 basis per recorded matrix on the host (docs/recording.md, for its cost).
    store_delta
        Also store every full update, as "float16" or "float32" (None: no).
    grad_sv
        Also store the singular values of each matrix's gradient at snapshot steps.
    w0_device
        Where the initial weights W_0 are kept: "cpu" (default) or "device" (faster snapshots, more device memory).
    w0_dtype
        W_0 of a weight matrix kept in "float32" (default) or in its "parameter" dtype (bf16 stays bf16: half the
        memory, the same values, so the same updates). A LoRA layer's starting update stays float32.
    strict
        Raise on a write failure instead of warning once and continuing training without recording.
    queue_size
        Bound of the queue between the training thread and the writer thread.
    flush_seconds
        Step rows are handed to the writer thread every half of this and appended to the file in batches at most
        this many seconds apart (0: after every step); snapshots are written at once. A killed run loses at most
        the step rows of its last 1.5 ``flush_seconds``.
    snapshot_worker
        ``True`` (default): at a snapshot step the training thread only copies the recorded matrices to host
        memory and a worker thread computes the spectra (docs/recording.md). ``False``: everything on the training
        thread, as before.
    snapshot_threads
        BLAS threads of the snapshot worker (numpy / scipy, limited with threadpoolctl while it computes; torch's
        thread settings are never changed).
    spectra_device
        Where the snapshot worker computes a dense update's spectrum: ``"auto"`` (default) on the CUDA device the
        matrix lives on (the same float64 Gram route, on a stream of the worker's own; 8-290x faster than one host
        core on an H200, docs/benchmarks.md), on the host for a matrix on the CPU; ``"host"``: always on the host.
        The top-k, ``factors_k``, ``grad_sv`` and LoRA-factor routes stay on the host.
    snapshot_buffer_mib
        Host memory (MiB) the copies of pending snapshots may hold; ``None``: one snapshot's copies (the recorded
        matrices in their own dtype). One snapshot larger than this is still taken when nothing else is pending.
    snapshot_backlog
        When a snapshot is due while the pending ones fill the buffer: ``"wait"`` (default; the training thread
        waits for the worker) or ``"skip"`` (the snapshot is not taken; its step and the reason are written to
        the file's ``snapshots_missing``). The final snapshot always waits.
    time_budget
        Share of the training time recording may cost (default 0.05): a snapshot of the log-spaced schedule is
        thinned (not taken; its step and the reason go to ``snapshots_missing``) when what recording has cost so
        far (snapshots: the training thread's time and the worker's CPU time; the per-step hooks; the writer
        thread) plus the expected cost of the next snapshot and of the final one, reserved at every decision,
        would exceed this share of the training time so far (:func:`lorascope.record.schedule.within_budget`).
        The final snapshot is never thinned, nor are snapshots while they cost under 2 s in all (small models);
        a schedule of explicit steps or ``every`` N steps is taken as asked. ``None``: no budget.
    overwrite
        Replace an existing run file.
    resumable
        Keep W_0 beside the run file (``<run>.w0.h5``, one float32 copy of the recorded matrices) so that a run
        resumed from a checkpoint can continue the same file. ``None``: on for a ``transformers.Trainer`` that
        saves checkpoints, off otherwise.
    gns
        Gradient-noise-scale inputs: ``"auto"`` (default) records the gradient norms of each backward pass and of
        the whole step whenever a step accumulates several passes (gradient accumulation); ``"accumulation"``
        is the same; ``"per_example"`` records exact per-example gradient norms (batch size 1 vs the step);
        ``None`` records neither.
    gns_loss
        How the passes of one step combine, to undo the loss scaling: ``"mean"`` (default; HF Trainer, Lightning,
        and loops dividing each pass's loss by the number of passes: the step gradient is the mean over its
        examples) or ``"sum"`` (each pass's loss is its own mean and the passes are summed).
    resume
        Continue an existing run file: a ``transformers.Trainer`` resumed from a checkpoint at step g drops the
        rows recorded after g (they are recorded again) and appends from there, measuring updates against the
        W_0 kept by ``resumable``.
    distributed
        ``None`` (default): when ``torch.distributed`` is initialized with more than one process, record the
        data-parallel run (DDP or FSDP2) as one run: rank 0 writes the file, every rank takes part in the
        collectives (see docs/distributed.md). ``True``: the same, but an error when torch.distributed is not
        initialized. ``False``: record this process alone (then every rank needs its own path).
    contributions
        ``False`` (default), ``True`` or ``"layers"``: at each snapshot, the loss of ``held_batch`` now, with every
        recorded matrix reverted to W_0, and with each kind's matrices reverted (``"layers"``: also each
        transformer layer's); the weights are restored exactly after (see docs/recording.md). Not under
        torch.distributed, nor for a PEFT LoRA model.
    held_batch
        The batch those losses are measured on: a mapping of tensors, or a tuple (then with ``loss_fn``). A
        ``transformers.Trainer`` without one uses the first batch of its training data loader.
    loss_fn
        ``(model, batch) -> scalar loss tensor``; ``None``: ``model(**batch).loss`` (a Trainer: its
        ``compute_loss``).
    """

    kinds: tuple[str, ...] | None = None
    modules: str | None = None
    kind_map: Mapping[str, str] | None = None
    snapshots: Any = "log"
    snapshot_points: int = 24
    total_steps: int | None = None
    top_k: int | None = None
    top_k_min_size: int = 1_000_000
    factors_k: int = 0
    intruder_k: int = 0
    store_delta: str | None = None
    grad_sv: bool = False
    w0_device: str = "cpu"
    w0_dtype: str = "float32"
    strict: bool = False
    queue_size: int = 64
    flush_seconds: float = 1.0
    snapshot_worker: bool = True
    snapshot_threads: int = 1
    spectra_device: str = "auto"
    snapshot_buffer_mib: float | None = None
    snapshot_backlog: str = "wait"
    time_budget: float | None = 0.05
    overwrite: bool = False
    resumable: bool | None = None
    resume: bool = False
    gns: str | None = "auto"
    gns_loss: str = "mean"
    distributed: bool | None = None
    contributions: bool | str = False
    held_batch: Any = field(default=None, compare=False, repr=False)
    loss_fn: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    extra_config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.extra_config is None:  # "no extra sections", as a caller passing an optional mapping writes it
            object.__setattr__(self, "extra_config", {})
        elif not isinstance(self.extra_config, Mapping):
            raise _bad("extra_config", "None or a mapping of config sections", self.extra_config)
        if self.kinds is not None:
            kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
            unknown = [k for k in kinds if k not in KINDS]
            if not kinds or unknown:
                raise _bad("kinds", f"None or a non-empty list of {', '.join(KINDS)}", list(kinds))
            object.__setattr__(self, "kinds", kinds)
        if self.modules is not None and not isinstance(self.modules, str):
            raise _bad("modules", "None or a regular expression string", self.modules)
        _check_int("snapshot_points", self.snapshot_points, 2)
        if self.total_steps is not None:
            _check_int("total_steps", self.total_steps, 1)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
        _check_int("top_k_min_size", self.top_k_min_size, 0)
        _check_int("factors_k", self.factors_k, 0)
        _check_int("intruder_k", self.intruder_k, 0)
        _check_int("queue_size", self.queue_size, 1)
        if isinstance(self.flush_seconds, bool) or not isinstance(self.flush_seconds, (int, float)) \
                or not 0 <= self.flush_seconds < float("inf"):
            raise _bad("flush_seconds", "a number of seconds >= 0", self.flush_seconds)
        self._check_snapshot_work()
        if self.store_delta not in (None, *DELTA_DTYPES):
            raise _bad("store_delta", f"None or one of {DELTA_DTYPES}", self.store_delta)
        if self.w0_device not in W0_DEVICES:
            raise _bad("w0_device", f"one of {W0_DEVICES}", self.w0_device)
        if self.w0_dtype not in W0_DTYPES:
            raise _bad("w0_dtype", f"one of {W0_DTYPES}", self.w0_dtype)
        if self.gns not in GNS_SOURCES:
            raise _bad("gns", f"one of {GNS_SOURCES}", self.gns)
        if self.gns_loss not in LOSS_CONVENTIONS:
            raise _bad("gns_loss", f"one of {LOSS_CONVENTIONS}", self.gns_loss)
        if self.distributed is not None and not isinstance(self.distributed, bool):
            raise _bad("distributed", "None, True or False", self.distributed)
        self._check_contributions()
        if self.resume and self.overwrite:
            raise _bad("resume", "False when overwrite=True (continue a file, or replace it, not both)", self.resume)
        self.schedule()  # validates ``snapshots``

    def _check_snapshot_work(self) -> None:
        if not isinstance(self.snapshot_worker, bool):
            raise _bad("snapshot_worker", "True or False", self.snapshot_worker)
        _check_int("snapshot_threads", self.snapshot_threads, 1)
        mib = self.snapshot_buffer_mib
        if mib is not None and (isinstance(mib, bool) or not isinstance(mib, (int, float))
                                or not 0 < mib < float("inf")):
            raise _bad("snapshot_buffer_mib", "None or a number of MiB > 0", mib)
        if self.spectra_device not in SPECTRA_DEVICES:
            raise _bad("spectra_device", f"one of {SPECTRA_DEVICES}", self.spectra_device)
        if self.snapshot_backlog not in SNAPSHOT_BACKLOG:
            raise _bad("snapshot_backlog", f"one of {SNAPSHOT_BACKLOG}", self.snapshot_backlog)
        budget = self.time_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget <= 1):
            raise _bad("time_budget", "None or a share of the training time in (0, 1]", budget)

    def _check_contributions(self) -> None:
        if not any(self.contributions is c for c in CONTRIBUTIONS[:2]) and self.contributions != "layers":
            raise _bad("contributions", 'False, True or "layers"', self.contributions)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise _bad("loss_fn", "None or a callable (model, batch) -> scalar loss", self.loss_fn)
        batch = self.held_batch
        if batch is not None and not isinstance(batch, (Mapping, tuple, list)):
            raise _bad("held_batch", "None, a mapping of tensors, or a tuple", type(batch).__name__)
        if not self.contributions and (batch is not None or self.loss_fn is not None):
            raise _bad("contributions", 'True or "layers" when held_batch or loss_fn is given', self.contributions)
        if isinstance(batch, (tuple, list)) and self.loss_fn is None:
            raise InvalidOptionError("The 'held_batch' option of lorascope.record is a tuple: pass loss_fn=(model, "
                                     "batch) -> scalar loss (only a mapping batch has the default "
                                     "model(**batch).loss).")

    def replace(self, **changes: Any) -> RecordOptions:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def schedule(self, total_steps: int | None = None) -> SnapshotSchedule:
        """The snapshot schedule these options describe, fitted to ``total_steps`` when known."""
        spec = self.snapshots
        total = total_steps or self.total_steps
        if isinstance(spec, SnapshotSchedule):
            return spec.with_total(total)
        if spec == "log":
            return SnapshotSchedule.log(self.snapshot_points, total)
        if isinstance(spec, bool):
            raise _bad("snapshots", '"log", an int >= 1, a list of steps or a SnapshotSchedule', spec)
        if isinstance(spec, int):
            return SnapshotSchedule.every(spec)
        if isinstance(spec, Iterable) and not isinstance(spec, (str, bytes)):
            return SnapshotSchedule.explicit(list(spec))
        raise _bad("snapshots", '"log", an int >= 1, a list of steps or a SnapshotSchedule', spec)

    def to_config(self) -> dict[str, Any]:
        """JSON-ready description stored in the run file's config group."""
        out = dataclasses.asdict(dataclasses.replace(self, held_batch=None, loss_fn=None))
        out["held_batch"] = _describe_batch(self.held_batch)
        out["loss_fn"] = None if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))
        out["snapshots"] = self.snapshots if isinstance(self.snapshots, (str, int, list, tuple)) else repr(
            self.snapshots)
        out["kind_map"] = dict(self.kind_map or {})
        out["extra_config"] = dict(self.extra_config)
        return out


def _describe_batch(batch: Any) -> str | None:
    """A short text of a held batch for the config: its entries and their shapes (never the values)."""
    if batch is None:
        return None
    items = batch.items() if isinstance(batch, Mapping) else enumerate(batch)
    return ", ".join(f"{k}: {'x'.join(map(str, getattr(v, 'shape', ()))) or type(v).__name__}" for k, v in items)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(name, f"an int in the range [{low}, inf)", value)


def make_options(options: RecordOptions | None, overrides: Mapping[str, Any]) -> RecordOptions:
    """Combine a reusable :class:`RecordOptions` with keyword overrides; unknown keywords are an error."""
    names = {f.name for f in dataclasses.fields(RecordOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InvalidOptionError(f"lorascope.record got unknown option(s) {unknown}; valid options are {sorted(names)}")
    if options is not None and not isinstance(options, RecordOptions):
        raise InvalidOptionError(f"options must be a lorascope.RecordOptions. Got {type(options).__name__} instead.")
    base = options or RecordOptions()
    return base.replace(**overrides) if overrides else base
