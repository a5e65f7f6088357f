"""The size of a supervised fine-tuning dataset in a JSON Lines file: examples, tokens and completion tokens.

:func:`count_dataset` reads a ``.jsonl`` (or gzip-compressed ``.jsonl.gz``) file line by line and counts the
tokens of every example, and separately those the SFT loss is computed on (the completion tokens), which is what
``lorascope recommend --dataset`` needs to predict how much a LoRA must store.

Line formats (:data:`DATASET_FORMATS`), detected on each line:

``messages``
    ``{"messages": [{"role": ..., "content": ...}, ...]}``; the completion is the ``"assistant"`` turns. A content
    is a string, a list of ``{"type": "text", "text": ...}`` parts (other parts, e.g. images, are not counted) or
    null.
``prompt/completion``
    ``{"prompt": str, "completion": str}``.
``instruction/input/output``
    Alpaca's ``{"instruction": str, "input": str (optional), "output": str}``; the completion is the output.
``question/answer``
    ``{"question": str, "answer": str}``.
``text``
    ``{"text": str}``; all of it is completion, as in continued pretraining.

Each text piece (a turn's content, a prompt, ...) is counted on its own, without chat template or special tokens.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorascope.errors import DatasetError, InvalidOptionError

__all__ = ["DATASET_FORMATS", "DatasetError", "DatasetSize", "count_dataset"]

DATASET_FORMATS: tuple[str, ...] = ("messages", "prompt/completion", "instruction/input/output", "question/answer",
                                    "text")
"""The supported line formats, in the order a line's keys are tried."""

_ESTIMATE = "estimate: 4 characters per token"
_FORMAT_HELP = ('supported: {"messages": [{"role", "content"}, ...]}, {"prompt", "completion"}, '
                '{"instruction", "input" (optional), "output"}, {"question", "answer"}, {"text"}')


