"""The run file schema: the one place that names every group, dataset and attribute of a run file.

Writer, reader, documentation test and fixtures all take their names from here. Schema version 1 is
described for humans in ``docs/format.md``; a test checks that every name below appears there.

Tables are column-per-dataset. Every per-step and per-snapshot dataset has the row axis first and is
resizable along it. The ``step`` column of each table is its *index*: the writer extends it last, so its
length is the number of committed rows and every other column holds at least that many.

A reader checks a file against these definitions once, when it opens it (:mod:`lorascope.store.validate`): it
refuses what breaks them (a missing group, dataset or attribute; an attribute of another type, such as a
``schema_version`` that is not an integer or a ``status`` outside :data:`STATUSES`; a dataset of another dtype
kind or other axes than its :class:`Column` says; a decreasing index; a ``sv_count`` outside [0, min(capacity,
out, in)]; a negative energy, singular value or squared norm), repairs only what the writing protocol defines
(rows past the index are not read, an optional column absent reads as its fill), and flags what may be true
(repeated steps, an energy not measured). Measurements are never judged: NaN and Inf are what a diverged run
records. Why each is refused or flagged: ``docs/format.md``, "What the reader refuses, repairs and flags".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMAT_NAME = "lorascope-run"
SCHEMA_VERSION = 1

# Root attributes (all strings except schema_version).
ATTR_FORMAT = "format"
ATTR_SCHEMA_VERSION = "schema_version"
ATTR_LORASCOPE_VERSION = "lorascope_version"
ATTR_TORCH_VERSION = "torch_version"
ATTR_FRAMEWORK = "framework"
ATTR_FRAMEWORK_VERSION = "framework_version"
ATTR_CREATED = "created"
ATTR_FINISHED = "finished"
ATTR_STATUS = "status"
ROOT_ATTRS = (
    ATTR_FORMAT,
    ATTR_SCHEMA_VERSION,
    ATTR_LORASCOPE_VERSION,
    ATTR_TORCH_VERSION,
    ATTR_FRAMEWORK,
    ATTR_FRAMEWORK_VERSION,
    ATTR_CREATED,
    ATTR_STATUS,
)

# Config sections lorascope itself reads, each a JSON object, with the fields inside that must be objects too when
# present (a reader refuses anything else; a section it does not read, such as one from extra_config, may hold any
# JSON).
CONFIG_OBJECTS: dict[str, tuple[str, ...]] = {
    "recorder": (), "optimizer": ("defaults",), "trainer": (), "lora": (), "model": ("config",), "dataset": (),
    "distributed": (),
}

# Values of the status attribute. A file left as "recording" by a killed writer is incomplete.
STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"
STATUSES = (STATUS_RECORDING, STATUS_COMPLETE, STATUS_FAILED)

GROUP_MODULES = "modules"
GROUP_COVERAGE = "coverage"
GROUP_CONFIG = "config"
GROUP_STEPS = "steps"
GROUP_SNAPSHOTS = "snapshots"
GROUP_FACTORS = "snapshots/factors"
GROUP_GRAD_FACTORS = "snapshots/grad_factors"  # the gradient's top-k singular vectors (grad_sv and factors_k)
GROUP_DELTAS = "snapshots/deltas"
GROUP_MISSING = "snapshots_missing"

INDEX = "step"
INDEX_FILL = -1  # an index row extended but not yet written; never a step

# How a column is shaped: per row, per (row, module) or per (row, module, singular value).
ROW = "row"
ROW_MODULE = "row_module"
ROW_MODULE_SV = "row_module_sv"
ROW_MODULE_INTRUDER = "row_module_intruder"  # per (row, module, one of the weight's top intruder_k directions)


@dataclass(frozen=True)
class Column:
    """One dataset of a table: its name, dtype, layout, the fill value meaning "unknown", unit and meaning."""

    name: str
    dtype: str
    layout: str
    fill: float | int | bool | str
    unit: str
    description: str
    required: bool = True  # False: added after schema 1 shipped; files without it read as all-fill

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


# Static tables written once at start: one row per recorded matrix / per model parameter.
MODULE_COLUMNS = (
    Column("name", "str", ROW, "", "", "unique matrix id (module path; fused experts add [expert] and .gate/.up)"),
    Column("module", "str", ROW, "", "", "dotted path of the owning torch module"),
    Column("parameter", "str", ROW, "", "", "parameter attribute on that module (weight, gate_up_proj, ...)"),
    Column("kind", "str", ROW, "", "", "attention, mlp, moe_expert, router, embedding, head, norm or other"),
    Column("role", "str", ROW, "", "", "q, k, v, o, qkv, gate, up, down, fc_in, fc_out, router, ... or empty"),
    Column("layer", "int32", ROW, -1, "", "transformer block index, -1 when none"),
    Column("expert", "int32", ROW, -1, "", "expert index, -1 when not a MoE expert"),
    Column("out_features", "int64", ROW, 0, "", "rows of the matrix as recorded (out, in)"),
    Column("in_features", "int64", ROW, 0, "", "columns of the matrix as recorded (out, in)"),
    Column("transposed", "bool", ROW, False, "", "stored (in, out) in the model and transposed for recording"),
    Column("part", "str", ROW, "", "", "gate or up half of a fused gate_up tensor, else empty"),
    Column("lora", "bool", ROW, False, "", "a PEFT LoRA layer: the recorded update is the merged scaling * B @ A"),
)

COVERAGE_COLUMNS = (
    Column("parameter", "str", ROW, "", "", "full parameter name as in model.named_parameters()"),
    Column("shape", "str", ROW, "", "", "parameter shape, e.g. '4x96x32'"),
    Column("recorded", "bool", ROW, False, "", "whether any matrix of this parameter is recorded"),
    Column("reason", "str", ROW, "", "", "why it is (or how it is) recorded or not"),
)

STEP_COLUMNS = (
    Column(INDEX, "int64", ROW, INDEX_FILL, "optimizer steps",
           "optimizer step number (1-based) after which the row was taken"),
    Column("examples_seen", "int64", ROW, -1, "examples", "training examples consumed up to and including this step"),
    Column("tokens_seen", "int64", ROW, -1, "tokens", "training tokens consumed up to and including this step"),
    Column("loss", "float64", ROW, np.nan, "nats per token", "training loss reported for this step"),
    Column("lr", "float64", ROW, np.nan, "", "learning rate of the first parameter group at this step"),
    Column("batch_examples", "int64", ROW, -1, "examples", "examples in this optimizer step (all micro-batches)"),
    Column("batch_tokens", "int64", ROW, -1, "tokens", "tokens in this optimizer step (all micro-batches)"),
    Column("batch_loss_tokens", "int64", ROW, -1, "tokens",
           "tokens the loss is computed on in this step (labels != -100, all micro-batches); -1 when unknown",
           required=False),
    Column("grad_sq_norm", "float32", ROW_MODULE, np.nan, "squared gradient units",
           "squared Frobenius norm of each recorded matrix's gradient at the optimizer step; NaN: no gradient "
           "(frozen, unused, skipped), +Inf: the gradient holds NaN or Inf"),
    Column("grad_sq_norm_other", "float64", ROW, np.nan, "squared gradient units",
           "squared norm of the gradient of every trainable parameter outside the modules table"),
    Column("grad_nonfinite_modules", "int32", ROW, 0, "modules",
           "number of recorded matrices whose gradient holds NaN or Inf at this step (a missing gradient is not "
           "counted)"),
    Column("gns_batch_small", "float64", ROW, np.nan, "examples", "small batch size B_small of the noise-scale pair"),
    Column("gns_batch_big", "float64", ROW, np.nan, "examples", "big batch size B_big of the noise-scale pair"),
    Column("gns_sq_norm_small", "float32", ROW_MODULE, np.nan, "squared gradient units",
           "mean squared gradient norm at batch size B_small, per recorded matrix"),
    Column("gns_sq_norm_big", "float32", ROW_MODULE, np.nan, "squared gradient units",
           "squared gradient norm at batch size B_big, per recorded matrix"),
)

SNAPSHOT_COLUMNS = (
    Column(INDEX, "int64", ROW, INDEX_FILL, "optimizer steps", "optimizer step at which the snapshot was taken"),
    Column("examples_seen", "int64", ROW, -1, "examples", "training examples consumed up to this snapshot"),
    Column("tokens_seen", "int64", ROW, -1, "tokens", "training tokens consumed up to this snapshot"),
    Column("energy", "float64", ROW_MODULE, np.nan, "squared weight units",
           "exact ||Delta||_F^2 of the update Delta = W_t - W_0 (LoRA: the merged update)"),
    Column("sv", "float32", ROW_MODULE_SV, np.nan, "weight units",
           "singular values of Delta, descending, NaN-padded past sv_count"),
    Column("sv_count", "int32", ROW_MODULE, 0, "", "number of singular values stored; below min(out, in) for top-k"),
    Column("delta_nonfinite", "int64", ROW_MODULE, 0, "entries", "NaN or Inf entries of Delta (spectrum skipped)"),
    # Recorded with contributions=True (lorascope/record/contributions.py): the loss of a held batch, NaN otherwise.
    Column("held_loss", "float64", ROW, np.nan, "nats per token",
           "loss of the held batch at the snapshot (eval mode, no gradients)", required=False),
    Column("held_loss_start", "float64", ROW, np.nan, "nats per token",
           "loss of the held batch with every recorded matrix reverted to W_0", required=False),
    Column("held_loss_without_kind", "float64", ROW_MODULE, np.nan, "nats per token",
           "loss of the held batch with the recorded matrices of this matrix's kind reverted to W_0",
           required=False),
    Column("held_loss_without_layer", "float64", ROW_MODULE, np.nan, "nats per token",
           "loss of the held batch with the recorded matrices of this matrix's transformer layer reverted to W_0 "
           "(contributions='layers'; NaN outside the blocks)", required=False),
)

# Present only when the recorder was asked for the gradient's own spectrum at snapshot steps.
GRAD_SV_COLUMNS = (
    Column("grad_sv", "float32", ROW_MODULE_SV, np.nan, "gradient units",
           "singular values of the gradient at the snapshot step, NaN-padded"),
    Column("grad_sv_count", "int32", ROW_MODULE, 0, "", "number of gradient singular values stored"),
)

# Present only when the recorder was asked for intruder dimensions (intruder_k > 0; Shuttleworth et al. 2024,
# Def. 3.1): the top intruder_k left singular vectors y_j of the weight W_t = W_0 + Delta, each compared with every
# left singular vector x_i of the starting weight W_0.
INTRUDER_COLUMNS = (
    Column("intruder_cos", "float32", ROW_MODULE_INTRUDER, np.nan, "",
           "max_i |cos(y_j, x_i)| over every left singular vector x_i of W_0, for the j-th left singular vector "
           "y_j of W_t (descending singular value); in [0, 1], small: an intruder dimension; NaN: not computed"),
    Column("weight_sv", "float32", ROW_MODULE_INTRUDER, np.nan, "weight units",
           "singular value of W_t for y_j, descending; NaN: not computed"),
)

# Snapshots the schedule asked for that are missing or incomplete, one row each, with the reason (an optional
# group: files written before it lack it and read as "none missing"). Fixed-width text (SWMR appends it in place).
MISSING_REASON_BYTES = 240
MISSING_COLUMNS = (
    Column(INDEX, "int64", ROW, INDEX_FILL, "optimizer steps",
           "optimizer step of the snapshot that is missing or incomplete"),
    Column("reason", f"S{MISSING_REASON_BYTES}", ROW, "", "",
           "why, in ASCII: 'thinned: ...' (time budget), 'skipped: ...' (snapshot worker behind), 'failed: ...' "
           "(the snapshot, or the matrix named, could not be computed)"),
)

# Optional per-module datasets, one each, named by the module's row index (zero-padded, 6 digits).
FACTOR_U = "u"  # (snapshot, out_features, k) left singular vectors
FACTOR_V = "v"  # (snapshot, in_features, k) right singular vectors
DELTA_DTYPES = ("float16", "float32")

# Attributes of the snapshots group.
ATTR_SV_CAPACITY = "sv_capacity"  # length of the sv axis
ATTR_FACTORS_K = "factors_k"  # 0 when no singular vectors are stored
ATTR_DELTA_DTYPE = "delta_dtype"  # "" when no full deltas are stored
ATTR_INTRUDER_K = "intruder_k"  # length of the intruder axis; 0 or absent (files before it) when not recorded


def module_key(index: int) -> str:
    """Name of a per-module dataset for the module at row ``index`` of the modules table."""
    return f"{index:06d}"


def columns_of(group: str, *, grad_sv: bool = False, intruder: bool = False) -> tuple[Column, ...]:
    """The columns of a table group, including the optional gradient-spectrum and intruder columns when present."""
    if group == GROUP_STEPS:
        return STEP_COLUMNS
    if group == GROUP_SNAPSHOTS:
        return SNAPSHOT_COLUMNS + (GRAD_SV_COLUMNS if grad_sv else ()) + (INTRUDER_COLUMNS if intruder else ())
    if group == GROUP_MODULES:
        return MODULE_COLUMNS
    if group == GROUP_COVERAGE:
        return COVERAGE_COLUMNS
    if group == GROUP_MISSING:
        return MISSING_COLUMNS
    raise KeyError(group)
