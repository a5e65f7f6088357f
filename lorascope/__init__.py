"""lorascope: how much rank does a fine-tuning update need, and when does a LoRA of rank r run out?"""

from lorascope._version import __version__
from lorascope.errors import (
    CorruptRunFileError,
    InvalidOptionError,
    LorascopeError,
    LorascopeWarning,
    NotARunFileError,
    RecordingError,
    RecordingWarning,
    RunFileError,
    RunFileExistsError,
    RunFileNotFoundError,
    SchemaVersionError,
    SelectionError,
)
from lorascope.model.taxonomy import classify
from lorascope.record import Recorder, RecordOptions, SnapshotSchedule, record
from lorascope.report.notebook import register_renderers as _register_renderers
from lorascope.store import Run, RunWriter, open_run
from lorascope.workflows.analyze import Analysis, analyze
from lorascope.workflows.calibrate import Calibration, calibrate, load_calibration
from lorascope.workflows.compare import Comparison, compare
from lorascope.workflows.lora_probes import calibration_from_runs
from lorascope.workflows.recommend import Recommendation, recommend

__all__ = [
    "Analysis",
    "Calibration",
    "Comparison",
    "CorruptRunFileError",
    "InvalidOptionError",
    "LorascopeError",
    "LorascopeWarning",
    "NotARunFileError",
    "RecordOptions",
    "Recommendation",
    "Recorder",
    "RecordingError",
    "RecordingWarning",
    "Run",
    "RunFileError",
    "RunFileExistsError",
    "RunFileNotFoundError",
    "RunWriter",
    "SchemaVersionError",
    "SelectionError",
    "SnapshotSchedule",
    "__version__",
    "analyze",
    "calibrate",
    "calibration_from_runs",
    "classify",
    "compare",
    "load_calibration",
    "open_run",
    "recommend",
    "record",
]

_register_renderers()  # Jupyter display of Run, Analysis, Comparison, Recommendation (see lorascope._display)
