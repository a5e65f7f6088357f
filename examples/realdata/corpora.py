"""The two corpora of the real-data study, from text that ships with the installed packages (nothing downloaded).

- Corpus A (pretraining): the docstrings of Python's standard library: a fixed list of modules, each module's
  docstring and those of its public functions and classes (``inspect.getdoc``).
- Corpus B (fine-tuning): another register, scientific-library documentation: scikit-learn's dataset descriptions
  (``sklearn/datasets/descr/*.rst``) and the docstrings of numpy's and scipy's public functions (numpydoc sections,
  maths, array examples).

Text is byte-level (vocabulary 256, UTF-8 bytes), no tokenizer. B is split by *document* into a training pool and a
held-out set (no document of the held-out set is ever trained on), each cut into 64-byte sequences.
"""

from __future__ import annotations

import importlib
import inspect
import random
import warnings
from pathlib import Path

import torch

SEQ_LEN = 64

STDLIB = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "locale", "logging", "lzma", "mailbox", "mimetypes", "multiprocessing", "netrc",
    "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "queue", "quopri", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zipimport",
)
SCIENTIFIC = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial.polynomial",
              "scipy.stats", "scipy.linalg", "scipy.optimize", "scipy.signal", "scipy.special", "scipy.interpolate",
              "scipy.integrate", "scipy.sparse", "scipy.spatial", "scipy.ndimage", "scipy.cluster.hierarchy")


def _docstrings(module_name: str) -> list[tuple[str, str]]:
    """``(name, docstring)`` of a module and of its public functions and classes, in name order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - a module missing on this platform is skipped
            return []
        docs = []
        top = inspect.getdoc(module)
        if top:
            docs.append((module_name, top))
        names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for name in sorted(set(names)):
            try:
                obj = getattr(module, name)
            except Exception:  # noqa: BLE001
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj) or callable(obj)):
                continue
            if inspect.ismodule(obj):
                continue
            home = getattr(obj, "__module__", "") or ""
            if not home.split(".")[0] == module_name.split(".")[0]:
                continue  # re-exports of another package's objects
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= 40:
                docs.append((f"{module_name}.{name}", doc))
    return docs


def _unique(docs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for name, doc in docs:
        if doc not in seen:
            seen.add(doc)
            out.append((name, doc))
    return out


def corpus_a() -> list[tuple[str, str]]:
    return _unique([d for m in STDLIB for d in _docstrings(m)])


def corpus_b() -> list[tuple[str, str]]:
    import sklearn

    descr = sorted((Path(sklearn.__file__).parent / "datasets" / "descr").glob("*.rst"))
    docs = [(f"sklearn.datasets.descr.{p.stem}", p.read_text(encoding="utf-8")) for p in descr]
    return _unique(docs + [d for m in SCIENTIFIC for d in _docstrings(m)])


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def sequences(docs: list[tuple[str, str]], seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Each document (a trailing blank line as separator) cut into non-overlapping ``seq_len``-byte sequences; a
    document's last partial piece is dropped. Shape ``(count, seq_len)``."""
    pieces = []
    for _, doc in docs:
        ids = encode(doc + "\n\n")
        whole = len(ids) // seq_len * seq_len
        if whole:
            pieces.append(ids[:whole].view(-1, seq_len))
    return torch.cat(pieces) if pieces else torch.empty(0, seq_len, dtype=torch.long)


def split_b(docs: list[tuple[str, str]], held_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Corpus B's training pool (sequences in a fixed shuffled order: the first N are the N-example dataset, so
    the datasets are nested) and its held-out set (at least ``held_out`` sequences, from documents never trained
    on; cut to exactly ``held_out``)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    held_docs, count, i = [], 0, 0
    while count < held_out and i < len(order):
        doc = docs[order[i]]
        held_docs.append(doc)
        count += len(doc[1].encode("utf-8")) // SEQ_LEN
        i += 1
    train_docs = [docs[j] for j in order[i:]]
    pool = sequences(train_docs)
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
    return pool, sequences(held_docs)[:held_out]


def summary(docs: list[tuple[str, str]]) -> dict[str, int]:
    return {"documents": len(docs), "bytes": sum(len(d.encode("utf-8")) for _, d in docs)}
