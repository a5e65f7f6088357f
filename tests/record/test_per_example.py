"""Per-example squared gradient norms (lorascope.record.per_example) against torch.func per-example gradients.

The reference is ``vmap(grad(share_b))`` over examples with ``functional_call``, where ``share_b`` is example b's
share of the batch loss: the terms of the batch loss that come from example b, divided as the batch loss divides
them. Its squared norm is what :class:`PerExampleNorms` must return, per module weight and summed for ``other``.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.func import functional_call, grad, vmap

from lorascope.errors import InvalidOptionError
from lorascope.record.per_example import PerExampleNorms

RTOL, ATOL = 1e-4, 1e-10

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def reference_norms(model: nn.Module, share, *batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Squared norm of each example's gradient of ``share(model_call, *example)``, per parameter name."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, *example):
        return share(lambda *args, **kwargs: functional_call(model, p, args, kwargs, tie_weights=True), *example)

    grads = vmap(grad(loss), in_dims=(None,) + (0,) * len(batch))(params, *batch)
    return {name: g.double().flatten(1).square().sum(1) for name, g in grads.items()}


def check_against(norms: PerExampleNorms, per_target: torch.Tensor, other: torch.Tensor,
                  reference: dict[str, torch.Tensor]) -> None:
    """Every supported column and ``other`` equal the reference; unsupported columns are NaN."""
    checked = 0
    for column, path in enumerate(norms.columns):
        if path in norms.unsupported:
            assert torch.isnan(per_target[:, column]).all(), path
            continue
        expected = reference[f"{path}.weight"]
        torch.testing.assert_close(per_target[:, column].double(), expected, rtol=RTOL, atol=ATOL, msg=path)
        checked += 1
    assert checked > 0
    expected_other = sum((reference[name] for name in norms.other_parameters), torch.zeros_like(other).double())
    torch.testing.assert_close(other.double(), expected_other, rtol=RTOL, atol=ATOL)


def measure(model: nn.Module, run, **kwargs) -> tuple[PerExampleNorms, torch.Tensor, torch.Tensor, int]:
    norms = PerExampleNorms(model, **kwargs)
    norms.attach()
    run()
    result = norms.pop()
    norms.detach()
    assert result is not None
    return (norms, *result)


# -- models ----------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SharedWeights(nn.Module):
    """Every kind of shared weight: a Linear called twice, an embedding called twice, a head tied to it."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.block = nn.Linear(dim, dim)
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + 0.5 * self.embed(ids.flip(-1))
        h = h + torch.tanh(self.block(h))
        h = h + torch.tanh(self.block(h))
        return self.head(self.norm(h))


def token_loss(logits: torch.Tensor, ids: torch.Tensor, count: int) -> torch.Tensor:
    """Next-token cross-entropy summed over positions and divided by the batch's token count."""
    return nn.functional.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), ids[..., 1:].reshape(-1),
                                       reduction="sum") / count


# -- numbers ---------------------------------------------------------------------------------------------------


def test_mlp_without_sequence_dimension(seed):
    model = MLP()
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    norms, per_target, other, passes = measure(model, lambda: (model(x) - y).square().sum(1).mean().backward())
    assert passes == 1 and per_target.dtype == torch.float32 and per_target.shape == (6, 3)
    assert norms.columns == ("net.0", "net.1", "net.3") and not norms.unsupported
    assert norms.other_parameters == ("net.0.bias", "net.1.bias", "net.3.bias")
    reference = reference_norms(model, lambda f, xb, yb: (f(xb[None]) - yb).square().sum() / 6, x, y)
    check_against(norms, per_target, other, reference)


def test_targets_choose_columns_and_the_rest_is_other(seed):
    model = MLP()
    x = torch.randn(4, 5)
    norms, per_target, other, _ = measure(model, lambda: model(x).sum().backward(), targets={"net.3": [1]})
    assert norms.columns == (None, "net.3") and per_target.shape == (4, 2)
    assert torch.isnan(per_target[:, 0]).all()
    reference = reference_norms(model, lambda f, xb: f(xb[None]).sum(), x)
    torch.testing.assert_close(per_target[:, 1].double(), reference["net.3.weight"], rtol=RTOL, atol=ATOL)
    rest = ("net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias", "net.3.bias")
    assert set(norms.other_parameters) == set(rest)
    torch.testing.assert_close(other.double(), sum(reference[n] for n in rest), rtol=RTOL, atol=ATOL)


