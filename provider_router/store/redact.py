"""Replacing configured secrets in text before it is stored or shown."""

from __future__ import annotations

import re
from typing import Iterable


class Redactor:
    """Replaces every configured secret in text with ``[REDACTED]``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        uniq = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.secrets = tuple(uniq)
        self._re = re.compile("|".join(map(re.escape, uniq))) if uniq else None
        self._bre = re.compile(b"|".join(re.escape(s.encode()) for s in uniq)) if uniq else None

    def __call__(self, text: str | None) -> str | None:
        if text is None or self._re is None:
            return text
        return self._re.sub("[REDACTED]", text)

    def bytes(self, data: bytes) -> bytes:
        if self._bre is None or not self._bre.search(data):
            return data
        return self._bre.sub(b"[REDACTED]", data)
