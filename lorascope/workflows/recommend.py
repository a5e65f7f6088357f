"""``lorascope.recommend``: ranks, target modules, learning rate, batch size and a PEFT config, before training.

Inputs: a model (a config, built on the meta device, or an in-memory model), the dataset size, the task, and
optionally probe recordings (a short full fine-tuning run on a slice of the data) and a calibration. The
capacity verdict per rank follows the information view (:mod:`lorascope.analysis.capacity`); spectral evidence
from a probe is shown beside it but does not enter the verdict (docs/capacity.md says why).

Fixed recommendations, with their source (Schulman et al., "LoRA Without Regret", 2025):

- targets: every linear layer, MLP and MoE experts included; attention-only LoRA underperforms MLP-only at the
  same parameter count, so it is never recommended;
- MoE experts: one LoRA per expert with rank = rank / active experts (at least 1);
- alpha = 32 with PEFT's alpha / r scaling (the optimal learning rate then barely depends on the rank);
- learning rate: about 10x the full fine-tuning one (a fit over 14 models gave 9.8x); about 15x for runs under
  ~100 steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lorascope import _display
from lorascope._checks import check_positive, check_positive_int, check_ranks
from lorascope.analysis.capacity import (
    REAL_TEXT_FINDING,
    CapacityConstant,
    RankPrediction,
    predict_ranks,
    rank_needed,
    smallest_rank_holding,
)
from lorascope.analysis.information import (
    DEFAULT_BITS_PER_EPISODE,
    DEFAULT_BITS_PER_TOKEN,
    TASKS,
    BitsEstimate,
    RecordedInformation,
    information_from_size,
    recorded_dataset_examples,
    recorded_vocab_size,
)
from lorascope.analysis.noise import batch_tradeoff
from lorascope.analysis.recipe import Recipe, RecipeInformation, bits_for_plan, information_for_recipe
from lorascope.errors import InvalidOptionError, ProbeMismatchError
from lorascope.inputs.datasets import count_dataset
from lorascope.model.lora_params import lora_parameters, model_from_config
from lorascope.model.peft_config import make_lora_config, to_peft
from lorascope.store.reader import open_run
from lorascope.workflows.analyze import Analysis, analyze
from lorascope.workflows.calibrate import load_calibration, model_signature, resolve_target
from lorascope.workflows.calibration import step_limited_note
from lorascope.workflows.forecast import active_experts
from lorascope.workflows.runs import ModelFacts, information_from_run, model_difference

__all__ = ["DEFAULT_RANKS", "Recommendation", "recommend"]

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LR_MULTIPLIER, LR_MULTIPLIER_SHORT, SHORT_RUN_STEPS = 10.0, 15.0, 100
LORA_ALPHA = 32
STEP_BUDGET_TOLERANCE = 1.5
"""A calibration's step budget and the planned run's steps further apart than this factor get a note."""
LR_MEASURED = ("Measured by this project, not ~10x: 1-3.3x on real text with every optimum bracketed "
               "(docs/realdata.md, batch 16-256), 1-3.3x on training loss and 3-10x on held-out loss on SmolLM2-135M "
               "(docs/realdata_smollm2.md), 0.17x on memorised facts with every optimum bracketed "
               "(docs/reproduction.md): treat the multiplier as a starting point and sweep around it")
BATCH_MEASURED = ("Measured by this project: LoRA's gap to full fine-tuning did not grow with the batch (16 to 256) "
                  "at the same epochs, on real text with bracketed learning rates (docs/realdata.md) nor on "
                  "memorised facts (docs/reproduction.md); the published effect is not reproduced at this scale")
RECOMMEND_FORMAT, RECOMMEND_VERSION = "lorascope-recommend", 1
TARGET_CHOICES = ("auto", "all-linear", "all-linear+experts", "mlp-only")


@dataclass
class Recommendation:
    """What :func:`recommend` concludes; :meth:`to_dict` is the ``--json`` output (docs/capacity.md)."""

    model: dict[str, Any]
    target: str
    task: str
    examples: float
    trained_tokens_per_example: float | None
    epochs: float
    batch_size: int | None
    bits: BitsEstimate
    constant: CapacityConstant
    predictions: list[RankPrediction]
    rank: int
    rank_needed: int | None
    ranks_by_kind: dict[str, int]
    lora_parameters: int
    lr_multiplier: float
    lr_reason: str
    batch_advice: str
    b_noise: float | None
    peft_config: dict[str, Any]
    probes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> RankPrediction | None:
        return next((p for p in self.predictions if p.rank == self.rank), None)

    def _repr_html_(self) -> str | None:  # Jupyter; rendered by lorascope.report.notebook via lorascope._display
        return _display.html("recommendation", self.to_dict())

    def to_peft_config(self) -> Any:
        """The recommended adapter as a :class:`peft.LoraConfig` (needs peft)."""
        return to_peft(self.peft_config)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECOMMEND_FORMAT, "version": RECOMMEND_VERSION, "model": dict(self.model),
            "task": self.task, "examples": self.examples,
            "trained_tokens_per_example": self.trained_tokens_per_example, "epochs": self.epochs,
            "batch_size": self.batch_size, "target": self.target, "bits": self.bits.to_dict(),
            "bits_to_learn": self.bits.bits(self.examples), "constant": self.constant.to_dict(),
            "predictions": [p.to_dict() for p in self.predictions], "rank": self.rank,
            "rank_needed": self.rank_needed, "ranks_by_kind": dict(self.ranks_by_kind),
            "lora_parameters": self.lora_parameters, "lora_alpha": LORA_ALPHA,
            "scaling": "alpha / r (PEFT default; LoRA Without Regret)",
            "lr_multiplier": self.lr_multiplier, "lr_reason": self.lr_reason, "batch_advice": self.batch_advice,
            "b_noise": self.b_noise, "peft_config": dict(self.peft_config), "probes": list(self.probes),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Probe:
    """A probe recording as :func:`recommend` uses it.

    Attributes
    ----------
    path : str
    information : RecordedInformation
        The information of its data as the probe ran (description length, what it absorbed).
    planned : RecipeInformation or None
        What its data asks under the planned recipe (the bits :func:`recommend` uses for SFT; None for RL).
    analysis : Analysis
        Its spectra and curves: evidence shown beside the verdict, not used in it.
    lora : bool
        The probe is a LoRA run (what it absorbed is capped by its own capacity).
    b_noise : float or None
        Its gradient noise scale in examples (None without a positive estimate).
    """

    path: str
    information: RecordedInformation
    planned: RecipeInformation | None
    analysis: Analysis
    lora: bool
    b_noise: float | None

    def to_dict(self) -> dict[str, Any]:
        """The probe's measured information and spectral evidence (shown, not used in the verdict)."""
        summary = self.analysis.to_dict()
        final = summary.get("final") or {}
        spectral = None
        if final:
            overall = final["overall"]
            spectral = {
                "examples_seen": final["examples_seen"],
                "energy_rank_0.9": overall["energy_rank"].get("0.9"),
                "signal_rank": overall["signal_rank"],
                "rank_residual": overall["rank_residual"],
                "by_kind": {k: {"energy_rank_0.9": v["energy_rank"].get("0.9"), "signal_rank": v["signal_rank"]}
                            for k, v in final["by_kind"].items()},
                "growth_with_data": {g: c["fit"].get("exponent") for g, c in summary["curves"].items()},
            }
        return {"path": self.path, "lora": self.lora, "information": self.information.to_dict(),
                "planned_recipe": None if self.planned is None else self.planned.to_dict(),
                "b_noise": self.b_noise, "spectral": spectral}


