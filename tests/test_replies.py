"""Assembling a forwarded chat reply for the log: a stream's events, any framing, become
the `chat.completion` they amount to (choices kept apart, tool calls with their arguments)."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from provider_router.replies import assemble_stream, completion, stream_events
from provider_router.sse import SSEParser

words = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
ints = st.integers(-(2**63), 2**63 - 1)
odd = st.one_of(st.none(), ints, st.lists(ints, max_size=2), st.dictionaries(words, ints, max_size=1))
tool_deltas = st.lists(
    st.fixed_dictionaries(
        {"index": st.integers(0, 1)},
        optional={"id": st.sampled_from(["call_a", "call_b"]), "type": st.just("function"),
                  "function": st.fixed_dictionaries({}, optional={"name": words, "arguments": words})},
    ),
    max_size=2,
)  # fmt: skip
deltas = st.one_of(
    st.fixed_dictionaries({}, optional={"role": st.just("assistant"), "content": st.one_of(words, st.none()),
                                        "reasoning_content": words, "refusal": words, "tool_calls": tool_deltas}),
    st.fixed_dictionaries({}, optional={"content": odd, "reasoning": odd}),  # odd shapes
    odd,  # not a dict at all
)  # fmt: skip
choices = st.fixed_dictionaries(
    {"index": st.integers(0, 1)},
    optional={"delta": deltas, "finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls"]), odd)},
)
events = st.one_of(
    st.fixed_dictionaries(
        {"object": st.just("chat.completion.chunk")},
        optional={
            "id": st.sampled_from(["c-1", "c-2"]),
            "choices": st.one_of(st.lists(choices, max_size=2), odd),
            "usage": st.fixed_dictionaries({"prompt_tokens": st.integers(0, 9), "total_tokens": st.integers(0, 99)}),
        },
    ),
    odd,  # an event that is not an object
)


def _by_event(data: bytes) -> dict[str, Any]:
    """The reference: each event parsed on its own by the SSE parser, each choice's strings
    concatenated, tool calls merged by index, the last finish reason and usage kept."""
    acc: dict[int, dict[str, Any]] = {}
    usage, count = None, 0
    for ev in SSEParser().feed(data + b"\n\n"):
        if not ev.data or ev.data == "[DONE]":
            continue
        obj = orjson.loads(ev.data)
        if not isinstance(obj, dict):
            continue
        count += 1
        usage = obj["usage"] if isinstance(obj.get("usage"), dict) else usage
        for ch in obj.get("choices") if isinstance(obj.get("choices"), list) else ():
            if not isinstance(ch, dict):
                continue
            a = acc.setdefault(ch["index"], {"text": "", "reasoning": "", "refusal": "", "calls": {}, "finish": None})
            d = ch.get("delta")
            if isinstance(d, dict):
                a["text"] += d["content"] if isinstance(d.get("content"), str) else ""
                a["reasoning"] += d["reasoning_content"] if isinstance(d.get("reasoning_content"), str) else ""
                a["refusal"] += d["refusal"] if isinstance(d.get("refusal"), str) else ""
                for tc in d.get("tool_calls") or ():
                    c = a["calls"].setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                    c["id"] = c["id"] or tc.get("id")
                    c["name"] += tc.get("function", {}).get("name", "")
                    c["arguments"] += tc.get("function", {}).get("arguments", "")
            if isinstance(ch.get("finish_reason"), str):
                a["finish"] = ch["finish_reason"]
    return {"usage": usage, "count": count, "choices": {i: acc[i] for i in sorted(acc)}}


def _assembled(data: bytes) -> dict[str, Any]:
    out = assemble_stream(data)
    got = {}
    for c in out["choices"]:
        m = c["message"]
        calls = {i: {"id": tc["id"], "name": tc["function"]["name"], "arguments": tc["function"]["arguments"]}
                 for i, tc in enumerate(m.get("tool_calls", []))}  # fmt: skip
        got[c["index"]] = {"text": m["content"] or "", "reasoning": m.get("reasoning_content", ""),
                           "refusal": m.get("refusal", ""), "calls": calls, "finish": c["finish_reason"]}  # fmt: skip
    return {"usage": out.get("usage"), "count": out["_events"], "choices": got}


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=8), st.sampled_from(["\n", "\r\n"]), st.sampled_from(["data: ", "data:"]), st.booleans(), st.booleans())
def test_stream_assembly_matches_reading_event_by_event(evs: list[Any], eol: str, prefix: str, done: bool, comment: bool) -> None:
    """Any mix of well-formed and odd events, any framing: per choice the same text,
    reasoning, refusal, tool calls and finish reason, and the same usage and event count,
    as reading the events one by one."""
    for e in evs:  # tool call deltas name their call by index, as the API does
        for ch in e.get("choices") or () if isinstance(e, dict) and isinstance(e.get("choices"), list) else ():
            if isinstance(ch, dict) and isinstance(ch.get("delta"), dict) and ch["delta"].get("tool_calls"):
                ch["delta"]["tool_calls"] = sorted(ch["delta"]["tool_calls"], key=lambda t: t["index"])
    parts = [f"{prefix}{orjson.dumps(e).decode()}{eol}{eol}" for e in evs]
    if comment:
        parts.insert(len(parts) // 2, f": keep-alive{eol}{eol}")
    if done:
        parts.append(f"{prefix}[DONE]{eol}{eol}")
    data = "".join(parts).encode()
    got, want = _assembled(data), _by_event(data)
    assert got["count"] == want["count"] and got["usage"] == want["usage"]
    assert got["choices"].keys() == want["choices"].keys()
    for i, w in want["choices"].items():
        calls = {k: w["calls"][k] for k in sorted(w["calls"])}
        assert (got["choices"][i]["text"], got["choices"][i]["reasoning"], got["choices"][i]["refusal"]) == (w["text"], w["reasoning"], w["refusal"])
        assert list(got["choices"][i]["calls"].values()) == list(calls.values())
        assert got["choices"][i]["finish"] == w["finish"]


def test_tool_calls_and_two_choices_assemble_apart() -> None:
    """A streamed reply with n=2, one choice calling two tools in pieces: each choice keeps
    its own text, finish reason and tool calls, with names and arguments whole."""
    chunks = [
        {"id": "c", "model": "m", "created": 1, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}, {"index": 1, "delta": {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_", "arguments": ""}}]}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "lo"}}, {"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": '{"city":'}}]}}]},
        {"id": "c", "choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}, {"index": 1, "id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}, {"index": 1, "delta": {}, "finish_reason": "tool_calls"}]},
        {"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 2}}},
    ]  # fmt: skip
    data = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    out = assemble_stream(data)
    assert (out["id"], out["model"], out["created"], out["_events"]) == ("c", "m", 1, 5)
    first, second = out["choices"]
    assert first == {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}
    assert second["finish_reason"] == "tool_calls" and second["message"]["content"] is None
    assert second["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 2


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_read_as_the_sse_parser_reads_them(data: bytes) -> None:
    """Arbitrary bytes never raise; the events found are the SSE parser's JSON payloads."""
    want = []
    for ev in SSEParser().feed(data + b"\n\n"):
        if ev.data and ev.data != "[DONE]":
            try:
                want.append(orjson.loads(ev.data))
            except orjson.JSONDecodeError:
                pass
    assert stream_events(data) == want
    assemble_stream(data)


def test_a_body_that_is_not_a_completion_is_not_read_as_one() -> None:
    """Only an object with a list of choices is a completion; anything else is kept as is."""
    assert completion(b'{"choices": [{"index": 0}]}') == {"choices": [{"index": 0}]}
    assert completion(b'{"error": {"message": "no"}}') is None
    assert completion(b"not json") is None
    assert completion(b"[1]") is None
