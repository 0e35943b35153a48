"""HTML built from elements, never from strings: `el()` escapes every text child and every
attribute value, and only what `el()` (or `raw()` on a constant) made is inserted as markup.
Prompts hold HTML and scripts; they reach a page as text.
"""

from __future__ import annotations

import html
import re
from typing import Iterable, Union
from urllib.parse import quote, urlencode

_TAG = re.compile(r"^[a-z][a-z0-9-]*$")
_ATTR = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]*$")  # SVG's are camel-case (viewBox)
# HTML's elements with no content and no end tag (SVG's are closed like any other: inside
# <svg> an unclosed <line> would hold everything after it).
_VOID = frozenset({"br", "hr", "img", "input", "link", "meta"})


class Markup(str):
    """Text that is already HTML: what `el()`, `raw()` and `join()` return."""

    __slots__ = ()


Child = Union["Markup", str, int, float, None, Iterable["Child"]]


def esc(value: object) -> Markup:
    """`value` as HTML text: markup stays as it is, anything else is escaped."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def raw(markup: str) -> Markup:
    """A constant the code wrote as HTML (never data)."""
    return Markup(markup)


def join(children: Iterable[Child]) -> Markup:
    """The children as markup, in order: text escaped, lists flattened, None skipped."""
    out: list[str] = []
    stack: list[Iterable[Child]] = [iter([children])]  # type: ignore[list-item]
    while stack:
        try:
            child = next(stack[-1])  # type: ignore[call-overload]
        except StopIteration:
            stack.pop()
            continue
        if child is None or child is False:
            continue
        if isinstance(child, (str, int, float)):
            out.append(esc(child))
        else:
            stack.append(iter(child))
    return Markup("".join(out))


def el(tag: str, *children: Child, **attrs: object) -> Markup:
    """`<tag attrs>children</tag>`. An attribute's name is its keyword (`class_` for class,
    `_` for `-`); True writes it bare, None or False leaves it out."""
    assert _TAG.match(tag), tag
    parts = [tag]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        name = key.rstrip("_").replace("_", "-")
        assert _ATTR.match(name), name
        parts.append(name if value is True else f'{name}="{esc(value)}"')
    head = "<" + " ".join(parts) + ">"
    if tag in _VOID:
        assert not children, tag
        return Markup(head)
    return Markup(f"{head}{join(children)}</{tag}>")


def href(path: str, **query: object) -> str:
    """A link inside the dashboard: `path` with the query parameters that are set."""
    assert path.startswith("/ui"), path
    params = {k: str(v) for k, v in query.items() if v is not None and v != ""}
    return path + ("?" + urlencode(params) if params else "")


def part(value: str) -> str:
    """A value as one path segment."""
    return quote(value, safe="")
