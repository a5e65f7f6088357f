"""kappa as a function of the LoRA parameter count, and what an adapter holds past its capacity (issue 13 item 2):
the fit against planted power laws, clamping outside the measured range, collapse and plateau on planted held-bits
sequences, the verdict text, calibration files old and new, bad input, and a real (tiny) bracketed calibrate run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lorascope.analysis.capacity import CapacityConstant, predict_ranks, rank_needed
from lorascope.analysis.capacity_fit import bracket_capacity, fit_kappa
from lorascope.analysis.information import information_from_size
from lorascope.errors import InvalidOptionError, LorascopeError
from lorascope.workflows.calibration import Calibration, CalibrationPoint, load_calibration

PER_RANK = 1000


def _point(rank: int, kappa: float, load: float = 2.0, per_rank: int = PER_RANK) -> CalibrationPoint:
    params = per_rank * rank
    return CalibrationPoint(rank=rank, lora_parameters=params, facts=int(load * params / 8),
                            bits_offered=load * params, bits_stored=kappa * params, final_loss_nats=1.0, epochs=3)


def _calibration(points, bracket_points=(), **changes) -> Calibration:
    return Calibration(model={"model_type": "llama", "hidden_size": 64}, target="all-linear", points=tuple(points),
                       task={}, training={}, created="2026-01-01", bracket_points=tuple(bracket_points), **changes)


def _law(a: float, g: float):
    return lambda p: math.exp(a) * p ** g


# -- the fit ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exponent", [-0.15, 0.0, 0.2])
def test_the_fit_recovers_a_planted_power_law_and_its_uncertainty_is_the_residual(exponent, seed):
    law = _law(0.4, exponent)
    ranks = (1, 2, 4, 8, 16)
    exact = _calibration([_point(r, law(PER_RANK * r)) for r in ranks])
    fit = exact.fit
    assert fit is not None and fit.points == 5
    assert fit.exponent == pytest.approx(exponent, abs=1e-9) and fit.intercept == pytest.approx(0.4, abs=1e-9)
    assert (fit.parameters_low, fit.parameters_high) == (PER_RANK, 16 * PER_RANK)
    assert exact.uncertainty == pytest.approx(1.25)  # no residual: the floor
    # Against numpy's least squares on noisy points; the uncertainty is exp(2 s) of the residuals.
    noise = np.random.default_rng(seed).normal(0, 0.1, len(ranks))
    noisy = _calibration([_point(r, law(PER_RANK * r) * math.exp(e)) for r, e in zip(ranks, noise)])
    x = np.log([PER_RANK * r for r in ranks])
    y = np.log([p.bits_per_parameter for p in noisy.points])
    slope, intercept = np.polyfit(x, y, 1)
    assert noisy.fit.exponent == pytest.approx(slope, rel=1e-7) and noisy.fit.intercept == pytest.approx(intercept)
    s = math.sqrt(np.sum((y - intercept - slope * x) ** 2) / (len(x) - 2))
    assert noisy.fit.residual == pytest.approx(s) and noisy.uncertainty == pytest.approx(max(1.25, math.exp(2 * s)))


def test_kappa_is_flat_with_fewer_than_three_learned_ranks_or_a_narrow_span():
    """Two adjacent ranks cannot tell a trend from noise: the median, and the spread as the uncertainty."""
    two = _calibration([_point(1, 0.5), _point(2, 0.8)])
    assert two.fit is None and two.bits_per_parameter == pytest.approx(0.65) and two.uncertainty == pytest.approx(1.6)
    constant = CapacityConstant.from_calibration(two)
    assert constant.bits_per_parameter_at(PER_RANK) == constant.bits_per_parameter_at(1e9) == pytest.approx(0.65)
    narrow = _calibration([_point(4, 0.5), _point(5, 0.6), _point(6, 0.7)])  # 1.5x in parameters
    assert narrow.fit is None
    failed = CalibrationPoint(8, 8 * PER_RANK, 100, 16_000.0, 10.0, 5.0, 3)  # held 0.06%: not learned
    assert _calibration([_point(1, 0.5), _point(2, 0.8), failed]).fit is None
    assert fit_kappa([500], [0.7]).exponent == 0.0 and fit_kappa([500], [0.7]).at(1e6) == pytest.approx(0.7)


def test_fit_kappa_refuses_bad_input_in_one_message():
    for parameters, kappas in (([], []), ([1, 2], [0.5]), ([1, -2], [0.5, 0.5]), ([1, 2], [0.5, math.nan])):
        with pytest.raises(InvalidOptionError, match="fit_kappa needs"):
            fit_kappa(parameters, kappas)


# -- clamping and the runway --------------------------------------------------------------------------------
def test_outside_the_measured_range_kappa_is_held_at_the_nearest_end_and_the_range_widens():
    law = _law(0.0, -0.2)
    constant = CapacityConstant.from_calibration(_calibration([_point(r, law(PER_RANK * r)) for r in (1, 2, 4)]))
    low, high = PER_RANK, 4 * PER_RANK
    assert constant.bits_per_parameter_at(2 * PER_RANK) == pytest.approx(law(2 * PER_RANK))  # inside: the law
    assert constant.bits_per_parameter_at(64 * PER_RANK) == pytest.approx(law(high))  # above: held at the end
    assert constant.bits_per_parameter_at(10) == pytest.approx(law(low))  # below
    assert constant.capacity_bits(64 * PER_RANK) == pytest.approx(law(high) * 64 * PER_RANK)
    u = constant.uncertainty
    assert constant.uncertainty_at(3 * PER_RANK) == pytest.approx(u)
    assert constant.uncertainty_at(64 * PER_RANK) == pytest.approx(u * 16 ** 0.2)  # covers the law continuing
    assert constant.uncertainty_at(64 * PER_RANK) / u >= law(high) / law(64 * PER_RANK) * (1 - 1e-9)
    # predict_ranks and rank_needed use kappa(P) and u(P) at each candidate rank.
    bits = information_from_size(examples=1000, tokens_per_example=8)
    params = lambda r: (PER_RANK * r, {"mlp": r})  # noqa: E731
    predictions = predict_ranks([1, 2, 64], params, examples=1000, bits=bits, constant=constant)
    for p in predictions:
        assert p.capacity_bits == pytest.approx(constant.capacity_bits(p.lora_parameters))
        assert p.runway_high / p.runway_examples == pytest.approx(constant.uncertainty_at(p.lora_parameters))
    assert "outside the calibrated" in predictions[2].reason and "outside" not in predictions[0].reason
    needed = rank_needed(1000, bits, constant, params)
    holds = lambda r: constant.capacity_bits(PER_RANK * r) / 8 / constant.uncertainty_at(PER_RANK * r)  # noqa: E731
    assert holds(needed) >= 1000 > holds(needed // 2)


def test_the_default_constant_stays_flat():
    constant = CapacityConstant.default()
    assert constant.fit is None and constant.collapse is None and constant.bracket is None
    assert constant.bits_per_parameter_at(1e9) == constant.bits_per_parameter == 0.69
    assert constant.capacity_bits(1000) == pytest.approx(690) and constant.uncertainty_at(1e12) == 2.0


# -- collapse and plateau -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("held", "finding", "capacity_load", "collapse_load"), [
    ((400, 800, 850, 30), "collapse", 1.0, 4.0),  # the facts: almost nothing at ~2x capacity and above
    ((400, 800, 200, 10), "collapse", 1.0, 2.0),
    ((400, 800, 850, 820), "plateau", 1.0, None),
    ((400, 800, 850, 500), "plateau", 1.0, None),  # fell, but not under half of its most
    ((400, 800, 1600, 3000), "growing", 4.0, None),  # never full: nothing bracketed
    ((0, 0, 0, 0), "not learned", 0.5, None),
])
def test_collapse_and_plateau_are_read_from_planted_held_bits(held, finding, capacity_load, collapse_load):
    bracket = bracket_capacity([4, 0.5, 2, 1], [held[3], held[0], held[2], held[1]], lora_parameters=1000, rank=2)
    assert bracket.loads == (0.5, 1.0, 2.0, 4.0)  # sorted with their held bits
    assert (bracket.finding, bracket.capacity_load, bracket.collapse_load) == (finding, capacity_load, collapse_load)
    if finding == "collapse":
        kappa = max(held) / 1000
        assert bracket.multiple(collapse_load) == pytest.approx(collapse_load / kappa)
        assert bracket.examined_share == pytest.approx(held[[0.5, 1, 2, 4].index(collapse_load)] / max(held))


def test_bracket_capacity_refuses_bad_input():
    for loads, held in (([1], [5]), ([1, 1], [5, 6]), ([0, 1], [5, 6]), ([1, 2], [5, -1]), ([1, 2], [5])):
        with pytest.raises(InvalidOptionError, match="capacity bracket needs"):
            bracket_capacity(loads, held, lora_parameters=100, rank=1)


def test_an_exceeded_verdict_says_what_calibrate_measured_past_capacity():
    points = [_point(1, 0.8), _point(2, 0.8)]
    collapsed = [_point(1, min(load, 0.8) if load <= 2 else 0.016, load) for load in (0.5, 1, 2, 4)]
    plateau = [_point(1, min(load, 0.8) if load <= 2 else 0.75, load) for load in (0.5, 1, 2, 4)]
    bits = information_from_size(examples=100_000, tokens_per_example=8)
    params = lambda r: (PER_RANK * r, {"mlp": r})  # noqa: E731

    def reason(calibration):
        constant = CapacityConstant.from_calibration(calibration)
        (prediction,) = predict_ranks([1], params, examples=100_000, bits=bits, constant=constant)
        assert prediction.verdict == "exceeded"
        return constant, prediction.reason

    constant, text = reason(_calibration(points, collapsed))
    assert constant.collapse == pytest.approx(4 / 0.8)
    assert "collapse: at ~5x its capacity the rank-1 adapter held 2% of what it held at capacity, measured by " \
           "calibrate" in text
    constant, text = reason(_calibration(points, plateau))
    assert constant.collapse is None and "a plateau: at ~5x its capacity the rank-1 adapter held 94%" in text
    constant, text = reason(_calibration(points))
    assert constant.bracket is None and "not measured on this base" in text and "~2x its capacity" in text
    fits = predict_ranks([64], params, examples=10, bits=bits, constant=constant)[0]
    assert fits.verdict == "fits" and "past" not in fits.reason


# -- files --------------------------------------------------------------------------------------------------
def test_a_calibration_round_trips_with_its_fit_and_bracket(tmp_path):
    law = _law(-0.2, -0.15)
    bracket = [_point(1, min(load, 0.8) if load <= 2 else 0.01, load) for load in (0.5, 1, 2, 4)]
    calibration = _calibration([_point(r, law(PER_RANK * r)) for r in (1, 2, 4, 8)], bracket)
    data = json.loads(calibration.save(tmp_path / "cal.json").read_text())
    assert data["version"] == 2 and data["fit"]["exponent"] == pytest.approx(-0.15)
    assert data["bracket"]["finding"] == "collapse" and data["collapse"] == pytest.approx(4 / 0.8)
    assert [p["load"] for p in data["bracket"]["points"]] == [0.5, 1, 2, 4]
    reloaded = load_calibration(tmp_path / "cal.json")
    assert reloaded == calibration
    assert reloaded.fit == calibration.fit and reloaded.bracket == calibration.bracket


def test_a_version_1_calibration_still_loads_as_a_flat_constant(tmp_path):
    """Files written before kappa(P): read as they were then, the median over the ranks, no bracket."""
    law = _law(1.0, -0.3)
    points = [_point(r, law(PER_RANK * r)) for r in (1, 2, 4, 8)]
    v1_fields = ("rank", "lora_parameters", "facts", "bits_offered", "bits_stored", "final_loss_nats", "epochs",
                 "bits_per_parameter", "saturated", "learned")  # what version 1 wrote per point
    v1 = {"format": "lorascope-calibration", "version": 1, "lorascope_version": "0.1", "created": "2026-11-29",
          "model": {"model_type": "llama"}, "base": "", "target": "all-linear", "task": {}, "training": {},
          "points": [{k: p.to_dict()[k] for k in v1_fields} for p in points], "bits_per_parameter": 0.0,
          "spread": 1.0, "uncertainty": 1.25, "notes": []}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(v1))
    calibration = load_calibration(path)
    assert calibration.fit is None and calibration.bracket is None and calibration.collapse is None
    constant = CapacityConstant.from_calibration(calibration)
    median = float(np.median([p.bits_per_parameter for p in points]))
    assert constant.bits_per_parameter_at(PER_RANK) == constant.bits_per_parameter_at(1e7) == pytest.approx(median)
    path.write_text(json.dumps({**v1, "version": 3}))
    with pytest.raises(LorascopeError, match="version 3, this lorascope reads 1 and 2"):
        load_calibration(path)


def test_a_calibration_where_no_rank_learned_is_one_clear_error():
    failed = CalibrationPoint(1, 1000, 250, 2000.0, 2.0, 5.0, 300)
    with pytest.raises(InvalidOptionError, match="no rank whose adapter learned") as info:
        CapacityConstant.from_calibration(_calibration([failed]))
    assert "\n" not in str(info.value) and "--epochs" in str(info.value)


# -- a real calibrate run -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base():
    """A 2-block Llama of width 32, briefly pretrained on the Markov language (a few seconds)."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import torch

    from lorascope.inputs.synthetic import pretrain_on_markov

    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, intermediate_size=64, vocab_size=256,
                                      max_position_embeddings=32, tie_word_embeddings=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    pretrain_on_markov(model, 256, steps=50)
    yield model
    torch.set_num_threads(threads)


