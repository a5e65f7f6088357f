"""A griffe extension for the API reference (mkdocs.yml): the docstrings are numpydoc with Sphinx markup, which
Markdown would show raw or mangle (it eats the backslashes of LaTeX).

Cross-references (:class:`~lorascope.x.Y`, :func:`analyze`, :meth:`shown <lorascope.x.Y.z>`) become links to the
object's entry in the API reference, showing the name as Sphinx would (the last part after ``~``). A short name is
resolved where the docstring is (its module's names and imports, as Python would). Three outcomes:

- the target is an object of the package that the site documents: a link;
- the target exists but the site does not document it (a private helper, a constant or field without a docstring
  of its own, a module left out of docs/api/): its name as code (an *optional* autorefs reference);
- the target does not exist (a typo, a renamed or removed object): a required autorefs reference, which fails the
  strict build ("Could not find cross-reference target"), as Sphinx's nitpicky mode would.

Targets in other projects (numpy, torch, ...) stay code: the site has no inventory of them. Inline :math:`...`
becomes a code span of its source, and a ``.. math::`` block a fenced LaTeX block.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|data|obj|exc|const|math):`(~?)([^`<]+?)(?:\s*<([^>]+)>)?`")
OUTSIDE = ("numpy", "np", "torch", "xarray", "xr", "pandas", "pd", "scipy", "transformers", "peft", "lightning",
           "h5py", "matplotlib", "trl", "click", "datetime", "pathlib", "collections", "typing", "os", "json")
# ".. math:: first line" and the lines indented under it
MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)\n(?P<rest>(?:(?P=indent)[ \t]+\S.*\n)*)", re.M)


def _math_block(match: re.Match[str]) -> str:
    indent = match.group("indent")
    lines = [match.group("first").strip()] + [line.strip() for line in match.group("rest").splitlines()]
    body = "\n".join(f"{indent}{line}" for line in lines if line)
    return f"{indent}```latex\n{body}\n{indent}```\n"


def _lookup(path: str, collection: Any) -> str | None:
    """The canonical path of the object at ``path`` in the loaded packages (through re-exports), or None."""
    try:
        found = collection[path]
        return str(found.final_target.path if found.is_alias else found.path)
    except Exception:  # noqa: BLE001 - KeyError, an alias that does not resolve, ...
        return None


def _documented_attribute(path: str, collection: Any) -> str | None:
    """``path`` when it names an attribute listed in its class's numpydoc Attributes section (an instance
    attribute set where griffe does not see it, e.g. inside a ``try``), else None."""
    owner, _, name = path.rpartition(".")
    found = _lookup(owner, collection) if owner else None
    cls = collection[found] if found else None
    if cls is None or not cls.is_class or cls.docstring is None:
        return None
    for section in cls.docstring.parse("numpy"):
        if section.kind is griffe.DocstringSectionKind.attributes and any(a.name == name for a in section.value):
            return f"{found}.{name}"
    return None


def resolve(target: str, obj: Any, collection: Any) -> str | None:
    """Where ``target``, written in ``obj``'s docstring, points: its canonical path, or None when nothing of that
    name exists. The first part is looked up in ``obj``'s scope (members, module names, imports) first."""
    head, _, rest = target.partition(".")
    try:
        scoped = obj.resolve(head)
    except Exception:  # noqa: BLE001 - not a name in that scope
        scoped = None
    candidates = ([f"{scoped}.{rest}" if rest else scoped] if scoped else []) + [target]
    for look in (_lookup, _documented_attribute):
        for candidate in candidates:
            found = look(candidate, collection)
            if found is not None:
                return found
    return None


def reference(match: re.Match[str], obj: Any, collection: Any) -> str:
    """The Markdown of one Sphinx role in ``obj``'s docstring (see the module's docstring)."""
    role, tilde, text, target = match.group(1), match.group(2), match.group(3).strip(), match.group(4)
    if target is None:  # :class:`target` or :class:`~target`
        target, text = text, text.rsplit(".", 1)[-1] if tilde else text
    target = target.strip()
    if role == "math" or target.split(".", 1)[0] in OUTSIDE:
        return f"`{text}`"
    found = resolve(target, obj, collection)
    if found is None:
        return f"[`{text}`][{target}]"  # no such object: autorefs reports it and the strict build fails
    return f'<autoref identifier="{html.escape(found)}" optional><code>{html.escape(text)}</code></autoref>'


def _objects(obj: Any) -> Any:
    """``obj`` and every member defined in it, recursively (re-exports are their targets' business)."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: Any, loader: Any, **kwargs: Any) -> None:
        collection = loader.modules_collection
        for obj in _objects(pkg):
            if obj.docstring is not None:
                text = obj.docstring.value if obj.docstring.value.endswith("\n") else obj.docstring.value + "\n"
                text = ROLE.sub(lambda match, obj=obj: reference(match, obj, collection), MATH.sub(_math_block, text))
                obj.docstring.value = text.rstrip("\n")