def recommend(model: Any, *, examples: int | None = None, tokens_per_example: float | None = None,
              tokens: int | None = None, dataset: str | os.PathLike[str] | None = None, tokenizer: Any = None,
              task: str = "sft", probes: Sequence[str | os.PathLike[str]] = (), ranks: Sequence[int] = DEFAULT_RANKS,
              batch_size: int | None = None, epochs: float = 1, full_ft_lr: float | None = None,
              target: str = "auto", calibration: Any = None,
              bits_per_token: float = DEFAULT_BITS_PER_TOKEN,
              bits_per_episode: float = DEFAULT_BITS_PER_EPISODE) -> Recommendation:
    """Recommend a LoRA for fine-tuning ``model`` on a dataset of the given size.

    Parameters
    ----------
    model : str, os.PathLike, mapping, transformers config or torch.nn.Module
        A ``config.json`` (or its directory, or its content): the model is built on the meta device, exact shapes
        and no weights; or the model itself (not PEFT-wrapped).
    examples : int, optional
        Training examples (SFT) or episodes (RL: problems x samples per problem).
    tokens_per_example, tokens : optional
        Trained (completion) tokens per example, or in total. SFT needs one of them unless ``dataset`` is given.
    dataset : path, optional
        A JSONL file to count examples and trained tokens from (:func:`lorascope.inputs.datasets.count_dataset`), with
        ``tokenizer`` (a tokenizer or a local directory; default: an estimate of 4 characters per token).
    task : {"sft", "rl"}
    probes : sequence of run files
        Recordings of full fine-tuning on a slice of this data with this model (with their dataset size): they
        replace the size-based bits estimate with the bits absorbed under the planned recipe, and give spectral
        evidence and the noise scale for batch advice. Probes on 2-3 slice sizes measure how the bits grow with
        the dataset size.
    ranks : sequence of int
        Candidate ranks.
    batch_size : int, optional
        Planned batch size in examples (for the step count of the LR advice and the batch advice).
    epochs : float, default 1
        Planned passes over the data. With probes, the bits to learn are what full fine-tuning absorbs in this many
        epochs (:mod:`lorascope.analysis.recipe`): more epochs memorise more.
    full_ft_lr : float, optional
        The full fine-tuning learning rate the plan corresponds to (a LoRA's is ``lr_multiplier`` times it):
        compared with the probes' learning rates, and a note says which way a mismatch moves the bits.
    target : {"auto", "all-linear", "all-linear+experts", "mlp-only"}
        ``"auto"`` adapts every linear layer and fused MoE experts. Attention-only is refused.
    calibration : Calibration or path, optional
        From ``lorascope calibrate`` on this architecture; without it the default constant is used.
    bits_per_token, bits_per_episode : float
        Assumed information rates when no probe is given.

    Returns
    -------
    Recommendation

    Raises
    ------
    ModelConfigError
        The config cannot be read or built (unknown architecture, missing sizes).
    ProbeMismatchError
        A probe or the calibration comes from another architecture.
    InvalidOptionError
        Missing, zero or negative sizes; an unknown task or target; bad ranks.
    """
    if task not in TASKS:
        raise InvalidOptionError(f"The 'task' parameter of recommend must be one of {TASKS}. Got {task!r} instead.")
    if target not in TARGET_CHOICES:
        raise InvalidOptionError(
            f"The 'target' parameter of recommend must be one of {TARGET_CHOICES}. Got {target!r} instead."
            + (" Attention-only LoRA underperforms MLP-only at matched parameter count (LoRA Without Regret, 2025)."
               if target == "attention-only" else ""))
    ranks = check_ranks(ranks, "recommend")
    check_positive("epochs", epochs, "recommend")
    if batch_size is not None:
        check_positive_int("batch_size", batch_size, "recommend")
    module = model if isinstance(model, nn.Module) else model_from_config(model)
    signature = model_signature(module)
    resolved = resolve_target(module, target)
    notes: list[str] = []
    size, trained_tokens = _dataset_size(task, examples, tokens_per_example, tokens, dataset, tokenizer, notes,
                                         tokens_required=task == "sft" and not probes)

    if task == "sft":
        notes.append(f"the runways are {REAL_TEXT_FINDING}")
    planned = Recipe(epochs=epochs, learning_rate=full_ft_lr, batch_size=batch_size)
    probe_results = [_probe(path, module, ranks, planned, task) for path in probes]
    full = [p for p in probe_results if not p.lora] or probe_results
    largest = max(full, key=lambda p: p.information.epoch_examples) if full else None
    if largest is not None and task == "sft":
        planned_bits = [p.planned for p in full if p.planned is not None]  # every SFT probe has its planned bits
        bits = bits_for_plan(planned_bits)
        said = (*largest.information.notes, *(largest.planned.notes if largest.planned else ()))
        notes.extend(f"probe {largest.path}: {n}" for n in dict.fromkeys(said))  # the planned estimate repeats some
        divergence = largest.analysis.runs[0].divergence
        if divergence is not None:
            notes.append(f"probe {largest.path} diverged at step {divergence.step}: its bits come from the finite "
                         "losses before it, what the data asks only as far as the run got")
        if largest.lora:
            notes.append(f"probe {largest.path} is a LoRA run: what it absorbed is capped by its own capacity, "
                         "so the bits to learn may be under-estimated; a full fine-tuning probe measures them")
    else:
        bits = information_from_size(examples=size, tokens_per_example=trained_tokens, task=task,
                                     bits_per_token=bits_per_token, bits_per_episode=bits_per_episode)
        if probe_results:
            notes.append("RL: the bits per episode come from the reward's information, not from the probe's loss")

    if calibration is not None:
        calibration = calibration if hasattr(calibration, "points") else load_calibration(calibration)
        _check_calibration(calibration, signature)
        constant = CapacityConstant.from_calibration(calibration)
    else:
        constant = CapacityConstant.default()

    count = lora_parameters(module, resolved, rank=1)
    active = _active_experts(module)

    useful = _max_useful_rank(count)
    kind_ranks = _measured_kind_ranks(largest if task == "sft" else None, count, active, constant,
                                      bits.bits(size), useful, notes)

    def ranks_by_adapter(rank: int) -> dict[str, int]:
        # a kind whose measured share of the bits needs more than this rank gets its measured rank
        return {a.name: max(_adapter_rank(rank, a.kind, a.experts, active), kind_ranks.get(a.kind, 0))
                for a in count.adapters}

    def parameters(rank: int, *, effective: bool = False) -> tuple[int, dict[str, int]]:
        """PEFT's LoRA parameters at ``rank``; ``effective``: only those a rank up to min(in, out) uses per
        matrix (past it a LoRA adds parameters, not capacity)."""
        per_adapter = ranks_by_adapter(rank)
        total = sum((min(per_adapter[a.name], a.in_features, a.out_features) if effective else per_adapter[a.name])
                    * a.per_rank for a in count.adapters)
        by_kind = {a.kind: per_adapter[a.name] for a in count.adapters}
        return total, by_kind

    def holding(rank: int) -> int:
        return parameters(rank, effective=True)[0]

    predictions = predict_ranks(ranks, parameters, examples=size, bits=bits, constant=constant,
                                trained_tokens_per_example=trained_tokens if task == "sft" else None, holding=holding)
    needed = rank_needed(size, bits, constant, parameters, holding=holding)
    above = [r for r in ranks if r > useful]
    if above:
        notes.append(f"rank(s) {', '.join(map(str, above))} exceed every adapted matrix's size (min(in, out) <= "
                     f"{useful}): a LoRA's parameters past a matrix's size add nothing a full update lacks, so their "
                     "capacity counts rank min(r, in, out) per matrix, and they are never recommended")
    # A rank above every adapted matrix's size adds nothing a full update lacks: never recommended (useful).
    fitting = [p.rank for p in predictions if p.verdict == "fits" and p.rank <= useful]
    if fitting:
        rank = fitting[0]
    elif needed is not None and needed <= useful:
        rank = needed
        notes.append(f"no candidate rank fits; rank {needed} is the smallest power of two that does")
    else:
        rank = max([r for r in ranks if r <= useful], default=useful)
        notes.append("no LoRA rank up to the matrices' size holds this data with margin: consider full fine-tuning "
                     f"(rank {rank}, the largest useful candidate, is shown)")
    peft_config = make_lora_config(module, target=resolved, rank=ranks_by_adapter(rank), alpha=LORA_ALPHA)
    chosen_parameters, chosen_by_kind = parameters(rank)
    steps = math.ceil(size * epochs / batch_size) if batch_size else None
    if calibration is not None:
        notes.extend(_step_budget_note(calibration, steps))
        limited = step_limited_note(calibration)
        if limited is not None:
            notes.append(limited)
    lr_multiplier, lr_reason = _learning_rate(steps)
    b_noise, batch_advice = _batch_advice(probe_results, batch_size)
    if resolved == "all-linear" and any(a.kind == "router" for a in count.adapters):
        notes.append("a Linear router is adapted too (PEFT's all-linear rule); routers hold few parameters")
    return Recommendation(
        model=signature, target=resolved, task=task, examples=size,
        trained_tokens_per_example=trained_tokens, epochs=float(epochs), batch_size=batch_size, bits=bits,
        constant=constant, predictions=predictions, rank=rank, rank_needed=needed,
        ranks_by_kind=chosen_by_kind, lora_parameters=chosen_parameters, lr_multiplier=lr_multiplier,
        lr_reason=lr_reason, batch_advice=batch_advice, b_noise=b_noise, peft_config=peft_config,
        probes=[p.to_dict() for p in probe_results], notes=notes)