def test_llama_with_rmsnorms_embedding_and_token_mean_loss(seed, tiny_llama_config):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(tiny_llama_config(attn_implementation="eager")).train()
    ids = torch.randint(0, 64, (3, 10))
    ids[0, 2] = ids[0, 5] = ids[0, 8]  # a repeated token in one example
    labels = ids.clone()
    labels[1, :4] = -100  # HF's loss is the mean over the batch's non-ignored tokens
    count = int((labels[:, 1:] != -100).sum())

    norms, per_target, other, _ = measure(model, lambda: model(input_ids=ids, labels=labels).loss.backward())
    assert not norms.unsupported and not norms.other_parameters
    assert {"model.embed_tokens", "model.norm", "model.layers.1.input_layernorm", "lm_head"} <= set(norms.columns)

    def share(f, idb, lb):
        logits = f(input_ids=idb[None]).logits[0, :-1]
        return nn.functional.cross_entropy(logits, lb[1:], ignore_index=-100, reduction="sum") / count

    check_against(norms, per_target, other, reference_norms(model, share, ids, labels))


def test_gpt2_conv1d_layernorm_and_tied_head(seed):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).train()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 64, (3, 9))
    ids[1, 1] = ids[1, 4] = ids[1, 6]

    norms, per_target, other, _ = measure(model, lambda: model(input_ids=ids, labels=ids).loss.backward())
    # wte's column holds the embedding's and the tied head's gradient, summed per example before the norm
    assert "transformer.wte" in norms.columns and "lm_head" not in norms.columns
    # the position embedding's output is broadcast over the batch: its per-example gradients never exist
    assert set(norms.unsupported) == {"transformer.wpe"}
    reference = reference_norms(model, lambda f, idb: token_loss(f(input_ids=idb[None]).logits, idb[None], 3 * 8),
                                ids)
    check_against(norms, per_target, other, reference)


def test_bert_layernorm_with_bias_and_masked_lm_head(seed):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                     vocab_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = transformers.BertForMaskedLM(config).train()
    ids = torch.randint(0, 64, (4, 8))
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    labels[0, 5] = ids[0, 5]
    count = int((labels != -100).sum())

    norms, per_target, other, _ = measure(model, lambda: model(input_ids=ids, labels=labels).loss.backward())
    assert "bert.embeddings.LayerNorm" in norms.columns
    assert "bert.embeddings.LayerNorm.bias" in norms.other_parameters

    def share(f, idb, lb):
        logits = f(input_ids=idb[None]).logits[0]
        return nn.functional.cross_entropy(logits, lb, ignore_index=-100, reduction="sum") / count

    check_against(norms, per_target, other, reference_norms(model, share, ids, labels))


def test_module_reuse_double_embedding_and_tied_head_are_exact(seed):
    model = SharedWeights()
    ids = torch.randint(0, 11, (5, 7))
    ids[0, :3] = 0  # padding rows get no gradient
    ids[2, 1] = ids[2, 4] = ids[2, 6]
    norms, per_target, other, _ = measure(model, lambda: token_loss(model(ids), ids, 5 * 6).backward())
    assert norms.columns == ("embed", "block", "norm") and not norms.unsupported
    check_against(norms, per_target, other,
                  reference_norms(model, lambda f, idb: token_loss(f(idb[None]), idb[None], 5 * 6), ids))


