"""What every command's output is made of: JSON lines and documents, local times, text cut
to a width, aligned tables, `name  value` fields and section rules.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Iterable, Sequence

import orjson

from ..rowtext import first_line, local_time, or_dash, parse_ts, status, tokens  # noqa: F401 (the commands' words for a row)

# Columns of a request row that hold the tree's internals (node ids, parameters and
# response without the reply messages): `logs show ID` rebuilds the bodies from them.
INTERNAL_COLUMNS = ("params", "params_blobs", "overrides", "body_blob", "response", "replies")
# Piped output has no terminal: be generous rather than cut at the 80-column fallback.
PIPE_WIDTH = 160


def json_line(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def json_doc(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode()


def public_row(row: dict[str, Any]) -> dict[str, Any]:
    """A listed request row as `--json` prints it: every column but the internal ones."""
    for col in INTERNAL_COLUMNS:
        row.pop(col, None)
    return row


def full_time(ts: str | None) -> str:
    """Local date and time with milliseconds, and the stored UTC value."""
    when = parse_ts(ts)
    if when is None:
        return ts or "-"
    local = when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    zone = when.strftime("%Z")
    return f"{local} {zone} ({ts})" if zone else f"{local} ({ts})"


def cells(text: str) -> int:
    """The terminal columns `text` takes: two per wide character (Chinese, Japanese,
    Korean, most emoji), none for a combining mark."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def fit(text: str, width: int) -> str:
    """`text` cut to `width` terminal columns, marking the cut with an ellipsis."""
    if width <= 0:
        return ""
    if cells(text) <= width:
        return text
    out, used = [], 0
    for c in text:
        w = cells(c)
        if used + w > width - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "…"


def pad(text: str, width: int, right: bool = False) -> str:
    """`text` padded with spaces to `width` terminal columns."""
    fill = " " * max(0, width - cells(text))
    return fill + text if right else text + fill


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"  # sub-10 ms (local) still tells apart


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Plain aligned columns (two spaces apart); column indexes in `right` align right."""
    rows = [list(r) for r in rows]
    right = set(right)
    widths = [max([cells(h)] + [cells(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(pad(c, w, i in right) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def section(title: str) -> str:
    return f"\n-- {title} " + "-" * max(0, 60 - len(title))


def fields(pairs: Iterable[tuple[str, Any]]) -> list[str]:
    """`name  value` lines, names padded to one width; an unset value shows as `-`."""
    pairs = list(pairs)
    width = max(len(k) for k, _ in pairs)
    return [f"{k:<{width}}  {'-' if v is None or v == '' else v}" for k, v in pairs]
