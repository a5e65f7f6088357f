"""The bits under a planned recipe (lorascope.analysis.recipe) on per-step rows whose answer is known: a probe read
at the planned epoch whatever its own length, the one-time cost counted once, extrapolation along the per-epoch
curve, the growth law from probes of several sizes, and one-line refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from lorascope.analysis.recipe import (
    MIN_SIZE_RATIO,
    Recipe,
    RecipeInformation,
    bits_for_plan,
    information_for_recipe,
)
from lorascope.errors import InvalidOptionError

LN2 = math.log(2)


def _steps(bits_per_token: list[float], *, batch: int = 8, tokens: int = 2, loss_tokens: bool = True) -> xr.Dataset:
    """Rows of a run with the given loss (in bits per token), ``batch`` examples of ``tokens`` loss tokens a step."""
    n = len(bits_per_token)
    data = {"loss": ("step", np.asarray(bits_per_token) * LN2), "batch_examples": ("step", np.full(n, batch)),
            "batch_tokens": ("step", np.full(n, batch * tokens)),
            "examples_seen": ("step", np.arange(1, n + 1) * batch)}
    data["batch_loss_tokens"] = ("step", np.full(n, batch * tokens if loss_tokens else -1))
    return xr.Dataset(data)


def _epochs(*per_epoch: list[float]) -> xr.Dataset:
    return _steps([v for epoch in per_epoch for v in epoch])


# 64 examples, 8 steps an epoch; the first half of epoch 1 pays a format cost (6 bits/token) above the rate (4).
FIRST = [6.0] * 4 + [4.0] * 4


def test_the_planned_epoch_is_read_whatever_the_probes_length():
    epochs = [FIRST, [3.0] * 8, [2.0] * 8, [1.0] * 8, [0.5] * 8]
    short, long = _epochs(*epochs[:3]), _epochs(*epochs)
    for planned in (1, 2, 3):
        a = information_for_recipe(short, dataset_examples=64, planned=Recipe(epochs=planned))
        b = information_for_recipe(long, dataset_examples=64, planned=Recipe(epochs=planned))
        assert a.absorbed_per_example == b.absorbed_per_example and not a.extrapolated and not b.extrapolated
    two = information_for_recipe(long, dataset_examples=64, planned=Recipe(epochs=2))
    # d = 4 bits/token x 2 tokens; the end of epoch 2 codes at 3 bits/token: (4 - 3) x 2 = 2 bits per example.
    assert two.code_length_per_example == pytest.approx(8.0)
    assert two.absorbed_per_example == pytest.approx(2.0)
    # The one-time cost: the first half-epoch's 32 examples paid (6 - 4) x 2 bits above the rate, once.
    assert two.one_time_bits == pytest.approx(32 * 4.0)
    assert two.absorbed_bits == pytest.approx(128 + 2.0 * 64)
    assert [a for _, a in two.per_epoch] == pytest.approx([0.0, 2.0, 4.0, 6.0, 7.0])
    assert not two.below_resolution and not two.estimate().upper_bound
    estimate = two.estimate()
    assert estimate.bits(64) == pytest.approx(two.absorbed_bits) and estimate.bits(640) == pytest.approx(128 + 1280)
    assert estimate.examples_for(128 + 1280) == pytest.approx(640)


def test_a_loss_above_a_uniform_guess_over_the_vocabulary_counts_as_that_guess():
    """A learner confidently wrong on unseen examples pays more than sending the tokens plain; the switching code
    (model or uniform, per batch) does not: each step counts at most log2 V bits per token, and a note says so."""
    from lorascope.analysis.information import information_from_steps, recorded_vocab_size

    steps = _epochs([7.0] * 4 + [5.0] * 4, [1.0] * 8, [0.0] * 8)  # a 16-token vocabulary: at most 4 bits a token
    plain = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=3))
    capped = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=3), vocab_size=16)
    assert plain.code_length_per_example == pytest.approx(10.0) and plain.one_time_bits == pytest.approx(128.0)
    assert capped.code_length_per_example == pytest.approx(8.0) and capped.one_time_bits == pytest.approx(0.0)
    assert capped.absorbed_per_example == pytest.approx(8.0)
    assert any("uniform guess over the 16-token vocabulary" in note for note in capped.notes)
    assert not any("uniform" in note for note in plain.notes)
    wide = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=3), vocab_size=1024)
    assert wide.code_length_per_example == plain.code_length_per_example and wide.notes == plain.notes  # not binding
    recorded = information_from_steps(steps, dataset_examples=64, vocab_size=16)
    assert recorded.description_length_bits == pytest.approx(64 * 8.0)
    assert recorded_vocab_size({"model": {"config": {"vocab_size": 16}}}) == 16
    assert recorded_vocab_size({"model": {"config": {"text_config": {"vocab_size": 32}}}}) == 32
    assert recorded_vocab_size({"model": {"config": {}}}) is None and recorded_vocab_size({}) is None


def test_a_fractional_plan_reads_the_window_before_it():
    steps = _epochs(FIRST, [3.0] * 4 + [1.0] * 4)
    info = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=1.5))
    assert info.end_loss_nats == pytest.approx(3.0 * LN2)  # the quarter epoch before 96 examples: steps 11-12


def test_a_shorter_probe_is_extrapolated_along_its_per_epoch_curve_and_says_so():
    # Epochs 2-4 end at 3.5, 3 and 2.5 bits/token (d = 4): a(E) = 1, 2, 3 bits per example; the fit reads epochs 2-4
    # (the first epoch only measures what one pass generalises).
    steps = _epochs(FIRST, [3.5] * 8, [3.0] * 8, [2.5] * 8)
    info = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=8))
    assert info.extrapolated and info.read_at_epochs == 4
    points = np.array(info.per_epoch[1:])
    assert points[:, 1] == pytest.approx([1.0, 2.0, 3.0])
    slope = np.polyfit(np.log(points[:, 0]), np.log(points[:, 1]), 1)[0]
    assert info.absorbed_per_example == pytest.approx(min(info.code_length_per_example, 3.0 * 2 ** slope))
    assert any("extrapolated" in n and "a probe of 8 epochs" in n for n in info.notes)
    assert info.relative_error >= 0.5  # one doubling of the epochs past the probe


def test_a_probe_with_one_epoch_past_the_first_is_extrapolated_in_proportion_to_the_epochs():
    # SmolLM2 (docs/information.md): a(1) = 0 on every probe, so a 2-epoch probe has one point to go on.
    info = information_for_recipe(_epochs(FIRST, [3.5] * 8), dataset_examples=64, planned=Recipe(epochs=6))
    assert [a for _, a in info.per_epoch] == pytest.approx([0.0, 1.0])
    assert info.absorbed_per_example == pytest.approx(3.0)


def test_a_plan_that_absorbs_nothing_measurable_is_taken_at_the_probes_resolution_as_an_upper_bound():
    info = information_for_recipe(_epochs(FIRST), dataset_examples=64, planned=Recipe(epochs=1))
    assert info.below_resolution and info.absorbed_per_example == pytest.approx(0.01 * info.code_length_per_example)
    assert info.estimate().upper_bound and any("below what the probe resolves" in n for n in info.notes)


def test_the_extrapolation_never_exceeds_the_code_length():
    steps = _epochs(FIRST, [2.0] * 8, [0.5] * 8)
    info = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=50))
    assert info.absorbed_per_example == pytest.approx(info.code_length_per_example)


def test_a_learning_rate_or_batch_unlike_the_plans_is_named_with_its_direction():
    steps = _epochs(FIRST, [3.0] * 8)
    high = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=2, learning_rate=1e-4),
                                  learning_rate=1e-3)
    assert any("10x the planned" in n and "over-estimate" in n for n in high.notes)
    low = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=2, learning_rate=1e-3),
                                 learning_rate=1e-4)
    assert any("under-estimate" in n for n in low.notes)
    same = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=2, learning_rate=1.2e-4,
                                                                            batch_size=8), learning_rate=1e-4)
    assert not same.notes
    unknown = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=2, learning_rate=1e-4))
    assert any("does not record its learning rate" in n for n in unknown.notes)
    batch = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=2, batch_size=64))
    assert any("batch (8 examples) differs" in n for n in batch.notes)


def test_the_error_comes_from_the_step_noise():
    quiet = information_for_recipe(_epochs(FIRST, [3.0] * 8), dataset_examples=64, planned=Recipe(epochs=2))
    assert quiet.relative_error == 0
    rng = np.random.default_rng(0)
    noisy_rows = [v + rng.normal(0, 0.3) for v in FIRST + [3.0] * 8]
    noisy = information_for_recipe(_steps(noisy_rows), dataset_examples=64, planned=Recipe(epochs=2))
    assert 0.05 < noisy.relative_error < 1.0


def _info(examples: int, absorbed: float, one_time: float = 0.0) -> RecipeInformation:
    steps = _epochs(FIRST, [3.0] * 8)
    base = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=2))
    return RecipeInformation(absorbed, one_time, 0.1, base.code_length_per_example, base.end_loss_nats,
                             base.loss_tokens_per_example, examples, 2.0, False, False, (), base.probe, base.planned,
                             base.token_basis)


def test_probes_of_several_sizes_give_the_growth_law():
    # bits = 10 N^0.75 at 100, 300 and 900 examples
    infos = [_info(n, 10 * n ** 0.75 / n) for n in (100, 300, 900)]
    estimate = bits_for_plan(infos)
    assert estimate.exponent == pytest.approx(0.75) and estimate.reference_examples == 900
    assert estimate.bits(10_000) == pytest.approx(10 * 10_000 ** 0.75)
    assert estimate.examples_for(10 * 10_000 ** 0.75) == pytest.approx(10_000)
    assert estimate.relative_error == pytest.approx(0.1, abs=1e-6)  # exact fit: only the probe's own error
    assert "fitted on 3 probes" in estimate.growth_source


def test_one_size_or_sizes_too_close_stay_linear_and_say_how_to_measure_growth():
    one = bits_for_plan([_info(100, 5.0)])
    assert one.exponent == 1 and "2-3 sizes" in one.growth_source
    close = bits_for_plan([_info(100, 5.0), _info(int(100 * MIN_SIZE_RATIO) - 1, 4.0)])
    assert close.exponent == 1 and close.bits_per_example == 4.0  # the larger probe's rate


def test_bad_input_is_one_line():
    steps = _epochs(FIRST, [3.0] * 8)
    with pytest.raises(InvalidOptionError, match="dataset size"):
        information_for_recipe(steps, dataset_examples=None, planned=Recipe(epochs=2))
    with pytest.raises(InvalidOptionError, match="second half of its first epoch"):
        information_for_recipe(_steps([5.0] * 3, batch=32), dataset_examples=64, planned=Recipe(epochs=1))
    with pytest.raises(InvalidOptionError, match="no step with a finite loss"):
        information_for_recipe(_steps([math.nan] * 8), dataset_examples=64, planned=Recipe())
    with pytest.raises(InvalidOptionError, match="epochs"):
        Recipe(epochs=0)
    with pytest.raises(InvalidOptionError, match="absorbed nothing"):
        bits_for_plan([_info(100, 0.0)])
    with pytest.raises(InvalidOptionError, match="at least one probe"):
        bits_for_plan([])
    for error in (InvalidOptionError,):
        try:
            information_for_recipe(steps, dataset_examples=None, planned=Recipe())
        except error as exc:
            assert "\n" not in str(exc)


def test_the_probes_schedule_is_read_from_its_learning_rates_and_a_decay_read_early_is_named():
    steps = _epochs(FIRST, [3.0] * 8, [2.0] * 8, [1.0] * 8)
    constant = steps.assign(lr=("step", np.full(32, 1e-3)))
    info = information_for_recipe(constant, dataset_examples=64, planned=Recipe(epochs=2, learning_rate=1e-3))
    assert (info.probe.schedule, info.probe.learning_rate) == ("constant", 1e-3)
    assert info.notes == ["read at the planned epoch 2 of the probe's 4: a plan of 4 epochs asks 6 bits per example "
                          "(give the planned epochs: recommend(epochs=), --epochs)"]
    decaying = steps.assign(lr=("step", 1e-3 * (1 - np.arange(32) / 32)))
    early = information_for_recipe(decaying, dataset_examples=64, planned=Recipe(epochs=2))
    assert early.probe.schedule == "decaying"
    assert any("decays over its own 4 epochs and was still 53% of its peak" in n and "over-estimate" in n
               for n in early.notes)
    at_end = information_for_recipe(decaying, dataset_examples=64, planned=Recipe(epochs=4))
    assert not any("decays" in n for n in at_end.notes)
    assert information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=2)).probe.schedule is None