@dataclass(frozen=True)
class DatasetSize:
    """The size of a fine-tuning dataset.

    Parameters
    ----------
    examples : int
        Number of examples (non-blank lines).
    tokens : int
        Tokens of all text, prompts and completions.
    completion_tokens : int
        Tokens the SFT loss is computed on: assistant turns, completions, outputs, answers, or all of a ``text``.
    counted_with : str
        ``"tokenizer <name or path>"`` or ``"estimate: 4 characters per token"``.
    fields : str
        The detected format (:data:`DATASET_FORMATS`); formats of a mixed file joined with ``"+"``.
    """

    examples: int
    tokens: int
    completion_tokens: int
    counted_with: str
    fields: str

    @property
    def tokens_per_example(self) -> float:
        """Mean completion tokens per example, ``completion_tokens / examples``."""
        return self.completion_tokens / self.examples if self.examples else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The fields and :attr:`tokens_per_example` as a JSON-ready dict."""
        return {**asdict(self), "tokens_per_example": self.tokens_per_example}


def count_dataset(path: str | os.PathLike[str], *, tokenizer: Any = None) -> DatasetSize:
    """Count the examples, tokens and completion tokens of a JSON Lines fine-tuning dataset.

    Without a tokenizer each text piece :math:`s` is estimated at

    .. math:: n(s) = \\lceil \\mathrm{len}(s) / 4 \\rceil

    tokens (characters, not bytes), a common rule of thumb for English text with BPE vocabularies.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.jsonl`` file, one JSON object per line in a format of :data:`DATASET_FORMATS`; gzip-compressed files
        are recognized by their content. Blank lines are skipped. The file is streamed, never loaded whole.
    tokenizer : None, str, os.PathLike or tokenizer object, optional
        None to estimate; a local directory (``transformers.AutoTokenizer``, offline) or ``tokenizer.json``
        (``tokenizers.Tokenizer``); or an object with ``encode(text)`` or a callable returning token ids
        (``input_ids``). Special tokens are left out where the tokenizer supports ``add_special_tokens=False``.

    Returns
    -------
    DatasetSize

    Raises
    ------
    DatasetError
        If the file is missing, a directory, unreadable, empty, has a line that is not a JSON object in a
        supported format (the message names the line), or has no completion tokens at all.
    InvalidOptionError
        If ``tokenizer`` is of the wrong type or cannot be loaded.

    Examples
    --------
    >>> import json, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "train.jsonl")
    >>> with open(path, "w") as f:
    ...     _ = f.write(json.dumps({"prompt": "What is 2+2?", "completion": "It is 4."}) + "\\n")
    >>> size = count_dataset(path)
    >>> size.examples, size.tokens, size.completion_tokens, size.fields
    (1, 5, 2, 'prompt/completion')
    >>> size.counted_with
    'estimate: 4 characters per token'
    >>> class Words:
    ...     def encode(self, text):
    ...         return text.split()
    >>> count_dataset(path, tokenizer=Words()).completion_tokens
    3
    """
    file = Path(path)
    if not file.exists():
        raise DatasetError(f"Dataset file {path} does not exist.")
    if not file.is_file():
        raise DatasetError(f"Dataset path {path} is a directory, not a .jsonl file.")
    count, counted_with = _token_counter(tokenizer)
    examples = tokens = completion_tokens = 0
    formats: dict[str, None] = {}
    for lineno, record in _records(file):
        fmt, prompt, completion = _parse(record, lineno, path)
        formats[fmt] = None
        done = sum(count(piece) for piece in completion if piece)
        tokens += done + sum(count(piece) for piece in prompt if piece)
        completion_tokens += done
        examples += 1
    if not examples:
        raise DatasetError(f"{path} has no examples: the file is empty or holds only blank lines.")
    if not completion_tokens:
        raise DatasetError(f"{path} has {examples} example{'s' * (examples != 1)} but 0 completion tokens: "
                           "nothing to train on (every assistant turn, completion, output, answer or text is empty).")
    return DatasetSize(examples, tokens, completion_tokens, counted_with, "+".join(formats))


def _records(file: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON) for each non-blank line of a plain or gzip-compressed file."""
    path, lineno = file, 0
    try:
        with open(file, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(file, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"Line {lineno} of {path} is not JSON ({exc.msg} at column {exc.colno}); "
                                       "each line must be one JSON object.") from None
    except UnicodeDecodeError:
        raise DatasetError(f"Line {lineno + 1} of {path} is not UTF-8 text.") from None
    except (OSError, EOFError) as exc:
        raise DatasetError(f"Cannot read {path} after line {lineno}: {exc}.") from None


def _parse(record: Any, lineno: int, path: Any) -> tuple[str, list[str], list[str]]:
    """The format, prompt pieces and completion pieces of one line."""
    where = f"Line {lineno} of {path}"
    if not isinstance(record, dict):
        raise DatasetError(f"{where} is a JSON {type(record).__name__}, not an object; {_FORMAT_HELP}.")

    def text(key: str, optional: bool = False) -> str:
        value = record.get(key)
        if value is None and optional:
            return ""
        if not isinstance(value, str):
            raise DatasetError(f"{where}: {key!r} must be a string. Got {type(value).__name__} instead.")
        return value

    if "messages" in record:
        prompt: list[str] = []
        completion: list[str] = []
        turns = record["messages"]
        if not isinstance(turns, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 for m in turns):
            raise DatasetError(f"{where}: 'messages' must be a list of objects with a string 'role' and a 'content'.")
        for m in turns:
            (completion if m["role"] == "assistant" else prompt).extend(_content(m.get("content"), where))
        return "messages", prompt, completion
    if "prompt" in record and "completion" in record:
        return "prompt/completion", [text("prompt")], [text("completion")]
    if "instruction" in record and "output" in record:
        return "instruction/input/output", [text("instruction"), text("input", True)], [text("output")]
    if "question" in record and "answer" in record:
        return "question/answer", [text("question")], [text("answer")]
    if "text" in record:
        return "text", [], [text("text")]
    keys = ", ".join(sorted(record)[:8]) or "none"
    raise DatasetError(f"{where} has none of the supported fields (keys: {keys}); {_FORMAT_HELP}.")


def _content(content: Any, where: str) -> list[str]:
    """The text pieces of a message content: a string, a list of typed parts, or null."""
    if content is None or isinstance(content, str):
        return [content or ""]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        pieces = [p.get("text") for p in content if p.get("type", "text") == "text"]
        if all(isinstance(p, str) for p in pieces):
            return pieces
    raise DatasetError(f"{where}: a message 'content' must be a string or a list of "
                       '{"type": "text", "text": str} parts.')


def _token_counter(tokenizer: Any) -> tuple[Callable[[str], int], str]:
    """A function counting the tokens of a string, and how it counts."""
    if tokenizer is None:
        return (lambda s: math.ceil(len(s) / 4)), _ESTIMATE
    name = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else None
    if name is not None:
        tokenizer = _load_tokenizer(Path(tokenizer))
    encode = getattr(tokenizer, "encode", None)
    if not callable(encode):
        if not callable(tokenizer):
            raise InvalidOptionError(
                "The 'tokenizer' parameter of count_dataset must be None, a path to a tokenizer directory or "
                f"tokenizer.json, or an object with an encode method. Got {type(tokenizer).__name__} instead.")
        encode = tokenizer
    try:
        encode("a", add_special_tokens=False)
        kwargs = {"add_special_tokens": False}
    except TypeError:
        kwargs = {}

    def count(text: str) -> int:
        out = encode(text, **kwargs)
        if isinstance(out, Mapping):
            out = out["input_ids"]
        return len(getattr(out, "ids", out))

    name = name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    return count, f"tokenizer {name}"


def _load_tokenizer(path: Path) -> Any:
    """Load a tokenizer offline from a directory (transformers) or a tokenizer.json file (tokenizers)."""
    if not path.exists():
        raise InvalidOptionError(f"The 'tokenizer' parameter of count_dataset must be an existing directory or "
                                 f"tokenizer.json file. Got {str(path)!r} instead.")
    try:
        if path.is_file():
            import tokenizers

            return tokenizers.Tokenizer.from_file(str(path))
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except ImportError as exc:
        raise InvalidOptionError(f"Loading the tokenizer {path} needs {exc.name}: "
                                 "pip install 'lorascope[hf]'.") from None
    except Exception as exc:  # any loading failure: one line naming the path
        reason = " ".join(str(exc).split()) or type(exc).__name__
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise InvalidOptionError(f"Cannot load a tokenizer from {path}: {reason}") from None
