"""The Responses API's and legacy completions' bodies read as chat messages, as the log
indexes and prints them (`as_chat`)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from provider_router.as_chat import reply_message, reply_text, request_messages, shown
from provider_router.store import Redactor, RequestRecord, connect, queries, sink


def test_a_responses_request_reads_as_its_instructions_then_its_input_items() -> None:
    body = {
        "model": "gpt-4o",
        "instructions": "be brief",
        "input": [
            {"role": "developer", "content": "use tools"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "look"}, {"type": "input_image", "image_url": "x"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},  # nothing a reader of the log reads
            {"type": "function_call", "call_id": "c1", "name": "ls", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "a.txt"},
            {"type": "item_reference", "id": "msg_0"},
        ],
    }
    assert request_messages("responses", body) == [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": "use tools"},
        {"role": "user", "content": [{"type": "input_text", "text": "look"}, {"type": "input_image", "image_url": "x"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
    ]
    assert request_messages("responses", {"input": "hi"}) == [{"role": "user", "content": "hi"}]
    assert request_messages("responses", {"input": 7}) == [] and request_messages("responses", None) == []
    # Shown: what could not be read (the reasoning, the reference) stays among the fields.
    messages, fields = shown("/v1/responses", body)
    assert messages == request_messages("responses", body) and fields == body


def test_a_request_read_whole_is_shown_as_its_messages_and_its_other_fields() -> None:
    body = {"model": "m", "instructions": "be brief", "input": [{"role": "user", "content": "hi"}], "store": False}
    assert shown("/v1/responses", body) == ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], {"model": "m", "store": False})
    assert shown("/v1/completions", {"model": "m", "prompt": [[1, 2]]}) == (None, {"model": "m", "prompt": [[1, 2]]})
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert shown("/v1/chat/completions", chat) == (chat["messages"], {"model": "m"})
    # Instructions with no input (a stateful call): read whole; arguments that are not a string, as JSON.
    assert shown("/v1/responses", {"model": "m", "instructions": "hi", "previous_response_id": "r"}) == (
        [{"role": "system", "content": "hi"}], {"model": "m", "previous_response_id": "r"})
    call = request_messages("responses", {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": True, "b": None}}]})
    assert call[0]["tool_calls"][0]["function"]["arguments"] == '{"a":true,"b":null}'


def test_a_completion_prompt_reads_as_one_user_message() -> None:
    assert request_messages("text_completion", {"prompt": "once"}) == [{"role": "user", "content": "once"}]
    assert request_messages("text_completion", {"prompt": ["a", "b"]}) == [{"role": "user", "content": "a\nb"}]
    assert request_messages("text_completion", {"prompt": [1, 2, 3]}) == []  # tokens, no text


def test_an_answer_reads_as_one_assistant_message_with_its_function_calls() -> None:
    response = {
        "object": "response",
        "status": "completed",
        "output": [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "c2", "name": "grep", "arguments": '{"q": "x"}'},
        ],
    }
    assert reply_message("responses", response) == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [{"id": "c2", "type": "function", "function": {"name": "grep", "arguments": '{"q": "x"}'}}],
    }
    assert reply_text(response) == "Checking."  # its text; its calls only when it has none
    assert reply_text({"output": response["output"][2:]}) == 'grep({"q": "x"})'
    assert reply_message("responses", {"output": [{"type": "reasoning"}]}) is None
    completion = {"object": "text_completion", "choices": [{"index": 0, "text": "twice", "finish_reason": "stop"}]}
    assert reply_message("text_completion", completion) == {"role": "assistant", "content": "twice"}
    assert reply_text(completion) == "twice" and reply_text({"choices": []}) is None and reply_text("text") is None


# -- as the log writer stores the reading -------------------------------------------------
def _writer(tmp_path: Path, **caps: int) -> tuple[sqlite3.Connection, sink.Sink]:
    asyncio.run(_migrate(tmp_path / "w.db"))
    db = sink.open_db(str(tmp_path / "w.db"))
    return db, sink.Sink(db, redactor=Redactor([]), emit=lambda _: None, **{"max_body_bytes": 1 << 20, **caps})


async def _migrate(path: Path) -> None:
    await (await connect(path)).close()


def _record(path: str, kind: str, body: Any, answer: Any) -> RequestRecord:
    r = RequestRecord("POST", path)
    r.request_body, r.response_body, r.reply_format = orjson.dumps(body), orjson.dumps(answer), kind
    r.finish(200, "ok")
    return r


def _rebuilt(db_path: Path, rid: str) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        conn = await aiosqlite.connect(db_path)
        try:
            return await queries.get_request(conn, rid)  # type: ignore[return-value]
        finally:
            await conn.close()

    return asyncio.run(read())


ANSWER = {"object": "response", "status": "completed", "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}]}


def test_a_reading_cut_at_the_message_cap_cuts_nothing_stored(tmp_path: Path) -> None:
    """A message over `max_message_bytes` is cut in the reading (search and listings) only:
    the request and the answer are rebuilt whole, and the row names no cut."""
    db, out = _writer(tmp_path, max_message_bytes=200)
    body = {"model": "m", "input": [{"role": "user", "content": "long " * 100}], "tools": [{"type": "function", "name": "f", "parameters": {"x": 1}}]}
    answer = {**ANSWER, "output": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"x": "y" * 500}}]}  # not a string: read as text
    rec = _record("/v1/responses", "responses", body, answer)
    out.apply([([], [rec])])
    row = db.execute("SELECT cut, prompt_message, reply_message FROM requests").fetchone()
    assert row[0] is None and row[1] is not None and row[2] is not None
    got = _rebuilt(tmp_path / "w.db", rec.id)
    assert got["request"] == body and got["response"] == answer


def test_a_body_over_the_body_cap_is_stored_cut_and_not_read(tmp_path: Path) -> None:
    db, out = _writer(tmp_path, max_body_bytes=300)
    rec = _record("/v1/responses", "responses", {"model": "m", "input": "x" * 1000}, ANSWER)
    out.apply([([], [rec])])
    assert db.execute("SELECT cut, prompt_message FROM requests").fetchone() == ("request body", None)
    assert db.execute("SELECT count(*) FROM messages WHERE role = 'user'").fetchone() == (0,)


def test_a_completion_sent_with_messages_comes_back_as_it_came(tmp_path: Path) -> None:
    """A legacy completion whose body has `messages` is placed as chat is; its answer's
    choices get no `message` in the rebuild (they have `text`)."""
    db, out = _writer(tmp_path)
    answer = {"object": "text_completion", "choices": [{"index": 0, "text": "yo", "finish_reason": "stop"}]}
    rec = _record("/v1/completions", "text_completion", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, answer)
    out.apply([([], [rec])])
    got = _rebuilt(tmp_path / "w.db", rec.id)
    assert got["response"] == answer and got["request"]["messages"] == [{"role": "user", "content": "hi"}]


def test_a_reading_shares_no_node_with_a_chat_of_the_same_messages(tmp_path: Path) -> None:
    """The same user message sent as chat and as a Responses input is two nodes: a reading
    never decides how a chat conversation's messages are stored."""
    db, out = _writer(tmp_path)
    hi = {"role": "user", "content": "hi"}
    chat = _record("/v1/chat/completions", "completion", {"model": "m", "messages": [hi]},
                   {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]})  # fmt: skip
    resp = _record("/v1/responses", "responses", {"model": "m", "input": [hi]}, ANSWER)
    out.apply([([], [chat, resp])])
    prompts = [r[0] for r in db.execute("SELECT prompt_message FROM requests ORDER BY rowid")]
    assert len(set(prompts)) == 2 and None not in prompts


