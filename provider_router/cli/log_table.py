"""The `logs` table: one line a request, its columns sized once from the first rows so that
`--follow` lines stay aligned with the header, cut to the terminal's width.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from typing import Any, Sequence

from ..rowtext import prompt_line
from .output import PIPE_WIDTH, first_line, fit, local_time, ms, pad, status, tokens
from .output import cells as cells_of

ID_WIDTH = 16  # ms + sequence: unique within a daemon; `logs show` takes any prefix


class LogTable:
    """Fixed columns sized from the first rows; prompt and reply share whatever the terminal
    has left. Narrow terminals drop the provider, ttfb and token columns first."""

    HEADERS = ("TIME", "ID", "MODEL", "PROVIDER", "STATUS", "TTFB", "DUR", "TOKENS", "PROMPT", "REPLY")
    CAPS = (19, ID_WIDTH, 24, 16, 24, 8, 8, 11)  # the fixed columns' widest
    RIGHT = {5, 6, 7}
    OPTIONAL = (3, 5, 7)  # provider, ttfb, tokens: dropped in this order on narrow terminals
    SHRINK = ((2, 10), (4, 6), (2, 6))  # then model and status narrow to these widths
    MIN_TEXT = 16

    def __init__(self, rows: list[dict[str, Any]], width: int | None = None) -> None:
        self.today = datetime.now().astimezone()
        self.total = width or shutil.get_terminal_size((PIPE_WIDTH, 24)).columns
        cells = [self.fixed(r) for r in rows]
        self.widths = [
            min(cap, max([cells_of(h)] + [cells_of(c[i]) for c in cells]))
            for i, (h, cap) in enumerate(zip(self.HEADERS, self.CAPS))
        ]
        if not rows:  # --follow on an empty result: leave room for typical values
            self.widths = [max(w, d) for w, d in zip(self.widths, (8, 16, 12, 8, 6, 4, 4, 7))]
        self.shown = list(range(len(self.widths)))
        for i in self.OPTIONAL:
            if self._room() >= 2 * self.MIN_TEXT:
                break
            self.shown.remove(i)
        for i, floor in self.SHRINK:
            if self._room() >= 2 * self.MIN_TEXT:
                break
            self.widths[i] = min(self.widths[i], floor)
        # The prompt takes what its longest first line needs (up to half), the reply the rest.
        room = self._room()
        longest = max([cells_of(prompt_line(r)) for r in rows] or [room])
        self.prompt_width = max(min(room // 2, max(longest, self.MIN_TEXT)), 8)
        self.reply_width = max(room - self.prompt_width, 8)

    def _room(self) -> int:
        """Columns left for prompt and reply, after the shown fixed ones and the gaps."""
        return self.total - sum(self.widths[i] for i in self.shown) - 2 * (len(self.shown) + 1)

    def fixed(self, r: dict[str, Any]) -> list[str]:
        return [
            local_time(r.get("received_at"), today=self.today),
            (r.get("id") or "")[:ID_WIDTH],
            r.get("model") or "-",
            r.get("provider") or "-",
            status(r),
            ms(r.get("ttfb_ms")),
            ms(r.get("duration_ms")),
            tokens(r),
        ]

    def _line(self, cells: Sequence[str]) -> str:
        out = []
        for i in [*self.shown, len(self.widths), len(self.widths) + 1]:
            w = self.widths[i] if i < len(self.widths) else (self.prompt_width, self.reply_width)[i - len(self.widths)]
            out.append(pad(fit(cells[i], w), w, i in self.RIGHT))
        # A terminal too narrow even for the shrunk columns: cut rather than wrap.
        return fit("  ".join(out).rstrip(), self.total)

    def header(self) -> str:
        return self._line(self.HEADERS)

    def line(self, r: dict[str, Any]) -> str:
        reply = first_line(r.get("response_text"))
        if not reply and r.get("error"):
            reply = "! " + first_line(r["error"])
        cells = self.fixed(r)
        if len(cells[0]) > self.widths[0]:  # --follow past midnight: keep the time, drop the date
            cells[0] = cells[0][-8:]
        if len(cells[4]) > self.widths[4]:  # a narrow status column keeps the code, not "404 re…"
            cells[4] = cells[4].split()[0]
        return self._line(cells + [prompt_line(r), reply])
