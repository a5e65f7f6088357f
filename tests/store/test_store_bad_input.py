"""Bad input files: each gives one specific exception class from lorascope.errors, with a one-line message that
names the file. The broken files come from ``fixtures/broken.py`` (also used by ``fixtures/make_fixtures.py``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

import lorascope.errors as errors
from lorascope import open_run

ROOT = Path(__file__).resolve().parents[2]


def _load_broken() -> ModuleType:
    # fixtures/ is a folder of data and scripts, not a package: load the helper by path.
    spec = importlib.util.spec_from_file_location("lorascope_fixtures_broken", ROOT / "fixtures" / "broken.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


broken = _load_broken()
NAMED_KEYS = sorted(key for key, expected in broken.EXPECTED_ERRORS.items() if expected)


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return broken.make_broken_files(tmp_path_factory.mktemp("broken"))


def _open_and_read(path: Path) -> None:
    with open_run(path) as run:
        run.steps.load()
        run.snapshots.load()


def _check_message(exc: BaseException, path: Path) -> str:
    message = str(exc)
    assert str(path) in message, f"the message must name the file: {message!r}"
    assert "\n" not in message.strip(), f"the message must be one line: {message!r}"
    return message


def test_make_broken_files_covers_every_expected_key(broken_files):
    assert set(broken.EXPECTED_ERRORS) <= set(broken_files)
    assert any(key.startswith(broken.TRUNCATED_PREFIX) for key in broken_files)
    for key, path in broken_files.items():
        assert path.exists(), key


def test_the_source_of_the_broken_files_is_valid(broken_files):
    with open_run(broken_files["valid"]) as run:
        assert run.complete
        assert run.n_steps == 12 and run.n_snapshots == 4 and len(run.modules) == 3


def test_nonexistent_path(tmp_path):
    path = tmp_path / "no_such_run.h5"
    with pytest.raises(errors.RunFileNotFoundError) as info:
        open_run(path)
    _check_message(info.value, path)
    assert isinstance(info.value, FileNotFoundError)  # also catchable the standard way


@pytest.mark.parametrize("key", NAMED_KEYS)
def test_broken_file_raises_its_specific_error(broken_files, key):
    path = broken_files[key]
    expected = getattr(errors, broken.EXPECTED_ERRORS[key])
    with pytest.raises(errors.RunFileError) as info:
        _open_and_read(path)
    assert type(info.value) is expected, f"{key}: {type(info.value).__name__}: {info.value}"
    _check_message(info.value, path)


@pytest.mark.parametrize(("key", "named"), [
    ("missing_dataset", broken.MISSING_DATASET),
    ("missing_group", broken.MISSING_GROUP),
    ("mismatched_lengths", broken.MISMATCHED_COLUMN),
    ("missing_version", "schema_version"),
    ("newer_version", "upgrade lorascope"),
    ("bad_config_json", "recorder"),
])
def test_message_says_what_is_wrong(broken_files, key, named):
    with pytest.raises(errors.RunFileError) as info:
        _open_and_read(broken_files[key])
    assert named in _check_message(info.value, broken_files[key])


def test_committed_broken_fixtures_still_raise_their_errors():
    folder = ROOT / "fixtures" / "broken"
    present = [key for key in NAMED_KEYS if (folder / f"{key}.h5").is_file()]
    if not present:
        pytest.skip("fixtures/broken/ not generated (python fixtures/make_fixtures.py)")
    for key in present:
        path = folder / f"{key}.h5"
        with pytest.raises(errors.RunFileError) as info:
            _open_and_read(path)
        assert type(info.value).__name__ == broken.EXPECTED_ERRORS[key], key
    _open_and_read(folder / "valid.h5")  # the source they were derived from is fine


# A truncated file is opened in a child process: a reader that hangs on it must fail this test, not the suite.
_OPEN_EACH = textwrap.dedent("""
    import json, sys
    from lorascope import open_run
    from lorascope.errors import RunFileError
    for path in sys.argv[1:]:
        try:
            with open_run(path) as run:
                run.steps.load(); run.snapshots.load()
            outcome = {"error": "", "run_file_error": False, "message": ""}
        except Exception as exc:
            outcome = {"error": type(exc).__name__, "run_file_error": isinstance(exc, RunFileError),
                       "message": str(exc)}
        print(json.dumps({"path": path, **outcome}), flush=True)
""")
_HANG_DEADLINE_S = 15  # only a hang detector: a working reader needs about a second for all files


def test_truncated_file_raises_a_run_file_error(broken_files):
    truncated = {str(p): key for key, p in broken_files.items() if key.startswith(broken.TRUNCATED_PREFIX)}
    proc = subprocess.Popen([sys.executable, "-c", _OPEN_EACH, *truncated], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=_HANG_DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    outcomes = {truncated[o["path"]]: o for o in map(json.loads, out.splitlines())}
    problems = []
    for path, key in truncated.items():
        outcome = outcomes.get(key)
        if outcome is None:
            problems.append(f"{key}: open_run did not return or raise within {_HANG_DEADLINE_S} s")
            break  # the child hung on this file and never reached the next ones
        if not outcome["run_file_error"]:
            problems.append(f"{key}: {outcome['error'] or 'opened without error'}: {outcome['message']}")
        elif path not in outcome["message"] or "\n" in outcome["message"].strip():
            problems.append(f"{key}: message must be one line naming the file: {outcome['message']!r}")
    assert not problems, "\n".join(problems) + (f"\nchild stderr: {err[-2000:]}" if err.strip() else "")
