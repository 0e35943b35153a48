"""The `qwen` provider: the Qwen chat web API (v2), a threaded upstream.

It receives only the messages the upstream has not seen (decided by threads.py), folds
them into one user message under `parent_id`, always streams from the upstream, and turns
the answer into events. Protocol: shared/protocols/qwen-chat-v2.md.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator
from urllib.parse import urlencode

import orjson
import structlog

from ..config import ProviderConfig
from ..errors import ApiError
from ..messages import content_text
from ..sse import SSEParser
from .base import ChatBusy, ChatCall, ChatGone, Delta, Event, Finish, Started, UpstreamReply, Usage
from .http import Exchange, Upstream, request_headers

log = structlog.get_logger("provider_router.providers")


def fold_messages(messages: list[dict[str, Any]]) -> str:
    """The one user message that carries `messages` upstream.

    A lone user message travels as it is; several (a system prompt on the first turn, a
    bootstrap of a whole history, tool results) become role-labelled blocks, in order.
    """
    if len(messages) == 1 and messages[0].get("role") == "user":
        return content_text(messages[0].get("content"))
    return "\n\n".join(f"{m.get('role', 'user')}: {content_text(m.get('content'))}" for m in messages)


def _error(data: dict[str, Any], status: int) -> Exception:
    """Map an upstream error body to what the client should see."""
    inner = data.get("data") if isinstance(data.get("data"), dict) else {}
    code = str(inner.get("code") or data.get("code") or "error")
    # Not cut here: the message is redacted before it is cut (errors.shown), so that no
    # part of an echoed key survives.
    details = str(inner.get("details") or data.get("message") or data.get("detail") or code)
    if code == "NotFound" or ("parent_id" in details and "not exist" in details):
        return ChatGone(details)  # the thread we hold is no longer upstream: rebuild it
    if code == "RateLimited":
        hours = inner.get("num")
        wait = f" (retry in {hours} h)" if hours is not None else ""
        return ApiError(
            429, f"upstream rate limit: {details}{wait}", code="upstream_rate_limited", outcome="upstream_error", retryable=True
        )
    if code == "Unauthorized" or status == 401:
        return ApiError(401, f"upstream refused the provider's token: {details}", code="upstream_unauthorized", outcome="upstream_error")
    if "in progress" in details:
        return ChatBusy(details)
    return ApiError(502, f"upstream error {code} (HTTP {status}): {details}", code="upstream_error", retryable=status >= 500)


class QwenProvider:
    threaded = True
    forwards = False

    def __init__(self, cfg: ProviderConfig, up: Upstream) -> None:
        self.name = cfg.name
        self.delete_chats = cfg.delete_chats_on_expiry
        self.upstream = up
        self._base = cfg.base_url.rstrip("/")
        headers = {
            **cfg.headers,
            "Authorization": f"Bearer {cfg.token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        if cfg.cookie:
            headers["Cookie"] = cfg.cookie
        self._headers = request_headers(headers)
        self._stream_headers = request_headers({**headers, "Accept": "text/event-stream"})

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = orjson.dumps(body) if body is not None else None
        resp = await self.upstream.request(method, self._base + path, self._headers, data)
        raw = await self.upstream.read(resp)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ApiError(502, f"upstream answered HTTP {resp.status} with a non-JSON body", code="upstream_error") from None
        if not isinstance(obj, dict) or obj.get("success") is False or resp.status >= 400:
            raise _error(obj if isinstance(obj, dict) else {}, resp.status)
        return obj

    async def new_chat(self, model: str) -> str:
        obj = await self._json(
            "POST",
            "/api/v2/chats/new",
            {"title": "New Chat", "models": [model], "chat_mode": "normal", "chat_type": "t2t", "timestamp": int(time.time() * 1000)},
        )
        chat_id = (obj.get("data") or {}).get("id")
        if not isinstance(chat_id, str):
            raise ApiError(502, "upstream created a chat without an id", code="upstream_error")
        return chat_id

    async def delete_chat(self, chat_id: str) -> None:
        await self._json("DELETE", f"/api/v2/chats/{chat_id}")

    async def chat(self, call: ChatCall) -> UpstreamReply:
        chat_id = call.chat_id or await self.new_chat(call.upstream_model)
        thinking = bool(call.body.get("enable_thinking")) or call.body.get("reasoning_effort") not in (None, "none", "minimal")
        now = int(time.time())
        message = {
            "fid": str(uuid.uuid4()),
            "parentId": call.parent_id,
            "childrenIds": [],
            "role": "user",
            "content": fold_messages(call.messages),
            "user_action": "chat",
            "files": [],
            "timestamp": now,
            "models": [call.upstream_model],
            "chat_type": "t2t",
            "feature_config": {"thinking_enabled": thinking, "output_schema": "phase"},
            "extra": {"meta": {"subChatType": "t2t"}},
            "sub_chat_type": "t2t",
            "parent_id": call.parent_id,
        }
        body = {
            "stream": True,
            "incremental_output": True,
            "chat_id": chat_id,
            "chat_mode": "normal",
            "model": call.upstream_model,
            "parent_id": call.parent_id,
            "messages": [message],
            "timestamp": now + 1,
        }
        data = orjson.dumps(body)
        url = f"{self._base}/api/v2/chat/completions?{urlencode({'chat_id': chat_id})}"
        resp = await self.upstream.request("POST", url, self._stream_headers, data)
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            # Errors come as JSON (often with HTTP 200) instead of a stream.
            raw = await self.upstream.read(resp)
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                obj = {"message": raw.decode("utf-8", "replace")}
            raise _error(obj if isinstance(obj, dict) else {}, resp.status)
        return UpstreamReply(events=self._events(resp, chat_id), close=resp.close, queue_ms=resp.queue_ms)

    async def _events(self, resp: Exchange, chat_id: str) -> AsyncIterator[Event]:
        """The turn's events; they end when the upstream's body ended, not at `finished`:
        the upstream counts the turn as running until then, and refuses the chat's next
        turn meanwhile (the threads hold the chat while these events are read)."""
        parser = SSEParser()
        usage: Usage | None = None
        chunks = self.upstream.chunks(resp)
        async for chunk in chunks:
            for ev in parser.feed(chunk):
                try:
                    obj = orjson.loads(ev.data)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(obj, dict):
                    continue
                created = obj.get("response.created")
                if isinstance(created, dict):
                    yield Started(chat_id=created.get("chat_id") or chat_id, reply_id=created.get("response_id"))
                    continue
                if obj.get("success") is False or "error" in obj:
                    raise _error(obj, 200)
                u = obj.get("usage")
                if isinstance(u, dict):
                    usage = Usage(_tokens(u.get("input_tokens")), _tokens(u.get("output_tokens")))
                for choice in obj.get("choices") or ():
                    delta = choice.get("delta") or {} if isinstance(choice, dict) else {}
                    content = delta.get("content") or ""
                    if content:
                        if delta.get("phase") == "think":
                            yield Delta(reasoning=content)
                        else:
                            yield Delta(content=content)
                    if delta.get("status") == "finished":
                        if usage is not None:
                            yield Usage(usage.prompt_tokens, usage.completion_tokens)
                        yield Finish("stop")
                        await _to_the_end(chunks)
                        return
        # The upstream closed without `finished`: a truncated reply must not become a parent.
        raise ApiError(502, "upstream stream ended before the reply finished", code="upstream_truncated")

    async def close(self) -> None:
        return None


async def _to_the_end(chunks: AsyncIterator[bytes]) -> None:
    """The rest of a finished reply's body, read and dropped. The reply is complete: a body
    that then breaks or idles past the timeout ends the wait, not the reply."""
    try:
        async for _ in chunks:
            pass
    except ApiError as e:
        log.info("upstream_body_after_finish", error=e.message)


def _tokens(value: object) -> int:
    """A usage count as the upstream wrote it (3, 3.0, "3"), or 0 when it is not a count."""
    try:
        n = int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0
    return n if 0 <= n < 2**63 else 0
