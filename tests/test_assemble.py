"""Assembling a forwarded reply for the log: the typed reading gives what reading the
reply field by field gives, whatever the reply's shape and the stream's framing."""

from __future__ import annotations

from typing import Any
from unittest.mock import patch

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provider_router.api import assemble
from provider_router.api.assemble import assemble_stream
from provider_router.sse import SSEParser
from provider_router.store.records import RequestRecord

words = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
ints = st.integers(-(2**63), 2**63 - 1)
odd = st.one_of(st.none(), ints, st.lists(ints, max_size=2), st.dictionaries(words, ints, max_size=1))
deltas = st.one_of(
    st.fixed_dictionaries({"content": words}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.one_of(st.just(""), st.none())}),
    st.fixed_dictionaries({"reasoning_content": words}),
    st.fixed_dictionaries({"reasoning": st.one_of(words, st.none()), "content": st.one_of(words, st.none())}),
    st.fixed_dictionaries({}, optional={"content": odd, "reasoning": odd}),  # odd shapes
    odd,  # not a dict at all
)
usual_deltas = st.fixed_dictionaries(
    {}, optional={"role": st.just("assistant"), "content": st.one_of(words, st.none()), "reasoning_content": st.one_of(words, st.none()), "reasoning": words}
)
usual_events = st.fixed_dictionaries(
    {"id": st.sampled_from(["c-1", "c-2"]), "choices": st.lists(
        st.fixed_dictionaries({"index": st.just(0), "delta": usual_deltas}, optional={"finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls", ""]))}),
        max_size=2,
    )},
    optional={"usage": st.fixed_dictionaries({"prompt_tokens": st.integers(0, 9), "total_tokens": st.integers(0, 99)})},
)
choices = st.fixed_dictionaries(
    {"index": st.just(0)},
    optional={"delta": deltas, "finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "length", ""]), odd)},
)
events = st.one_of(
    st.fixed_dictionaries(
        {"object": st.just("chat.completion.chunk")},
        optional={
            "id": st.sampled_from(["c-1", "c-2", ""]),
            "choices": st.one_of(st.lists(choices, max_size=2), odd),
            "usage": st.one_of(st.none(), st.fixed_dictionaries({"prompt_tokens": st.integers(0, 9), "total_tokens": st.integers(0, 99)})),
        },
    ),
    odd,  # an event that is not an object
)


def _by_event(data: bytes) -> dict[str, Any]:
    """The reference: every event parsed on its own, every field checked before use."""
    rec = RequestRecord("POST", "/v1/chat/completions")
    text, reasoning, count = [], [], 0
    for ev in SSEParser().feed(data + b"\n\n"):
        if not ev.data or ev.data == "[DONE]":
            continue
        try:
            obj = orjson.loads(ev.data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        count += 1
        if obj.get("usage") or rec.reply_id is None:
            rec.reply_id = obj.get("id") or rec.reply_id
            usage = obj.get("usage")
            if isinstance(usage, dict):
                rec.prompt_tokens, rec.total_tokens = usage.get("prompt_tokens"), usage.get("total_tokens")
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("content"), str):
                    text.append(delta["content"])
                r = delta.get("reasoning_content") or delta.get("reasoning")
                if isinstance(r, str):
                    reasoning.append(r)
            if choice.get("finish_reason") and isinstance(choice["finish_reason"], str):
                rec.finish_reason = choice["finish_reason"]
    return {
        "text": "".join(text), "reasoning": "".join(reasoning) or None, "count": count,
        "finish": rec.finish_reason, "id": rec.reply_id, "tokens": (rec.prompt_tokens, rec.total_tokens),
    }


def _assembled(data: bytes) -> dict[str, Any]:
    rec = RequestRecord("POST", "/v1/chat/completions")
    rec.stream_body = data
    assemble_stream(rec)
    return {
        "text": rec.response_text, "reasoning": rec.reasoning_text, "count": rec.chunk_count,
        "finish": rec.finish_reason, "id": rec.reply_id, "tokens": (rec.prompt_tokens, rec.total_tokens),
    }


@settings(max_examples=400, deadline=None)
@given(
    st.lists(events, max_size=8),
    st.sampled_from(["\n", "\r\n"]),
    st.sampled_from(["data: ", "data:"]),
    st.booleans(),
    st.booleans(),
)
def test_stream_assembly_matches_reading_event_by_event(
    evs: list[Any], eol: str, prefix: str, done: bool, comment: bool
) -> None:
    """Any mix of well-formed and odd events, any framing: the same text, reasoning,
    finish reason, usage, reply id and chunk count as the event-by-event reading."""
    parts = [f"{prefix}{orjson.dumps(e).decode()}{eol}{eol}" for e in evs]
    if comment:
        parts.insert(len(parts) // 2, f": keep-alive{eol}{eol}")
    if done:
        parts.append(f"{prefix}[DONE]{eol}{eol}")
    data = "".join(parts).encode()
    assert _assembled(data) == _by_event(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(usual_events, max_size=8), st.booleans())
def test_usual_events_take_the_typed_path(evs: list[Any], done: bool) -> None:
    """Events of the usual shape never need the generic reading, and give its result."""
    data = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in evs) + (b"data: [DONE]\n\n" if done else b"")
    expected = _by_event(data)
    with patch.object(assemble, "_stream_generic", None), patch.object(assemble, "stream_events", None):
        assert _assembled(data) == expected  # calling either would raise


fragments = st.sampled_from([
    '{"id":"c","choices":[{"delta":{"content":"a"},"finish_reason":null}]}',
    '{"choices":[{"delta":{"content":"b"},"finish_reason":"stop"}]}',
    '{"id":', '{"id":"x"', '"x"}', '"choices":[{"delta":{"content":"hi"}}]}', "[DONE]", "1", "[1", "2]", " ", "",
])
line_kinds = st.sampled_from(["data: ", "data: ", "", "data:", " data: ", "event: x\n", ": keep-alive\n", "id: 3\n"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(line_kinds, fragments, st.sampled_from(["\n\n", "\n", "\r\n\r\n", "", "\n\n\n", "\x0b\n\n"])), max_size=8))
def test_any_framing_reads_as_the_sse_parser_reads_it(lines: list[tuple[str, str, str]]) -> None:
    """Odd framing (a value split over lines or events, multi-line data, glued `[DONE]`,
    comments, CRLF, stray spaces) never takes the one-array path to a different answer."""
    data = "".join(kind + fragment + end for kind, fragment, end in lines).encode()
    assert _assembled(data) == _by_event(data)


ODD_FRAMINGS = {
    "a line break inside a value": b'data: {"id":\n"x"}\n\n',
    "a carriage return inside a value": b'data: {"id":\r"x"}\n\n',
    "a space before data:": b' data: {"id":"x"}\n\n',
    "a vertical tab after the value": b'data: {"id":"x"}\x0b\n\n',
    "[DONE] glued to the value": b'data: {"id":"x"}data: [DONE]\n\n',
    "one value split over two events": b'data: {"id":"x"\n\ndata: "choices":[{"delta":{"content":"hi"}}]}\n\n',
    "one value split over two events, other framing": b': c\n\ndata: {"id":"x"\n\ndata: "choices":[{"delta":{"content":"hi"}}]}\n\n',
    "two data lines in one event": b'data: {"id":"x"}\ndata: {"id":"y"}\n\n',
    "[DONE] as an event's second data line": b'data: {"id":"x"}\ndata: [DONE]\n\n',
    "two values in one event": b'data: {"id":"x"} {"id":"y"}\n\n',
    "CRLF": b'data: {"id":"x","choices":[{"delta":{"content":"a"},"finish_reason":"stop"}]}\r\n\r\ndata: [DONE]\r\n\r\n',
    "[DONE] in the middle": b'data: {"id":"x"}\n\ndata: [DONE]\n\ndata: {"choices":[{"delta":{"content":"b"}}]}\n\n',
    "a byte order mark": b'\xef\xbb\xbfdata: {"id":"x"}\n\n',
}


@pytest.mark.parametrize("data", list(ODD_FRAMINGS.values()), ids=list(ODD_FRAMINGS))
def test_odd_framing_reads_as_the_sse_parser_reads_it(data: bytes) -> None:
    assert _assembled(data) == _by_event(data)


def test_the_usual_stream_takes_the_fast_path_and_assembles() -> None:
    """A plain OpenAI stream: role chunk, content chunks, finish, usage, [DONE]."""
    chunks = [{"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    chunks += [{"id": "c", "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]} for i in range(64)]
    chunks += [{"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    chunks += [{"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 70}}]
    data = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    got = _assembled(data)
    assert got["text"] == "".join(f"w{i} " for i in range(64))
    assert (got["count"], got["finish"], got["id"], got["tokens"]) == (67, "stop", "c", (3, 70))
    assert got == _by_event(data)


