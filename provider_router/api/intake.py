"""A model-routed request's intake: its JSON body read within the limits (a clear 413, 415
or 400), the routes its `model` names (404 if none), and the body as each route's upstream
gets it.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..errors import ApiError
from ..routing import NoRoute, Route
from ..state import State
from ..records import RequestRecord
from .validate import JSON_TYPES, bad, has_nul, parse_body


async def read_body(request: web.Request, state: State, rec: RequestRecord) -> tuple[bytes, dict[str, Any]]:
    """The body as it came and as a JSON object (kept in the record as it came)."""
    # The media type without parameters; aiohttp's `content_type` parses with the email
    # package, more than this check needs.
    ctype = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if ctype not in JSON_TYPES and not ctype.endswith("+json"):
        raise ApiError(415, f"Content-Type must be application/json, not {ctype!r}.", code="unsupported_media_type")
    limit = state.config.server.max_body_bytes
    length = request.content_length  # parsed from the header at each reading
    if length is not None and length > limit:
        raise ApiError(413, f"The request body exceeds the limit of {limit} bytes.", code="body_too_large")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"The request body exceeds the limit of {limit} bytes.", code="body_too_large") from None
    rec.request_body = raw
    if ctype == "application/x-www-form-urlencoded" and not raw.lstrip().startswith(b"{"):
        # curl -d sends this type; we accept it only when the body is really JSON.
        raise ApiError(
            415, "The request body must be a JSON object, sent as application/json (this one is a form, "
            "application/x-www-form-urlencoded, and not JSON).", code="unsupported_media_type",
        )  # fmt: skip
    body = parse_body(raw)
    if has_nul(raw):
        raise bad("The request contains a NUL character (\\u0000), which is not accepted.", code="invalid_text")
    return raw, body


def routes(state: State, model: str) -> list[Route]:
    """`model`'s route, then its fallbacks; a 404 that lists the models there are if none."""
    try:
        return state.router.chain(model)
    except NoRoute as e:
        raise ApiError(404, str(e), param="model", code="model_not_found") from None


def for_route(raw: bytes, body: dict[str, Any], changed: bool, route: Route) -> tuple[dict[str, Any], bytes]:
    """The body as `route`'s upstream gets it, decoded and encoded: its model renamed to
    the upstream's; encoded again only if it changed (`changed`: the proxy already took
    something out of it), else the bytes the client sent."""
    if route.upstream_model != body.get("model"):
        body = {**body, "model": route.upstream_model}
    elif not changed:
        return body, raw
    try:
        return body, orjson.dumps(body)
    except orjson.JSONEncodeError as e:  # orjson writes ~250 levels; it reads 1024
        raise bad(f"The request body cannot be forwarded as changed: {e}.", code="invalid_json") from None