FAST = dict(values=64, layers=[1], epochs=20, lr=3e-3, batch_size=128)  # one block: half the facts, same kappa


def test_a_bracketed_calibration_fits_kappa_and_reads_what_lies_past_capacity(tiny_base, tmp_path):
    from lorascope.workflows.calibrate import calibrate

    lines: list[str] = []
    result = calibrate(tiny_base, ranks=(1, 2, 4), bracket=(0.5, 2, 8), log=lines.append, **FAST)
    bracket = result.bracket
    assert bracket is not None and bracket.rank == 1 and bracket.loads == pytest.approx((0.5, 2, 8), rel=0.02)
    assert bracket.finding in ("collapse", "plateau"), bracket
    assert [p.rank for p in result.points] == [1, 2, 4]
    full = next(p for p in result.bracket_points if p.load == bracket.capacity_load)
    assert result.points[0] == full  # the smallest rank's point is where its held bits stopped growing ...
    assert all(p.load == pytest.approx(full.load, rel=0.02) for p in result.points)  # ... offered to every rank
    assert result.fit is not None and result.fit.points == 3, [p.bits_per_parameter for p in result.points]
    assert result.training["examples_trained"] == sum(p.facts * p.epochs for p in {*result.points,
                                                                                     *result.bracket_points})
    assert [line.split(":")[0] for line in lines if line.startswith("rank ")] == ["rank 1", "rank 2", "rank 4"]
    constant = CapacityConstant.from_calibration(load_calibration(result.save(tmp_path / "cal.json")))
    assert constant.fit == result.fit and constant.bracket == bracket
    assert constant.past_capacity().startswith("collapse: at ~" if bracket.finding == "collapse" else "a plateau")


