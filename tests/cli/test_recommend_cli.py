"""``lorascope recommend`` and ``lorascope calibrate`` through click's CliRunner: the table, --json against the API,
--peft-config against real PEFT models, and one-line errors with exit status 2."""

from __future__ import annotations

import importlib
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lorascope.model.lora_params import lora_parameters, model_from_config  # noqa: E402
from lorascope.workflows.calibrate import Calibration, CalibrationPoint, model_signature  # noqa: E402
from lorascope.workflows.recommend import recommend  # noqa: E402
from lorascope_cli.main import cli  # noqa: E402


@pytest.fixture(autouse=True)
def _one_bit_per_lora_parameter(monkeypatch):
    """The numbers worked out by hand here use 1 bit per LoRA parameter; the shipped default is a measurement
    (docs/capacity.md) that changes when it is measured again."""
    monkeypatch.setattr("lorascope.analysis.capacity.DEFAULT_BITS_PER_PARAMETER", 1.0)

_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
               max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS = {
    "llama": dict(model_type="llama", intermediate_size=48, **_COMMON),
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                      num_experts_per_tok=2, shared_expert_intermediate_size=24, **_COMMON),
}
SIZES = ["--examples", "150", "--tokens-per-example", "10", "--ranks", "1,2,4,8"]
TINY_RUN = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_run.h5"  # a custom 2-block decoder


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    """config.json files of the tiny models, and of ones that cannot be built."""
    folder = tmp_path_factory.mktemp("configs")
    written = {}
    for name, values in {**CONFIGS, "unknown": {"model_type": "zzz", "hidden_size": 8},
                         "no_hidden_size": {"model_type": "llama", "num_hidden_layers": 2}}.items():
        (folder / name).mkdir()
        written[name] = folder / name / "config.json"
        written[name].write_text(json.dumps(values))
    return written


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _json(data):
    return json.loads(json.dumps(data, allow_nan=False))


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------------------------------------
# Output


def test_table_marks_the_recommended_rank(configs):
    result = _invoke("recommend", "--config", configs["llama"], *SIZES, "--batch-size", "8")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank "))
    assert re.split(r"\s{2,}", lines[header]) == ["rank", "attn", "mlp", "LoRA params", "runway (examples)", "range",
                                                  "Tinker rule", "verdict"]
    rows = lines[header + 1:header + 5]
    assert [row.split()[0] for row in rows] == ["1", "2", "4", "8"]
    marked = [row for row in rows if row.endswith("<")]
    expected = recommend(configs["llama"], examples=150, tokens_per_example=10, ranks=[1, 2, 4, 8], batch_size=8)
    assert len(marked) == 1 and marked[0].split()[0] == str(expected.rank) == "4"
    cells = re.split(r"\s{2,}", marked[0].strip())
    assert cells[:5] == ["4", "4", "4", "3,712", "371"] and cells[-2:] == ["fits", "<"]
    text = result.stdout
    assert "recommended: rank 4 (attention 4, mlp 4) on all-linear, lora_alpha 32, scaling alpha / r" in text
    assert "attention-only LoRA is never recommended" in text and "LoRA Without Regret" in text
    assert "learning rate: 15x your full fine-tuning LR" in text and "19 steps" in text
    assert "batch size: " in text


def test_table_of_an_moe_model_has_an_experts_column(configs):
    result = _invoke("recommend", "--config", configs["qwen2_moe"].parent, *SIZES)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert re.split(r"\s{2,}", header)[:4] == ["rank", "attn", "mlp", "experts"]
    assert "on all-linear+experts" in result.stdout and "moe_expert 2" in result.stdout


@pytest.mark.parametrize("extra", [[], ["--task", "rl", "--batch-size", "4", "--epochs", "3"]])
def test_json_equals_the_api(configs, extra):
    args = ["--examples", "150", "--ranks", "1,2,4,8"] + (["--tokens", "1500"] if not extra else extra)
    result = _invoke("recommend", "--config", configs["qwen2_moe"], *args, "--json")
    assert result.exit_code == 0, result.output
    api = recommend(configs["qwen2_moe"], examples=150, tokens=None if extra else 1500, ranks=[1, 2, 4, 8],
                    task="rl" if extra else "sft", batch_size=4 if extra else None, epochs=3 if extra else 1)
    assert json.loads(result.stdout) == _json(api.to_dict())


def _rank_of_each_adapter(peft_model: nn.Module) -> dict[str, int]:
    found = {}
    for path, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and "default" in lora_a:
            name = re.sub(r"\.base_layer", "", path.removeprefix("base_model.model."))
            rows = lora_a["default"].weight.shape[0]
            if type(module).__name__ == "ParamWrapper":
                param = getattr(module.get_base_layer(), module.parameter_name)
                name, rows = f"{name}.{module.parameter_name}", rows // (param.shape[0] if param.ndim == 3 else 1)
            found[name] = rows
    return found


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_peft_config_file_instantiates_on_the_model(configs, tmp_path, family):
    folder = tmp_path / "adapter"
    result = _invoke("recommend", "--config", configs[family], *SIZES, "--peft-config", folder, "--json")
    assert result.exit_code == 0, result.output
    written = folder / "adapter_config.json"
    assert result.stderr.strip() == f"PEFT config: {written}"
    summary = json.loads(result.stdout)
    content = json.loads(written.read_text())
    assert content == {"peft_type": "LORA", **summary["peft_config"]}
    chosen = next(p for p in summary["predictions"] if p["rank"] == summary["rank"])
    values = dict(CONFIGS[family])
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    adapters = lora_parameters(model_from_config(config), summary["target"]).adapters
    intended = {a.name: chosen["ranks_by_kind"][a.kind] for a in adapters}
    loaded = peft.LoraConfig.from_pretrained(str(folder))
    direct = peft.LoraConfig(**{k: v for k, v in content.items() if k != "peft_type"})
    for lora_config in (loaded, direct):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = peft.get_peft_model(model, lora_config)
        assert _rank_of_each_adapter(peft_model) == intended
        assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == chosen["lora_parameters"]


