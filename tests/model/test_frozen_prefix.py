"""The frozen blocks below the trained ones run once (lorascope.model.frozen_prefix), and calibrate uses it."""

from __future__ import annotations

import pytest
import torch
import transformers

from lorascope.inputs.synthetic import FactsTask
from lorascope.model.frozen_prefix import frozen_prefix, last_position_logits

TINY = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, bos_token_id=0,
                                         eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    return model_class(config_class(**TINY)).eval()


def _probe(length: int = 4) -> torch.Tensor:
    return torch.randint(0, 128, (6, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("first", [1, 2])
def test_the_kept_states_give_the_full_forwards_logits(kind, first):
    model = _model(kind)
    prefix = frozen_prefix(model, first, _probe())
    assert prefix is not None and prefix.first == first
    ids = _probe(length=5)
    states = prefix.states(model, ids, batch=4)  # two batches
    assert states.shape == (6, 5, 32) and not states.requires_grad
    full = last_position_logits(model, input_ids=ids)
    with prefix.skipping():
        assert len(prefix.blocks) == 3 - first
        skipped = last_position_logits(model, inputs_embeds=states)
    assert len(prefix.blocks) == 3  # the block list is put back
    torch.testing.assert_close(skipped, full, rtol=1e-5, atol=1e-5)
    assert full.shape == (6, 128)
    torch.testing.assert_close(full, model(input_ids=ids).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_no_prefix_where_skipping_would_be_wrong_or_useless():
    # GPT-2 adds position embeddings to inputs_embeds, so its blocks cannot be entered with kept states
    assert frozen_prefix(_model("gpt2"), 2, _probe()) is None
    llama = _model("llama")
    assert frozen_prefix(llama, 0, _probe()) is None  # nothing below the first block
    assert frozen_prefix(llama, 3, _probe()) is None  # no such block

    class TwoStacks(torch.nn.Module):  # an encoder-decoder has two block lists: which one is meant is unknown
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = llama, _model("llama")

        def forward(self, input_ids=None, inputs_embeds=None):
            return self.decoder(input_ids=input_ids, inputs_embeds=inputs_embeds)

    assert frozen_prefix(TwoStacks(), 1, _probe()) is None


def test_skipping_restores_the_blocks_when_the_forward_fails():
    model = _model("llama")
    prefix = frozen_prefix(model, 2, _probe())
    with pytest.raises(RuntimeError, match="boom"), prefix.skipping():
        raise RuntimeError("boom")
    assert len(model.model.layers) == 3


def test_calibrate_on_the_last_block_matches_the_full_forward_and_says_it_skipped():
    """The same adapter, trained through the full model and through the kept states, stores the same bits."""
    pytest.importorskip("peft")
    from lorascope.workflows.calibrate import _prefix, calibrate, memorize_with_lora

    model = _model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = _prefix(model, frozenset({2}), 128)
    assert prefix is not None and prefix.first == 2
    task = FactsTask(facts=64, vocab_size=128, values=32, key_tokens=3, seed=1)
    kwargs = {"epochs": 20, "lr": 3e-3, "batch_size": 16, "seed": 0, "layers": [2]}
    plain = memorize_with_lora(model, "all-linear", 2, task, **kwargs)
    kept = memorize_with_lora(model, "all-linear", 2, task, prefix=prefix, **kwargs)
    assert plain.bits_stored > 0.1 * task.bits  # it learned: the comparison is not between two zeros
    assert kept.bits_stored == pytest.approx(plain.bits_stored, rel=1e-3)
    assert kept.final_loss_nats == pytest.approx(plain.final_loss_nats, rel=1e-3)
    assert kept.lora_parameters == plain.lora_parameters
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(model.model.layers) == 3 and not any("lora" in n for n, _ in model.named_modules())
    assert calibrate(model, ranks=(1,), epochs=1, layers=[2], bracket=None).training["blocks_run_once"] == 2
    assert calibrate(model, ranks=(1,), epochs=1, layers=[0, 2], bracket=None).training["blocks_run_once"] == 0