# -- non-stream replies ----------------------------------------------------------------------
messages = st.one_of(
    st.fixed_dictionaries(
        {"role": st.just("assistant")},
        optional={"content": st.one_of(words, st.none(), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words}), max_size=2), odd),
                  "reasoning_content": st.one_of(words, st.none(), odd), "reasoning": st.one_of(words, odd)},
    ),
    st.just({}),
    odd,
)
completions = st.one_of(
    st.fixed_dictionaries(
        {"object": st.just("chat.completion")},
        optional={
            "id": st.one_of(st.sampled_from(["c-1", ""]), odd),
            "choices": st.one_of(st.lists(st.fixed_dictionaries({"index": st.just(0)}, optional={"message": messages, "finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "length"]), odd)}), max_size=2), odd),
            "usage": st.one_of(st.fixed_dictionaries({"prompt_tokens": st.integers(0, 9), "completion_tokens": ints, "total_tokens": st.integers(0, 99)}), odd),
            "system_fingerprint": st.just("fp"),
        },
    ),
    odd,
)


def _completion(body: bytes, read: Any) -> dict[str, Any] | str:
    rec = RequestRecord("POST", "/v1/chat/completions")
    rec.response_body = body
    try:
        read(rec)
    except Exception as e:  # the writer records the error with the row
        return type(e).__name__
    return {
        "text": rec.response_text, "reasoning": rec.reasoning_text, "finish": rec.finish_reason, "id": rec.reply_id,
        "tokens": (rec.prompt_tokens, rec.completion_tokens, rec.total_tokens),
    }


def _completion_generic(rec: RequestRecord) -> None:
    assemble._completion_generic(rec, orjson.loads(rec.response_body or b""))


@settings(max_examples=400, deadline=None)
@given(completions)
def test_completion_assembly_matches_the_generic_reading(obj: Any) -> None:
    """Any shape of chat.completion body: the same text, reasoning, finish reason, usage and
    reply id (or the same failure) as the generic reading."""
    body = orjson.dumps(obj)
    assert _completion(body, assemble.assemble_completion) == _completion(body, _completion_generic)


def test_a_usual_completion_takes_the_typed_path() -> None:
    obj = {
        "id": "chatcmpl-1", "object": "chat.completion", "model": "m", "system_fingerprint": "fp",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi.", "reasoning_content": "think", "tool_calls": [{"id": "t"}]}, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}},
    }
    with patch.object(assemble, "_completion_generic", None):  # calling it would raise
        got = _completion(orjson.dumps(obj), assemble.assemble_completion)
    assert got == {"text": "Hi.", "reasoning": "think", "finish": "stop", "id": "chatcmpl-1", "tokens": (3, 2, 5)}


def test_a_malformed_completion_body_fails_as_the_generic_reading_does() -> None:
    assert _completion(b'{"id": "c", "choices": [', assemble.assemble_completion) == "JSONDecodeError"


DEEP = b"[" * 1010 + b"]" * 1010
TYPED_FAILS = {
    "invalid UTF-8 in a stream's text": b'data: {"id":"c","choices":[{"delta":{"content":"caf\xe9 "}}]}\n\ndata: {"choices":[{"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\n',
    "nesting deeper than msgspec recurses, in a stream": b'data: {"id":"c","x":' + DEEP + b',"choices":[{"delta":{"content":"a"}}]}\n\n',
}


@pytest.mark.parametrize("data", list(TYPED_FAILS.values()), ids=list(TYPED_FAILS))
def test_a_stream_the_typed_reading_fails_on_gets_the_generic_one(data: bytes) -> None:
    assert _assembled(data) == _by_event(data)


@pytest.mark.parametrize(
    "body",
    [b'{"id":"c","choices":[{"message":{"content":"caf\xe9"},"finish_reason":"stop"}]}', b'{"id":"c","x":' + DEEP + b',"choices":[{"message":{"content":"a"}}]}'],
    ids=["invalid UTF-8 in the text", "deep nesting"],
)
def test_a_completion_the_typed_reading_fails_on_gets_the_generic_one(body: bytes) -> None:
    assert _completion(body, assemble.assemble_completion) == _completion(body, _completion_generic)
