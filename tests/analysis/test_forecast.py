"""The capacity forecast of a recording (lorascope.analysis.forecast): LoRA parameters read off the recorded
matrices equal PEFT's count, the growth law recovers a planted exponent, and the runway is the capacity rule's."""

from __future__ import annotations

import pytest
import torch

from lorascope.analysis.capacity import CapacityConstant, predict_ranks
from lorascope.analysis.forecast import Matrix, forecast, lora_parameters_of
from lorascope.analysis.layers import TARGET_SETS
from lorascope.analysis.recipe import ProbeRecipe, Recipe, RecipeInformation
from lorascope.errors import InvalidOptionError
from lorascope.model.lora_params import lora_parameters
from lorascope.model.taxonomy import classify


def _matrices(model: torch.nn.Module) -> list[Matrix]:
    return [Matrix(ref.kind, ref.out_features, ref.in_features, f"{ref.module}.{ref.parameter}[{ref.expert}]",
                   ref.expert) for ref in classify(model).matrices]


def _information(examples: int, absorbed_bits: float, epochs: float = 4.0) -> RecipeInformation:
    """A recording of ``examples`` examples that absorbed ``absorbed_bits`` in all (no one-time cost)."""
    return RecipeInformation(absorbed_bits / examples, 0.0, 0.0, 1e6, 0.01, 1.0, examples, epochs, False, False, (),
                             ProbeRecipe(epochs, None, 10), Recipe(epochs=epochs), "loss tokens")


@pytest.mark.parametrize("rank", [1, 3, 16])
def test_parameters_from_recorded_shapes_equal_peft_counts_on_a_llama(tiny_llama_config, rank):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    matrices = _matrices(model)
    for target in ("all-linear", "mlp-only", "attention-only"):
        expected = lora_parameters(model, target, rank=rank).total
        assert lora_parameters_of(matrices, TARGET_SETS[target], rank)[0] == expected, target


def test_parameters_of_fused_experts_follow_recommends_rank_per_active_expert(tiny_mixtral_config):
    transformers = pytest.importorskip("transformers")
    import lorascope

    model = transformers.MixtralForCausalLM(tiny_mixtral_config())
    matrices = _matrices(model)
    rec = lorascope.recommend(model, examples=1000, tokens_per_example=10, ranks=[2, 8])
    for prediction in rec.predictions:
        count, by_kind = lora_parameters_of(matrices, TARGET_SETS["all-linear"], prediction.rank, 2)
        assert count == prediction.lora_parameters
        assert by_kind["moe_expert"] == prediction.rank // 2


def test_a_plain_models_linear_layers_count_as_all_linear(tiny_token_model):
    model = tiny_token_model()
    matrices = _matrices(model)
    assert {m.kind for m in matrices} >= {"other", "mlp"}
    assert lora_parameters_of(matrices, TARGET_SETS["all-linear"], 4)[0] == lora_parameters(
        model, "all-linear", rank=4).total


def test_growth_law_recovers_a_planted_exponent():
    infos = [_information(n, 50.0 * n ** 0.6) for n in (100, 400, 1600)]
    growth = forecast(infos, [Matrix("mlp", 16, 8, "up")], [1]).bits
    assert growth.exponent == pytest.approx(0.6, rel=1e-9)
    assert growth.reference_examples == 1600
    assert growth.bits(5000.0) == pytest.approx(50.0 * 5000 ** 0.6)
    assert growth.examples_for(growth.bits(5000.0)) == pytest.approx(5000.0)


def test_one_recording_grows_linearly_and_gives_the_capacity_rules_runway():
    info = _information(500, 3000.0)
    constant = CapacityConstant(0.5, 2.0, "test")
    matrices = [Matrix("mlp", 64, 32, "a"), Matrix("attention", 32, 32, "b")]
    result = forecast([info], matrices, [1, 8], constant=constant)
    assert result.bits.exponent == 1.0 and result.to_dict()["growth"]["exponent"] == 1.0
    # data of unknown information carry what the real-text study measured; a task of known information does not
    assert any("docs/realdata.md" in note for note in result.notes)
    known = forecast([info], matrices, [1], constant=constant, truth_bits_per_example=6.0)
    assert not any("docs/realdata.md" in note for note in known.notes)
    reference = predict_ranks([1, 8], lambda r: lora_parameters_of(matrices, TARGET_SETS["all-linear"], r),
                              examples=500, bits=info.estimate(), constant=constant)
    for row, ref in zip([r for r in result.rows if r.target == "all-linear"], reference):
        assert row.prediction.runway_examples == pytest.approx(ref.runway_examples)
        assert (row.prediction.runway_low, row.prediction.runway_high) == pytest.approx(
            (ref.runway_low, ref.runway_high))
        assert row.prediction.verdict == ref.verdict


def test_sub_linear_growth_moves_the_falloff_later():
    infos = [_information(n, 2.0 * 32 * n ** 0.5) for n in (256, 1024)]  # 2 bits per example at 1,024
    constant = CapacityConstant(1.0, 2.0, "test")
    matrices = [Matrix("mlp", 512, 512, "a")]  # rank 4: 4,096 bits, twice what the largest recording absorbed
    linear = forecast(infos[-1:], matrices, [4], constant=constant).rows[0].prediction
    grown = forecast(infos, matrices, [4], constant=constant).rows[0].prediction
    assert linear.runway_examples == pytest.approx(4096 / 2.0)
    assert grown.runway_examples == pytest.approx(1024 * (4096 / (2.0 * 1024)) ** 2)


def test_no_information_is_refused():
    with pytest.raises(InvalidOptionError, match="at least one"):
        forecast([], [Matrix("mlp", 4, 4, "a")], [1])
