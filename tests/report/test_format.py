"""The report's number vocabulary (lorascope.report.format) and the rule that report modules share it publicly."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from lorascope.report import format as fmt

REPORT = Path(fmt.__file__).parent


@pytest.mark.parametrize("missing", [None, math.nan])
def test_every_formatter_writes_a_missing_value_the_same_way(missing):
    for write in (fmt.count, fmt.approx_count, fmt.number, fmt.percent, fmt.significant):
        assert write(missing) == fmt.MISSING
    assert fmt.count(-1) == fmt.approx_count(-1) == fmt.MISSING  # a count a run file did not record


def test_counts_are_exact_and_predictions_rounded():
    assert fmt.count(1024) == "1,024" and fmt.count(12345.4) == "12,345"
    assert fmt.approx_count(1024) == "1,020" and fmt.approx_count(999_999) == "1,000,000"
    assert fmt.count(math.inf) == fmt.approx_count(math.inf) == fmt.bound(None) == "unbounded"
    assert fmt.bound(20049.0) == fmt.approx_count(20049.0) == "20,000"


def test_numbers_have_thousands_separators_and_fixed_decimals():
    assert fmt.number(2313.24) == "2,313.2" and fmt.number(-0.0204, 3) == "-0.020" and fmt.number(7, 0) == "7"
    assert fmt.percent(0.5) == "50.0%" and fmt.percent(1.0, 0) == "100%"
    assert fmt.significant(0.0001234) == "0.0001234" and fmt.significant(16.0) == "16"


def test_table_aligns_names_left_and_numbers_right():
    lines = fmt.table(["run", "steps"], [["a", "1,024"], ["longer", "8"]])
    assert lines == ["run     steps", "a       1,024", "longer      8"]


def test_json_text_is_strict():
    assert fmt.json_text({"a": [1, None]}) == '{\n  "a": [\n    1,\n    null\n  ]\n}'
    with pytest.raises(ValueError):
        fmt.json_text({"a": math.nan})


def _report_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from lorascope.report.<module> import <name>`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorascope.report."):
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_report_modules_import_no_private_name_of_a_sibling():
    private = [f"{path.name}: {module}.{name}" for path in sorted(REPORT.glob("*.py"))
               for module, name in _report_imports(path) if name.startswith("_")]
    assert not private, "report modules share format.py and style.py, not each other's private helpers"


def test_the_number_formatters_live_only_in_format():
    names = {"num", "count", "pct", "percent", "number", "approx_count", "bound", "size", "byte_size"}
    defined = sorted(f"{path.name}: {node.name}" for path in REPORT.glob("*.py") if path.name != "format.py"
                     for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                     if isinstance(node, ast.FunctionDef) and node.name.strip("_") in names)
    assert not defined, "numbers are written by lorascope.report.format only"
