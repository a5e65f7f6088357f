"""The layering rules of docs/design.md, enforced on the source: what each part of ``lorascope/`` may import.

Data flows one way: trainer -> record -> store (file) -> workflows -> analysis -> report -> cli. Every import
statement counts, at module level or inside a function (a lazy import hides a dependency, it does not remove one);
``from lorascope import name`` is followed to the module that defines ``name``. Imports under
``if TYPE_CHECKING:`` count too, except in the layers of ``TYPE_ONLY_ALLOWED`` (report/ names the types it
renders). The checks read the source with :mod:`ast`; nothing is imported.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lorascope": ROOT / "lorascope", "lorascope_cli": ROOT / "cli"}  # import name -> source folder

# -- the rules: layer (folder, or root module, under lorascope/) -> forbidden imports ---------------------------
# A forbidden name covers itself and everything under it ("torch" covers "torch.nn"). Keep the table of
# docs/design.md (its section DOC_SECTION) in step with this one: test_design_doc_states_these_rules compares them.
DOC_SECTION = "## What each part may import"

MODEL, RECORD, STORE, ANALYSIS = "lorascope.model", "lorascope.record", "lorascope.store", "lorascope.analysis"
WORKFLOWS, INPUTS, REPORT = "lorascope.workflows", "lorascope.inputs", "lorascope.report"
LAYERS = (MODEL, RECORD, STORE, ANALYSIS, WORKFLOWS, INPUTS, REPORT)

# Modules through which a file is read or written: pure layers import none of them.
FILE_MODULES = ("os", "pathlib", "io", "shutil", "tempfile", "glob", "pickle", "h5netcdf", "netCDF4", "zarr",
                "json.load", "json.dump")

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "analysis":  (STORE, RECORD, WORKFLOWS, REPORT, MODEL, INPUTS, "lorascope.spectrum", "lorascope.demo",
                  "h5py", "torch", *FILE_MODULES),  # pure: arrays and dataclasses in and out
    "record":    (ANALYSIS, WORKFLOWS, REPORT, INPUTS),
    "store":     (RECORD, ANALYSIS, WORKFLOWS, REPORT, MODEL, INPUTS),
    "model":     (RECORD, STORE, ANALYSIS, WORKFLOWS, REPORT),
    "inputs":    (RECORD, STORE, ANALYSIS, WORKFLOWS, REPORT),
    "workflows": (REPORT,),  # workflows return results; the CLI hands them to report
    "report":    (STORE, RECORD, "h5py", "torch"),  # renders results, never reads a run file
    "spectrum":  LAYERS,  # the numeric kernel, and the helpers every layer shares
    "errors":    LAYERS,
    "_checks":   LAYERS,
    "_version":  LAYERS,
    "_display":  LAYERS,  # the display hooks the report fills (docs/design.md, "Notebooks")
}
# One named exception (docs/design.md): the live metrics the recorder publishes while training are analyze's own
# numbers, so the one module that computes them imports them from analysis instead of re-implementing them.
EXCEPTIONS: dict[str, tuple[str, ...]] = {"lorascope.record.live_metrics": ("lorascope.analysis.live",)}
ORCHESTRATORS = {"__init__", "demo"}  # the public surface and `lorascope demo` use every layer: no row
EVERYWHERE = ("lorascope_cli", "cli")  # no module of the library imports the command-line application
TYPE_ONLY_ALLOWED = {"report"}  # layers whose ``if TYPE_CHECKING:`` imports are exempt
NO_FILE_CALLS = {"analysis"}  # layers that may not call a file API (below) either

# File APIs reached without importing a file module: open(), and these functions and methods.
FILE_FUNCTIONS = {"open", "json.load", "json.dump", "numpy.save", "numpy.savez", "numpy.savez_compressed",
                  "numpy.savetxt", "numpy.load", "numpy.loadtxt", "numpy.genfromtxt", "numpy.fromfile",
                  "numpy.memmap", "xarray.open_dataset", "xarray.open_dataarray", "xarray.open_mfdataset",
                  "xarray.load_dataset", "xarray.load_dataarray", "xarray.open_zarr", "pandas.read_csv",
                  "pandas.read_json", "pandas.read_parquet", "pandas.read_hdf", "pandas.read_pickle"}
FILE_METHODS = {"to_netcdf", "to_zarr", "to_csv", "to_json", "to_parquet", "to_hdf", "to_pickle", "tofile",
                "savefig", "read_text", "write_text", "read_bytes", "write_bytes"}

MAX_LINES = 600  # STYLE.md: a module past ~600 lines is split by responsibility


# -- the checker ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    module: str  # lorascope/analysis/information.py:298
    imported: str  # what it imports or calls, resolved: lorascope.store.reader.open_run
    rule: str  # the forbidden prefix it falls under, or "file API"

    def __str__(self) -> str:
        return f"{self.module}: {self.imported} (forbidden: {self.rule})"


def module_name(path: Path) -> str:
    """``lorascope/analysis/metrics.py`` -> ``lorascope.analysis.metrics``; a package's ``__init__`` -> the package."""
    for package, folder in PACKAGES.items():
        if path.is_relative_to(folder):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(f"{path} is not in a package of this repository")


