"""The capture side: the core recorder, its options and schedule, and the framework integrations."""

from lorascope.record.api import record
from lorascope.record.core import Recorder
from lorascope.record.options import RecordOptions
from lorascope.record.schedule import SnapshotSchedule

__all__ = ["RecordOptions", "Recorder", "SnapshotSchedule", "record"]