def test_the_budget_skips_loads_and_ranks_it_cannot_pay_for_with_a_note(tiny_base):
    from lorascope.workflows.calibrate import calibrate

    cheap = {**FAST, "epochs": 1}
    # rank 1 (544 LoRA parameters, 6 bits per fact): 182 facts at load 2, 46 at 0.5, 726 at 8; rank 2 at load 2: 363
    result = calibrate(tiny_base, ranks=(1, 2, 4), bracket=(0.5, 2, 8), budget=182 + 46 + 363, **cheap)
    assert [p.rank for p in result.points] == [1, 2] and result.training["examples_trained"] <= 182 + 46 + 363
    assert any("load 8 at rank 1 skipped" in n for n in result.notes)
    assert any(n.startswith("ranks 4 skipped") for n in result.notes), result.notes
    for bad in (0, -5, 2.5, True):
        with pytest.raises(InvalidOptionError, match="'budget' parameter of calibrate must be an int"):
            calibrate(tiny_base, ranks=(1,), budget=bad, **cheap)
    with pytest.raises(InvalidOptionError, match=r"covers no measurement: rank 1 at 0.5 bits per parameter with 1 "
                                                 r"learning rate\(s\) needs 46 adapter-training examples"):
        calibrate(tiny_base, ranks=(1,), budget=10, **cheap)
    with pytest.raises(InvalidOptionError, match="'bracket' parameter of calibrate"):
        calibrate(tiny_base, ranks=(1,), bracket=(1, -2), **cheap)