def test_a_resent_answer_continues_the_conversation_through_its_reply(tmp_path: Path) -> None:
    """A client that resends its whole `input` (no stored state) sends the answer back as
    items, a message and its function calls: read, they are that answer's reply node, so
    the second turn's messages grow from the first turn's reply, as chat's do."""
    db, out = _writer(tmp_path)
    hi = {"role": "user", "content": "hi"}
    said = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "looking", "annotations": []}]}
    call = {"type": "function_call", "call_id": "c1", "name": "ls", "arguments": "{}"}
    first = _record("/v1/responses", "responses", {"model": "m", "input": [hi]}, {**ANSWER, "output": [said, call]})
    second = _record("/v1/responses", "responses", {"model": "m", "input": [
        hi, said, call, {"type": "function_call_output", "call_id": "c1", "output": "a.txt"}, {"role": "user", "content": "and?"},
    ]}, ANSWER)  # fmt: skip
    out.apply([([], [first, second])])
    (reply,) = db.execute("SELECT reply_message FROM requests WHERE id = ?", (first.id,)).fetchone()
    (prompt,) = db.execute("SELECT prompt_message FROM requests WHERE id = ?", (second.id,)).fetchone()
    path = []
    node = prompt
    while node is not None:
        path.append(node)
        (node,) = db.execute("SELECT parent_id FROM messages WHERE id = ?", (node,)).fetchone()
    assert reply in path and len(path) == 4  # hi, the reply (text and call), the result, and?
    assert db.execute("SELECT count(*) FROM messages WHERE role = 'assistant'").fetchone() == (2,)  # that reply, and the second's


def test_a_responses_answer_sent_with_messages_comes_back_as_it_came(tmp_path: Path) -> None:
    db, out = _writer(tmp_path)
    rec = _record("/v1/responses", "responses", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, ANSWER)
    out.apply([([], [rec])])
    assert _rebuilt(tmp_path / "w.db", rec.id)["response"] == ANSWER
