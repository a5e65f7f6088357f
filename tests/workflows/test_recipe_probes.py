"""``lorascope recommend`` asks probes about the planned recipe (issue 13 item 1), on recorded full fine-tuning of
random facts: probes of different lengths and learning rates agree within 1.5x about one plan where reading each
at its own end did not, slices of two sizes give a growth law, and what a probe cannot answer is one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lorascope.analysis.information import information_from_steps
from lorascope.errors import InvalidOptionError
from lorascope.store.reader import open_run
from lorascope.workflows.recommend import recommend

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_single_thread")

_STUDY = Path(__file__).resolve().parents[2] / "examples" / "capacity" / "recipe_consistency.py"
_spec = importlib.util.spec_from_file_location("recipe_consistency", _STUDY)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def _model():
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=64, max_position_embeddings=16, tie_word_embeddings=False))


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """Probes of 4 and 8 epochs at learning rates 1e-3 and 3e-3 on the same 256 facts (the study's grid, seed 0)."""
    folder = tmp_path_factory.mktemp("recipe")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {(epochs, lr): study.record_probe(folder / f"p{epochs}_{lr}.h5", epochs=epochs, lr=lr, seed=0)
                for epochs in (4, 8) for lr in (1e-3, 3e-3)}
    finally:
        torch.set_num_threads(threads)


def test_probes_of_other_lengths_and_learning_rates_agree_about_one_plan(probes):
    planned = {key: recommend(_model(), examples=4096, probes=[path], epochs=4, ranks=[1, 4]).bits.bits_per_example
               for key, path in probes.items()}
    assert max(planned.values()) / min(planned.values()) <= 1.5, planned
    # Read at the plan, a probe's length does not matter; read at its own end (the estimator before), it does.
    assert planned[(4, 1e-3)] == pytest.approx(planned[(8, 1e-3)])
    as_run = {}
    for key, path in probes.items():
        with open_run(path) as run:
            as_run[key] = information_from_steps(run.steps, dataset_examples=study.FACTS).estimate().bits_per_example
    assert as_run[(8, 1e-3)] / as_run[(4, 1e-3)] > 1.3, as_run
    # What four epochs of full fine-tuning absorb is a share of the 4 bits each fact holds, not more than it plus the
    # format the value token's output vocabulary costs (64 ids where 16 are values: 2 bits).
    assert all(0.5 < bits < 4.0 + 2.0 for bits in planned.values()), planned


def test_a_longer_plan_than_the_probe_is_extrapolated_with_a_wider_error_and_a_note(probes):
    result = recommend(_model(), examples=4096, probes=[probes[(4, 1e-3)]], epochs=8, ranks=[1])
    planned = result.probes[0]["planned_recipe"]
    assert planned["extrapolated"] and planned["relative_error"] >= 0.5
    assert any("extrapolated along its per-epoch curve" in n for n in result.notes)
    measured = recommend(_model(), examples=4096, probes=[probes[(8, 1e-3)]], epochs=8, ranks=[1])
    assert 0.5 < result.bits.bits_per_example / measured.bits.bits_per_example < 2.0
    low, high = result.predictions[0].runway_low, result.predictions[0].runway_high
    low_measured, high_measured = measured.predictions[0].runway_low, measured.predictions[0].runway_high
    assert high / low > high_measured / low_measured  # the extrapolation's error widens the runway's range


def test_a_learning_rate_unlike_the_plans_is_named(probes):
    result = recommend(_model(), examples=4096, probes=[probes[(4, 3e-3)]], epochs=4, full_ft_lr=3e-4, ranks=[1])
    assert any("10x the planned 0.0003" in n and "over-estimate" in n for n in result.notes)
    assert result.to_dict()["probes"][0]["planned_recipe"]["probe"]["learning_rate"] == pytest.approx(3e-3)
    json.dumps(result.to_dict(), allow_nan=False)


def test_slices_of_two_sizes_give_the_growth_of_the_bits(probes, tmp_path):
    small = study.record_probe(tmp_path / "half.h5", epochs=4, lr=1e-3, seed=0, facts=study.FACTS // 2)
    result = recommend(_model(), examples=4096, probes=[small, probes[(4, 1e-3)]], epochs=4, ranks=[1, 4])
    bits = result.bits
    assert bits.reference_examples == study.FACTS and "fitted on 2 probes" in bits.growth_source
    # Random facts share nothing, and at 4 epochs twice the facts get twice the steps, which memorise more of each:
    # the bits grow faster than linearly (N^1.6 measured), up to memorising every fact (its code length).
    assert bits.exponent > 1.1, bits
    ceiling = bits.one_time_bits + bits.ceiling_per_example * 10**6
    assert bits.bits(10**6) == pytest.approx(ceiling) and bits.examples_for(ceiling) == pytest.approx(10**6)
    first = result.predictions[0]
    assert first.runway_examples == pytest.approx(bits.examples_for(first.capacity_bits))


def test_a_probe_without_its_dataset_size_is_one_line(tmp_path):
    path = tmp_path / "no_size.h5"
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    import lorascope

    ids = torch.randint(0, 64, (8, 6))
    with lorascope.record(model, path, optimizer=optimizer):
        for _ in range(4):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    with pytest.raises(InvalidOptionError, match="does not record its dataset size") as caught:
        recommend(_model(), examples=100, probes=[path])
    assert "\n" not in str(caught.value)


def test_the_cli_reads_the_plan_and_refuses_what_a_probe_cannot_answer_in_one_line(probes, tmp_path):
    from click.testing import CliRunner

    from lorascope_cli.main import cli

    folder = tmp_path / "model"
    _model().config.save_pretrained(folder)
    run = CliRunner().invoke(cli, ["recommend", "--config", str(folder), "--examples", "4096", "--probe",
                                   str(probes[(4, 1e-3)]), "--epochs", "4", "--full-ft-lr", "1e-4", "--json"])
    assert run.exit_code == 0, run.output
    summary = json.loads(run.stdout)
    assert summary["bits"]["basis"] == "absorbed under the planned recipe"
    assert summary["probes"][0]["planned_recipe"]["planned"] == {"epochs": 4.0, "learning_rate": 1e-4,
                                                                 "batch_size": None}
    assert any("10x the planned" in n for n in summary["notes"])
    for args, fragment in ((["--epochs", "0"], "epochs"), (["--full-ft-lr", "-1"], "learning_rate")):
        bad = CliRunner().invoke(cli, ["recommend", "--config", str(folder), "--examples", "4096", "--probe",
                                       str(probes[(4, 1e-3)]), *args])
        assert bad.exit_code == 2 and len(bad.stderr.splitlines()) == 1 and fragment in bad.stderr, bad.output


def test_a_probe_of_another_task_is_one_line(probes, tmp_path):
    """A probe whose run config says RL (TRL's GRPO) asked about SFT, or the reverse: refused with the task to pass."""
    import h5py

    path = tmp_path / "rl.h5"
    path.write_bytes(probes[(4, 1e-3)].read_bytes())
    with h5py.File(path, "r+") as f:
        f["config"].attrs["task"] = json.dumps("rl")  # a config section, as TRL's GRPO runs write it
    with pytest.raises(InvalidOptionError, match="is an RL run .* pass task='rl'") as caught:
        recommend(_model(), examples=4096, probes=[path])
    assert "\n" not in str(caught.value)
    assert recommend(_model(), examples=4096, probes=[path], task="rl", ranks=[1]).bits.source == "episodes"
    import lorascope

    analysis = lorascope.analyze(path, ranks=(1,))
    assert analysis.forecast is None and "is an RL run" in analysis.forecast_missing
