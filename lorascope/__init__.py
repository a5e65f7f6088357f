"""lorascope: how much rank does a fine-tuning update need, and when does a LoRA of rank r run out?"""

from lorascope._version import __version__
from lorascope.errors import (
    CorruptRunFileError,
    LorascopeError,
    LorascopeWarning,
    NotARunFileError,
    RecordingWarning,
    RunFileError,
    RunFileExistsError,
    RunFileNotFoundError,
    SchemaVersionError,
    SelectionError,
)
from lorascope.store import Run, RunWriter, open_run

__all__ = [
    "CorruptRunFileError",
    "LorascopeError",
    "LorascopeWarning",
    "NotARunFileError",
    "RecordingWarning",
    "Run",
    "RunFileError",
    "RunFileExistsError",
    "RunFileNotFoundError",
    "RunWriter",
    "SchemaVersionError",
    "SelectionError",
    "__version__",
    "open_run",
]