def test_peft_config_json_path_and_text_output(configs, tmp_path):
    path = tmp_path / "lora.json"
    result = _invoke("recommend", "--config", configs["llama"], *SIZES, "--peft-config", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"PEFT config: {path}"
    assert json.loads(path.read_text())["r"] == 4


# --------------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


@pytest.mark.parametrize("config, args, fragments", [
    ("unknown", SIZES, ["does not know model_type 'zzz'"]),
    ("no_hidden_size", SIZES, ["gives no hidden size"]),
    ("missing", SIZES, ["No model config at"]),
    ("llama", [], ["needs the dataset size"]),
    ("llama", ["--examples", "150"], ["SFT without a probe needs the trained tokens"]),
    ("llama", ["--examples", "0", "--tokens-per-example", "10"], ["'examples'", "Got 0 instead"]),
    ("llama", ["--examples", "-5", "--tokens-per-example", "10"], ["'examples'", "Got -5 instead"]),
    ("llama", ["--examples=-5", "--tokens-per-example", "10"], ["Got -5 instead"]),
    ("llama", ["--examples", "150", "--tokens-per-example", "0"], ["'tokens_per_example'", "Got 0.0 instead"]),
    ("llama", ["--examples", "150", "--tokens", "-3"], ["'tokens'", "Got -3 instead"]),
    ("llama", ["--examples", "150", "--tokens", "9", "--tokens-per-example", "3"], ["not both"]),
    ("llama", [*SIZES, "--batch-size", "0"], ["'batch_size'"]),
    ("llama", [*SIZES, "--epochs", "0"], ["'epochs'"]),
    ("llama", [*SIZES, "--probe", TINY_RUN], ["from another architecture"]),
])
def test_bad_input_is_one_line_with_exit_status_2(configs, tmp_path, config, args, fragments):
    path = configs.get(config, tmp_path / "missing" / "config.json")
    _assert_one_line_error(_invoke("recommend", "--config", path, *args), *fragments)


def test_bad_files_are_one_line_with_exit_status_2(configs, tmp_path):
    _assert_one_line_error(_invoke("recommend", "--config", configs["llama"], *SIZES, "--probe",
                                   tmp_path / "missing.h5"), "missing.h5")
    text = tmp_path / "data.jsonl"
    text.write_text("plain text, not JSON lines\n")
    _assert_one_line_error(_invoke("recommend", "--config", configs["llama"], "--dataset", text), "data.jsonl")
    _assert_one_line_error(_invoke("recommend", "--config", configs["llama"], "--dataset", text, "--examples", "5"),
                           "not both")
    other = model_from_config({**CONFIGS["llama"], "hidden_size": 64})
    calibration = Calibration(model=model_signature(other), target="all-linear", task={}, training={},
                              points=(CalibrationPoint(1, 1856, 100, 2000.0, 900.0, 1.0, 3),))
    path = calibration.save(tmp_path / "calibration.json")
    _assert_one_line_error(_invoke("recommend", "--config", configs["llama"], *SIZES, "--calibration", path),
                           "hidden_size = 64", "lorascope calibrate")


@pytest.mark.parametrize("args", [["--ranks", "0,4"], ["--ranks", "x"], ["--task", "ppo"]])
def test_invalid_choices_exit_2(configs, args):
    result = _invoke("recommend", "--config", configs["llama"], *SIZES, *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"Invalid value for '{args[0]}'" in result.stderr


def test_attention_only_is_refused_with_its_reason(configs):
    _assert_one_line_error(_invoke("recommend", "--config", configs["llama"], *SIZES, "--target", "attention-only"),
                           "attention-only", "LoRA Without Regret")


# --------------------------------------------------------------------------------------------------------
# calibrate: arguments are checked before any training


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if calibrate would load, pretrain or train a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("calibrate trained despite bad arguments")

    for module, name in (("lorascope.workflows.calibrate", "calibrate"),
                         ("lorascope.inputs.synthetic", "pretrain_on_markov")):
        monkeypatch.setattr(importlib.import_module(module), name, refuse)  # the modules, not lorascope.calibrate()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)


def test_calibrate_needs_exactly_one_model_source(configs, tmp_path, no_training):
    out = tmp_path / "calibration.json"
    _assert_one_line_error(_invoke("calibrate", "-o", out), "exactly one of --model")
    _assert_one_line_error(_invoke("calibrate", "--model", tmp_path, "--config", configs["llama"], "-o", out),
                           "exactly one of --model")
    assert not out.exists()


def test_calibrate_refuses_to_overwrite_without_force(configs, tmp_path, no_training):
    out = tmp_path / "calibration.json"
    out.write_text("mine")
    _assert_one_line_error(_invoke("calibrate", "--config", configs["llama"], "-o", out), "--force")
    assert out.read_text() == "mine"


def test_calibrate_refuses_a_model_that_is_not_a_directory(tmp_path, no_training):
    _assert_one_line_error(_invoke("calibrate", "--model", tmp_path / "nowhere", "-o", tmp_path / "c.json"),
                           "is not a directory")
    _assert_one_line_error(_invoke("calibrate", "--config", tmp_path / "nowhere.json", "-o", tmp_path / "c.json"),
                           "No model config at")