def test_two_micro_batches_are_concatenated(seed):
    model = MLP()
    xs = [torch.randn(3, 5), torch.randn(2, 5)]
    norms = PerExampleNorms(model)
    norms.attach()
    for x in xs:
        (model(x).square().sum() / 5).backward()
    per_target, other, passes = norms.pop()
    assert passes == 2 and per_target.shape == (5, 3) and other.shape == (5,)
    assert norms.pop() is None  # popped: forgotten
    x = torch.cat(xs)
    check_against(norms, per_target, other, reference_norms(model, lambda f, xb: f(xb[None]).square().sum() / 5, x))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_norms(seed, tiny_llama_config, reentrant):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(tiny_llama_config(attn_implementation="eager")).train()
    ids = torch.randint(0, 64, (3, 8))
    _, plain, plain_other, _ = measure(model, lambda: model(input_ids=ids, labels=ids).loss.backward())
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.zero_grad()
    norms = PerExampleNorms(model)
    norms.attach()
    out = model(input_ids=ids, labels=ids)
    if not reentrant:  # the checkpointed layers' inputs are not kept: the recomputation supplies them
        kept = [call for state in norms._current.groups.values() for ref in state.calls
                if (call := ref()) is not None and call.input is not None]
        assert {call.site.path for call in kept} == {"model.embed_tokens", "model.norm", "lm_head"}
    out.loss.backward()
    per_target, other, passes = norms.pop()
    assert passes == 1 and not norms.unsupported
    torch.testing.assert_close(per_target, plain, rtol=RTOL, atol=1e-9)
    torch.testing.assert_close(other, plain_other)


def test_peft_lora_layer_target_is_the_sum_over_its_adapter_factors(seed, tiny_llama_config):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lorascope.model.taxonomy import classify

    base = transformers.LlamaForCausalLM(tiny_llama_config(attn_implementation="eager"))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)  # B = 0 at init would make A's gradient zero
    model.train()
    refs = classify(model).matrices
    ids = torch.randint(0, 64, (3, 8))
    norms, per_target, other, _ = measure(model, lambda: model(input_ids=ids, labels=ids).loss.backward(),
                                          targets={ref.module: [i] for i, ref in enumerate(refs)})
    assert norms.columns == tuple(ref.module for ref in refs) and not norms.unsupported
    assert norms.other_parameters == ()  # the frozen base weights are not measured
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}

    def share(f, idb):
        return token_loss(f(input_ids=idb[None]).logits, idb[None], 3 * 7)

    reference = reference_norms(model, share, ids)
    for column, ref in enumerate(refs):  # the recorder's LoRA gradient: |grad A|^2 + |grad B|^2
        expected = sum(reference[name] for name in trainable if name.startswith(ref.module + "."))
        torch.testing.assert_close(per_target[:, column].double(), expected, rtol=RTOL, atol=ATOL)


