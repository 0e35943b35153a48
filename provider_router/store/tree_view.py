"""Read-side queries for drawing a session's conversation tree: the union of the paths of
all its requests (what each sent and the replies it got), each node once, with the requests
and threaded-upstream turns that annotate the nodes. No rendering here: `cli.session_view` draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import aiosqlite
import orjson

# Every node on a path from a root to one of the session's tips or replies, each once:
# UNION (not UNION ALL) stops the walk where two paths meet, so a long conversation's shared
# prefix is read once, not once per request. Seeded from the request rows, so the whole
# subtree comes from one statement however many turns the session has.
_NODES = """
WITH RECURSIVE seen(id) AS (
    SELECT tip_message FROM requests WHERE session_id = ? AND tip_message IS NOT NULL
    UNION
    SELECT reply_message FROM requests WHERE session_id = ? AND reply_message IS NOT NULL
    UNION
    SELECT m.parent_id FROM messages m JOIN seen s ON m.id = s.id WHERE m.parent_id IS NOT NULL
)
SELECT m.id, m.parent_id, m.role, m.body FROM messages m JOIN seen s ON m.id = s.id
"""

_REQUESTS = """
SELECT id, turn, status, outcome, finish_reason, tip_message, reply_message, replies
FROM requests WHERE session_id = ? ORDER BY rowid
"""

# A turn names its reply node by the node's hash (what the threads compute), so join on it.
_TURNS = """
SELECT m.id AS node, t.turn, t.chat_id, t.reply_id, t.request_id
FROM turns t JOIN messages m ON m.hash = t.message_hash
WHERE t.session_id = ?
"""

_BY_ID = "SELECT id, parent_id, role, body FROM messages WHERE id IN ({})"
_MAX_PARAMS = 500  # per IN list: well under any backend's bound on bound parameters


@dataclass(slots=True)
class TreeRequest:
    """A request of the session, as the tree annotates its nodes with it."""

    id: str
    turn: int | None
    status: int | None
    outcome: str | None
    finish_reason: str | None
    tip: int | None
    replies: list[int]


@dataclass(slots=True)
class ThreadTurn:
    """Where a threaded upstream continues: its chat and its id for this reply node."""

    turn: int
    chat_id: str | None
    reply_id: str | None
    request_id: str | None


@dataclass(slots=True)
class Node:
    """One message of the tree. `produced_by`: the requests whose reply it is; `tip_of`: the
    requests that sent the history ending here; `children` in the order they were stored."""

    id: int
    parent_id: int | None
    role: str
    message: Any
    children: list[int] = field(default_factory=list)
    produced_by: list[TreeRequest] = field(default_factory=list)
    tip_of: list[TreeRequest] = field(default_factory=list)
    threads: list[ThreadTurn] = field(default_factory=list)


@dataclass(slots=True)
class SessionTree:
    """A session's conversation tree: `roots` are the first messages of its branches (more
    than one when the opening itself was edited)."""

    nodes: dict[int, Node]
    roots: list[int]
    requests: list[TreeRequest]

    def branch_points(self) -> int:
        """How many nodes have more than one child (a regenerate, an edit or a go-back)."""
        return sum(1 for n in self.nodes.values() if len(n.children) > 1)

    def summary(self) -> str:
        """One line: its requests, the distinct messages of every branch, its branch points
        (the session's own `message_count` is the length of its latest history instead)."""
        return f"{len(self.requests)} request(s), {len(self.nodes)} message(s) in the tree, {self.branch_points()} branch point(s)"


def _node(row: Any) -> Node:
    try:
        message = orjson.loads(row[3])
    except orjson.JSONDecodeError:  # a body stored cut is text, not JSON: show it as it is
        message = {"role": row[2], "content": row[3]}
    return Node(int(row[0]), row[1], str(row[2]), message)


async def session_tree(conn: aiosqlite.Connection, session_id: str) -> SessionTree:
    """The conversation tree of the session `session_id` (exact id): three or four
    statements whatever the number of turns."""
    async with conn.execute(_REQUESTS, (session_id,)) as cur:
        requests = tree_requests(await cur.fetchall())
    async with conn.execute(_NODES, (session_id, session_id)) as cur:
        nodes = {n.id: n for n in map(_node, await cur.fetchall())}
    # The other choices of an n>1 request hang under its tip, which the walk has read:
    # fetch just those nodes (rare; the seed above stays plain SQL rather than a JSON table function).
    extra = missing_replies(requests, nodes)
    for start in range(0, len(extra), _MAX_PARAMS):
        chunk = extra[start : start + _MAX_PARAMS]
        async with conn.execute(_BY_ID.format(", ".join("?" * len(chunk))), chunk) as cur:
            nodes.update((n.id, n) for n in map(_node, await cur.fetchall()))
    async with conn.execute(_TURNS, (session_id,)) as cur:
        turns = await cur.fetchall()
    return assembled(requests, nodes, turns)


def tree_requests(rows: Sequence[Sequence[Any]]) -> list[TreeRequest]:
    """Rows of (id, turn, status, outcome, finish_reason, tip_message, reply_message, replies)."""
    return [
        TreeRequest(
            r[0], r[1], r[2], r[3], r[4], r[5],
            orjson.loads(r[7]) if r[7] else ([r[6]] if r[6] is not None else []),
        )
        for r in rows
    ]


def tree_node(row: Sequence[Any]) -> Node:
    """A row of (id, parent_id, role, body) as a node."""
    return _node(row)


def missing_replies(requests: list[TreeRequest], nodes: dict[int, Node]) -> list[int]:
    """The reply nodes of `requests` the walk up from their tips did not read."""
    return sorted({i for r in requests for i in r.replies if i not in nodes})


def assembled(requests: list[TreeRequest], nodes: dict[int, Node], turns: Sequence[Sequence[Any]]) -> SessionTree:
    """The tree from its requests, its nodes and the session's turns (rows of node, turn,
    chat_id, reply_id, request_id), on either database."""
    for r in requests:
        if r.tip in nodes:
            nodes[r.tip].tip_of.append(r)
        for i in r.replies:
            if i in nodes:
                nodes[i].produced_by.append(r)
    for node, turn, chat_id, reply_id, request_id in turns:
        if node in nodes:
            nodes[node].threads.append(ThreadTurn(turn, chat_id, reply_id, request_id))
    roots: list[int] = []
    for nid in sorted(nodes):  # ids rise in the order nodes were stored: older branches first
        n = nodes[nid]
        if n.parent_id is not None and n.parent_id in nodes:
            nodes[n.parent_id].children.append(nid)
        else:
            roots.append(nid)
    return SessionTree(nodes, roots, requests)
