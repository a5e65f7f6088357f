"""docs/format.md cannot drift from lorascope/store/schema.py: every name is listed, every column row states the
schema's dtype, shape, fill value and unit, and the reading examples run against a real run file."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from lorascope import RunWriter
from lorascope.store import Snapshot
from lorascope.store import schema as S

DOC = Path(__file__).resolve().parents[2] / "docs" / "format.md"
TEXT = DOC.read_text(encoding="utf-8")

# Tables of the schema, the section heading they live under, and the row-count symbol of their shape cells.
TABLES = {
    S.GROUP_MODULES: (S.MODULE_COLUMNS, "M"),
    S.GROUP_COVERAGE: (S.COVERAGE_COLUMNS, "P"),
    S.GROUP_STEPS: (S.STEP_COLUMNS, "n"),
    S.GROUP_SNAPSHOTS: (S.SNAPSHOT_COLUMNS + S.GRAD_SV_COLUMNS + S.INTRUDER_COLUMNS, "n"),
}
SHAPES = {S.ROW: "({rows},)", S.ROW_MODULE: "({rows}, M)", S.ROW_MODULE_SV: "({rows}, M, K)",
          S.ROW_MODULE_INTRUDER: "({rows}, M, I)"}


def section(group: str) -> str:
    """The text under the heading that names ``group`` (``## `steps```), up to the next heading of that level."""
    match = re.search(rf"^(#+) `{re.escape(group)}`\s*$", TEXT, flags=re.MULTILINE)
    assert match, f"docs/format.md has no section headed `{group}`"
    level = len(match.group(1))
    end = re.search(rf"^#{{1,{level}}} ", TEXT[match.end():], flags=re.MULTILINE)
    return TEXT[match.end(): match.end() + end.start() if end else len(TEXT)]


def table_rows(text: str, header: tuple[str, ...] | None = None) -> dict[str, list[str]]:
    """Rows of the markdown tables in ``text`` (only those with ``header`` when given), keyed by their first
    cell without backticks."""
    rows: dict[str, list[str]] = {}
    current: tuple[str, ...] = ()
    for line in text.splitlines():
        if not line.startswith("|"):
            current = ()
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not current:
            current = tuple(cells)  # the first line of a table is its header
        elif line.startswith("| `") and (header is None or current == header):
            rows[cells[0].strip("`")] = cells
    return rows


COLUMN_HEADER = ("dataset", "dtype", "shape", "fill", "unit", "meaning")


def fill_text(fill: object) -> str:
    if isinstance(fill, bool):
        return "true" if fill else "false"
    if isinstance(fill, str):
        return f'`"{fill}"`'
    if isinstance(fill, float) and math.isnan(fill):
        return "NaN"
    return str(fill)


def all_names() -> list[str]:
    names = [S.FORMAT_NAME, *S.ROOT_ATTRS, S.ATTR_FINISHED, *S.STATUSES, S.INDEX, *S.DELTA_DTYPES,
             S.ATTR_SV_CAPACITY, S.ATTR_FACTORS_K, S.ATTR_DELTA_DTYPE, S.ATTR_INTRUDER_K, S.module_key(0),
             S.GROUP_MODULES, S.GROUP_COVERAGE, S.GROUP_CONFIG, S.GROUP_STEPS, S.GROUP_SNAPSHOTS,
             S.GROUP_FACTORS, S.GROUP_DELTAS, f"{S.GROUP_FACTORS}/{S.FACTOR_U}/", f"{S.GROUP_FACTORS}/{S.FACTOR_V}/",
             f"{S.GROUP_GRAD_FACTORS}/{S.FACTOR_U}/", f"{S.GROUP_GRAD_FACTORS}/{S.FACTOR_V}/"]
    for columns, _ in TABLES.values():
        names += [c.name for c in columns]
    return names


@pytest.mark.parametrize("name", sorted(set(all_names())))
def test_every_schema_name_is_in_the_doc(name):
    assert f"`{name}" in TEXT, f"docs/format.md does not mention `{name}` (from lorascope/store/schema.py)"


def test_the_doc_states_the_schema_version():
    assert f"(schema version {S.SCHEMA_VERSION})" in TEXT.splitlines()[0]


@pytest.mark.parametrize("group", list(TABLES))
def test_each_column_row_matches_the_schema(group):
    columns, rows = TABLES[group]
    documented = table_rows(section(group), COLUMN_HEADER)
    for column in columns:
        assert column.name in documented, f"`{group}/{column.name}` has no row in its section"
        name, dtype, shape, fill, unit, meaning = documented[column.name]
        assert dtype == column.dtype, f"{group}/{column.name}: dtype {dtype!r}, schema says {column.dtype!r}"
        assert shape == SHAPES[column.layout].format(rows=rows), f"{group}/{column.name}: shape {shape!r}"
        assert fill == fill_text(column.fill), f"{group}/{column.name}: fill {fill!r}, schema {column.fill!r}"
        assert unit == column.unit, f"{group}/{column.name}: unit {unit!r}, schema says {column.unit!r}"
        assert meaning, f"{group}/{column.name}: no meaning given"
    extra = set(documented) - {c.name for c in columns}
    assert not extra, f"the `{group}` section documents datasets the schema lacks: {sorted(extra)}"


def test_root_attributes_status_values_and_snapshot_attributes_are_tables():
    root = section_by_title("Root attributes")
    attributes = table_rows(root, ("attribute", "type", "meaning"))
    assert set(attributes) == {*S.ROOT_ATTRS, S.ATTR_FINISHED}
    assert attributes[S.ATTR_SCHEMA_VERSION][1] == "int64"
    assert f"`{S.FORMAT_NAME}`" in attributes[S.ATTR_FORMAT][2]
    assert set(table_rows(root, ("status", "meaning"))) == set(S.STATUSES)
    snapshot_attributes = table_rows(section(S.GROUP_SNAPSHOTS), ("attribute", "type", "meaning"))
    assert set(snapshot_attributes) == {S.ATTR_SV_CAPACITY, S.ATTR_FACTORS_K, S.ATTR_DELTA_DTYPE, S.ATTR_INTRUDER_K}


def section_by_title(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\s*$", TEXT, flags=re.MULTILINE)
    assert match, title
    end = re.search(r"^## ", TEXT[match.end():], flags=re.MULTILINE)
    return TEXT[match.end(): match.end() + end.start() if end else len(TEXT)]


def test_the_reading_examples_run(tmp_path, monkeypatch):
    modules = [dict(name="layers.0.q", module="layers.0.q", parameter="weight", kind="attention", role="q",
                    layer=0, expert=-1, out_features=3, in_features=2)]
    with RunWriter(tmp_path / "run.h5", modules, config={"recorder": {"snapshots": "log"}}) as writer:
        writer.append_steps({"step": [1, 2], "loss": [2.0, 1.5]})
        writer.append_snapshot(Snapshot(step=2, energy=[5.0], sv=[np.array([2.0, 1.0])]))
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", TEXT, flags=re.DOTALL)
    assert len(blocks) >= 2
    for block in blocks:
        namespace: dict[str, object] = {}
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
        if "spectrum" in namespace:
            np.testing.assert_array_equal(namespace["spectrum"], [2.0, 1.0])
            assert namespace["config"] == {"recorder": {"snapshots": "log"}}
