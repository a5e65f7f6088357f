"""MkDocs hooks (mkdocs.yml): the pages of docs/ link to files of the repository outside docs/ (the example
figures, CONTRIBUTING.md) by relative paths, as GitHub shows them. The site gets a copy of each such figure or file
under ``_repo/`` and the link points there; a link to a Markdown file outside docs/, or to a folder (GitHub lists
it, a static site cannot), becomes its text and the path in the repository. Every other link is left to MkDocs'
strict validation."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[([^\]]*)\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")  # [text](../path#anchor)
FOLDER = re.compile(r"\[([^\]]*)\]\(([\w./-]+/)\)")  # [text](some/folder/)


def _outside(page_path: Path, target: str, docs: Path) -> Path | None:
    path = (page_path.parent / target).resolve()
    return path if path.is_file() and path.is_relative_to(ROOT) and not path.is_relative_to(docs) else None


def on_files(files: Files, config: Any) -> Files:
    docs = Path(config.docs_dir).resolve()
    for page in docs.rglob("*.md"):
        for _, target, _ in LINK.findall(page.read_text(encoding="utf-8")):
            path = _outside(page, target, docs)
            if path is not None and path.suffix != ".md":
                uri = "_repo/" + path.relative_to(ROOT).as_posix()
                if files.get_file_from_path(uri) is None:
                    files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    docs = Path(config.docs_dir).resolve()
    here = Path(page.file.abs_src_path)

    def rewrite(match: re.Match[str]) -> str:
        text, target, anchor = match.group(1), match.group(2), match.group(3) or ""
        path = _outside(here, target, docs)
        if path is None:
            return match.group(0)
        in_repo = path.relative_to(ROOT).as_posix()
        if path.suffix == ".md":
            return f"{text} (`{in_repo}` in the repository)"
        return f"[{text}]({posixpath.relpath('_repo/' + in_repo, posixpath.dirname(page.file.src_uri) or '.')}{anchor})"

    def folder(match: re.Match[str]) -> str:
        path = (here.parent / match.group(2)).resolve()
        if not path.is_dir() or not path.is_relative_to(ROOT):
            return match.group(0)
        return f"{match.group(1)} (`{path.relative_to(ROOT).as_posix()}/` in the repository)"

    return FOLDER.sub(folder, LINK.sub(rewrite, markdown))