def _measured_kind_ranks(probe: Probe | None, count: Any, active: int | None, constant: CapacityConstant,
                         bits_to_learn: float, max_rank: int, notes: list[str]) -> dict[str, int]:
    """Per adapted kind, the smallest rank whose LoRA holds the kind's share of the planned dataset's bits, from a
    probe recorded with ``contributions=True`` (its share of the held loss reduction); empty without one."""
    contributions = None if probe is None else probe.analysis.contributions
    if probe is None or contributions is None:
        return {}
    out = {}
    for part in contributions.kinds:
        adapters = [a for a in count.adapters if a.kind == part.name]
        if not adapters or not math.isfinite(part.share) or part.share <= 0:
            continue
        def capacity_at(r: int, adapters: list[Any] = adapters) -> float:
            return constant.capacity_bits(sum(_adapter_rank(r, a.kind, a.experts, active) * a.per_rank
                                              for a in adapters))

        needed = smallest_rank_holding(part.share * bits_to_learn, capacity_at, max_rank)
        if needed is None:
            notes.append(f"no rank up to the matrices' size ({max_rank}) holds {part.name}'s share of the bits "
                         f"({part.share:.0%}): it gets rank {max_rank}")
        out[part.name] = max_rank if needed is None else needed
    if out:
        notes.append(f"per-kind ranks measured by probe {probe.path}'s contributions (each kind's share of the bits, "
                     "held at the bits per LoRA parameter): " + ", ".join(f"{k} {r}" for k, r in out.items())
                     + "; a kind that needs more than the chosen rank gets its rank in rank_pattern")
    return out