def source_of(name: str) -> Path | None:
    """The file of a module of this repository (a package's ``__init__.py``), None for other modules."""
    package, _, rest = name.partition(".")
    if package not in PACKAGES:
        return None
    base = PACKAGES[package].joinpath(*rest.split(".")) if rest else PACKAGES[package]
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def layer_of(name: str) -> str | None:
    """``lorascope.analysis.metrics`` -> ``analysis``; ``lorascope.spectrum`` -> ``spectrum``; None outside."""
    parts = name.split(".")
    return parts[1] if parts[0] == "lorascope" and len(parts) > 1 else None


def _reexport(package: str, name: str, depth: int = 0) -> str:
    """Where ``from package import name`` really comes from: the submodule ``package.name``, the module a package
    ``__init__`` re-exports ``name`` from (followed through further re-exports), or ``package.name``."""
    if source_of(f"{package}.{name}") is not None or depth > 5:
        return f"{package}.{name}"
    init = source_of(package)
    if init is not None and init.name == "__init__.py":
        for node in ast.walk(ast.parse(init.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
                origin = _absolute(node, package, is_package=True)
                original = next(a.name for a in node.names if (a.asname or a.name) == name)
                return _reexport(origin, original, depth + 1)
    return f"{package}.{name}"


def _absolute(node: ast.ImportFrom, module: str, *, is_package: bool) -> str:
    """The absolute module of a ``from ... import``, relative imports resolved against ``module``."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside the body of an ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for statement in node.body:
                inside.update(id(n) for n in ast.walk(statement))
    return inside


def imports_of(source: str, module: str, *, is_package: bool = False, skip_type_checking: bool = False
               ) -> list[tuple[int, str]]:
    """(line, imported module or name) of every import in ``source``, resolved to absolute dotted names.

    ``import a.b`` gives ``a.b``; ``from a import b`` gives ``a.b`` (a re-export of this repository followed to its
    origin); ``importlib.import_module("a.b")`` and ``__import__("a.b")`` with a literal name give ``a.b``.
    """
    tree = ast.parse(source)
    skipped = _type_checking_nodes(tree) if skip_type_checking else set()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package=is_package)
            if base == "__future__":
                continue
            for alias in node.names:
                found.append((node.lineno, base if alias.name == "*" else _reexport(base, alias.name)))
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def file_calls_of(source: str) -> list[tuple[int, str]]:
    """(line, call) of every call of a file API: ``open(...)``, a function of ``FILE_FUNCTIONS`` through any import
    alias (``np.save`` is ``numpy.save``), or a method of ``FILE_METHODS`` on anything (``ds.to_netcdf``)."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({(a.asname or a.name.split(".")[0]): (a.name if a.asname else a.name.split(".")[0])
                            for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            aliases.update({(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names})
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called = ast.unparse(node.func)
        head, dot, tail = called.partition(".")
        resolved = aliases.get(head, head) + dot + tail
        if resolved in FILE_FUNCTIONS:
            found.append((node.lineno, resolved))
        elif isinstance(node.func, ast.Attribute) and node.func.attr in FILE_METHODS:
            found.append((node.lineno, called))
    return sorted(found)


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check_source(source: str, module: str, where: str, *, is_package: bool = False) -> list[Violation]:
    """Every violation of the rules by one module's source (``module``: its dotted name, ``where``: its label)."""
    layer = layer_of(module)
    forbidden = (*FORBIDDEN.get(layer, ()), *EVERYWHERE)
    violations = []
    for line, name in imports_of(source, module, is_package=is_package,
                                 skip_type_checking=layer in TYPE_ONLY_ALLOWED):
        rule = next((prefix for prefix in forbidden if _matches(name, prefix)), None)
        if rule is not None and not any(_matches(name, allowed) for allowed in EXCEPTIONS.get(module, ())):
            violations.append(Violation(f"{where}:{line}", name, rule))
    if layer in NO_FILE_CALLS:
        violations.extend(Violation(f"{where}:{line}", call, "file API") for line, call in file_calls_of(source))
    return sorted(violations, key=lambda v: int(v.module.rsplit(":", 1)[1]))


def library_files() -> list[Path]:
    return sorted(PACKAGES["lorascope"].rglob("*.py"))


def check_library() -> list[Violation]:
    violations = []
    for path in library_files():
        violations.extend(check_source(path.read_text(encoding="utf-8"), module_name(path),
                                       str(path.relative_to(ROOT)), is_package=path.name == "__init__.py"))
    return violations


# -- the library obeys them -------------------------------------------------------------------------------------


def test_every_layer_imports_only_what_it_may():
    violations = check_library()
    assert not violations, (f"{len(violations)} imports break the layering of docs/design.md (module: import):\n  "
                            + "\n  ".join(map(str, violations)))


def test_every_layer_of_the_package_has_a_rule():
    layers = {p.stem for p in PACKAGES["lorascope"].iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py"}
    unruled = layers - set(FORBIDDEN) - ORCHESTRATORS
    assert not unruled, f"parts of lorascope/ without a row in FORBIDDEN (add one, and to docs/design.md): {unruled}"


def test_no_module_exceeds_the_line_limit():
    too_long = []
    for folder in PACKAGES.values():
        for path in sorted(folder.rglob("*.py")):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_LINES:
                too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not too_long, f"modules over {MAX_LINES} lines (split them by responsibility):\n  " + "\n  ".join(too_long)


def test_design_doc_states_these_rules():
    """docs/design.md's table of forbidden imports has one row per layer here, naming exactly this file's names."""
    doc = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = doc[doc.index(DOC_SECTION):]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    rows = {}
    for match in re.finditer(r"^\|([^|]*)\|([^|]*)\|([^|]*)\|\s*$", section, flags=re.MULTILINE):
        for layer in re.findall(r"`lorascope/([\w/.]+)`", match.group(1)):  # a row may name several layers
            rows[layer.removesuffix("/").removesuffix(".py")] = set(re.findall(r"`([\w.]+)`", match.group(2)))
    assert set(rows) == set(FORBIDDEN), f"docs/design.md's table has rows {sorted(rows)}; here: {sorted(FORBIDDEN)}"
    for layer, forbidden in FORBIDDEN.items():
        assert rows[layer] == set(forbidden), (f"docs/design.md's row for {layer} differs from tests/test_layering.py: "
                                               f"only in the doc {sorted(rows[layer] - set(forbidden))}, only here "
                                               f"{sorted(set(forbidden) - rows[layer])}")
    for name in (*EVERYWHERE, "open()", "to_netcdf"):
        assert f"`{name}`" in section, f"docs/design.md's section on imports does not mention `{name}`"


# -- the checker catches what it should (so the tests above cannot pass vacuously) ------------------------------


PLANTED = '''
from __future__ import annotations

import os.path
import numpy as np
from typing import TYPE_CHECKING

from lorascope.errors import LorascopeError
from lorascope import open_run
from ..record import snapshot
from . import spectra

if TYPE_CHECKING:
    import torch


def lazy(ds, path):
    import h5py
    import importlib
    importlib.import_module("lorascope_cli.main")
    np.save(path, np.zeros(3))
    ds.to_netcdf(path)
    with open(path) as f:
        return f.read()
'''


def test_checker_finds_planted_violations():
    found = {(int(v.module.rsplit(":", 1)[1]), v.imported, v.rule)
             for v in check_source(PLANTED, "lorascope.analysis.planted", "planted.py")}
    assert found == {
        (4, "os.path", "os"),
        (9, "lorascope.store.reader.open_run", STORE),  # a re-export of the package root, followed
        (10, "lorascope.record.snapshot", RECORD),  # a relative import, resolved
        (14, "torch", "torch"),  # type-only imports count outside report/
        (18, "h5py", "h5py"),  # an import inside a function counts
        (20, "lorascope_cli.main", "lorascope_cli"),
        (21, "numpy.save", "file API"),
        (22, "ds.to_netcdf", "file API"),
        (23, "open", "file API"),
    }


def test_checker_allows_type_only_imports_in_report_only():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lorascope.store import Run\n"
    assert check_source(source, "lorascope.report.planted", "planted.py") == []
    (violation,) = check_source(source, "lorascope.store.planted", "planted.py") + check_source(
        source.replace("lorascope.store", "lorascope.report"), "lorascope.record.planted", "planted.py")
    assert (violation.imported, violation.rule) == ("lorascope.report.Run", REPORT)
    (violation,) = check_source(source.replace("if TYPE_CHECKING:\n    ", ""), "lorascope.report.planted", "p.py")
    assert violation.rule == STORE


@pytest.mark.parametrize(("layer", "allowed"), [("workflows", "lorascope.store.reader"), ("record", STORE),
                                                ("report", "lorascope.workflows.analyze"), ("analysis", "numpy")])
def test_checker_allows_what_the_table_allows(layer, allowed):
    assert check_source(f"import {allowed}\n", f"lorascope.{layer}.planted", "planted.py") == []


def test_checker_holds_every_module_to_the_cli_rule():
    for module in ("lorascope", "lorascope.demo", "lorascope.workflows.analyze"):  # rows or not
        (violation,) = check_source("from lorascope_cli import main\n", module, "planted.py")
        assert violation.rule == "lorascope_cli"


def test_checker_reads_the_real_tree():
    assert len(library_files()) > 40
    assert module_name(ROOT / "lorascope" / "analysis" / "__init__.py") == "lorascope.analysis"
    assert source_of("lorascope.analysis.spectra") == ROOT / "lorascope" / "analysis" / "spectra.py"
    assert _reexport("lorascope", "open_run").startswith(STORE)
