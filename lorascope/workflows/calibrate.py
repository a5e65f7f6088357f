"""``lorascope calibrate``: measure bits stored per LoRA parameter on the user's own architecture.

A short probe: at each of several ranks, a real PEFT LoRA on the frozen model is trained to memorize random
key -> value facts (:class:`~lorascope.inputs.synthetic.FactsTask`), and the bits it ends up holding
(:func:`~lorascope.inputs.synthetic.stored_bits`) are divided by its parameter count. At the smallest rank the
facts offered are bracketed (below and above what the adapter holds) to find its capacity and whether it collapses
past it; the other ranks are offered the load at which that adapter's held bits stopped growing, and kappa(P) is
fitted over all of them. The result, a :class:`Calibration` (:mod:`lorascope.workflows.calibration`), is saved as
JSON and passed to ``lorascope recommend``.

With ``steps`` every adapter trains a fixed number of Adam steps instead of epochs to a plateau: kappa at the step
budget of the planned run. A short run does not fill a large adapter (on real text in 64 steps a rank-16 LoRA held a
fifth of the kappa it reaches at 300 epochs, docs/realdata_smollm2.md), and the load that fills an adapter in a fixed
number of steps falls with its size, so in this mode every rank is offered every load of the bracket and keeps its
best. Measured on SmolLM2's last block in 64 steps, random facts do not stand in for text there (an adapter held
almost nothing once the facts passed one batch, so kappa fell as 1/P): for a real-text forecast at a step budget,
read kappa from LoRA probes on the data (:func:`lorascope.workflows.lora_probes.calibration_from_runs`).

Why measure: "2 bits per parameter" (Allen-Zhu & Li, 2025) is for a whole model trained long on its facts; a
low-rank adapter on a frozen base can store far less, how much depends on the base, and on random facts it fell
with the adapter's size (issue 13).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import math
import numbers
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorascope._checks import check_positive_int, check_ranks
from lorascope.analysis.capacity_fit import bracket_capacity
from lorascope.errors import InvalidOptionError, LorascopeError, ModelConfigError
from lorascope.inputs import synthetic
from lorascope.model.frozen_prefix import FrozenPrefix, frozen_prefix, last_position_logits
from lorascope.model.lora_params import lora_parameters, model_from_config
from lorascope.model.peft_config import make_lora_config, to_peft
from lorascope.model.taxonomy import classify
from lorascope.workflows.calibrate_search import at_capacity_loads, at_step_budget, describe, tune_rate
from lorascope.workflows.calibration import Calibration, CalibrationPoint, load_calibration

__all__ = ["DEFAULT_BRACKET", "DEFAULT_RANKS", "DEFAULT_STEP_BRACKET", "Calibration", "CalibrationPoint", "base_model",
           "calibrate", "load_calibration", "memorize_with_lora", "model_signature"]

EVALUATIONS = 5
"""Checkpoints (evenly spaced over the epochs) at which an adapter's stored bits are measured; the best counts."""
AUTO_ALL_LAYERS_BUDGET = 50_000
"""LoRA parameters per rank up to which ``layers="auto"`` adapts every block."""
DEFAULT_RANKS = (1, 2, 4, 8, 16)
"""Ranks measured by default: enough octaves of P to fit kappa(P)."""
DEFAULT_BRACKET = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Loads (bits offered per LoRA parameter) tried at the smallest rank, below and above its capacity: at 300 epochs
the falloff validation's rank 1 (0.9 bits per parameter) held on to ~5x its capacity and collapsed by ~8x
(docs/capacity.md), so the bracket reaches ~9x."""
DEFAULT_STEP_BRACKET = (0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5)
"""Loads tried at every rank at a step budget: in a few dozen steps an adapter holds a fraction of a bit per
parameter, so the best load is lower than at a plateau, and lower the larger the rank (on SmolLM2's block in 64 steps:
1/8 at rank 1, 1/16 at rank 4, at most 1/64 at rank 16; docs/realdata_smollm2.md)."""
DEFAULT_LOAD = 2.0
"""The load offered without a bracket."""
KEPT_STATES_BYTES = 2**31
"""The most memory the hidden states of the frozen blocks below the adapted ones may take, kept for one fact set."""


def model_signature(model: nn.Module) -> dict[str, Any]:
    """What identifies an architecture for a calibration: the config's ``model_type`` and sizes (when the model
    has a transformers config), the class name, and the parameter count."""
    config = getattr(model, "config", None)
    signature: dict[str, Any] = {"class": type(model).__name__,
                                 "parameters": int(sum(p.numel() for p in model.parameters()))}
    if config is not None:
        text = getattr(config, "get_text_config", lambda: config)()
        for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
            value = getattr(text, key, None)
            if isinstance(value, (int, str)):
                signature[key] = value
    return signature


def base_model(model_dir: str | os.PathLike[str] | None = None, config: str | os.PathLike[str] | None = None, *,
               pretrain_steps: int = 300, seed: int = 0,
               log: Callable[[str], None] | None = None) -> tuple[nn.Module, str]:
    """The base model to calibrate on, and a description of it for :attr:`Calibration.base`.

    Parameters
    ----------
    model_dir : str or os.PathLike, optional
        A local transformers causal-LM directory with its weights (the base you will fine-tune); nothing is
        downloaded.
    config : str or os.PathLike, optional
        Only a ``config.json`` (or its directory): the model gets random weights, first trained for
        ``pretrain_steps`` on a synthetic language (:func:`~lorascope.inputs.synthetic.pretrain_on_markov`), a
        stand-in for real weights.
    pretrain_steps : int, default 300
        Synthetic pretraining steps of a ``config`` model (0: none).
    seed : int, default 0
        Seed of the random weights and of the synthetic pretraining.
    log : callable, optional
        Receives a line before the synthetic pretraining starts.

    Raises
    ------
    InvalidOptionError
        Not exactly one of ``model_dir`` and ``config``.
    ModelConfigError
        ``model_dir`` is not a directory transformers loads a causal LM from, or ``config`` cannot be read or built.
    """
    import transformers

    if (model_dir is None) == (config is None):
        raise InvalidOptionError("base_model needs exactly one of 'model_dir' (a model directory with weights) or "
                                 "'config' (a config.json).")
    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise ModelConfigError(f"{str(model_dir)!r} is not a directory holding a transformers model.")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelConfigError(f"cannot load a causal LM from {str(model_dir)!r}: {str(exc).splitlines()[0]}"
                                   ) from None
        return model, f"pretrained weights from {model_dir}"
    meta = model_from_config(config)  # validates the config with lorascope's messages
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(meta.config)
    vocab = model.get_output_embeddings().out_features
    if pretrain_steps:
        if log:
            log(f"pretraining the randomly initialized model for {pretrain_steps} steps on a synthetic language "
                "(a stand-in for real weights) ...")
        synthetic.pretrain_on_markov(model, vocab, steps=pretrain_steps, seed=seed)
    return model, f"config {config}: random weights + {pretrain_steps} synthetic pretraining steps"


def calibrate(model: nn.Module, *, ranks: Sequence[int] = DEFAULT_RANKS, target: str = "auto",
              values: int | None = None, offered_bits_per_parameter: float | None = None,
              bracket: Sequence[float] | str | None = "auto", budget: int | None = None, epochs: int = 300,
              steps: int | None = None, lr: float | Sequence[float] = (1e-3, 3e-3), batch_size: int = 128,
              seed: int = 0,
              layers: Sequence[int] | str | None = "auto", base: str = "",
              log: Callable[[str], None] | None = None) -> Calibration:
    """Measure bits stored per LoRA parameter on ``model`` with real PEFT LoRA adapters, at several ranks.

    For each rank r: :math:`P(r)` LoRA parameters on ``target``; :math:`N = \\lceil \\rho P(r) / \\log_2
    V\\rceil` facts offering :math:`\\rho` bits per parameter (the *load*); Adam on the adapter for ``epochs``
    passes (loss on the value token); then :math:`\\kappa_r = \\mathrm{stored\\_bits} / P(r)`, and over the
    ranks that learned the fit (:func:`~lorascope.analysis.capacity_fit.fit_kappa`)

    .. math:: \\log \\kappa(P) = a + g \\log P

    In order: the smallest rank is offered each load of ``bracket`` (else the given load, else
    :data:`DEFAULT_LOAD`) at each learning rate, and the rate at which it held the most is kept; when that rate is
    an end of the grid, the grid is extended past it (:func:`~lorascope.workflows.calibrate_search.tune_rate`). The
    kept rate's loads give the adapter's capacity and whether it collapses past it
    (:func:`~lorascope.analysis.capacity_fit.bracket_capacity`); every other rank is trained at the rate of the
    rank below it and offered the load at which the smallest rank's held bits stopped growing at that rate (its
    ``capacity_load``: the smallest load holding 90% of its most, the cheapest load that fills an adapter); a rank
    that collapsed there is retried at the lower rates tried, each at its own capacity load, and a rank that held
    80% or more of its load is offered the bracket's next one
    (:func:`~lorascope.workflows.calibrate_search.at_capacity_loads`). The model
    is left as it was (adapters are removed with PEFT's ``unload``; base weights never change). When the adapted
    blocks are the last ones, the frozen blocks below them run once per fact set (:mod:`lorascope.model.frozen_prefix`,
    where the model's forward allows it exactly; the result records how many blocks were skipped as
    ``training["blocks_run_once"]``).

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM taking ``input_ids`` and returning logits (transformers models do); its trained weights
        should be the base you will fine-tune: the constant depends on them.
    ranks : sequence of int, default (1, 2, 4, 8, 16)
        The facts needed, so the cost, grow with the rank; ``budget`` caps it.
    target : str, default "auto"
        ``"auto"`` (all linear layers, plus fused MoE experts when present) or a target set of
        :data:`~lorascope.model.lora_params.LORA_TARGETS`.
    values : int, optional
        Size V of the value set (default ``min(256, vocab_size // 4)``).
    offered_bits_per_parameter : float, optional
        The load offered at every rank. Default: the bracket's capacity load (:data:`DEFAULT_LOAD` without one).
    bracket : sequence of float, "auto" or None, default "auto"
        Loads offered to the smallest rank's adapter (with ``steps``: to every rank's); None or fewer than two
        loads: no bracket. ``"auto"``: :data:`DEFAULT_BRACKET`, with ``steps`` :data:`DEFAULT_STEP_BRACKET`.
    budget : int, optional
        The most adapter-training examples to spend (facts x epochs, with ``steps`` steps x facts per step, summed
        over every adapter trained: learning rates tried, bracket loads and ranks). A load, an extension of the
        learning-rate grid or a rank that would pass it is skipped, with a note (a bracket's largest loads go first;
        an extension only if the larger ranks stay affordable; a rank skipped skips the larger ones too). None: no
        limit.
    epochs, batch_size, seed
        Training of each adapter.
    steps : int, optional
        Train each adapter for exactly this many Adam steps of ``batch_size`` facts (cycling through shuffled
        passes) instead of ``epochs`` passes: kappa at the planned run's step budget. Give the planned number of
        optimizer steps, and a ``batch_size`` that offers a step the bits a planned step offers (about the planned
        batch x the probes' bits per example / log2 ``values``). The learning rates are then tried at every load of
        the smallest rank, and every rank keeps the load at which it held the most.
    lr : float or sequence of float, default (1e-3, 3e-3)
        Adam learning rate; given several, each is tried at every load of the smallest rank and the one storing the
        most bits is used for every adapter (with alpha / r scaling the best LoRA learning rate barely depends on the
        rank). A best rate at an end of several is not trusted: the grid is extended past it by its own step, at
        most :data:`~lorascope.workflows.calibrate_search.LR_EXTENSIONS` times, and a rate still at an end gets a
        note. One rate is used as given.
    layers : "auto", sequence of int or None, default "auto"
        Transformer blocks to adapt. The constant is per parameter, so one block measures it at a fraction of the
        cost. ``"auto"``: every block when an all-block adapter has at most :data:`AUTO_ALL_LAYERS_BUDGET`
        parameters per rank, else the middle block; None: every block.
    base : str
        A description of the base stored with the result.
    log : callable, optional
        Receives one progress line per adapter trained.

    Returns
    -------
    Calibration

    Raises
    ------
    InvalidOptionError
        Bad ranks, loads, budget or training settings, or a budget that covers not even the first adapter.
    ModelConfigError
        The model has no vocabulary size to draw facts from, or PEFT cannot adapt it.
    """
    ranks = check_ranks(ranks, "calibrate")
    check_positive_int("epochs", epochs, "calibrate")
    check_positive_int("batch_size", batch_size, "calibrate")
    if steps is not None:
        check_positive_int("steps", steps, "calibrate")
    if isinstance(bracket, str):
        if bracket != "auto":
            raise InvalidOptionError(f"The 'bracket' parameter of calibrate must be 'auto', positive loads (bits "
                                     f"offered per LoRA parameter) such as (0.5, 1, 2, 4), or None. Got {bracket!r} "
                                     "instead.")
        bracket = DEFAULT_STEP_BRACKET if steps else DEFAULT_BRACKET
    lrs = (lr,) if isinstance(lr, (int, float)) else tuple(lr)
    if not lrs or not all(isinstance(v, (int, float)) and v > 0 for v in lrs):
        raise InvalidOptionError(f"The 'lr' parameter of calibrate must be a positive number or a list of them. "
                                 f"Got {lr!r} instead.")
    if offered_bits_per_parameter is not None and not _positive(offered_bits_per_parameter):
        raise InvalidOptionError(f"The 'offered_bits_per_parameter' parameter of calibrate must be a positive number "
                                 f"or None. Got {offered_bits_per_parameter!r} instead.")
    loads = tuple(sorted(set(bracket or ())))
    if not all(_positive(v) for v in loads):
        raise InvalidOptionError(f"The 'bracket' parameter of calibrate must be positive loads (bits offered per "
                                 f"LoRA parameter) such as (0.5, 1, 2, 4), or None. Got {bracket!r} instead.")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1):
        raise InvalidOptionError(f"The 'budget' parameter of calibrate must be an int in the range [1, inf) "
                                 f"(adapter-training examples: facts x epochs) or None. Got {budget!r} instead.")
    loads = loads if len(loads) >= 2 else ()
    vocab = _vocab_size(model)
    values = values or min(256, vocab // 4)
    resolved = resolve_target(model, target)
    blocks = _calibration_layers(model, resolved, layers)
    per_rank = _per_rank(model, resolved, blocks)
    prefix = _prefix(model, blocks, vocab)
    notes: list[str] = []
    spent = 0

    def facts_for(rank: int, load: float) -> int:
        return math.ceil(load * rank * per_rank / math.log2(values))

    def cost(rank: int, load: float) -> int:
        """Adapter-training examples one adapter spends."""
        facts = facts_for(rank, load)
        if not steps:
            return facts * epochs
        passes, rest = divmod(steps, math.ceil(facts / batch_size))  # whole shuffled passes, then full batches
        return passes * facts + rest * batch_size

    def train(rank: int, load: float, rate: float, what: str) -> CalibrationPoint:
        nonlocal spent
        facts = facts_for(rank, load)
        task = synthetic.FactsTask(facts=facts, vocab_size=vocab, values=values,
                                   key_tokens=_key_tokens(facts, vocab - values), seed=seed + rank)
        point = memorize_with_lora(model, resolved, rank, task, epochs=epochs, steps=steps, lr=rate,
                                   batch_size=batch_size, seed=seed, layers=blocks, prefix=prefix)
        spent += cost(rank, load)
        if point.lora_parameters != rank * per_rank:  # PEFT's own count must agree with lorascope's accounting
            raise LorascopeError(f"PEFT created {point.lora_parameters} LoRA parameters at rank {rank}, lorascope "
                                 f"counted {rank * per_rank}; please report this architecture.")
        if log and what:
            log(f"{what}: {describe(point)}")
        return point

    def affordable(rank: int, load: float) -> bool:
        return budget is None or spent + cost(rank, load) <= budget

    first = ranks[0]
    if steps and offered_bits_per_parameter is not None:
        loads = ()  # a given load at a step budget: every rank at it, no bracket
    given = () if offered_bits_per_parameter is None else (offered_bits_per_parameter,)

    def first_loads(kept: int) -> tuple[float, ...]:
        """The smallest rank's loads: the bracket's ``kept`` smallest and the given load (else DEFAULT_LOAD)."""
        return tuple(sorted({*loads[:kept], *given})) or (DEFAULT_LOAD,)

    def first_cost(kept: int) -> int:
        return len(lrs) * sum(cost(first, v) for v in first_loads(kept))

    kept = len(loads)  # the budget drops the bracket's largest loads first
    while kept > 1 and budget is not None and first_cost(kept) > budget:
        kept -= 1
    if budget is not None and first_cost(kept) > budget:
        raise InvalidOptionError(
            f"The 'budget' parameter of calibrate covers no measurement: rank {first} at "
            f"{', '.join(f'{v:g}' for v in first_loads(kept))} bits per parameter with {len(lrs)} learning rate(s) "
            f"needs {first_cost(kept):,} adapter-training examples "
            f"({'steps x facts per step' if steps else 'facts x epochs'}). Got {budget!r} instead.")
    if kept < len(loads):
        notes.append(f"bracket: load{'s' if len(loads) - kept > 1 else ''} "
                     f"{', '.join(f'{v:g}' for v in loads[kept:])} at rank {first} skipped, over the budget "
                     f"({budget:,} examples)")
        loads = loads[:kept]
    measured = first_loads(kept)

    def all_loads_affordable(rank: int) -> bool:
        return budget is None or spent + sum(cost(rank, v) for v in measured) <= budget

    # a rate past the grid's end is worth less than the larger ranks: it is tried only if they stay affordable
    # (at a step budget at every load, else at the given load or DEFAULT_LOAD, the usual capacity load)
    reserve = sum(cost(rank, v) for rank in ranks[1:] for v in (measured if steps else given or (DEFAULT_LOAD,)))

    def extension_affordable() -> bool:
        return budget is None or spent + sum(cost(first, v) for v in measured) + reserve <= budget

    load: float | None
    held_less: set[int] = set()  # ranks whose next larger load held less (epochs mode)
    if steps:
        rate, by_rate, points, bracket_points, load_points = at_step_budget(
            train, all_loads_affordable, extension_affordable, ranks, measured, lrs, budget, notes, log)
        load = None
    else:
        load_points = ()
        rate, by_rate = tune_rate(train, first, measured, lrs, extension_affordable, notes)

        def at_load(rate: float) -> dict[float, CalibrationPoint]:
            """The smallest rank's adapters trained at ``rate``, by load."""
            return dict(zip(measured, by_rate[rate]))

        bracket_points = tuple(at_load(rate)[v] for v in loads) if len(loads) >= 2 else ()

        def load_for(rate: float) -> float:
            """The load that fills an adapter trained at ``rate``: read from that rate's loads at the smallest
            rank (where its held bits stopped growing), else the given load, else the one measured."""
            if offered_bits_per_parameter is not None or len(loads) < 2:
                return offered_bits_per_parameter or measured[0]
            held = at_load(rate)
            capacity_load = bracket_capacity([held[v].load for v in loads], [held[v].bits_stored for v in loads],
                                             lora_parameters=held[loads[0]].lora_parameters,
                                             rank=first).capacity_load
            return min(loads, key=lambda v: abs(held[v].load - capacity_load))

        def skipped(left: Sequence[int], at: float) -> str:
            return (f"ranks {', '.join(map(str, left))} skipped: rank {left[0]} needs "
                    f"{facts_for(left[0], at) * epochs:,} adapter-training examples, the budget ({budget or 0:,}) "
                    f"has {(budget or 0) - spent:,} left")  # only a budget skips a rank

        load = load_for(rate)
        first_point = at_load(rate)[load]
        if log:  # one line per rank, each starting "rank ": the CLI's progress bar counts them
            log(f"rank {first}: {describe(first_point)}")
        lower = sorted((r for r in by_rate if r < rate), reverse=True)  # for a larger rank that collapses
        points, rates, loads_by_rank, held_less = at_capacity_loads(train, ranks, first_point, rate, load_for, lower,
                                                                    measured, affordable, skipped, notes)
    notes += _point_notes(points, held_less)
    return Calibration(model=model_signature(model), target=resolved, points=tuple(points),
                       task={"kind": "random key -> value facts", "values": values, "seed": seed},
                       training={"optimizer": "Adam", "lr": rate, "lr_tried": sorted(map(float, by_rate)),
                                 "lr_loads": list(measured),  # the smallest rank's, at every rate tried
                                 "held_by_lr": {f"{r:g}": [p.bits_stored for p in curve]
                                                for r, curve in sorted(by_rate.items())},
                                 **({} if steps else {"lr_by_rank": {str(r): v for r, v in rates.items()},
                                                      "load_by_rank": {str(r): v for r, v in loads_by_rank.items()}}),
                                 "epochs": None if steps else epochs, "steps": steps, "batch_size": batch_size,
                                 "lora_alpha": 32, "offered_bits_per_parameter": load,
                                 **({"best_loads": {str(p.rank): p.load for p in points}} if steps else {}),
                                 "bracket_loads": list(measured if steps else loads),
                                 "budget": budget, "examples_trained": spent,
                                 "layers": None if blocks is None else sorted(blocks),
                                 "blocks_run_once": prefix.first if prefix else 0},
                       base=base, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       notes=tuple(notes), bracket_points=bracket_points, load_points=load_points)


def _point_notes(points: Sequence[CalibrationPoint], held_less: Collection[int]) -> list[str]:
    """Each rank that did not learn or may not be full; ``held_less``: ranks whose next larger load held less."""
    notes = []
    for point in points:
        more = ("offered more, it held less (above): this rate gets no more from it" if point.rank in held_less
                else "raise offered_bits_per_parameter")
        if not point.learned:
            notes.append(f"rank {point.rank}: the adapter held {point.bits_stored / point.bits_offered:.1%} of the "
                         "bits offered: it did not learn the facts (more epochs or another learning rate), so this "
                         "rank is left out of the constant")
        elif not point.saturated:
            notes.append(f"rank {point.rank}: the adapter held {point.bits_stored / point.bits_offered:.0%} of the "
                         f"bits offered, so it may not be full: its bits per parameter are a lower bound; {more}")
    return notes


def _positive(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and float(value) > 0


def _calibration_layers(model: nn.Module, target: str, layers: Sequence[int] | str | None) -> frozenset[int] | None:
    if layers is None:
        return None
    adapters = lora_parameters(model, target).adapters
    present = sorted({a.layer for a in adapters if a.layer >= 0})
    if isinstance(layers, str):
        if layers != "auto":
            raise InvalidOptionError(f"The 'layers' parameter of calibrate must be 'auto', None or a list of block "
                                     f"indices. Got {layers!r} instead.")
        if sum(a.per_rank for a in adapters) <= AUTO_ALL_LAYERS_BUDGET or not present:
            return None
        return frozenset({present[len(present) // 2]})
    chosen = frozenset(layers)
    if not chosen or not chosen <= set(present):
        raise InvalidOptionError(f"The 'layers' parameter of calibrate must name blocks of this model "
                                 f"({present[0]}..{present[-1]}). Got {sorted(chosen)!r} instead.")
    return chosen


def _prefix(model: nn.Module, blocks: frozenset[int] | None, vocab: int) -> FrozenPrefix | None:
    """The frozen blocks below the adapted ones, when running them once is exact on this model."""
    if not blocks:
        return None
    probe = torch.randint(0, vocab, (4, 3), generator=torch.Generator().manual_seed(0))
    return frozen_prefix(model, min(blocks), probe.to(next(model.parameters()).device))


def _per_rank(model: nn.Module, target: str, layers: frozenset[int] | None) -> int:
    return sum(a.per_rank for a in lora_parameters(model, target).adapters if layers is None or a.layer in layers)


def resolve_target(model: nn.Module, target: str) -> str:
    """``"auto"``: ``"all-linear+experts"`` when the model has fused MoE experts, else ``"all-linear"``."""
    if target != "auto":
        return target
    fused = any(ref.kind == "moe_expert" and ref.expert >= 0 for ref in classify(model, include_frozen=True).matrices)
    return "all-linear+experts" if fused else "all-linear"


def memorize_with_lora(model: nn.Module, target: str, rank: int, task: synthetic.FactsTask, *, epochs: int, lr: float,
                       batch_size: int, seed: int, layers: Collection[int] | None = None,
                       prefix: FrozenPrefix | None = None, steps: int | None = None) -> CalibrationPoint:
    """Train a PEFT LoRA of ``rank`` on ``target`` of the frozen ``model`` to memorize ``task``; the bits it holds.

    Adam at ``lr``, ``epochs`` shuffled passes (or exactly ``steps`` steps) in batches of ``batch_size``,
    cross-entropy on the value token,
    alpha 32 with alpha / r scaling, on the blocks ``layers`` (all when None). The stored bits are measured at
    :data:`EVALUATIONS` evenly spaced checkpoints and the best one is kept (early stopping). The adapters are
    removed afterwards (``model`` is left as it was). The model reads the key only (the value token is what it
    predicts, never an input) and its head runs at the key's last position only; with ``prefix`` (no adapted block
    below ``prefix.first``) the blocks below run once, before training.
    """
    import peft

    ids, _ = task.tensors()
    device = next(model.parameters()).device
    keys, values = ids[:, :-1].to(device), ids[:, -1].to(device)
    if prefix and prefix.states(model, keys[:1]).nbytes * len(keys) > KEPT_STATES_BYTES:
        prefix = None  # too many facts to keep their states: run the whole model every step
    inputs = {"inputs_embeds": prefix.states(model, keys)} if prefix else {"input_ids": keys}
    config = make_lora_config(model, target=target, rank=rank, task_type=None, layers=layers)
    trainable_before = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(seed)  # LoRA's A initialization
    try:
        wrapped = peft.get_peft_model(model, to_peft(config))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ModelConfigError(f"PEFT cannot add LoRA adapters to this model: {exc}") from None
    try:
        skipping = prefix.skipping() if prefix else contextlib.nullcontext()
        with skipping:
            bits, epoch_loss = _memorize(wrapped, task, inputs, values, epochs=epochs, steps=steps, lr=lr,
                                         batch_size=batch_size, seed=seed)
        count = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    finally:
        wrapped.unload()  # take the adapters out again; the base weights were frozen and are unchanged
        for name, p in model.named_parameters():
            p.requires_grad_(trainable_before.get(name, p.requires_grad))
    passes = math.ceil(steps / math.ceil(task.facts / batch_size)) if steps else epochs  # begun
    return CalibrationPoint(rank, int(count), task.facts, task.bits, bits, epoch_loss, passes, steps)


def _memorize(wrapped: nn.Module, task: synthetic.FactsTask, inputs: dict[str, torch.Tensor], values: torch.Tensor, *,
              epochs: int, steps: int | None, lr: float, batch_size: int, seed: int) -> tuple[float, float]:
    """Train the adapters of ``wrapped`` for ``epochs`` passes, or ``steps`` steps; the most bits held at a
    checkpoint, and the mean loss over the last pass's worth of steps."""
    device = values.device
    optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    per_pass = math.ceil(task.facts / batch_size)
    if steps:
        total, checkpoints = steps, {max(1, round(steps * k / EVALUATIONS)) for k in range(1, EVALUATIONS + 1)}
    else:
        total, checkpoints = epochs * per_pass, {per_pass * round(epochs * k / EVALUATIONS)
                                                 for k in range(1, EVALUATIONS + 1)}

    def batches() -> Iterator[torch.Tensor]:  # shuffled passes, one after another
        while True:
            order = torch.randperm(task.facts, generator=generator).to(device)
            yield from (order[start:start + batch_size] for start in range(0, task.facts, batch_size))

    recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=per_pass)
    bits = 0.0
    wrapped.train()
    for step, batch in enumerate(batches(), start=1):
        logits = last_position_logits(wrapped, **{name: x[batch] for name, x in inputs.items()})
        loss = nn.functional.cross_entropy(logits.float(), values[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append((loss.item() * len(batch), len(batch)))
        if step in checkpoints:  # the best checkpoint counts: a run that later diverges still held its bits
            wrapped.eval()
            with torch.no_grad():
                logits = torch.cat([last_position_logits(wrapped, **{name: x[i:i + 512] for name, x in inputs.items()})
                                    for i in range(0, task.facts, 512)])
            bits = max(bits, synthetic.stored_bits(logits.cpu(), task, values.cpu()))
            wrapped.train()
        if step == total:
            break
    return bits, sum(summed for summed, _ in recent) / sum(count for _, count in recent)


def _vocab_size(model: nn.Module) -> int:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    size = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(size, int) or size < 16:
        raise ModelConfigError("calibrate needs a causal LM with an output vocabulary of at least 16 tokens "
                               "(a transformers *ForCausalLM model).")
    return size


def _key_tokens(facts: int, key_ids: int) -> int:
    """Key length so that random keys rarely collide: ``key_ids ** k >= 1000 facts``."""
    return max(2, math.ceil(math.log(1000 * facts) / math.log(key_ids)))
