"""The API reference's cross-references (scripts/griffe_roles.py, mkdocs.yml): a Sphinx role naming an object the
site documents becomes a link, one naming an object it does not document shows as code, and one naming nothing
that exists fails the strict build. Checked by building a one-page site of a small package with the project's
own extension (mkdocs, mkdocstrings and autorefs as installed by the ``docs`` extra)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")

EXTENSION = Path(__file__).resolve().parents[1] / "scripts" / "griffe_roles.py"

PACKAGE = '''
"""A package: :func:`helper`, :class:`~refpkg.Thing`, :meth:`Thing.run <refpkg.Thing.run>`, the undocumented
:func:`_hidden`, :data:`numpy.pi`{broken}."""


def helper() -> None:
    """Helps."""


def _hidden() -> None:
    pass


class Thing:
    """A thing.

    Attributes
    ----------
    size : int
        Set where griffe cannot see it: :attr:`Thing.size` still counts as existing.
    """

    def __init__(self) -> None:
        try:
            self.size = 1
        except ValueError:
            pass

    def run(self) -> None:
        """Runs."""
'''


def _build(tmp_path: Path, broken: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    (tmp_path / "refpkg").mkdir(exist_ok=True)
    (tmp_path / "refpkg" / "__init__.py").write_text(PACKAGE.format(broken=broken))
    (tmp_path / "docs").mkdir(exist_ok=True)
    (tmp_path / "docs" / "index.md").write_text("# refpkg\n\n::: refpkg\n")
    (tmp_path / "mkdocs.yml").write_text(textwrap.dedent(f"""\
        site_name: refs
        docs_dir: docs
        plugins:
          - autorefs
          - mkdocstrings:
              handlers:
                python:
                  paths: [{tmp_path}]
                  options:
                    extensions:
                      - {EXTENSION}:SphinxRoles
                    docstring_style: numpy
                    show_if_no_docstring: false
        """))
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml"),
                           "--site-dir", str(site)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    return done, site / "index.html"


def test_documented_targets_link_undocumented_ones_show_as_code(tmp_path):
    done, page = _build(tmp_path, broken="")
    assert done.returncode == 0, done.stderr[-3000:]
    html = page.read_text()
    for anchor, shown in (("refpkg.helper", "helper"), ("refpkg.Thing", "Thing"), ("refpkg.Thing.run", "Thing.run")):
        assert f'href="#{anchor}"><code>{shown}</code></a>' in html, anchor
    assert '<span title="refpkg._hidden"><code>_hidden</code></span>' in html  # exists, not documented: code
    assert '<span title="refpkg.Thing.size"><code>Thing.size</code></span>' in html
    assert "<code>numpy.pi</code>" in html and 'href="#numpy' not in html  # another project: code


def test_a_reference_to_nothing_fails_the_strict_build(tmp_path):
    done, _ = _build(tmp_path, broken=", and :func:`helpr`")
    assert done.returncode != 0
    assert "Could not find cross-reference target 'helpr'" in done.stderr
