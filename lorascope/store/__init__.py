"""The run file: its schema (one module names everything), the append-only writer, and the reader."""

from lorascope.store.payloads import Snapshot
from lorascope.store.reader import Run, open_run
from lorascope.store.schema import FORMAT_NAME, SCHEMA_VERSION
from lorascope.store.writer import RunWriter, check_writable

__all__ = ["FORMAT_NAME", "SCHEMA_VERSION", "Run", "RunWriter", "Snapshot", "check_writable", "open_run"]
