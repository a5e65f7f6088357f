"""Recording TRL's trainers with the real ``trl`` package on a tiny Llama and a word-level tokenizer built here
(nothing downloaded): ``SFTTrainer`` (full fine-tuning and a PEFT LoRA) and ``GRPOTrainer`` with a tiny reward.
The run files are reopened and checked against what the trainers fed and logged, and used as probes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import lorascope  # noqa: E402

pytestmark = [pytest.mark.usefixtures("torch_single_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

WORDS = "the a cat dog sat ran on mat log red blue is was what color answer yes no".split()
SPECIAL = ["<pad>", "<eos>", "<unk>", "<bos>"]
N_SFT, N_PROMPTS, GENERATIONS = 24, 12, 4
STEPS = 6  # SFT: one epoch of 4 examples per step (2 micro-batches of 2)


@pytest.fixture
def tokenizer():
    """A word-level fast tokenizer over a small vocabulary (tokenizers' WordLevel in PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", bos_token="<bos>")


@pytest.fixture
def tiny_model(tiny_llama_config, tokenizer):
    def make():
        torch.manual_seed(0)
        config = tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, bos_token_id=3)
        return transformers.LlamaForCausalLM(config)

    return make


def _sft_dataset():
    rng = np.random.default_rng(0)
    rows = [{"prompt": f"what color is the {rng.choice(['cat', 'dog', 'mat'])}",
             "completion": f" the {rng.choice(['cat', 'dog'])} is {rng.choice(['red', 'blue'])}"} for _ in range(N_SFT)]
    return datasets.Dataset.from_list(rows)


