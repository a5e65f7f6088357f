"""``lorascope calibrate``'s kappa(P) options (issue 13 item 2) through click's CliRunner: --bracket, --load and
--budget checked before any training, one line each, exit status 2; a real tiny run prints the fit and the bracket
and writes them to the file."""

from __future__ import annotations

import importlib
import json
import math

import pytest
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lorascope.workflows.calibrate import load_calibration  # noqa: E402
from lorascope_cli.main import cli  # noqa: E402

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 256, "max_position_embeddings": 32,
        "tie_word_embeddings": False}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY))
    return path


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if calibrate would build, pretrain or train a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("calibrate trained despite bad arguments")

    for module, name in (("lorascope.workflows.calibrate", "calibrate"),
                         ("lorascope.workflows.calibrate", "base_model")):
        monkeypatch.setattr(importlib.import_module(module), name, refuse)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--budget", "-5"], "--budget must be a positive number"),
    (["--budget", "0"], "--budget must be a positive number"),
    (["--bracket", "1"], "--bracket must be two or more positive loads"),
    (["--bracket", "1,x"], "--bracket must be two or more positive loads"),
    (["--bracket", "0,2"], "--bracket must be two or more positive loads"),
    (["--load", "0"], "--load must be a positive number"),
    (["--steps", "0"], "Invalid value for '--steps'"),
])
def test_bad_kappa_options_are_one_line_before_any_training(config, tmp_path, no_training, args, fragment):
    result = _invoke("calibrate", "--config", config, "-o", tmp_path / "c.json", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "c.json").exists()


def test_a_tiny_calibration_prints_its_fit_and_bracket(config, tmp_path, torch_single_thread):
    out = tmp_path / "cal.json"
    result = _invoke("calibrate", "--config", config, "--pretrain-steps", "20", "--ranks", "1,2,4", "--bracket",
                     "0.5,2", "--layers", "1", "--epochs", "3", "--lr", "3e-3", "-o", out)
    assert result.exit_code == 0, result.output
    saved = load_calibration(out)
    assert [p.rank for p in saved.points] == [1, 2, 4] and len(saved.bracket_points) == 2
    text = result.stdout
    assert "bracket at rank 1" in text
    assert any(finding in text for finding in ("capacity: held bits stop growing", "capacity not reached",
                                               "held nothing"))
    assert ("kappa(P) = exp(" in text) == (saved.fit is not None)
    assert f"calibration: {out}" in text
    data = json.loads(out.read_text())
    assert data["version"] == 2 and data["training"]["bracket_loads"] == [0.5, 2.0]
    assert data["bracket"]["finding"] == saved.bracket.finding


def test_a_step_budget_calibration_from_the_cli_tries_every_load_at_every_rank(config, tmp_path, torch_single_thread):
    out = tmp_path / "cal.json"
    result = _invoke("calibrate", "--config", config, "--pretrain-steps", "20", "--ranks", "1,2", "--steps", "5",
                     "--batch-size", "16", "--layers", "1", "--lr", "3e-3", "-o", out)
    assert result.exit_code == 0, result.output
    saved = load_calibration(out)
    assert saved.steps == 5 and saved.training["bracket_loads"] == [0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5]
    assert [p.rank for p in saved.load_points] == [1] * 6 + [2] * 6
    bits_per_fact = math.log2(saved.task["values"])  # each load offered as whole facts
    assert [p.facts for p in saved.load_points] == [math.ceil(v * p.lora_parameters / bits_per_fact) for p, v in
                                                    zip(saved.load_points, saved.training["bracket_loads"] * 2)]
    assert "at a step budget: 5 steps of 16 facts per adapter" in result.stdout
