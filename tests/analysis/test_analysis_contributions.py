"""Per-kind contributions on hand-computed numbers: shares, interaction, attributed bits, LoRA runways, the rank
each kind needs and the kind that runs out first; NaN shares when the update did not lower the loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lorascope.analysis.capacity import CapacityConstant
from lorascope.analysis.contributions import contributions, loss_shares
from lorascope.analysis.forecast import Matrix, forecast
from lorascope.analysis.recipe import ProbeRecipe, Recipe, RecipeInformation

MATRICES = [Matrix("attention", 8, 8, "q"), Matrix("mlp", 16, 8, "up"), Matrix("mlp", 8, 16, "down"),
            Matrix("head", 50, 8, "lm_head")]
LAYERS = [0, 0, 1, -1]
# L = 1, L_0 = 3; reverting attention gives 1.5, the MLP 2.2, the head 1.0.
WITHOUT_KIND = [1.5, 2.2, 2.2, 1.0]


def _information(bits_per_example: float) -> RecipeInformation:
    """A recording of 100 examples over 4 epochs that absorbed ``bits_per_example`` each, no one-time cost."""
    return RecipeInformation(bits_per_example, 0.0, 0.0, 1e6, 0.01, 1.0, 100, 4.0, False, False, (),
                             ProbeRecipe(4.0, None, 10), Recipe(epochs=4), "loss tokens")


@pytest.fixture
def probe_forecast():
    # 780 bits to learn over 100 examples (linear growth), 4 bits per LoRA parameter.
    info = _information(7.8)
    result = forecast([info], MATRICES, [2], constant=CapacityConstant(4.0, 2.0, "test"))
    assert result.bits.bits(result.dataset_examples) == pytest.approx(780.0)
    return result


def test_shares_and_interaction_by_hand():
    shares, interaction = loss_shares(1.0, 3.0, [1.5, 2.2, 1.0])
    np.testing.assert_allclose(shares, [0.25, 0.6, 0.0], rtol=1e-12)
    assert interaction == pytest.approx(0.15, rel=1e-12)
    # Shares plus interaction account for the whole reduction, whatever the losses.
    rng = np.random.default_rng(0)
    without = rng.uniform(0, 5, 7)
    shares, interaction = loss_shares(0.5, 4.0, without)
    assert float(np.sum(shares)) + interaction == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("loss,start", [(2.0, 2.0), (2.0, 1.5), (float("nan"), 3.0), (1.0, float("inf"))])
def test_no_reduction_gives_nan_shares_with_a_note(loss, start):
    result = contributions(loss, start, WITHOUT_KIND, MATRICES, [2])
    assert all(math.isnan(k.share) for k in result.kinds) and math.isnan(result.interaction)
    assert any("did not lower" in n for n in result.notes)
    assert result.to_dict()["kinds"][0]["share"] is None
    json.dumps(result.to_dict(), allow_nan=False)


def test_bits_runways_needed_ranks_and_first_out(probe_forecast):
    result = contributions(1.0, 3.0, WITHOUT_KIND, MATRICES, [2, 4, 8], forecast=probe_forecast, step=7)
    by = {k.name: k for k in result.kinds}
    assert list(by) == ["attention", "mlp", "head"]
    assert result.step == 7 and result.bits_to_learn == pytest.approx(780.0)
    assert by["attention"].bits == pytest.approx(0.25 * 780) and by["mlp"].bits == pytest.approx(0.6 * 780)
    assert by["head"].bits == 0.0 and by["head"].rank_needed == 0
    # attention: P(r) = 16 r, capacity 64 r; mlp: P(r) = 48 r (two adapters of 24 r), capacity 192 r.
    attention_r2 = by["attention"].ranks[0]
    assert (attention_r2.rank, attention_r2.lora_parameters, attention_r2.capacity_bits) == (2, 32, 128.0)
    assert attention_r2.runway == pytest.approx(128 / 195) and attention_r2.holds is False
    assert attention_r2.runway_examples == pytest.approx(100 * (128 / 0.25) / 780)
    assert by["mlp"].ranks[0].runway == pytest.approx(384 / 468)
    assert by["mlp"].ranks[1].holds is True  # 768 bits >= 468
    assert by["attention"].rank_needed == 4  # 64 * 3 = 192 < 195 <= 256
    assert by["mlp"].rank_needed == 3  # 192 * 2 = 384 < 468 <= 576
    assert result.first_to_run_out == {2: "attention", 4: "attention", 8: "attention"}
    d = result.to_dict()
    assert d["first_to_run_out"] == {"2": "attention", "4": "attention", "8": "attention"}
    assert d["interaction"] == pytest.approx(0.15) and d["reduction"] == pytest.approx(2.0)


def test_no_rank_holds_a_large_share():
    info = _information(1e4)
    big = forecast([info], MATRICES, [2], constant=CapacityConstant(1.0, 2.0, "test"))
    result = contributions(1.0, 3.0, WITHOUT_KIND, MATRICES, [2], forecast=big)
    assert all(k.rank_needed is None for k in result.kinds if k.name != "head")


def test_layers(probe_forecast):
    # Layer 0 (attention q + mlp up) reverted: 2.0; layer 1 (mlp down): 1.4; the head is outside the blocks.
    without_layer = [2.0, 2.0, 1.4, np.nan]
    result = contributions(1.0, 3.0, WITHOUT_KIND, MATRICES, [2], layers=LAYERS, loss_without_layer=without_layer,
                           forecast=probe_forecast)
    assert [(p.name, p.share) for p in result.layers] == [("0", pytest.approx(0.5)), ("1", pytest.approx(0.2))]
    # Layer 0's LoRA at rank 2: q (2 * 16) + up (2 * 24) = 80 parameters.
    assert result.layers[0].ranks[0].lora_parameters == 80


def test_without_forecast_gives_shares_only():
    result = contributions(1.0, 3.0, WITHOUT_KIND, MATRICES, [2])
    assert result.bits_to_learn is None and result.first_to_run_out == {}
    assert all(k.bits is None and k.rank_needed is None for k in result.kinds)
    assert any("no forecast" in n for n in result.notes)
    json.dumps(result.to_dict(), allow_nan=False)  # strict JSON: undefined numbers are null


def test_wrong_length_is_an_error():
    with pytest.raises(Exception, match="one value per matrix"):
        contributions(1.0, 3.0, [1.0], MATRICES, [2])


def test_strong_interaction_is_noted():
    # Reverting either kind alone gives back little: most of the reduction needs both (interaction 80%).
    result = contributions(0.0, 5.0, [0.5, 0.5, 0.5, 0.0], MATRICES, [2])
    assert result.interaction == pytest.approx(0.8)
    assert any("interact strongly" in n and "optimistic" in n for n in result.notes)
    assert not any("interact" in n for n in contributions(1.0, 3.0, WITHOUT_KIND, MATRICES, [2]).notes)


def test_the_part_that_runs_out_first_is_one_an_all_linear_lora_adapts():
    m = [Matrix("attention", 64, 64, "q"), Matrix("mlp", 128, 64, "up"), Matrix("head", 500, 64, "lm_head")]
    info = _information(70.0)
    f = forecast([info], m, [1], constant=CapacityConstant(1.0, 2.0, "test"))
    # the head holds most of the reduction, but no all-linear LoRA adapts it: it is named in a note, not chosen
    c = contributions(0.5, 3.0, [0.9, 1.0, 2.5], m, [1], forecast=f)
    assert c.first_to_run_out[1] in ("attention", "mlp")
    assert any("head (80%)" in note and "no rank holds it" in note for note in c.notes)
