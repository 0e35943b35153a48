"""Line charts as inline SVG, drawn on the server: no script, no library. A series is a list
of values per bucket (None where it has none: the line breaks there); each bucket has an
invisible column whose tooltip lists every series' value at that time.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Callable, Sequence

from .html import Markup, el

WIDTH, HEIGHT = 720, 180
LEFT, RIGHT, TOP, BOTTOM = 56, 8, 10, 22
COLOURS = 8  # CSS classes s0..s7


def nice_max(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above `value` (1 for nothing)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 5, 10):
        if value <= m * power:
            return float(m * power)
    return float(10 * power)


def _number(v: float) -> str:
    if v >= 1_000_000:
        return f"{v / 1_000_000:g}M"
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def line_chart(
    title: str,
    starts: Sequence[datetime],
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    unit: str = "",
    label: Callable[[datetime], str],
) -> Markup:
    """A titled chart of `series` (name, values per bucket) over `starts`, with a legend;
    `label` writes a bucket's start on the time axis and in the tooltips."""
    n = len(starts)
    top = nice_max(max((v for _, vs in series for v in vs if v is not None), default=0.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(i: float) -> float:
        return LEFT + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return TOP + plot_h * (1 - v / top)

    grid = []
    for frac in (0.0, 0.5, 1.0):
        yy = round(y(top * frac), 1)
        grid.append(el("line", x1=LEFT, x2=WIDTH - RIGHT, y1=yy, y2=yy, class_="grid"))
        grid.append(el("text", _number(top * frac) + (f" {unit}" if frac == 1.0 and unit else ""), x=LEFT - 4, y=yy + 4, class_="ylabel"))
    ticks = sorted({round(i * (n - 1) / 5) for i in range(6)}) if n > 1 else [0]
    for i in ticks if n else []:
        edge = " first" if i == 0 and n > 1 else " last" if i == n - 1 and n > 1 else ""
        grid.append(el("text", label(starts[i]), x=round(x(i), 1), y=HEIGHT - 6, class_="xlabel" + edge))
    lines = []
    for k, (_, values) in enumerate(series):
        runs: list[list[str]] = [[]]
        for i, v in enumerate(values):
            if v is None:
                runs.append([])
            else:
                runs[-1].append(f"{x(i):.1f},{y(v):.1f}")
        for run in runs:
            if len(run) > 1:
                lines.append(el("polyline", points=" ".join(run), class_=f"line s{k % COLOURS}"))
            elif run:  # a lone point: a dot, or it would not show
                cx, cy = run[0].split(",")
                lines.append(el("circle", cx=cx, cy=cy, r=2, class_=f"dot s{k % COLOURS}"))
    hover = []
    col = plot_w / max(n - 1, 1)
    for i, start in enumerate(starts):
        tip = [label(start)] + [f"{name}: {_value(vs[i], unit)}" for name, vs in series if vs[i] is not None]
        hover.append(el("rect", el("title", "\n".join(tip)), x=round(x(i) - col / 2, 1), y=TOP, width=round(col, 1), height=plot_h, class_="hover"))
    svg = el(
        "svg", grid, lines, hover, viewBox=f"0 0 {WIDTH} {HEIGHT}", class_="chart", role="img", aria_label=title,
        xmlns="http://www.w3.org/2000/svg",
    )  # fmt: skip
    legend = el("ul", [el("li", el("span", class_=f"swatch s{k % COLOURS}"), name) for k, (name, _) in enumerate(series)], class_="legend")
    return el("figure", el("figcaption", title), svg, legend, class_="chart-box")


def _value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    text = f"{v:,.0f}" if v >= 100 or float(v).is_integer() else f"{v:,.1f}"
    return f"{text} {unit}".rstrip()