def _adapter_rank(rank: int, kind: str, experts: int, active: int | None) -> int:
    """One LoRA per expert with rank / active experts (LoRA Without Regret), never below 1."""
    if kind == "moe_expert" and experts > 1 and active:
        return max(1, rank // active)
    return rank


def _active_experts(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    return active_experts(text.to_dict()) if text is not None and hasattr(text, "to_dict") else None


def _max_useful_rank(count: Any) -> int:
    """The largest rank any adapted matrix can use, min(d_in, d_out) of the widest: past it a rank adds nothing a
    full update lacks, on any matrix."""
    return max(min(a.in_features, a.out_features) for a in count.adapters)


def _dataset_size(task: str, examples: Any, tokens_per_example: Any, tokens: Any, dataset: Any, tokenizer: Any,
                  notes: list[str], *, tokens_required: bool) -> tuple[float, float | None]:
    if dataset is not None:
        if examples is not None or tokens is not None or tokens_per_example is not None:
            raise InvalidOptionError("Give the dataset either as a JSONL file or as sizes (examples, tokens), not "
                                     "both.")
        size = count_dataset(dataset, tokenizer=tokenizer)
        notes.append(f"dataset {os.fspath(dataset)}: {size.examples:,} examples, {size.completion_tokens:,} "
                     f"trained tokens ({size.fields}; {size.counted_with})")
        return float(size.examples), float(size.tokens_per_example)
    if examples is None:
        raise InvalidOptionError("recommend needs the dataset size: the number of examples (episodes for RL), or a "
                                 "JSONL dataset to count.")
    check_positive("examples", examples, "recommend")
    if tokens is not None and tokens_per_example is not None:
        raise InvalidOptionError("Give either tokens per example or total tokens, not both.")
    if tokens is not None:
        check_positive("tokens", tokens, "recommend")
        tokens_per_example = tokens / examples
    elif tokens_per_example is not None:
        check_positive("tokens_per_example", tokens_per_example, "recommend")
    elif tokens_required:
        raise InvalidOptionError("SFT without a probe needs the trained tokens: give tokens per example or total "
                                 "tokens (the completion tokens the loss is computed on), or a JSONL dataset to count.")
    return float(examples), None if tokens_per_example is None else float(tokens_per_example)


def _learning_rate(steps: int | None) -> tuple[float, str]:
    source = ("LoRA Without Regret (Schulman et al., 2025): optimal LoRA LR ~10x full fine-tuning (fit over 14 "
              "models: 9.8x)")
    if steps is None:
        advice = f"{source}; ~15x for runs under ~100 steps (give the batch size to count the steps)"
        multiplier = LR_MULTIPLIER
    elif steps < SHORT_RUN_STEPS:
        advice = f"{source}; this run has {steps} steps, under ~100, where ~15x is better"
        multiplier = LR_MULTIPLIER_SHORT
    else:
        advice, multiplier = f"{source}; this run has {steps:,} steps", LR_MULTIPLIER
    return multiplier, f"{advice}. {LR_MEASURED}"


def _batch_advice(probes: list[Probe], batch_size: int | None) -> tuple[float | None, str]:
    noise = [p.b_noise for p in probes if p.b_noise is not None]
    if not noise:
        general = ("LoRA's loss penalty vs full fine-tuning grows with batch size, independent of rank (LoRA Without "
                   "Regret, 2025): prefer small batches (~32 or less) when the step budget allows; a probe recording "
                   f"gives the noise scale to size it. {BATCH_MEASURED}")
        return None, general
    b_noise = float(noise[-1])
    if batch_size is None:
        return b_noise, (f"the probe's gradient noise scale is B_noise ~ {b_noise:.3g} examples: keep the LoRA batch "
                         "at or below it (LoRA's penalty grows with batch size)")
    advice = batch_tradeoff(b_noise, float(batch_size), lora=True)
    if advice.warning:
        return b_noise, advice.warning + f"; prefer a batch of at most ~{max(1, int(b_noise)):,}"
    return b_noise, (f"batch {batch_size:,} is within the probe's noise scale B_noise ~ {b_noise:.3g}: data-efficient "
                     "for LoRA")


def _probe(path: str | os.PathLike[str], model: nn.Module, ranks: Sequence[int], planned: Recipe,
           task: str) -> Probe:
    with open_run(path) as run:
        _check_probe(str(path), ModelFacts.of_run(run), model)  # before the (longer) analysis
        recorded_task = run.config.get("task")
        if recorded_task in TASKS and recorded_task != task:
            raise InvalidOptionError(f"probe {path} is an {recorded_task.upper()} run (its config's task), the "
                                     f"recommendation is for {task.upper()}: pass task={recorded_task!r} (--task "
                                     f"{recorded_task}) or a probe of the task you plan")
        information = information_from_run(run)
        recipe = _planned_information(str(path), run, planned) if task == "sft" else None
        analysis = analyze(run, ranks=ranks)
    result = analysis.runs[0]
    b_noise = None if result.noise is None else result.noise.final["all"]["b_simple"]
    return Probe(str(path), information, recipe, analysis, result.is_lora,
                 b_noise if b_noise is not None and b_noise > 0 else None)


def _planned_information(path: str, run: Any, planned: Recipe) -> RecipeInformation:
    """What an SFT probe's data asks under the planned recipe, or one line saying why it cannot tell."""
    examples = recorded_dataset_examples(run.config)
    if examples is None:
        raise InvalidOptionError(f"probe {path} does not record its dataset size (config dataset.examples), which "
                                 "the bits under the planned recipe need: the HF and Lightning integrations write "
                                 "it; in a plain loop pass extra_config={'dataset': {'examples': N}} to "
                                 "lorascope.record")
    try:
        return information_for_recipe(run.steps, dataset_examples=examples, planned=planned,
                                      learning_rate=_learning_rate_of(run.config),
                                      vocab_size=recorded_vocab_size(run.config))
    except InvalidOptionError as exc:
        raise InvalidOptionError(f"probe {path}: {exc}") from None


def _learning_rate_of(config: Mapping[str, Any]) -> float | None:
    """The learning rate a run's optimizer was built with (its defaults), when recorded."""
    value = ((config.get("optimizer") or {}).get("defaults") or {}).get("lr")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _check_probe(path: str, probe: ModelFacts, model: nn.Module) -> None:
    """Refuse a probe recorded on another architecture than ``model`` (its model type, or a recorded matrix that
    the model lacks or holds with another shape)."""
    difference, _ = model_difference(ModelFacts.of_model(model), probe, keys=("model_type",), matrices="contained")
    if difference is None:
        return
    if difference.kind == "config":
        raise ProbeMismatchError(f"probe {path} was recorded on a {difference.other!r} model, not "
                                 f"{difference.reference!r}: record the probe with the model you will fine-tune")
    if difference.kind == "missing":
        raise ProbeMismatchError(f"probe {path} is from another architecture: its recorded matrix "
                                 f"{difference.name!r} does not exist in this model")
    (out, inp), (model_out, model_in) = difference.other, difference.reference
    raise ProbeMismatchError(f"probe {path} is from another architecture: {difference.name} is {out}x{inp} there "
                             f"and {model_out}x{model_in} in this model")


def _step_budget_note(calibration: Any, steps: int | None) -> list[str]:
    """A note when the calibration's adapters trained for other than about this run's steps: in a short run a large
    adapter fills only part of the kappa it reaches at a plateau (on SmolLM2 in 64 steps rank 16 held a fifth of it;
    a LoRA probe's kappa grew 1.54-1.95x from 64 to 128 steps at ranks 4-64, and probes read at another budget were
    off by about that much; docs/realdata_smollm2.md), so kappa depends on the step budget."""
    measured = calibration.steps
    if measured is None:  # epochs to a plateau: its adapters' fewest steps
        batch = calibration.training.get("batch_size")
        if not batch or not calibration.points:
            return []
        fewest = min(p.epochs * math.ceil(p.facts / batch) for p in calibration.points)
        if steps is None or steps * STEP_BUDGET_TOLERANCE >= fewest:
            return []
        return [f"the calibration trained its adapters to a plateau (at least {fewest:,} steps); this run has "
                f"{steps:,}, in which a large adapter may hold only part of that kappa (on SmolLM2 in 64 steps rank 16 "
                f"held a fifth of it): LoRA probes of {steps} steps on a slice of this data measure kappa at this "
                "budget (`lorascope calibrate --lora-probe`)"]
    if steps is None:
        return [f"the calibration measured kappa at a budget of {measured:,} steps; give the batch size so that this "
                "run's steps can be checked against it"]
    if max(steps, measured) > STEP_BUDGET_TOLERANCE * min(steps, measured):
        return [f"the calibration measured kappa at a budget of {measured:,} steps, this run has {steps:,}: kappa "
                "at a step budget changes with the steps (on SmolLM2 a LoRA probe's kappa grew 1.5-2x from 64 to "
                "128 steps at ranks 4-64 on SFT, 1.6-2.7x on continued pretraining; LoRA probes of 128 steps read "
                "for 64-step runs put the falloffs 1.2-2.1x late, of 64 steps for a 128-step run 0.3-0.6x early, "
                f"and scaled by that growth 0.4-1.2x, docs/realdata_smollm2.md); LoRA probes of {steps} steps measure "
                "it at this budget (`lorascope calibrate --lora-probe`)"]
    return []


def _check_calibration(calibration: Any, signature: Mapping[str, Any]) -> None:
    """Refuse a calibration measured on another architecture (its model type or hidden size)."""
    difference, _ = model_difference(ModelFacts("this model", signature, ()),
                                     ModelFacts("the calibration", calibration.model, ()),
                                     keys=("model_type", "hidden_size"))
    if difference is not None:
        raise ProbeMismatchError(f"the calibration was measured on a model with {difference.name} = "
                                 f"{difference.other!r}, this model has {difference.reference!r}: run `lorascope "
                                 "calibrate` on this architecture")
