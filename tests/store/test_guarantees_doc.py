"""docs/guarantees.md: every test a guarantee points to exists (``file::test``), so that no promise outlives its
check."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_guarantee_points_to_a_test_that_exists():
    text = (ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8")
    references = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(references) >= 20
    missing = [f"{path}::{name}" for path, name in references
               if not (ROOT / path).is_file()
               or not re.search(rf"^def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.MULTILINE)]
    assert not missing, f"docs/guarantees.md points to tests that do not exist: {missing}"


def test_readme_links_the_guarantees():
    assert "(docs/guarantees.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