def test_the_budget_keeps_the_larger_ranks_before_it_extends_the_learning_rate_grid(tiny_base):
    from lorascope.workflows.calibrate import calibrate

    cheap = {**FAST, "epochs": 1, "lr": (3e-3, 1e-2)}
    # rank 1 at loads 0.5 and 2: 46 + 182 facts at each of two rates; rank 2 at load 2: 363 (see above)
    budget = 2 * (46 + 182) + 363
    result = calibrate(tiny_base, ranks=(1, 2), bracket=(0.5, 2), budget=budget, **cheap)
    assert result.training["lr_tried"] == [3e-3, 1e-2] and [p.rank for p in result.points] == [1, 2]
    assert any(n.endswith("the budget paid for no rate past it") for n in result.notes), result.notes
    free = calibrate(tiny_base, ranks=(1, 2), bracket=(0.5, 2), **cheap)  # two rates: the best is an end, extended
    assert len(free.training["lr_tried"]) >= 3


@pytest.mark.parametrize(("held_at_4", "says"), [
    (0.016, "capacity: held bits stop growing at load 1; collapse at load 4 (~5x capacity): held 2% of its most"),
    (0.75, "capacity: held bits stop growing at load 1; a plateau: at load 4 (~5x capacity) it still held 94%"),
    (3.0, "capacity not reached: held bits still grew at the largest load, 4 (not bracketed"),
])
def test_the_printed_calibration_shows_the_fit_and_what_the_bracket_found(held_at_4, says):
    from lorascope.report.recommend import format_calibration

    bracket = [_point(1, min(load, 0.8) if load <= 2 else held_at_4, load) for load in (0.5, 1, 2, 4)]
    text = format_calibration(_calibration([_point(r, 0.8 * r ** -0.1) for r in (1, 2, 4)], bracket).to_dict())
    assert "kappa(P) = exp(" in text and "over 1,000 to 4,000 LoRA parameters (3 ranks" in text
    assert says in text, text
    flat = format_calibration(_calibration([_point(1, 0.8), _point(2, 0.8)]).to_dict())
    assert "kappa(P): flat" in flat and "bracket" not in flat


# -- kappa at a step budget ----------------------------------------------------------------------------------
def _planted_train(held: dict[tuple[int, float, float], float], trained: list[tuple[int, float, float]]):
    """A stand-in for calibrate's adapter training: the bits held are planted per (rank, load, rate)."""

    def train(rank: int, load: float, rate: float, what: str) -> CalibrationPoint:
        trained.append((rank, load, rate))
        params = PER_RANK * rank
        return CalibrationPoint(rank, params, int(load * params / 8), load * params, held[rank, load, rate] * params,
                                1.0, 2, steps=64)

    return train


