"""kappa from LoRA probes (issue 13): real PEFT LoRA and full fine-tuning runs of a tiny Llama, recorded to real run
files, read by ``calibration_from_runs``; what recommend then does with it; the CLI; bad input, one line each."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lorascope  # noqa: E402
from lorascope.analysis.capacity import CapacityConstant  # noqa: E402
from lorascope.errors import InvalidOptionError  # noqa: E402
from lorascope.model.lora_params import lora_parameters  # noqa: E402
from lorascope.model.peft_config import make_lora_config, to_peft  # noqa: E402
from lorascope.workflows.calibration import load_calibration  # noqa: E402
from lorascope.workflows.lora_probes import calibration_from_runs  # noqa: E402
from lorascope.workflows.runs import information_from_run  # noqa: E402
from lorascope_cli.main import cli  # noqa: E402

EXAMPLES, LENGTH, BATCH, STEPS = 32, 12, 8, 40  # 10 epochs of 32 random sequences
LORA_LR = 1e-2
CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
              vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)


_BASE: dict[str, torch.Tensor] = {}


def _model() -> torch.nn.Module:
    """The base every probe starts from: the tiny Llama briefly pretrained on a synthetic language."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    if not _BASE:
        from lorascope.inputs.synthetic import pretrain_on_markov

        pretrain_on_markov(model, 64, steps=150)
        _BASE.update({k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(_BASE)
    return model


def _sequences() -> torch.Tensor:
    """Sequences of a new language: a random first token, then each token's fixed random successor (64 x 6 bits
    of rule to learn; a low-rank adapter holds part of it)."""
    generator = torch.Generator().manual_seed(1)
    successor = torch.randperm(64, generator=generator)
    ids = torch.empty(EXAMPLES, LENGTH, dtype=torch.long)
    ids[:, 0] = torch.randint(0, 64, (EXAMPLES,), generator=generator)
    for t in range(1, LENGTH):
        ids[:, t] = successor[ids[:, t - 1]]
    return ids


def _record(path, *, rank: int = 0, steps: int = STEPS, examples: int | None = EXAMPLES):
    """Full fine-tuning (rank 0) or an all-linear PEFT LoRA memorising random token sequences, recorded."""
    model = _model()
    if rank:
        model.requires_grad_(False)
        model = peft.get_peft_model(model, to_peft(make_lora_config(model, target="all-linear", rank=rank, alpha=32,
                                                                     task_type=None)))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LORA_LR if rank else 3e-3)
    ids = _sequences()
    extra = {"dataset": {"examples": examples}} if examples else {}
    with lorascope.record(model, path, optimizer=optimizer, total_steps=steps, snapshots=[steps],
                          extra_config=extra):
        for step in range(steps):
            rows = ids[(step * BATCH) % EXAMPLES:][:BATCH]
            model(input_ids=rows, labels=rows).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return path


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probes")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        return {rank: _record(folder / f"r{rank}.h5", rank=rank) for rank in (0, 1, 2, 4)}


def test_lora_probes_give_kappa_per_rank_and_their_trend_is_continued_past_them(probes, tmp_path):
    calibration = calibration_from_runs([probes[4], probes[1], probes[2]], [probes[0]])
    per_rank = lora_parameters(_model(), "all-linear", rank=1).total
    assert [p.rank for p in calibration.points] == [1, 2, 4]
    assert [p.lora_parameters for p in calibration.points] == [per_rank, 2 * per_rank, 4 * per_rank]
    full = information_from_run(probes[0]).absorbed_bits
    for point in calibration.points:
        assert point.bits_stored == information_from_run(probes[point.rank]).absorbed_bits
        assert point.bits_offered == full and point.facts == EXAMPLES and point.steps == STEPS
    assert calibration.points[0].bits_stored < 0.8 * full  # rank 1 could not hold the sequences: a capacity
    assert calibration.steps == STEPS and calibration.from_lora_probes
    assert calibration.training["batch_size"] == BATCH and calibration.training["lr"] == [1e-2]
    assert calibration.model["model_type"] == "llama" and calibration.model["hidden_size"] == 32
    fit = calibration.fit
    assert fit is not None and fit.points == 3
    constant = CapacityConstant.from_calibration(load_calibration(calibration.save(tmp_path / "cal.json")))
    assert "measured by LoRA probes on this data" in constant.source and "at a budget of 40 steps" in constant.source
    assert "log-log between the probes, their trend continued outside" in constant.source
    kappas = [p.bits_per_parameter for p in calibration.points]
    assert constant.measured == tuple((float(p.lora_parameters), k) for p, k in zip(calibration.points, kappas))
    for point in calibration.points:  # each probed rank gets its own kappa, not the fit's
        assert constant.bits_per_parameter_at(point.lora_parameters) == pytest.approx(point.bits_per_parameter)
    outside = 16 * per_rank  # the last segment (ranks 2 -> 4) continued, two more doublings
    assert constant.bits_per_parameter_at(outside) == pytest.approx(kappas[2] * (kappas[2] / kappas[1]) ** 2)
    assert constant.bits_per_parameter_at(outside) != pytest.approx(fit.at(outside))  # held there, for facts
    # each probe's kappa is measured, so 1.25 inside; outside, widened by how far the trend moved kappa
    assert calibration.uncertainty == 1.25 and constant.uncertainty_at(2 * per_rank) == 1.25
    moved = max(kappas[2] / kappas[1], kappas[1] / kappas[2]) ** 2
    assert constant.uncertainty_at(outside) == pytest.approx(1.25 * moved)


def test_recommend_reads_a_lora_probe_calibration_at_its_step_budget(probes):
    calibration = calibration_from_runs([probes[1], probes[2], probes[4]], [probes[0]])
    config = transformers.LlamaConfig(**CONFIG)
    same = lorascope.recommend(config, examples=EXAMPLES, tokens_per_example=LENGTH - 1, epochs=STEPS * BATCH
                               / EXAMPLES, batch_size=BATCH, ranks=[1, 2, 4, 16], calibration=calibration)
    assert not [n for n in same.notes if "calibration" in n and "steps" in n]
    rank16 = next(p for p in same.predictions if p.rank == 16)
    assert "(outside the probed" in rank16.reason and "kappa extrapolated by the probes' trend" in rank16.reason
    assert rank16.capacity_bits == pytest.approx(CapacityConstant.from_calibration(calibration).capacity_bits(
        rank16.lora_parameters))
    longer = lorascope.recommend(config, examples=EXAMPLES, tokens_per_example=LENGTH - 1, epochs=40,
                                 batch_size=BATCH, calibration=calibration)
    assert any("a budget of 40 steps, this run has 160" in n for n in longer.notes), longer.notes


@pytest.fixture(scope="module")
def odd_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        return {"short": _record(folder / "short.h5", rank=2, steps=20),
                "one_step": _record(folder / "one_step.h5", rank=2, steps=1),
                "no_size": _record(folder / "no_size.h5", rank=2, examples=None),
                "other_size": _record(folder / "other_size.h5", rank=2, examples=16)}


@pytest.mark.parametrize(("lora", "full", "says"), [
    ([], [0], "needs at least one LoRA probe"),
    ([0], [0], "is not a LoRA probe"),
    ([1], [1], "is a LoRA run; the reference runs are full fine-tuning"),
    ([1], [0, 0], "two full fine-tuning runs of 32 examples"),
    ([1, 1], [0], "one LoRA probe per rank; got ranks [1, 1]"),
    ([1, "short"], [0], "different numbers of optimizer steps ([20, 40])"),
    (["other_size"], [0], "trained on 16 examples and no full fine-tuning run of 16 examples"),
    (["no_size"], [0], "does not record its dataset size"),
    (["one_step"], [0], "too short to measure what it absorbed"),
])
def test_bad_probes_are_one_clear_error(probes, odd_runs, lora, full, says):
    runs = {**probes, **odd_runs}
    with pytest.raises(InvalidOptionError, match=None) as error:
        calibration_from_runs([runs[k] for k in lora], [runs[k] for k in full])
    assert says in str(error.value) and "\n" not in str(error.value)


def test_the_cli_reads_lora_probes_and_refuses_half_an_invocation(probes, tmp_path):
    out = tmp_path / "cal.json"
    args = ["calibrate", "--lora-probe", probes[1], "--lora-probe", probes[2], "--full-probe", probes[0], "-o", out]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "LoRA probes on your data at a step budget of 40 steps" in result.stdout
    assert json.loads(out.read_text())["task"]["kind"] == "LoRA probes on the planned data"
    for bad in (["calibrate", "--lora-probe", probes[1], "-o", tmp_path / "x.json"],
                ["calibrate", "--lora-probe", probes[1], "--full-probe", probes[0], "--config", out,
                 "-o", tmp_path / "x.json"],
                ["calibrate", "--lora-probe", probes[0], "--full-probe", probes[0], "-o", tmp_path / "x.json"]):
        result = CliRunner().invoke(cli, [str(a) for a in bad])
        lines = result.stderr.splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert not (tmp_path / "x.json").exists()


def _probes_calibration(points):
    from lorascope.workflows.calibration import LORA_PROBES, Calibration, CalibrationPoint

    return Calibration(model={}, target="all-linear", task={"kind": LORA_PROBES}, training={"steps": 64},
                       points=tuple(CalibrationPoint(rank=r, lora_parameters=100 * r, facts=256, bits_offered=offered,
                                                     bits_stored=held, final_loss_nats=1.0, epochs=4, steps=64)
                                    for r, held, offered in points))


@pytest.mark.parametrize(("points", "says"), [
    ([(16, 18655, 44926), (64, 19105, 44926)], "ranks 16 and 64 absorbed about the same (18,655 and 19,105 bits, "
                                               "42% and 43% of full fine-tuning's) for 4x the parameters: in 64 steps"),
    ([(4, 1000, 9000), (16, 1090, 9000), (64, 1095, 9000)], "ranks 4 and 64"),  # the widest such pair
    # otherwise the probes' saturating capacity: its ceiling, and the rank from which an adapter holds 90% of it
    ([(16, 41307, 78327), (64, 53769, 78327)], "capacity saturates in 64 steps: no rank holds more than ~53,931 bits, "
                                               "and from rank 32 on"),  # CPT, 128 steps: rank 64 held 30% more
    ([(16, 1000, 9000), (32, 1000, 9000)], "no rank holds more than ~1,000 bits"),  # only 2x apart: no plateau note
    ([(16, 1000, 9000), (64, 1050, 1100)], "no rank holds more than"),  # rank 64 not full: no plateau note
    ([(16, 1000, 9000), (64, 4000, 9000)], None),  # kappa did not fall: nothing saturates
    # SmolLM2 SFT, 128 steps, seed 3, probes of ranks 1-4 on 128 and on 256 examples: the ceiling is read past the
    # largest probe (saturated from rank 8, and from rank 4), where ranks 16 and 32 fell off later than forecast
    ([(1, 8419, 23661), (2, 12897, 23661), (4, 18074, 23661)], "from rank 8 on an adapter holds 90% of that or more, "
                                                               "so larger ranks add little runway"),
    ([(1, 12375, 41458), (2, 15019, 41458), (4, 19790, 41458)], "from rank 4 on"),
])
def test_probes_of_very_different_ranks_holding_the_same_bits_are_noted_as_step_limited(points, says):
    from lorascope.workflows.calibration import step_limited_note

    note = step_limited_note(_probes_calibration(points))
    assert (note is None) if says is None else says in note, note
    assert note is None or ("ranks above" in note) == ("absorbed about the same" in note)
    if note is not None and "capacity saturates" in note:  # a ceiling no larger probe witnessed is flagged as such
        ceiling_rank = int(note.split("from rank ")[1].split(" ")[0])
        past_the_probes = max(rank for rank, _, _ in points) <= ceiling_rank
        assert ("no probe ran above that rank" in note) == past_the_probes, note
        assert ("probe the ranks you will choose between" in note) == past_the_probes


def test_the_step_limited_note_reads_the_checked_in_probes():
    """CPT and SFT in 64 steps (probes of ranks 16 and 64 at N = 256): noted; CPT in 128 steps: not."""
    from pathlib import Path

    from lorascope.workflows.calibration import Calibration, CalibrationPoint, step_limited_note

    docs = Path(__file__).resolve().parents[2] / "docs" / "realdata"
    noted = {}
    for name in ("smollm2_lora_probes_steps_seed2_r32", "smollm2_lora_probes_sft_seed2_r32", "smollm2_lora_probes_r32"):
        saved = json.loads((docs / f"{name}_predictions.json").read_text())["calibration"]
        calibration = Calibration(model=saved["model"], target=saved["target"], task=saved["task"],
                                  training=saved["training"],
                                  points=tuple(CalibrationPoint.from_dict(p) for p in saved["points"]))
        noted[name] = "absorbed about the same" in step_limited_note(calibration)
    assert noted == {"smollm2_lora_probes_steps_seed2_r32": True, "smollm2_lora_probes_sft_seed2_r32": True,
                     "smollm2_lora_probes_r32": False}  # CPT in 128 steps gets the saturating capacity's note
