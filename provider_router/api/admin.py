"""Operator HTTP surface (`/health`, `/metrics`, `/admin/*`): filled in by the inspect issue."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Add the operator routes to `app`."""
    return None
