"""Replacing configured secrets in text before it is stored or shown."""

from __future__ import annotations

import re
from typing import Iterable


class Redactor:
    """Replaces every configured secret in text with ``[REDACTED]``.

    Text rarely holds a secret: a substring test per secret (a vectorised search, far
    cheaper than the regex's scan of a long body) decides whether the regex runs at all."""

    def __init__(self, secrets: Iterable[str]) -> None:
        uniq = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.secrets = tuple(uniq)
        self._bsecrets = tuple(s.encode() for s in uniq)
        self._re = re.compile("|".join(map(re.escape, uniq))) if uniq else None
        self._bre = re.compile(b"|".join(map(re.escape, self._bsecrets))) if uniq else None

    def __call__(self, text: str | None) -> str | None:
        if text is None or self._re is None:
            return text
        for s in self.secrets:
            if s in text:
                return self._re.sub("[REDACTED]", text)
        return text

    def bytes(self, data: bytes) -> bytes:
        if self._bre is None:
            return data
        for s in self._bsecrets:
            if s in data:
                return self._bre.sub(b"[REDACTED]", data)
        return data
