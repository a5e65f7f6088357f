"""TRL's trainers (``SFTTrainer``, ``GRPOTrainer``, ...) are ``transformers.Trainer`` subclasses, recorded by the
same callback; this module adds what their run file needs beyond a Trainer's: the task, and for RL the episodes.

A TRL trainer is recognised by its arguments' class (``trl.SFTConfig``, ``trl.GRPOConfig``, ...), without importing
trl. RL with a scalar reward per sampled completion (GRPO, RLOO: configs with ``num_generations``) counts
**episodes**: the recorder's forward hooks see every trained completion, so ``examples_seen`` and
``batch_examples`` count episodes, and ``config["dataset"]["examples"]`` is the episodes of one pass over the
prompts (prompts x ``num_generations``), the unit ``recommend --task rl`` takes (docs/capacity.md). SFT keeps the
Trainer's dataset size (examples; packed sequences under ``packing=True``) and its loss tokens (labels != -100).
"""

from __future__ import annotations

from typing import Any

TASK_SFT, TASK_RL = "sft", "rl"

# Arguments of TRL's configs worth keeping in the run file, when the config has them.
_SFT_ARGS = ("max_length", "packing", "completion_only_loss", "assistant_only_loss", "padding_free")
_RL_ARGS = ("num_generations", "num_iterations", "max_completion_length", "beta", "loss_type", "temperature",
            "steps_per_generation", "generation_batch_size")


def is_trl_config(args: Any) -> bool:
    """Whether a Trainer's ``args`` are one of TRL's configs (by the module of their class)."""
    return any(cls.__module__.split(".")[0] == "trl" for cls in type(args).__mro__)


def trl_config(args: Any, dataloader: Any) -> dict[str, Any]:
    """The run config's sections for a TRL trainer: ``task``, ``trl`` (its config class and the arguments above)
    and, for RL, ``dataset`` in episodes. ``{}`` for a plain ``transformers.Trainer``.

    >>> trl_config(object(), None)
    {}
    """
    if not is_trl_config(args):
        return {}
    generations = getattr(args, "num_generations", None)
    rl = isinstance(generations, int) and not isinstance(generations, bool) and generations > 0
    episodes = generations if isinstance(generations, int) and rl else 0  # per prompt
    names = _RL_ARGS if rl else _SFT_ARGS
    section = {"config": type(args).__name__,
               **{name: _plain(getattr(args, name)) for name in names if hasattr(args, name)}}
    out: dict[str, Any] = {"task": TASK_RL if rl else TASK_SFT, "trl": section}
    if rl:
        prompts = _length(getattr(dataloader, "dataset", None))
        if prompts is not None:
            out["dataset"] = {"examples": prompts * episodes, "unit": "episodes", "prompts": prompts,
                              "episodes_per_prompt": episodes}
    return out


def _length(dataset: Any) -> int | None:
    try:
        return int(len(dataset))
    except TypeError:
        return None


def _plain(value: Any) -> Any:
    """A JSON-serialisable form of a config value (enums by their value, anything else unknown by its text)."""
    value = getattr(value, "value", value)
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
