"""The Responses API's and the legacy completions' bodies read as chat messages.

The log keeps such a request as it was sent and its answer as it came (`replies.py` assembles
a stream's), and also reads both as chat messages: the request's `instructions` and `input`
items (or a completion's `prompt`), and the answer's text and function calls as one
assistant message. Those messages go into the conversation tree as a chat request's do, so
search, listings, the `request_log` view and `logs show` read every endpoint's text the same
way. They are a reading for the log, never sent anywhere. (A stateful `/v1/responses` would
place its `input` items the same way.)

Domain, below the store: the log writer process and the readers use it.
"""

from __future__ import annotations

from typing import Any

import orjson

from .messages import content_text, said_text

# The `reply_format` of a record whose request and answer are read here, by endpoint.
KIND_OF_PATH = {"/v1/responses": "responses", "/v1/completions": "text_completion"}
KINDS = tuple(KIND_OF_PATH.values())


# The fields of such a request that its messages are read from.
READ_FIELDS = ("input", "instructions", "prompt")


def request_messages(kind: str, body: Any) -> list[dict[str, Any]]:
    """A Responses request (`kind` "responses") or a legacy completion's ("text_completion")
    as chat messages; [] when it holds none that can be read."""
    return _reading(kind, body)[0]


def shown(path: str | None, request: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A request body as `logs show` and the dashboard show it: its messages (a chat's, or
    the reading of a Responses or legacy completion body; None if it has none), and its
    other fields. The fields a reading comes from are left out of the others only when all
    of them was read (not token prompts, references to stored items or reasoning)."""
    kind = KIND_OF_PATH.get(path or "")
    if kind is None:
        return request.get("messages"), {k: v for k, v in request.items() if k != "messages"}
    messages, whole = _reading(kind, request)
    read = READ_FIELDS if messages and whole else ()
    return messages or None, {k: v for k, v in request.items() if k not in read}


def _reading(kind: str, body: Any) -> tuple[list[dict[str, Any]], bool]:
    """`request_messages`, and whether every part of the fields they come from was read."""
    if not isinstance(body, dict):
        return [], False
    if kind == "text_completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompt = "\n".join(prompt)  # several prompts in one request: one text (token arrays: none)
        return ([{"role": "user", "content": prompt}], True) if isinstance(prompt, str) else ([], False)
    out: list[dict[str, Any]] = []
    whole = body.get("instructions") is None or isinstance(body.get("instructions"), str)
    if isinstance(body.get("instructions"), str):
        out.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    whole = whole and (items is None or isinstance(items, list))
    for item in items if isinstance(items, list) else ():
        m = _item_message(item)
        whole = whole and m is not None
        if m is None:
            continue
        last = out[-1] if out else None
        if last is not None and last["role"] == "assistant" and m["role"] == "assistant" and m["content"] is None:
            # An answer resent: its text and its function calls (separate items) are one
            # assistant message, as `reply_message` read them, so the conversation goes on
            # through that reply's node.
            last["tool_calls"] = [*last.get("tool_calls", ()), *m["tool_calls"]]
            continue
        out.append(m)
    return out, whole


def reply_message(kind: str, reply: Any) -> dict[str, Any] | None:
    """An answer (the final `response` object, or a `text_completion`) as one assistant
    message: its text, and a Responses answer's function calls as tool calls; None when it
    has neither."""
    if not isinstance(reply, dict):
        return None
    if kind == "text_completion":
        choices = reply.get("choices")
        return choice_message(choices[0]) if isinstance(choices, list) and choices else None
    output = reply.get("output")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            calls.append(_tool_call(item))
        elif item.get("type") == "message":
            texts.append(content_text(item.get("content")))
    if not texts and not calls:
        return None
    m: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts else None}
    if calls:
        m["tool_calls"] = calls
    return m


def choice_message(choice: Any) -> dict[str, Any] | None:
    """What one choice of an answer said: a chat choice's message, or a legacy completion's
    text as an assistant message; None if neither."""
    if not isinstance(choice, dict):
        return None
    if isinstance(choice.get("message"), dict):
        return choice["message"]  # type: ignore[no-any-return]
    return {"role": "assistant", "content": choice["text"]} if isinstance(choice.get("text"), str) else None


def reply_text(reply: Any) -> str | None:
    """The text of an answer that is not a chat completion (a Responses `output`, a text
    completion's choices), or its function calls as `name(arguments)` when it has none."""
    kind = "responses" if isinstance(reply, dict) and "output" in reply else "text_completion"
    m = reply_message(kind, reply)
    return None if m is None else said_text(m)  # as a chat reply's text is listed


def _item_message(item: Any) -> dict[str, Any] | None:
    """One `input` item as a chat message: a message (its text), a function call (an
    assistant's tool call) or a function call's output (a tool message); None for others
    (reasoning, references to stored items)."""
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind == "function_call":
        return {"role": "assistant", "content": None, "tool_calls": [_tool_call(item)]}
    if kind == "function_call_output":
        output = item.get("output")
        return {"role": "tool", "tool_call_id": item.get("call_id"), "content": output if isinstance(output, str) else content_text(output)}
    if kind in (None, "message") and isinstance(item.get("role"), str):
        content = item.get("content")
        if not isinstance(content, str) and not (isinstance(content, list) and any(_not_text(p) for p in content)):
            content = content_text(content)  # text parts as one text, as an answer's are read
        return {"role": item["role"], "content": content}  # with an image among them: the parts
    return None


def _not_text(part: Any) -> bool:
    return not (isinstance(part, dict) and isinstance(part.get("text"), str))


def _tool_call(item: dict[str, Any]) -> dict[str, Any]:
    arguments = item.get("arguments")  # a JSON string; anything else, as JSON text
    if not isinstance(arguments, str):
        try:
            arguments = "" if arguments is None else orjson.dumps(arguments).decode()
        except (orjson.JSONEncodeError, TypeError):  # nested past orjson's depth
            arguments = str(arguments)
    return {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": arguments}}
