"""lorascope: how much rank does a fine-tuning update need, and when does a LoRA of rank r run out?"""

from lorascope._version import __version__
from lorascope.analysis.analyze import Analysis, analyze
from lorascope.analysis.compare import Comparison, compare
from lorascope.analysis.recommend import Recommendation, recommend
from lorascope.calibrate import Calibration, calibrate, load_calibration
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
from lorascope.record import Recorder, RecordOptions, SnapshotSchedule, record
from lorascope.store import Run, RunWriter, open_run
from lorascope.taxonomy import classify

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
    "classify",
    "compare",
    "load_calibration",
    "open_run",
    "recommend",
    "record",
]