class SharedBlock(nn.Module):
    """One Linear applied in three checkpointed blocks (ALBERT-style sharing)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.shared, self.out, self.reentrant = nn.Linear(6, 6), nn.Linear(6, 2), reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            if self.reentrant is None:
                x = x + torch.tanh(self.shared(x))
            else:
                x = torch.utils.checkpoint.checkpoint(lambda h: h + torch.tanh(self.shared(h)), x,
                                                      use_reentrant=self.reentrant)
        return self.out(x)


def test_module_shared_across_checkpointed_blocks(seed):
    model = SharedBlock(None)
    x = torch.randn(4, 5, 6, requires_grad=True)  # requires grad: reentrant checkpointing needs it
    reference = reference_norms(model, lambda f, xb: f(xb[None]).square().sum(), x.detach())
    # reentrant: the second call is created during backward, after the first finished; the first micro-batch's
    # cross term is lost (NaN), and from then on the factors are kept: exact.
    model.reentrant = True
    norms = PerExampleNorms(model)
    norms.attach()
    results = []
    for _ in range(2):
        model(x).square().sum().backward()
        results.append(norms.pop()[0])
    assert torch.isnan(results[0][:, 0]).all() and not norms.unsupported
    torch.testing.assert_close(results[0][:, 1].double(), reference["out.weight"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(results[1][:, 0].double(), reference["shared.weight"], rtol=RTOL, atol=ATOL)
    norms.detach()
    # non-reentrant: a module called more than once inside checkpointed code is reported unsupported
    model.reentrant = False
    norms = PerExampleNorms(model)
    norms.attach()
    model(x).square().sum().backward()
    per_target, _, _ = norms.pop()
    assert "non-reentrant" in norms.unsupported["shared"] and torch.isnan(per_target[:, 0]).all()
    torch.testing.assert_close(per_target[:, 1].double(), reference["out.weight"], rtol=RTOL, atol=ATOL)


def test_submodule_calls_without_the_model_split_at_each_backward(seed):
    model = nn.Sequential(MLP())
    norms = PerExampleNorms(model)
    norms.attach()
    xs = [torch.randn(2, 5), torch.randn(3, 5)]
    for x in xs:
        model[0](x).sum().backward()  # the model's own forward never runs
    per_target, other, passes = norms.pop()
    assert passes == 2 and per_target.shape == (5, 3)
    check_against(norms, per_target, other, reference_norms(model, lambda f, xb: f(xb[None]).sum(), torch.cat(xs)))


# -- lifecycle -------------------------------------------------------------------------------------------------


def test_no_grad_and_eval_forwards_leave_nothing_behind(seed):
    model = MLP()
    norms = PerExampleNorms(model)
    norms.attach()
    with torch.no_grad():
        model(torch.randn(4, 5))
    model.eval()
    model(torch.randn(4, 5)).sum().backward()
    assert norms._batches == [] and norms.pop() is None
    model.train()
    out = model(torch.randn(4, 5))  # a training forward whose output is dropped without backward
    del out
    assert all(ref() is None for mb in norms._batches for state in mb.groups.values() for ref in state.calls)
    assert norms.pop() is None


def test_detach_removes_every_hook(seed):
    model = SharedWeights()
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    norms = PerExampleNorms(model)
    norms.attach()
    norms.attach()  # idempotent
    assert any(m._forward_hooks for m in model.modules())
    ids = torch.randint(1, 11, (2, 5))
    logits = model(ids)  # forward while attached, backward after detach: the output hooks go quiet
    norms.detach()
    assert {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()} == hooks
    logits.sum().backward()
    assert norms.pop() is None


def test_half_precision_inputs_are_measured_in_float32(seed):
    model = MLP()
    x = torch.randn(6, 5)
    reference = reference_norms(model, lambda f, xb: f(xb[None]).sum(), x)
    model.to(torch.bfloat16)
    norms, per_target, _, _ = measure(model, lambda: model(x.bfloat16()).float().sum().backward())
    assert per_target.dtype == torch.float32
    for column, path in enumerate(norms.columns):
        torch.testing.assert_close(per_target[:, column].double(), reference[f"{path}.weight"], rtol=5e-2, atol=1e-6)


def test_unsupported_inputs_and_formulas_are_reported(seed):
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flat = nn.Linear(4, 4)  # called on flattened tokens
            self.scaled = nn.Linear(4, 4)  # a subclass-like module whose output is not x W^T + b
            self.scaled.register_forward_hook(lambda m, a, out: out * 2)
            self.fine = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fine(self.scaled(self.flat(x.reshape(-1, 4)).reshape(x.shape)))

    model = Odd()
    norms = PerExampleNorms(model, targets={"flat": [0], "scaled": [1], "fine": [3]})
    norms.attach()
    model(torch.randn(3, 5, 4)).sum().backward()
    assert set(norms.unsupported) == {"flat", "scaled"}
    assert "15 entries" in norms.unsupported["flat"] and "x W^T + b" in norms.unsupported["scaled"]
    assert norms.other_parameters == ("fine.bias",)  # the unsupported modules' biases are left out
    per_target, other, _ = norms.pop()
    assert torch.isnan(per_target[:, :3]).all() and torch.isfinite(per_target[:, 3]).all()
    assert torch.isfinite(other).all()
    norms.detach()


def test_bad_arguments_raise(seed):
    model = MLP()
    with pytest.raises(InvalidOptionError, match="does not have"):
        PerExampleNorms(model, targets={"nope": [0]})
    with pytest.raises(InvalidOptionError, match="one column index"):
        PerExampleNorms(model, targets={"net.0": [0, 1]})
    with pytest.raises(InvalidOptionError, match="batch_dim"):
        PerExampleNorms(model, batch_dim=-1)
    with pytest.raises(InvalidOptionError, match="torch.nn.Module"):
        PerExampleNorms("model")
