"""A plain-dict summary of a run file, for ``lorascope info`` and quick checks."""

from __future__ import annotations

import os
from typing import Any

from lorascope.store.reader import Run, open_run


def run_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarise a run file, after the validation of every committed value (the spectra are read once, block by
    block, to check them; the per-module singular vectors and updates are not read).

    Returns
    -------
    dict
        ``path``, ``status``, ``complete``, ``schema_version``, versions, ``framework``, ``created``,
        ``finished``, ``file_size_bytes``, ``modules_by_kind`` (kind -> count), ``n_modules``, ``steps``
        (count, first, last), ``snapshots`` (count and the list of steps), ``coverage`` (recorded / not recorded
        parameter counts), ``flags`` (what the validation kept but flags, :attr:`Run.flags`).

    Raises
    ------
    RunFileError
        What :func:`~lorascope.open_run` or :meth:`Run.check_values` refuses, one line naming the dataset and rule.
    """
    with open_run(path) as run:
        run.check_values()  # what the views would refuse, info refuses too (lorascope.store.validate)
        return run_summary(run)


def run_summary(run: Run) -> dict[str, Any]:
    """:func:`run_info` of a run already open (what ``Run._repr_html_`` shows in a notebook)."""
    steps = run.step_index
    snapshot_steps = run.snapshot_index
    kinds = run.modules["kind"].value_counts().sort_index()
    recorded = run.coverage["recorded"].astype(bool)
    return {
        "path": str(run.path),
        "status": run.status,
        "complete": run.complete,
        "schema_version": run.schema_version,
        "lorascope_version": run.attrs.get("lorascope_version", ""),
        "torch_version": run.attrs.get("torch_version", ""),
        "framework": run.attrs.get("framework", ""),
        "framework_version": run.attrs.get("framework_version", ""),
        "created": run.attrs.get("created", ""),
        "finished": run.attrs.get("finished", ""),
        "file_size_bytes": run.file_size_bytes,
        "n_modules": int(len(run.modules)),
        "modules_by_kind": {str(k): int(v) for k, v in kinds.items()},
        "steps": {
            "count": int(len(steps)),
            "first": int(steps[0]) if len(steps) else None,
            "last": int(steps[-1]) if len(steps) else None,
        },
        "snapshots": {"count": int(len(snapshot_steps)), "steps": [int(s) for s in snapshot_steps]},
        "coverage": {"recorded": int(recorded.sum()), "not_recorded": int((~recorded).sum())},
        "flags": list(run.flags),
    }
