"""The package as a user gets it: ``python -m build`` makes a wheel and an sdist from this checkout; the wheel,
installed (not editable) into a fresh virtual environment that cannot see the checkout, runs ``lorascope
--version`` and the smallest ``lorascope demo``, imports every public name, and ships ``py.typed`` so a type
checker reads its annotations (mypy, pointed at that environment, flags a wrong type from lorascope's hints).

Slow tier (``-m slow``, run by ``.ci/run`` after the default suite): installing the dependencies into the fresh
environment takes minutes. torch is pinned to the version of this environment, so the same build (here the CPU
one) is installed, as a user's own torch would be kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import lorascope

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VERSION = lorascope.__version__


def _run(*args: str | Path, cwd: Path, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """Wheel and sdist built from a copy of the checkout's files (tracked and new, never ignored ones), so that the
    build leaves nothing in the checkout."""
    pytest.importorskip("build")
    tmp = tmp_path_factory.mktemp("package")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    source = tmp / "src"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    _run(sys.executable, "-m", "build", "--outdir", tmp / "dist", source, cwd=tmp)
    return {"wheel": tmp / "dist" / f"lorascope-{VERSION}-py3-none-any.whl",
            "sdist": tmp / "dist" / f"lorascope-{VERSION}.tar.gz"}


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel and its dependencies (this environment's torch version)."""
    import torch

    home = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", home / "env", cwd=home)
    python = home / "env" / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", dist["wheel"],
         f"torch=={torch.__version__.split('+')[0]}", cwd=home)
    return home / "env"


def test_wheel_and_sdist_hold_the_package(dist):
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        entry_points = wheel.read(f"lorascope-{VERSION}.dist-info/entry_points.txt").decode()
    assert {"lorascope/py.typed", "lorascope/__init__.py", "lorascope_cli/main.py",
            "lorascope/record/per_example/__init__.py"} <= names
    assert not any(name.startswith(("tests/", "examples/")) for name in names)
    assert "lorascope = lorascope_cli.main:main" in entry_points
    # every module of the source tree is in the wheel (a package missing from pyproject's list would not be)
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lorascope").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    with tarfile.open(dist["sdist"]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "README.md", "lorascope/py.typed", "cli/main.py"} <= members


def test_installed_wheel_runs_the_cli_and_imports_every_public_name(venv, tmp_path):
    bin_dir = venv / "bin"
    version = _run(bin_dir / "lorascope", "--version", cwd=tmp_path).stdout
    assert version.strip() == f"lorascope, version {VERSION}"
    probe = ("import lorascope, sys; missing = [n for n in lorascope.__all__ if not hasattr(lorascope, n)]; "
             "print(lorascope.__file__); print(len(lorascope.__all__), missing)")
    where, names = _run(bin_dir / "python", "-c", probe, cwd=tmp_path).stdout.splitlines()
    assert Path(where).is_relative_to(venv), f"imported from {where}, not from the installed wheel"
    assert names == f"{len(lorascope.__all__)} []"
    demo = _run(bin_dir / "lorascope", "demo", "-o", tmp_path / "demo", "--steps", "2", "--quiet", cwd=tmp_path)
    assert "captures" in demo.stdout
    assert (tmp_path / "demo" / "report" / "report.html").is_file()


def test_type_checker_reads_the_installed_annotations(venv, tmp_path):
    """py.typed honoured: mypy, resolving ``lorascope`` in the fresh environment, types a call from its hints."""
    pytest.importorskip("mypy")
    user = tmp_path / "user.py"
    user.write_text("import lorascope\n\nsteps: str = lorascope.open_run('run.h5').n_steps\n")
    result = subprocess.run([sys.executable, "-m", "mypy", "--python-executable", str(venv / "bin" / "python"),
                             "--no-incremental", "--follow-imports=silent", str(user)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'Incompatible types in assignment (expression has type "int", variable has type "str")' in result.stdout
    assert "missing library stubs or py.typed marker" not in result.stdout