class _CountingCollator:
    """Wraps the trainer's collator and keeps the loss tokens (labels != -100) of every batch it built."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.loss_tokens: list[int] = []

    def __call__(self, features):
        batch = self.inner(features)
        self.loss_tokens.append(int((batch["labels"] != -100).sum()))
        return batch


def _sft(tmp_path, model, tokenizer, *, peft_config=None, max_steps=STEPS):
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True,
                         save_strategy="no", logging_steps=1, disable_tqdm=True, max_length=32, bf16=False, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_sft_dataset(), processing_class=tokenizer,
                             peft_config=peft_config)
    collator = trainer.data_collator = _CountingCollator(trainer.data_collator)
    lorascope.record(trainer, tmp_path / "run.h5")
    trainer.train()
    return trainer, collator


def test_sft_full_fine_tuning_is_recorded_and_usable_as_a_probe(tmp_path, tiny_model, tokenizer):
    model = tiny_model()
    start = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    trainer, collator = _sft(tmp_path, model, tokenizer)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]

    with lorascope.open_run(tmp_path / "run.h5") as run:
        assert run.complete and run.attrs["framework"] == "transformers"
        config = run.config
        assert config["task"] == "sft" and config["trl"]["config"] == "SFTConfig"
        assert config["trl"]["max_length"] == 32
        assert config["dataset"] == {"examples": N_SFT}
        steps = run.steps
        np.testing.assert_array_equal(steps["batch_examples"], 4)
        # the completion tokens only (the prompt is masked by TRL's collator), summed over the two micro-batches
        fed = np.asarray(collator.loss_tokens[:2 * STEPS]).reshape(STEPS, 2).sum(axis=1)
        np.testing.assert_array_equal(steps["batch_loss_tokens"], fed)
        assert np.all(fed < steps["batch_tokens"].values)
        np.testing.assert_allclose(steps["loss"], [entry["loss"] for entry in logged], rtol=1e-4)
        delta = (model.model.layers[0].mlp.down_proj.weight.detach() - start).double()
        energy = run.snapshots["energy"].isel(snapshot=-1).sel(module="model.layers.0.mlp.down_proj")
        assert float(energy) == pytest.approx(float(delta.square().sum()), rel=1e-5)
        snapshot_steps = run.snapshot_index.tolist()

    recommendation = lorascope.recommend(tiny_model(), probes=[tmp_path / "run.h5"], examples=N_SFT * 10)
    assert recommendation.bits.source == "recording"
    assert recommendation.bits.bits_per_example > 0

    # The live metrics went through the Trainer's logging, and left TRL's own metrics to its own logging steps.
    ours = [entry for entry in trainer.state.log_history if "lorascope/step" in entry]
    assert [entry["lorascope/step"] for entry in ours] == snapshot_steps
    assert all("lorascope/mlp/energy_rank_p90" in entry and "entropy" not in entry for entry in ours)
    assert all("entropy" in entry and "mean_token_accuracy" in entry for entry in logged)


def test_sft_peft_lora_is_recorded(tmp_path, tiny_model, tokenizer):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    trainer, collator = _sft(tmp_path, tiny_model(), tokenizer, peft_config=lora)
    with lorascope.open_run(tmp_path / "run.h5") as run:
        assert run.complete and run.config["task"] == "sft"
        names = list(run.modules["name"])
        assert len(names) == 6 and all(n.endswith(("q_proj", "v_proj", "down_proj")) for n in names)
        assert run.config["dataset"] == {"examples": N_SFT}
        fed = np.asarray(collator.loss_tokens[:2 * STEPS]).reshape(STEPS, 2).sum(axis=1)
        np.testing.assert_array_equal(run.steps["batch_loss_tokens"], fed)
        # a LoRA update has rank at most r
        assert int(run.snapshots["sv_count"].max()) <= 32
        sv = run.snapshots["sv"].isel(snapshot=-1).values
        assert np.all(np.nan_to_num(sv[:, 4:]) < 1e-5 * np.nanmax(sv))
    recommendation = lorascope.recommend(tiny_model(), probes=[tmp_path / "run.h5"], examples=N_SFT * 10)
    assert any("LoRA run" in note for note in recommendation.notes)


def _red(completions, **kwargs):
    """A tiny reward: how often a completion says "red"."""
    return [float(str(c).count("red")) for c in completions]


def test_grpo_episodes_land_in_the_run_file(tmp_path, tiny_model, tokenizer):
    words = ["cat", "dog", "mat", "log"] * 3
    prompts = datasets.Dataset.from_list([{"prompt": f"what color is the {w}"} for w in words])
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                          num_generations=GENERATIONS, max_completion_length=6, learning_rate=1e-3, report_to=[],
                          use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, bf16=False, seed=0)
    trainer = trl.GRPOTrainer(model=tiny_model(), reward_funcs=_red, args=args, train_dataset=prompts,
                              processing_class=tokenizer)
    lorascope.record(trainer, tmp_path / "run.h5")
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4 and all("reward" in entry for entry in logged)  # TRL's metrics where TRL logs them
    with lorascope.open_run(tmp_path / "run.h5") as run:
        assert run.complete
        config = run.config
        assert config["task"] == "rl" and config["trl"]["config"] == "GRPOConfig"
        assert config["trl"]["num_generations"] == GENERATIONS
        assert config["dataset"] == {"examples": N_PROMPTS * GENERATIONS, "unit": "episodes", "prompts": N_PROMPTS,
                                     "episodes_per_prompt": GENERATIONS}
        # every trained completion is an episode: 4 per optimizer step here
        np.testing.assert_array_equal(run.steps["batch_examples"], 4)
        np.testing.assert_array_equal(run.steps["examples_seen"], 4 * np.arange(1, 5))
        assert run.snapshots.sizes["snapshot"] >= 1
    episodes = config["dataset"]["examples"]
    recommendation = lorascope.recommend(tiny_model(), task="rl", examples=episodes, probes=[tmp_path / "run.h5"])
    assert recommendation.bits.source == "episodes"
    assert recommendation.bits.bits(episodes) == pytest.approx(episodes * 1.0)  # 1 bit per episode by default
    assert lorascope.analyze(tmp_path / "run.h5").runs