def test_at_a_step_budget_the_best_rate_is_read_at_every_load_and_each_rank_keeps_its_best_load():
    from lorascope.workflows.calibrate_search import at_step_budget

    loads, rates = (0.25, 1.0, 4.0), (1e-3, 1e-2, 1e-1)
    held = {(1, 0.25, 1e-3): 0.2, (1, 1.0, 1e-3): 0.3, (1, 4.0, 1e-3): 0.1,   # 1e-3 holds at most 0.3 ...
            (1, 0.25, 1e-2): 0.25, (1, 1.0, 1e-2): 0.5, (1, 4.0, 1e-2): 0.2,  # ... 1e-2 holds 0.5: chosen
            (1, 0.25, 1e-1): 0.05, (1, 1.0, 1e-1): 0.01, (1, 4.0, 1e-1): 0.0,
            (2, 0.25, 1e-2): 0.2, (2, 1.0, 1e-2): 0.15, (2, 4.0, 1e-2): 0.05,  # rank 2 best at the lowest load
            (4, 0.25, 1e-2): 0.1, (4, 1.0, 1e-2): 0.12, (4, 4.0, 1e-2): 0.01}
    trained: list[tuple[int, float, float]] = []
    notes: list[str] = []
    lines: list[str] = []
    rate, by_rate, points, bracket, every = at_step_budget(_planted_train(held, trained), lambda rank: True,
                                                           lambda: True, (1, 2, 4), loads, rates, None, notes,
                                                           lines.append)
    assert rate == 1e-2 and sorted(by_rate) == list(rates) and by_rate[rate] == list(bracket)
    assert [(p.rank, p.load, p.bits_per_parameter) for p in points] == [(1, 1.0, 0.5), (2, 0.25, 0.2), (4, 1.0, 0.12)]
    assert [p.load for p in bracket] == list(loads) and {p.rank for p in bracket} == {1}
    assert len(every) == 9 and len(trained) == 15  # rank 1 at the three rates, ranks 2 and 4 at the chosen one
    assert [line.split(":")[0] for line in lines if line.startswith("rank ")] == ["rank 1", "rank 2", "rank 4"]
    assert notes == ["rank 2: held the most at the bracket's lowest load (0.25 bits offered per parameter), so its "
                     "best load may lie outside the bracket: widen it"]


def _rate_train(held: dict[float, tuple[float, ...]], loads: tuple[float, ...], trained: list[float],
                default: float = 0.0):
    """A stand-in for calibrate's adapter training at the smallest rank: bits per parameter planted per rate (one
    value per load); a rate not planted holds ``default``."""

    def train(rank: int, load: float, rate: float, what: str) -> CalibrationPoint:
        trained.append(rate)
        bits = next((v for r, v in held.items() if math.isclose(r, rate, rel_tol=1e-9)), None)
        value = default if bits is None else bits[loads.index(load)]
        params = PER_RANK * rank
        return CalibrationPoint(rank, params, int(load * params / 8), load * params, value * params, 1.0, 2)

    return train


def test_the_rate_is_the_one_that_held_the_most_at_any_load_not_at_one():
    from lorascope.workflows.calibrate_search import tune_rate

    loads = (0.5, 1.0, 2.0)
    # at load 2 the lowest rate holds the most (3e-3 has collapsed there), but 3e-3 at load 1 holds the most any
    # adapter held: as on the reproduction's base, where reading one load misread rank 1's capacity by a third
    held = {1e-3: (0.25, 0.23, 0.32), 3e-3: (0.31, 0.43, 0.05), 1e-2: (0.29, 0.05, 0.0)}
    trained: list[float] = []
    notes: list[str] = []
    rate, by_rate = tune_rate(_rate_train(held, loads, trained), 1, loads, (1e-2, 1e-3, 3e-3), lambda: True, notes)
    assert rate == 3e-3 and sorted(by_rate) == [1e-3, 3e-3, 1e-2] and len(trained) == 9 and notes == []
    assert [p.bits_per_parameter for p in by_rate[3e-3]] == [0.31, 0.43, 0.05]


def test_a_best_rate_at_an_end_of_the_grid_extends_it_by_its_own_step_until_interior():
    from lorascope.workflows.calibrate_search import LR_EXTENSIONS, tune_rate

    loads = (1.0, 2.0)
    held = {1e-3: (0.2, 0.1), 3e-3: (0.3, 0.2), 9e-3: (0.4, 0.3), 2.7e-2: (0.1, 0.0)}
    trained: list[float] = []
    notes: list[str] = []
    rate, by_rate = tune_rate(_rate_train(held, loads, trained), 1, loads, (1e-3, 3e-3), lambda: True, notes)
    assert rate == pytest.approx(9e-3) and sorted(by_rate) == pytest.approx([1e-3, 3e-3, 9e-3, 2.7e-2])
    assert notes == [] and len(trained) == 8  # two rates past the top end, each at both loads

    # still at the low end after LR_EXTENSIONS steps down (by the grid's step there, 10x): a note
    notes.clear()
    rate, by_rate = tune_rate(_rate_train({1e-4: (0.5,)}, (1.0,), [], default=0.1), 1, (1.0,), (1e-2, 1e-1),
                               lambda: True, notes)
    assert LR_EXTENSIONS == 2 and rate == pytest.approx(1e-4) and len(by_rate) == 4
    assert notes == ["learning rate 0.0001, the lowest of those tried (0.0001, 0.001, 0.01, 0.1), held the most: "
                     "the best rate may lie past it, and kappa be understated; widen lr"]

    # the budget pays for no rate past the end; one rate given is used as given
    notes.clear()
    rate, by_rate = tune_rate(_rate_train({3e-3: (0.5,)}, (1.0,), [], default=0.1), 1, (1.0,), (1e-3, 3e-3),
                               lambda: False, notes)
    assert rate == 3e-3 and len(by_rate) == 2 and notes[0].endswith("; the budget paid for no rate past it")
    notes.clear()
    rate, by_rate = tune_rate(_rate_train({}, (1.0,), []), 1, (1.0,), (3e-3,), lambda: True, notes)
    assert rate == 3e-3 and len(by_rate) == 1 and notes == []


