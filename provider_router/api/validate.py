"""Validating a chat request body: every refusal is a clear OpenAI-shaped 400.

Checks are cheap and done once; nothing here walks message contents beyond their type.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import ApiError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Fields a client could use to steer where the proxy sends its key: dropped at any depth.
STEERING = frozenset({"api_base", "base_url", "api_key", "extra_headers", "headers"})
_STEERING_BYTES = tuple(f'"{k}"'.encode() for k in STEERING)
JSON_TYPES = ("application/json", "application/x-www-form-urlencoded", "")
MAX_N = 128


def bad(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode the JSON object of a request body."""
    if not raw:
        raise bad("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        try:
            raw.decode()
        except UnicodeDecodeError as u:  # orjson places this at the body's start: say where it is
            raise bad(f"The request body is not valid UTF-8 (at byte {u.start}).", code="invalid_json") from None
        raise bad(f"The request body is not valid JSON (UTF-8): {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"The request body must be a JSON object, not {type(body).__name__}.", code="invalid_json")
    return body


# JSON Schemas name the client's own fields (a tool parameter called `headers`): not steering.
SCHEMAS = frozenset({"tools", "functions", "response_format"})


def _strip_steering(body: dict[str, Any]) -> bool:
    changed = False
    stack: list[Any] = [v for k, v in body.items() if k not in SCHEMAS]
    for key in STEERING.intersection(body):
        del body[key]
        changed = True
    while stack:  # iterative: a body nested 1000 deep is valid JSON, not a reason to fail
        node = stack.pop()
        if isinstance(node, dict):
            for key in STEERING.intersection(node):
                del node[key]
                changed = True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return changed


def strip_steering(raw: bytes, body: dict[str, Any]) -> bool:
    """Drop upstream-steering fields; True if any were present. Walks only when the raw
    body names one, or has a `\\u` escape (`"api\\u005fkey"` is `api_key` to any parser)."""
    # `find`, not `in`: on bytes, `in` first tries the needle as an integer and formats a
    # TypeError for each needle that is not one.
    if raw.find(b"\\u") == -1:
        for k in _STEERING_BYTES:
            if raw.find(k) != -1:
                break
        else:
            return False
    return _strip_steering(body)


def has_nul(raw: bytes) -> bool:
    """Whether the JSON text escapes a NUL character (`\\u0000`, its backslash not itself
    escaped: `"\\\\u0000"` is text about the escape, not a NUL)."""
    i = raw.find(b"\\u0000")
    while i != -1:
        j = i
        while j > 0 and raw[j - 1] == 0x5C:
            j -= 1
        if (i - j) % 2 == 0:
            return True
        i = raw.find(b"\\u0000", i + 1)
    return False


def _int_field(body: dict[str, Any], name: str, lo: int, hi: int) -> None:
    v = body.get(name)
    if v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise bad(f"`{name}` must be an integer from {lo} to {hi}.", param=name)


def _num_field(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    v = body.get(name)
    if v is None:
        return
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise bad(f"`{name}` must be a number from {lo:g} to {hi:g}.", param=name)


def validate_chat(body: dict[str, Any], *, max_messages: int) -> None:
    """Check the shape OpenAI's chat endpoint documents; raise `ApiError` (400) on the first fault."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad("`model` is required and must be a non-empty string.", param="model")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("`messages` is required and must be a non-empty array.", param="messages")
    if len(msgs) > max_messages:
        raise bad(f"`messages` has {len(msgs)} entries; this proxy accepts at most {max_messages}.", param="messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"`messages[{i}]` must be an object.", param=f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list or object is unhashable
            raise bad(
                f"`messages[{i}].role` must be one of {', '.join(sorted(ROLES))}; got {role!r}."[:300],
                param=f"messages[{i}].role",
            )
        content = m.get("content")
        if isinstance(content, str):
            continue
        if content is None and role in ("assistant", "tool", "function"):
            continue  # e.g. an assistant turn that only has tool_calls
        if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content):
            continue
        raise bad(
            f"`messages[{i}].content` must be a string or an array of content parts.",
            param=f"messages[{i}].content",
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("`stream` must be a boolean.", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("`stream_options` must be an object.", param="stream_options")
    _int_field(body, "max_tokens", 1, 10_000_000)
    _int_field(body, "max_completion_tokens", 1, 10_000_000)
    _int_field(body, "n", 1, MAX_N)
    _num_field(body, "temperature", 0, 2)
    _num_field(body, "top_p", 0, 1)
