"""A session as text: its fields and requests turn by turn (`sessions show`), or its
conversation tree with the branches side by side (`sessions show --tree`).
"""

from __future__ import annotations

from typing import Any

from .. import rowtext
from ..store import tree_view as tv
from .log_table import ID_WIDTH
from .output import (
    fields,
    first_line,
    fit,
    full_time,
    json_line,
    local_time,
    or_dash,
    section,
    status,
)
from .transcript import content_text, tool_call_line, transcript_lines


def render_session(s: dict[str, Any], requests: list[dict[str, Any]]) -> list[str]:
    """The session's fields, then each of its requests as a turn of the conversation."""
    meta = s.get("metadata")
    out = [f"session {s['id']}"]
    out += fields([
        ("state", s.get("state")),
        ("client", s.get("client")),
        ("route", f"{s.get('provider')}/{s.get('upstream_model')}"),
        ("chat_id", s.get("chat_id")),
        ("tip (parent_id)", s.get("parent_id")),
        ("created", full_time(s.get("created_at"))),
        ("last access", full_time(s.get("last_accessed_at"))),
        ("expires", full_time(s.get("expires_at"))),
        ("requests", s.get("request_count")),
        ("messages in its latest request", s.get("message_count")),
        ("thread turns", s.get("turn_rows")),
        ("fingerprint", s.get("fingerprint")),
        ("metadata", None if meta is None else (meta if isinstance(meta, str) else json_line(meta))),
    ])
    out.append(section(f"conversation ({len(requests)} requests)"))
    if not requests:
        out.append("(no request rows: they may have been pruned)")
    for r in requests:
        turn = "?" if r.get("turn") is None else r["turn"]
        chat = rowtext.upstream_chat(r)
        out.append("")
        out.append(
            f"turn {turn}  {r['id']}  {local_time(r.get('received_at'))}  {status(r)}"
            + (f"  chat {chat}" if chat else "") + f"  {rowtext.lineage(r) or ''}".rstrip()
        )
        out += transcript_lines("user", r.get("prompt_text") or "")
        reply = r.get("response_text")
        if reply is None and r.get("error"):
            out += transcript_lines("error", str(r["error"]))
        else:
            out += transcript_lines("assistant", reply or "")
    return out


def _short(value: str | None, n: int = 8) -> str:
    return "-" if not value else (value if len(value) <= n else value[:n] + "…")


def node_text(message: Any) -> str:
    """What a tree line shows of a message: its text, else its tool calls, else its refusal."""
    if not isinstance(message, dict):
        return str(message)
    text = first_line(content_text(message.get("content")))
    if not text:
        calls = message.get("tool_calls") or []
        text = " ".join(tool_call_line(c) for c in calls) if isinstance(calls, list) else ""
    if not text and isinstance(message.get("function_call"), dict):
        text = tool_call_line({"function": message["function_call"]})
    if not text and message.get("refusal"):
        text = f"(refused) {message['refusal']}"
    return first_line(text)


def node_label(node: tv.Node) -> str:
    """`role: text`; a tool result names the call it answers."""
    m = node.message if isinstance(node.message, dict) else {}
    role = node.role
    if m.get("tool_call_id"):
        role += f" [{m['tool_call_id']}]"
    return f"{role}: {node_text(node.message)}"


def node_note(node: tv.Node, tip_reply: str | None) -> str:
    """The right-hand note of a tree line: which requests produced this reply (turn, short
    id), requests that ended here without one (an error), and where the upstream thread
    continues from it."""
    notes: list[str] = []
    for i, r in enumerate(node.produced_by):
        if i == 2:  # a reply produced again and again (a deterministic regenerate): count
            notes.append(f"[+{len(node.produced_by) - 2} more]")
            break
        notes.append(f"[turn {or_dash(r.turn)} {r.id[:ID_WIDTH]}]")
    for r in node.tip_of:
        if not r.replies:
            notes.append(f"[turn {or_dash(r.turn)} {r.id[:ID_WIDTH]} {status({'status': r.status, 'outcome': r.outcome})}]")
    for t in node.threads:
        tip = ", session tip" if tip_reply and t.reply_id == tip_reply else ""
        notes.append(f"[⇢ chat {_short(t.chat_id)} reply {_short(t.reply_id)}{tip}]")
    return "  ".join(notes)


def render_tree(tree: tv.SessionTree, width: int, tip_reply: str | None = None) -> list[str]:
    """The tree, one node a line. A node with one child continues on the next line at the
    same depth, so a long linear conversation stays at the margin; where a node has more
    children (a regenerate, an edit, a go-back) each starts a sibling branch under `├─` /
    `└─`, and the guide `│` runs down beside the earlier ones until the last starts. The
    branch that goes on longest is drawn last, so the short side branches close early and
    the `│` guides stay short however long the conversation goes on after them."""
    out: list[str] = []
    # A child's id is above its parent's (it is stored after it): one pass from the highest
    # id gives every node its height without recursion.
    height: dict[int, int] = {}
    for nid in sorted(tree.nodes, reverse=True):
        height[nid] = 1 + max((height.get(c, 0) for c in tree.nodes[nid].children), default=0)
    # (node id, the guide prefix of its line, its connector): an explicit stack, since a
    # conversation of hundreds of turns is deeper than Python's recursion limit.
    stack: list[tuple[int, str, str]] = []
    roots = tree.roots
    for i, root in reversed(list(enumerate(roots))):
        if len(roots) == 1:
            stack.append((root, "", ""))
        else:
            last = i == len(roots) - 1
            stack.append((root, "   " if last else "│  ", "└─ " if last else "├─ "))
    while stack:
        nid, guide, connector = stack.pop()
        node = tree.nodes[nid]
        head = (guide[:-3] + connector) if connector else guide
        label, note = node_label(node), node_note(node, tip_reply)
        room = width - len(head) - (len(note) + 2 if note else 0)
        text = fit(label, max(room, 16))
        out.append(fit(f"{head}{text}  {note}" if note else f"{head}{text}", width))
        kids = sorted(node.children, key=lambda c: (height[c], c))
        if len(kids) == 1:
            stack.append((kids[0], guide, ""))
            continue
        for j in reversed(range(len(kids))):
            last = j == len(kids) - 1
            stack.append((kids[j], guide + ("   " if last else "│  "), "└─ " if last else "├─ "))
    return out
