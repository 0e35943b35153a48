"""Conversations as HTML: one request as a chat transcript (tool calls with their arguments,
tool results, reasoning folded) with its reply, timings and attempts; one session's tree
with its branches side by side in lanes, each node linked to the requests that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..as_chat import choice_message, reply_message, shown
from .. import rowtext
from ..messages import content_text
from ..store import tree_view as tv
from . import fmt
from .html import Markup, el, href, part
from .views import page, request_href, session_href

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _role_class(role: Any) -> str:
    return f"role-{role}" if role in ROLES else "role-other"


def _parts(content: Any) -> str:
    """Content parts that are not text (images, audio, files), as `[type]` markers: the
    dashboard loads nothing a prompt points at."""
    if not isinstance(content, list):
        return ""
    return " ".join(f"[{p.get('type', 'part')}]" for p in content if isinstance(p, dict) and not isinstance(p.get("text"), str))


def _calls(message: dict[str, Any]) -> list[Markup]:
    calls = message.get("tool_calls")
    calls = list(calls) if isinstance(calls, list) else []
    if isinstance(message.get("function_call"), dict):
        calls.append({"function": message["function_call"]})
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        fn = fn if isinstance(fn, dict) else {}
        out.append(
            el(
                "div",
                el("div", el("span", "tool call", class_="tag"), el("code", str(fn.get("name", "?")), class_="fn"), el("span", call.get("id") if isinstance(call, dict) else None, class_="muted")),
                el("pre", fmt.pretty_json(fn.get("arguments", "")), class_="args"),
                class_="call",
            )
        )  # fmt: skip
    return out


def message_block(message: Any, title: str | None = None) -> Markup:
    """One message: who said it, its reasoning (folded), its text, its tool calls."""
    if not isinstance(message, dict):
        return el("article", el("pre", fmt.pretty_json(message)), class_="msg role-other")
    role = message.get("role") or "assistant"
    head = [el("span", title or str(role), class_="who")]
    if message.get("name"):
        head.append(el("span", str(message["name"]), class_="muted"))
    if message.get("tool_call_id"):
        head.append(el("span", f"result of {message['tool_call_id']}", class_="tag"))
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    text = content_text(message.get("content"))
    if not text and message.get("content") is not None and not isinstance(message.get("content"), (str, list)):
        text = fmt.pretty_json(message["content"])
    return el(
        "article",
        el("header", head),
        el("details", el("summary", "reasoning"), el("div", str(reasoning), class_="text"), class_="reasoning") if reasoning else None,
        el("div", text, class_="text") if text else None,
        el("div", _parts(message.get("content")), class_="muted") if _parts(message.get("content")) else None,
        _calls(message),
        el("div", el("span", "refused", class_="tag"), str(message["refusal"]), class_="text") if message.get("refusal") else None,
        class_=f"msg {_role_class(role)}",
    )


def _fields(pairs: list[tuple[str, Any]]) -> Markup:
    return el("dl", [[el("dt", k), el("dd", v)] for k, v in pairs if v is not None and v != ""], class_="fields")


def _attempts(attempts: Any) -> Markup | None:
    if not attempts:
        return None
    if not isinstance(attempts, list) or not all(isinstance(a, dict) for a in attempts):
        return el("pre", fmt.pretty_json(attempts))
    keys: list[str] = []
    for a in attempts:
        keys += [k for k in a if k not in keys]
    rows = [el("tr", [el("td", "-" if a.get(k) is None else (a[k] if isinstance(a[k], (str, int, float)) else fmt.pretty_json(a[k]))) for k in keys]) for a in attempts]
    return el("table", el("thead", el("tr", [el("th", k) for k in keys])), el("tbody", rows), class_="requests")


def request_page(r: dict[str, Any]) -> Markup:
    """One request in full, as `logs show` has it, with the raw JSON a link away."""
    rid = r["id"]
    request, response = r.get("request"), r.get("response")
    stream = {None: None, 0: "no", 1: "yes"}.get(r.get("stream"), r.get("stream"))
    if stream == "yes" and r.get("chunk_count") is not None:
        stream = f"yes ({r['chunk_count']} chunks)"
    session = None
    if r.get("session_id"):
        anchor = f"#m{r['reply_message']}" if r.get("reply_message") else ""
        session = el("a", r["session_id"], href=session_href(r["session_id"]) + anchor)
    lineage = fmt.lineage(r, "→")
    fields = _fields([
        ("received", fmt.full_time(r.get("received_at"))),
        ("finished", fmt.full_time(r.get("finished_at"))),
        ("endpoint", f"{r.get('method')} {r.get('path')}"),
        ("client", r.get("client")),
        ("user agent", r.get("user_agent")),
        ("model", r.get("model")),
        ("provider", r.get("provider")),
        ("upstream model", r.get("upstream_model")),
        ("stream", stream),
        ("status", fmt.status(r)),
        ("finish reason", r.get("finish_reason")),
        ("time to first byte", None if r.get("ttfb_ms") is None else fmt.ms(r["ttfb_ms"])),
        ("duration", None if r.get("duration_ms") is None else fmt.ms(r["duration_ms"])),
        ("usage", rowtext.usage(r)),
        ("session", session),
        ("turn", r.get("turn")),
        ("upstream chat", r.get("chat_id") if r.get("chat_id") != r.get("session_id") else None),
        ("upstream lineage", lineage),
        ("stored cut", r.get("cut")),
    ])  # fmt: skip
    body: list[Any] = [
        el("h1", "Request ", el("code", rid)),
        el("p", el("a", "Raw JSON", href=href(f"/ui/requests/{part(rid)}/json")), class_="actions"),
        fields,
    ]
    if r.get("error"):
        body += [el("h2", "Error"), el("pre", str(r["error"]), class_="error")]
    if isinstance(request, dict):
        messages, params = shown(r.get("path"), request)  # a Responses or legacy completion body: read as chat
        if isinstance(messages, list):  # none in an embeddings request: its parameters below
            body.append(el("h2", "Conversation", el("span", f" {len(messages)} messages", class_="muted")))
            body.append(el("div", [message_block(m) for m in messages], class_="transcript"))
        if params:
            body.append(el("details", el("summary", "Request parameters (", ", ".join(params), ")"), el("pre", fmt.pretty_json(params)), class_="params"))
    elif request is not None:
        body += [el("h2", "Request body"), el("pre", fmt.pretty_json(request))]
    choices = response.get("choices") if isinstance(response, dict) else None
    choices = choices if isinstance(choices, list) else []
    said = [choice_message(c) for c in choices]
    if said and all(m is not None for m in said):
        body.append(el("h2", "Reply" if len(said) == 1 else f"Replies ({len(said)} choices)"))
        for i, (choice, m) in enumerate(zip(choices, said)):
            title = "assistant" if len(said) == 1 else f"choice {i + 1}"
            finish = el("p", f"finish: {choice.get('finish_reason') or '-'}", class_="muted")
            body.append(el("div", message_block(m, title), finish, class_="transcript reply"))
        if r.get("path") == "/v1/completions":  # its text is read as a message: the rest (logprobs...) here
            body.append(el("details", el("summary", "Response as it came"), el("pre", fmt.pretty_json(response)), class_="params"))
    elif r.get("path") == "/v1/responses" and isinstance(response, dict) and (answer := reply_message("responses", response)) is not None:
        body.append(el("h2", "Reply"))
        body.append(el("div", message_block(answer, "assistant"), el("p", f"finish: {response.get('status') or '-'}", class_="muted"), class_="transcript reply"))
        body.append(el("details", el("summary", "Response as it came"), el("pre", fmt.pretty_json(response)), class_="params"))
    elif response is not None:
        body += [el("h2", "Response"), el("pre", fmt.pretty_json(response))]
    attempts = _attempts(r.get("attempts"))
    if attempts is not None:
        body += [el("h2", "Upstream attempts"), attempts]
    return page(f"Request {rid[:16]}", *body, nav="requests")


# -- a session's tree --------------------------------------------------------------------
def _node_links(node: tv.Node, tip_reply: str | None) -> list[Markup]:
    links = []
    for r in node.produced_by:
        links.append(el("a", f"turn {'-' if r.turn is None else r.turn} · {r.id[:16]}", href=request_href(r.id), class_="req", title="the request that produced this reply"))
    for r in node.tip_of:
        if not r.replies:  # a request that sent this and got no reply: an error
            text = f"turn {'-' if r.turn is None else r.turn} · {r.id[:16]} · {fmt.status({'status': r.status, 'outcome': r.outcome})}"
            links.append(el("a", text, href=request_href(r.id), class_="req bad", title="a request that ended here without a reply"))
    for t in node.threads:
        tip = " · session tip" if tip_reply and t.reply_id == tip_reply else ""
        links.append(el("span", f"upstream chat {t.chat_id or '-'} · reply {t.reply_id or '-'}{tip}", class_="thread"))
    return links


def _node(node: tv.Node, tip_reply: str | None, fork_of: int | None = None) -> Markup:
    m = node.message if isinstance(node.message, dict) else {}
    head = [el("span", node.role, class_="who")]
    if fork_of is not None:
        head.append(el("a", "↱ branch", href=f"#m{fork_of}", class_="tag fork", title="a new branch from this message's parent"))
    if m.get("tool_call_id"):
        head.append(el("span", f"result of {m['tool_call_id']}", class_="tag"))
    reasoning = m.get("reasoning_content") or m.get("reasoning")
    return el(
        "div",
        el("header", head, _node_links(node, tip_reply)),
        el("details", el("summary", "reasoning"), el("div", str(reasoning), class_="text"), class_="reasoning") if reasoning else None,
        el("div", fmt.message_text(node.message), class_="text"),
        class_=f"node msg {_role_class(node.role)}",
        id=f"m{node.id}",
    )


@dataclass(slots=True)
class Lane:
    """A branch of the tree as drawn: its messages from `start` (a depth) down, in lane `lane`."""

    nodes: list[int]
    start: int
    lane: int = 0


def lanes(tree: tv.SessionTree) -> tuple[list[Lane], int]:
    """The tree cut into branches laid out in lanes, and how many lanes: each branch follows
    its longest child, so a conversation's main line is one lane; a regenerate, an edit or a
    go-back starts a branch in the next lane that is free at its depth, beside its siblings.
    Lanes are reused once a branch has ended, so the width is the most branches alive at
    one depth, not the number of forks. No recursion: ids rise from parent to child."""
    height: dict[int, int] = {}
    for nid in sorted(tree.nodes, reverse=True):
        height[nid] = 1 + max((height[c] for c in tree.nodes[nid].children), default=0)
    depth: dict[int, int] = {}
    for nid in sorted(tree.nodes):
        parent = tree.nodes[nid].parent_id
        depth[nid] = depth[parent] + 1 if parent in depth else 0
    branches: list[Lane] = []
    starts = list(tree.roots)
    while starts:
        nid = starts.pop(0)
        branch = Lane([], depth[nid])
        while True:
            branch.nodes.append(nid)
            kids = sorted(tree.nodes[nid].children, key=lambda c: (-height[c], c))
            if not kids:
                break
            starts += kids[1:]
            nid = kids[0]
        branches.append(branch)
    # First fit by start depth: a lane is free once its last branch ended above.
    ends: list[int] = []
    for b in sorted(branches, key=lambda b: b.start):
        free = [i for i, end in enumerate(ends) if end < b.start]
        b.lane = free[0] if free else len(ends)
        if not free:
            ends.append(0)
        ends[b.lane] = b.start + len(b.nodes) - 1
    return branches, len(ends)


def tree_html(tree: tv.SessionTree, tip_reply: str | None = None) -> Markup:
    """The tree as a table of lanes (see `lanes`): a row per depth, siblings side by side in
    one row; a branch's first message names the message it branches from."""
    branches, width = lanes(tree)
    rows: list[list[Markup | None]] = []
    for b in branches:
        for i, nid in enumerate(b.nodes):
            d = b.start + i
            while len(rows) <= d:
                rows.append([None] * width)
            parent = tree.nodes[nid].parent_id
            fork = i == 0 and parent is not None and parent in tree.nodes
            rows[d][b.lane] = _node(tree.nodes[nid], tip_reply, fork_of=parent if fork else None)
    body = [el("tr", [el("td", cell, class_="lane" if cell is not None else "empty") for cell in row]) for row in rows]
    return el("div", el("table", el("tbody", body), class_="tree", data_lanes=width, data_branches=len(branches)), class_="tree-wrap")


def session_page(s: dict[str, Any], tree: tv.SessionTree) -> Markup:
    """A session's fields, then its conversation tree."""
    fields = _fields([
        ("state", s.get("state")),
        ("client", s.get("client")),
        ("route", f"{s['provider']}/{s.get('upstream_model')}" if s.get("provider") else None),
        ("upstream chat", s.get("chat_id") if s.get("chat_id") != s.get("id") else None),
        ("upstream tip", s.get("parent_id")),
        ("created", fmt.full_time(s.get("created_at"))),
        ("last used", fmt.full_time(s.get("last_accessed_at"))),
        ("expires", fmt.full_time(s.get("expires_at"))),
        ("requests", s.get("request_count")),
        ("messages in its latest request", s.get("message_count")),
    ])  # fmt: skip
    summary = tree.summary()
    body = tree_html(tree, s.get("parent_id")) if tree.nodes else el("p", "No messages: the requests may have been pruned.")
    return page(
        f"Session {s['id'][:16]}", el("h1", "Session ", el("code", s["id"])), fields,
        el("h2", "Conversation tree", el("span", f" {summary}", class_="muted")), body, nav="sessions",
    )  # fmt: skip