def test_a_larger_rank_that_collapsed_at_the_chosen_rate_is_retried_lower_and_the_larger_ones_start_there():
    from lorascope.workflows.calibrate_search import unless_collapsed

    def point(rank: int, bits_per_parameter: float) -> CalibrationPoint:
        return CalibrationPoint(rank, PER_RANK * rank, 100, 2.0 * PER_RANK * rank, bits_per_parameter * PER_RANK * rank,
                                1.0, 300)

    rank2 = point(2, 0.62)
    held = {1e-3: 0.5, 3e-4: 0.55}
    trained: list[float] = []

    def train(rank: int, load: float, rate: float, what: str) -> CalibrationPoint:
        trained.append(rate)
        return point(rank, held[rate])

    notes: list[str] = []
    lower = [1e-3, 3e-4]
    load_for = {1e-3: 2.0, 3e-4: 4.0}.get
    kept, rate, load = unless_collapsed(train, point(4, 0.01), 2.0, rank2, 3e-3, lower, load_for, lambda v: True,
                                        notes)
    assert (kept.bits_per_parameter, rate, load, trained, lower) == (0.5, 1e-3, 2.0, [1e-3], [3e-4])  # not a collapse
    assert notes == ["rank 4: 0.010 bits per parameter at learning rate 0.003, under half of rank 2's 0.620 (a "
                     "collapse); at 0.001: 0.500, kept, and the larger ranks start there"]
    # a rank that filled is kept as it is; a retry that does not help is not kept; no budget, no retry
    assert unless_collapsed(train, point(4, 0.4), 2.0, rank2, 3e-3, [1e-3], load_for, lambda v: True, []) \
        == (point(4, 0.4), 3e-3, 2.0)
    held[1e-3] = 0.005
    notes.clear()
    assert unless_collapsed(train, point(4, 0.01), 1.0, rank2, 3e-3, [1e-3], load_for, lambda v: True, notes) \
        == (point(4, 0.01), 3e-3, 1.0)
    assert notes[0].endswith("at 0.001: 0.005, not better")
    assert unless_collapsed(train, point(4, 0.01), 1.0, rank2, 3e-3, [1e-3], load_for, lambda v: False, []) \
        == (point(4, 0.01), 3e-3, 1.0)


def test_each_larger_rank_is_offered_its_own_rates_capacity_load_and_more_when_it_did_not_fill():
    from lorascope.workflows.calibrate_search import at_capacity_loads

    # planted after seed 102 of the reproduction, with a lower rate that fills at a larger load: rank 1 filled at
    # load 1 at 9e-3 and at load 2 at 3e-3; rank 8 collapsed at 9e-3 and is retried at 3e-3 at load 2
    held = {(2, 1.0, 9e-3): 0.6, (8, 1.0, 9e-3): 0.03, (8, 2.0, 3e-3): 1.7, (8, 4.0, 3e-3): 1.6,
            (16, 2.0, 3e-3): 1.7, (16, 4.0, 3e-3): 2.2}
    trained: list[tuple[int, float, float]] = []
    notes: list[str] = []
    first = CalibrationPoint(1, PER_RANK, int(PER_RANK / 8), PER_RANK, 0.47 * PER_RANK, 1.0, 300)
    points, rates, loads, held_less = at_capacity_loads(_planted_train(held, trained), (1, 2, 8, 16), first, 9e-3,
                                             {9e-3: 1.0, 3e-3: 2.0}.get, [3e-3], (0.5, 1.0, 2.0, 4.0, 8.0),
                                             lambda rank, load: True, lambda left, at: "skipped", notes)
    # rank 8 retried at 3e-3 is offered 3e-3's capacity load, 2; at 85% of it, load 4 (held less: not kept);
    # rank 16 starts at 3e-3 and load 2, is not full there, holds more at 4 and fills it (55%)
    assert trained == [(2, 1.0, 9e-3), (8, 1.0, 9e-3), (8, 2.0, 3e-3), (8, 4.0, 3e-3), (16, 2.0, 3e-3),
                       (16, 4.0, 3e-3)]
    assert [p.bits_per_parameter for p in points] == pytest.approx([0.47, 0.6, 1.7, 2.2])
    assert rates == {1: 9e-3, 2: 9e-3, 8: 3e-3, 16: 3e-3} and loads == {1: 1.0, 2: 1.0, 8: 2.0, 16: 4.0}
    assert held_less == {8}  # its own load stands; the calibration's note says a larger one held less
    assert notes[1:] == ["rank 8: held 85% of load 2 (it may not be full); at load 4: 1.600 bits per parameter, "
                         "not more",
                         "rank 16: held 85% of load 2 (it may not be full); at load 4: 2.200 bits per parameter, kept"]
    # the budget: a rank it cannot pay for at its load is skipped with the larger ones; no extra load past it
    notes.clear()
    trained.clear()
    points, _, loads, _ = at_capacity_loads(_planted_train(held, trained), (1, 8, 16), first, 3e-3,
                                         {3e-3: 2.0}.get, [], (1.0, 2.0, 4.0), lambda rank, load: load < 4.0,
                                         lambda left, at: f"ranks {left} skipped at {at:g}", notes)
    assert [p.rank for p in points] == [1, 8, 16] and loads == {1: 2.0, 8: 2.0, 16: 2.0}
    assert trained == [(8, 2.0, 3e-3), (16, 2.0, 3e-3)]
    points, _, _, _ = at_capacity_loads(_planted_train(held, []), (1, 8, 16), first, 3e-3, {3e-3: 2.0}.get, [],
                                     (1.0, 2.0), lambda rank, load: rank < 16, lambda left, at: f"{left} at {at:g}",
                                     notes)
    assert [p.rank for p in points] == [1, 8] and notes[-1] == "(16,) at 2"


