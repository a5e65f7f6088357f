"""Terminal rendering of a run summary (see :func:`lorascope.store.info.run_info`)."""

from __future__ import annotations

from typing import Any

from lorascope.report.format import byte_size

__all__ = ["format_info"]


def format_info(summary: dict[str, Any]) -> str:
    """Render the summary as a few aligned lines of text."""
    status = summary["status"] if summary["complete"] else f"{summary['status']} (incomplete)"
    steps = summary["steps"]
    step_range = f"{steps['count']}" + (f" (steps {steps['first']}..{steps['last']})" if steps["count"] else "")
    snaps = summary["snapshots"]
    shown = snaps["steps"][:12]
    more = f", ... ({snaps['count'] - len(shown)} more)" if snaps["count"] > len(shown) else ""
    snap_text = f"{snaps['count']}" + (f" at steps {', '.join(map(str, shown))}{more}" if snaps["count"] else "")
    kinds = ", ".join(f"{kind} {count}" for kind, count in summary["modules_by_kind"].items()) or "none"
    cov = summary["coverage"]
    rows = [
        ("file", summary["path"]),
        ("status", status),
        ("schema", f"version {summary['schema_version']}"),
        ("written by", f"lorascope {summary['lorascope_version']}, torch {summary['torch_version']}, "
                       f"{summary['framework']} {summary['framework_version']}".rstrip()),
        ("created", summary["created"] + (f", finished {summary['finished']}" if summary["finished"] else "")),
        ("size", byte_size(summary["file_size_bytes"])),
        ("modules", f"{summary['n_modules']} matrices: {kinds}"),
        ("parameters", f"{cov['recorded']} recorded, {cov['not_recorded']} not recorded (see coverage)"),
        ("steps", step_range),
        ("snapshots", snap_text),
    ]
    rows += [("flagged", flag) for flag in summary.get("flags", [])]  # kept, but worth knowing (docs/format.md)
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)
