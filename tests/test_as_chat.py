"""The Responses API's and legacy completions' bodies read as chat messages, as the log
indexes and prints them (`as_chat`)."""

from __future__ import annotations

from provider_router.as_chat import reply_message, reply_text, request_messages


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
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
    ]
    assert request_messages("responses", {"input": "hi"}) == [{"role": "user", "content": "hi"}]
    assert request_messages("responses", {"input": 7}) == [] and request_messages("responses", None) == []


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
