"""Exception and warning classes raised by lorascope.

Every error a user can cause derives from :class:`LorascopeError`, so the CLI can catch that one class at
its boundary and print a single line. Messages name the offending file or argument, say what was expected
and what was found.
"""

from __future__ import annotations


class LorascopeError(Exception):
    """Base class of every error lorascope raises on bad input."""


class RunFileError(LorascopeError, ValueError):
    """A run file cannot be read as a lorascope recording."""


class RunFileNotFoundError(RunFileError, FileNotFoundError):
    """The path does not exist or is not a regular file."""


class NotARunFileError(RunFileError):
    """The file is not HDF5, is damaged, or is HDF5 without the lorascope format marker."""


class SchemaVersionError(RunFileError):
    """The run file was written with a schema version this lorascope cannot read."""


class CorruptRunFileError(RunFileError):
    """The run file is a lorascope run but a required group or dataset is missing or inconsistent."""


class RunFileExistsError(LorascopeError, FileExistsError):
    """Refusing to overwrite an existing run file without ``overwrite=True``."""


class SelectionError(LorascopeError, ValueError):
    """A module selection (kinds, regex, mapping) is invalid or selects nothing."""


class ModelConfigError(LorascopeError, ValueError):
    """A model configuration cannot be read or turned into a model."""


class ProbeMismatchError(ModelConfigError):
    """A probe recording was made on another architecture than the model a recommendation is for."""


class DatasetError(LorascopeError, ValueError):
    """A fine-tuning dataset file is missing, not JSON Lines, or in none of the supported formats."""


class InvalidOptionError(LorascopeError, ValueError):
    """An option or argument is out of its valid range or of the wrong type."""


class RecordingError(LorascopeError, RuntimeError):
    """A strict recorder (``strict=True``) could not write its run file."""


class LorascopeWarning(UserWarning):
    """Base class of lorascope's warnings."""


class RecordingWarning(LorascopeWarning):
    """Recording degraded (for example, a write failed and recording stopped) but training continues."""