def test_at_a_step_budget_a_rank_the_budget_cannot_pay_for_is_skipped_with_the_larger_ones():
    from lorascope.workflows.calibrate_search import at_step_budget

    held = {(r, load, 1e-3): 0.1 * load for r in (1, 2, 4) for load in (1.0, 2.0)}
    notes: list[str] = []
    _, _, points, _, _ = at_step_budget(_planted_train(held, []), lambda rank: rank < 2, lambda: True, (1, 2, 4),
                                        (1.0, 2.0), (1e-3,), 10_000, notes, None)
    assert [p.rank for p in points] == [1]
    assert notes[0] == ("ranks 2, 4 skipped: rank 2 at 2 load(s) would pass the budget (10,000 adapter-training "
                        "examples)")
    assert "highest load" in notes[1]


def test_a_step_budget_calibration_trains_the_steps_it_says_and_round_trips(tiny_base, tmp_path):
    from torch.optim import optimizer

    from lorascope.report.recommend import format_calibration
    from lorascope.workflows.calibrate import calibrate

    steps: list[int] = []
    handle = optimizer.register_optimizer_step_post_hook(lambda *_: steps.append(1))
    try:
        result = calibrate(tiny_base, ranks=(1, 4), steps=12, batch_size=32, bracket=(0.25, 2.0), lr=(3e-3, 1e-2),
                           values=64, layers=[1])
    finally:
        handle.remove()
    rates = len(result.training["lr_tried"])  # the two given, and any past an end of them
    assert 2 <= rates <= 4 and result.training["lr_loads"] == [0.25, 2.0]
    assert [len(held) for held in result.training["held_by_lr"].values()] == [2] * rates
    trained = rates * 2 + 2  # rank 1: each rate x two loads; rank 4: two loads
    assert len(steps) == 12 * trained  # every adapter took exactly the budget's steps, whatever its facts
    assert all(p.steps == 12 for p in result.points + result.load_points)
    assert result.training["steps"] == 12 and result.training["epochs"] is None
    per_pass = {p: math.ceil(p.facts / 32) for p in result.load_points}  # batches in one pass over the facts
    assert result.training["examples_trained"] == sum(
        (12 // per_pass[p] * p.facts + 12 % per_pass[p] * 32) * (rates if p.rank == 1 else 1)
        for p in result.load_points)
    for point in result.points:  # each rank's point is its best load
        assert point.bits_stored == max(p.bits_stored for p in result.load_points if p.rank == point.rank)
        assert point.epochs == math.ceil(12 / per_pass[point])
    assert result.training["best_loads"] == {str(p.rank): p.load for p in result.points}
    saved = load_calibration(result.save(tmp_path / "cal.json"))
    assert saved.steps == 12 and saved.load_points == result.load_points and saved.points == result.points
    assert "at a step budget: 12 steps of 32 facts per adapter" in format_calibration(result.to_dict())


def test_step_mode_trains_as_many_steps_as_the_same_epochs_would_and_ends_at_the_same_loss(tiny_base):
    from lorascope.inputs.synthetic import FactsTask
    from lorascope.workflows.calibrate import memorize_with_lora

    task = FactsTask(facts=100, vocab_size=256, values=64, key_tokens=2, seed=3)
    by_epochs = memorize_with_lora(tiny_base, "all-linear", 2, task, epochs=3, lr=1e-2, batch_size=32, seed=0,
                                   layers=[1])
    by_steps = memorize_with_lora(tiny_base, "all-linear", 2, task, epochs=1, steps=3 * 4, lr=1e-2, batch_size=32,
                                  seed=0, layers=[1])
    assert by_steps.final_loss_nats == pytest.approx(by_epochs.final_loss_nats, rel=1e-6)
    assert (by_steps.epochs, by_steps.steps, by_epochs.steps) == (3, 12, None)


def test_step_mode_refuses_bad_steps_and_brackets(tiny_base):
    from lorascope.workflows.calibrate import calibrate

    for bad in (0, -3, 2.5):
        with pytest.raises(InvalidOptionError, match="'steps' parameter of calibrate"):
            calibrate(tiny_base, ranks=(1,), steps=bad, **FAST)
    with pytest.raises(InvalidOptionError, match="'bracket' parameter of calibrate must be 'auto'"):
        calibrate(tiny_base, ranks=(1,), bracket="wide", **FAST)
    with pytest.raises(InvalidOptionError, match=r"covers no measurement: rank 1 at 0.5 bits per parameter with 2 "
                                                 r"learning rate"):
        calibrate(tiny_base, ranks=(1,), steps=10, bracket=(0.5, 1.0), budget=100, **{**FAST, "lr": (1e-3, 1e-2)})


def test_kappa_through_measured_probes_is_log_linear_between_them_and_continues_the_end_segments():
    from lorascope.analysis.capacity_fit import interpolate_kappa

    probes = [(4000, 0.2), (1000, 0.8), (2000, 0.4)]  # unsorted on purpose: kappa halves per doubling
    for parameters, kappa in [(1000, 0.8), (1500, 0.8 * (1500 / 1000) ** -1), (2000, 0.4), (4000, 0.2),
                              (16000, 0.05), (250, 3.2)]:
        assert interpolate_kappa(probes, parameters) == pytest.approx(kappa)
    bent = [(1000, 0.8), (2000, 0.4), (4000, 0.35)]  # past the last probe the last segment's gentler slope
    assert interpolate_kappa(bent, 8000) == pytest.approx(0.35 * 0.35 / 0.4)
    assert interpolate_kappa([(1000, 0.8)], 10**6) == 0.8
    for bad in ([], [(1000, -1.0)]):
        with pytest.raises(InvalidOptionError, match="interpolate_kappa"):
            interpolate_kappa(bad, 1000)


def test_past_the_probes_the_range_widens_by_how_far_the_end_segment_moved_kappa():
    from lorascope.analysis.capacity_fit import probes_extrapolation

    probes = [(1000, 0.8), (2000, 0.4), (4000, 0.35)]
    assert probes_extrapolation(probes, 3000) == 1.0 and probes_extrapolation(probes[:1], 10**6) == 1.0
    assert probes_extrapolation(probes, 8000) == pytest.approx(0.4 / 0.35)  # the last segment, one doubling on
    assert probes_extrapolation(probes, 250) == pytest.approx(4.0)  # the first segment, two doublings below


@pytest.mark.parametrize(("kappa0", "ceiling"), [(0.8, 40_000.0), (0.3, 5_000.0), (1.5, 200_000.0)])
def test_a_planted_saturating_capacity_is_recovered_from_three_probes(kappa0, ceiling):
    from lorascope.analysis.capacity_fit import SaturatingCapacity, fit_saturating

    planted = SaturatingCapacity(kappa0, ceiling)
    sizes = (10_000.0, 20_000.0, 40_000.0)
    law = fit_saturating([(p, planted.bits(p) / p) for p in sizes])
    assert law.kappa0 == pytest.approx(kappa0, rel=1e-4) and law.ceiling == pytest.approx(ceiling, rel=1e-4)
    assert law.bits(10**7) == pytest.approx(ceiling, rel=1e-4)  # far past the probes: the ceiling, not the trend


def test_the_saturating_capacity_needs_two_probes_whose_kappa_falls():
    from lorascope.analysis.capacity_fit import fit_saturating

    assert fit_saturating([(1000, 0.8)]) is None
    assert fit_saturating([(1000, 0.5), (4000, 0.6)]) is None  # kappa rose with P: nothing saturates
    assert fit_saturating([(1000, 0.5), (4000, 0.5)]) is None
    flat = fit_saturating([(1000, 0.8), (2000, 0.4), (4000, 0.2)])  # no rank held more: the ceiling is reached
    assert flat.bits(1000) == pytest.approx(800, rel=0.01) and flat.bits(10**6) == pytest.approx(800, rel=0.01)


def test_a_constant_from_lora_probes_saturates_beyond_them_and_says_so():
    from lorascope.analysis.capacity import CapacityConstant

    # SmolLM2's CPT probes of ranks 1, 2 and 4 at 128 steps (docs/realdata/smollm2_lora_probes.json)
    measured = ((10_176.0, 0.8167), (20_352.0, 0.7099), (40_704.0, 0.5814))
    constant = CapacityConstant(0.71, 1.25, "probes", measured=measured)
    assert constant.saturating.kappa0 == pytest.approx(0.915, abs=0.002)
    assert constant.saturating.ceiling == pytest.approx(37_268, rel=0.002)
    for parameters, kappa in measured:  # through the probes within the fit's residual
        assert constant.bits_per_parameter_at(parameters) == pytest.approx(kappa, rel=0.02)
    # rank 64: at most the ceiling, where the probes' trend continued would have held 0.298 bits per parameter
    assert constant.capacity_bits(651_264) == pytest.approx(37_268, rel=0.002)
    assert constant.uncertainty_at(651_264) > constant.uncertainty_at(20_352) == 1.25
    rising = CapacityConstant(0.5, 1.25, "probes", measured=((1000.0, 0.5), (4000.0, 0.6)))
    assert rising.saturating is None and rising.bits_per_parameter_at(2000) == pytest.approx(0.5 * 1.2 ** 0.5)
