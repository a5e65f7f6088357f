"""Every CLI error is one line on stderr with exit status 2, never click's usage text or a traceback (issue 15,
item 4), and every output path is checked before the work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorascope._checks import MAX_RANK
from lorascope_cli.main import cli

TINY_RUN = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_run.h5"
SIZES = ("--examples", "100", "--tokens-per-example", "10")


@pytest.fixture
def paths(tmp_path) -> dict[str, Path]:
    """A model config, a plain file, a file that is no run file, and a missing folder."""
    config = tmp_path / "model" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
                                  "vocab_size": 64}))
    plain = tmp_path / "plain.txt"
    plain.write_text("not a folder")
    garbage = tmp_path / "garbage.h5"
    garbage.write_text("not HDF5")
    return {"config": config, "plain": plain, "garbage": garbage, "missing": tmp_path / "missing" / "dir",
            "tmp": tmp_path}


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "Usage:" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""  # nothing printed before the error: the check came before the work
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("ranks", ["x", "0,4", "8,,-1", "99999999999999999999999", str(MAX_RANK + 1), "1e99"])
@pytest.mark.parametrize("command", ["analyze", "recommend", "calibrate"])
def test_a_bad_ranks_value_is_one_line(paths, command, ranks):
    args = {"analyze": [TINY_RUN, "-o", paths["tmp"] / "report"],
            "recommend": ["--config", paths["config"], *SIZES],
            "calibrate": ["--config", paths["config"], "-o", paths["tmp"] / "c.json"]}[command]
    _assert_one_line_error(_invoke(command, *args, "--ranks", ranks), "'--ranks'", str(MAX_RANK), "--help")


def test_the_largest_rank_is_accepted(paths):
    result = _invoke("recommend", "--config", paths["config"], *SIZES, "--ranks", f"8,{MAX_RANK}", "--json")
    assert result.exit_code == 0, result.output
    assert MAX_RANK in [row["rank"] for row in json.loads(result.stdout)["predictions"]]


@pytest.mark.parametrize("args", [
    ["analyze"],  # a missing argument
    ["analyze", TINY_RUN, "--bogus"],  # an unknown option
    ["bogus"],  # an unknown command
    ["--bogus"],
    ["info"],
    ["compare"],
    ["recommend", "--examples", "100"],  # a missing required option
    ["recommend", "--config", "x", "--examples", "abc"],  # a value of the wrong type
    ["recommend", "--config", "x", "--task", "ppo"],  # a choice not offered
    ["calibrate", "--epochs", "0"],  # out of range
    ["demo", "--steps", "1"],
])
def test_click_argument_errors_are_one_line(args):
    _assert_one_line_error(_invoke(*args), "--help")


def test_help_still_shows_the_usage():
    result = _invoke("analyze", "--help")
    assert result.exit_code == 0 and result.output.startswith("Usage:")


@pytest.mark.parametrize(("args", "fragment"), [
    (["info", "{missing}/run.h5"], "no such file"),
    (["info", "{garbage}"], "not an HDF5 file"),
    (["analyze", "{garbage}", "-o", "{tmp}/r"], "not an HDF5 file"),
    (["analyze", "{tmp}", "-o", "{tmp}/r"], "is a directory"),
    (["recommend", "--config", "{missing}/config.json", "--examples", "100"], "No model config"),
    (["recommend", "--config", "{config}", *SIZES, "--calibration", "{garbage}"], "calibration"),
    (["recommend", "--config", "{config}", *SIZES, "--probe", "{garbage}"], "not an HDF5 file"),
    (["recommend", "--config", "{config}", "--dataset", "{missing}/data.jsonl"], "does not exist"),
    (["compare", TINY_RUN, TINY_RUN, "--predictions", "{garbage}", "-o", "{tmp}/c"], "predictions"),
])
def test_an_unreadable_file_argument_is_one_line(paths, args, fragment):
    _assert_one_line_error(_invoke(*[str(a).format(**paths) for a in args]), fragment)


@pytest.mark.parametrize(("args", "fragment"), [
    # recommend used to print the whole recommendation, then fail on the path with a traceback
    (["recommend", "--config", "{config}", *SIZES, "--peft-config", "{missing}/lora.json"], "does not exist"),
    (["recommend", "--config", "{config}", *SIZES, "--peft-config", "{plain}/adapter"], "is not a folder"),
    (["recommend", "--config", "{config}", *SIZES, "--peft-config", "{plain}/lora.json"], "is not a folder"),
    (["analyze", TINY_RUN, "-o", "{plain}/report"], "is not a folder"),
    (["analyze", TINY_RUN, "-o", "{plain}"], "is not a folder"),
    (["compare", TINY_RUN, TINY_RUN, "-o", "{plain}/compare"], "is not a folder"),
    (["calibrate", "--config", "{config}", "-o", "{missing}/c.json"], "does not exist"),
    (["calibrate", "--config", "{config}", "-o", "{tmp}"], "is a folder"),
    (["demo", "-o", "{plain}/demo"], "is not a folder"),
])
def test_an_unusable_output_path_is_refused_before_the_work(paths, args, fragment):
    _assert_one_line_error(_invoke(*[str(a).format(**paths) for a in args]), fragment)


def test_a_missing_output_folder_is_created_with_its_parents(paths):
    out = paths["tmp"] / "new" / "deeper" / "adapter"
    result = _invoke("recommend", "--config", paths["config"], *SIZES, "--peft-config", out)
    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").is_file()
