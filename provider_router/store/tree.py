"""The conversation tree on a SQLite connection: messages stored once per position, keyed
by the chained hash of `history.node_key`; large request fields stored once by content
hash; one request row pointing at the tip of what it sent and at the reply of each choice.

Synchronous (the log writer process and the schema migration run it): `Tree.request` and
`Tree.reply` turn a finished request into statements, `Tree.take` hands them over. The
statements below are the tree's whole vocabulary: on PostgreSQL the writer runs each
one's counterpart (store/pg/writer.py), and ids come from `ids` (per batch from the
largest stored here, in sequence blocks there). Only what is new is parsed and
hashed: a conversation's previous request is remembered, and the messages a client resends
unchanged (byte for byte) are matched without being read again.
"""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import msgspec
import orjson

from .. import history

# A request field at least this long (tools, response_format, a JSON schema) is a blob.
BLOB_MIN_BYTES = 128
CUT_MARK = "…[cut {n} bytes]"
_RAW_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw])
NODE_CACHE = 200_000  # tree keys -> (id, body hash, carried-form hash): about 150 bytes each
CONVERSATION_CACHE_BYTES = 64 << 20  # the previous request of recent conversations

FIND_NODE = "SELECT id, body, resent, carried FROM messages WHERE hash = ?"
FIND_BLOB = "SELECT id FROM blobs WHERE hash = ?"
INSERT_BLOB = "INSERT INTO blobs (id, hash, data, refs) VALUES (?, ?, ?, 0)"
ADD_BLOB_REFS = "UPDATE blobs SET refs = refs + ? WHERE id = ?"
INSERT_NODE = "INSERT INTO messages (id, hash, parent_id, role, body, carried) VALUES (?, ?, ?, ?, ?, ?)"
CARRY = "UPDATE messages SET resent = ?, carried = 1 WHERE id = ?"
INSERT_TEXT = "INSERT INTO messages_fts (rowid, text) VALUES (?, ?)"
# A source of ids for a table's new rows: `ids(table)` is called on every reset and gives
# a function returning the next id.
Ids = Callable[[str], Callable[[], int]]


def blob_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(slots=True)
class _Path:
    """What a conversation's previous request resolved to, message by message."""

    array: bytes  # its `messages` array as sent
    raws: list[bytes]
    keys: list[bytes]
    ids: list[int]
    assistants: list[int]  # assistant messages up to and including i
    last_user: list[int]  # the id of the last user message up to i (0: none)
    overrides: dict[int, Any]
    fields: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # large fields -> blob ids
    # The body around the `messages` array (b"" when not known), and its fields' columns:
    # a next body that is the same around a longer array is not read again.
    head: bytes = b""
    after: bytes = b""
    params: tuple[str, str | None, tuple[int, ...]] | None = None

    def size(self) -> int:
        """Bytes held, about: the array twice (as sent, and as its messages)."""
        return 2 * len(self.array) + len(self.head) + len(self.after)


@dataclass(slots=True)
class Placed:
    """A request's history in the tree."""

    tip: int | None = None
    tip_key: bytes = b""
    prompt: int | None = None
    turn: int = 1
    overrides: dict[int, Any] = field(default_factory=dict)
    cut: list[str] = field(default_factory=list)


class Tree:
    """Statements for the tree, gathered per batch; ids are assigned here, before the rows
    are written (children name their parents in the same batch): by default after the
    largest id stored, which holds for SQLite's single writer."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        max_message_bytes: int = 8 << 20,
        redact: Callable[[str], str] = lambda s: s,
        ids: Ids | None = None,
    ) -> None:
        self.conn = conn  # anything with execute(sql, params).fetchone() for FIND_NODE, FIND_BLOB
        self.ids = ids or self._after_largest
        self.max_message = max_message_bytes
        self.redact = redact
        # tree key -> (id, hash of its body, hash of the form requests carry it in; None: a
        # reply no request has carried yet)
        self._nodes: OrderedDict[bytes, tuple[int, int, int | None]] = OrderedDict()
        self._blobs: OrderedDict[bytes, int] = OrderedDict()
        self._paths: OrderedDict[str, _Path] = OrderedDict()
        self._path_bytes = 0
        self.reset()

    # -- batch state -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget what was gathered and anything cached that a rolled-back batch may have
        put there; read the next ids again."""
        self._nodes.clear()
        self._blobs.clear()
        self._paths.clear()
        self._path_bytes = 0
        self.new_nodes: list[tuple[Any, ...]] = []
        self.carried: list[tuple[str | None, int]] = []  # replies a request carried first: (resent, id)
        self._fresh: set[int] = set()  # nodes created in this batch: none has a child stored yet
        self.new_text: list[tuple[int, str]] = []
        self.blob_rows: list[tuple[Any, ...]] = []
        self.blob_refs: dict[int, int] = {}
        self._node_id = self.ids("messages")
        self._blob_id = self.ids("blobs")

    def _after_largest(self, table: str) -> Callable[[], int]:
        (n,) = self.conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()
        return itertools.count(int(n) + 1).__next__

    def take(self) -> list[tuple[str, Sequence[Any]]]:
        """The gathered statements, in the order they must run; the gathering starts anew."""
        out: list[tuple[str, Sequence[Any]]] = []
        if self.blob_rows:
            out.append((INSERT_BLOB, self.blob_rows))
        if self.blob_refs:
            out.append((ADD_BLOB_REFS, [(n, i) for i, n in self.blob_refs.items()]))
        if self.new_nodes:
            out.append((INSERT_NODE, self.new_nodes))
        if self.carried:
            out.append((CARRY, self.carried))
        if self.new_text:
            out.append((INSERT_TEXT, self.new_text))
        self.new_nodes, self.new_text, self.blob_rows, self.blob_refs, self.carried = [], [], [], {}, []
        self._fresh = set()
        return out

    # -- nodes -----------------------------------------------------------------------------
    def _cap(self, m: dict[str, Any], exact: bytes, placed: Placed, where: str) -> bytes:
        """A message longer than the cap is stored with its content cut, and the cut said."""
        extra = len(exact) - self.max_message
        if extra <= 0:
            return exact
        content = m.get("content")
        if isinstance(content, str):
            keep = max(0, len(content) - extra - 64)
            m = {**m, "content": content[:keep] + CUT_MARK.format(n=len(content) - keep)}
        else:
            m = {"role": m.get("role"), "content": CUT_MARK.format(n=len(exact))}
        placed.cut.append(where)
        return orjson.dumps(m, option=orjson.OPT_SORT_KEYS)

    def node(
        self, parent_id: int | None, parent_key: bytes, m: dict[str, Any], placed: Placed, where: str, reply: bool = False
    ) -> tuple[int, bytes, bool]:
        """The node of message `m` under `parent_key` (created if new): (id, key, whether
        the request or reply keeps nothing of its own for it).

        A reply is compared with the node's body. A request is compared with the form in
        which requests carry the node: its body, or for a reply, the form the first request
        to carry it used (`resent`, decided once). A message differing from that is kept
        by the request as an override."""
        key = history.node_key(parent_key, m)
        exact = orjson.dumps(m, option=orjson.OPT_SORT_KEYS)
        mine = hash(exact)
        hit = self._nodes.get(key)
        if hit is None and parent_id not in self._fresh:  # a new parent has no stored child
            row = self.conn.execute(FIND_NODE, (key,)).fetchone()
            if row is not None:
                body = hash(row[1].encode())
                hit = (row[0], body, (hash(row[2].encode()) if row[2] is not None else body) if row[3] else None)
        if hit is None:
            capped = self._cap(m, exact, placed, where)
            decoded = capped.decode()
            text = self.redact(decoded)
            nid = self._node_id()
            self._fresh.add(nid)
            self.new_nodes.append((nid, key, parent_id, str(m.get("role")), text, 0 if reply else 1))
            # Derived from the stored (redacted) body alone, so that retention can delete
            # exactly these terms again from the body.
            stored = m if capped is exact and text == decoded else orjson.loads(text)
            self.new_text.append((nid, history.message_text(stored)))
            body = hash(text.encode()) if stored is not m else mine
            hit = (nid, body, None if reply else body)
        elif hit[2] is None and not reply:
            # The first request to carry this reply: how requests carry it, decided once.
            resent = None
            if mine != hit[1] and len(exact) <= self.max_message:
                decoded = exact.decode()
                resent = self.redact(decoded)
            self.carried.append((resent, hit[0]))
            hit = (hit[0], hit[1], hit[1] if resent is None else hash(resent.encode()))
        self._nodes[key] = hit
        self._nodes.move_to_end(key)
        if len(self._nodes) > NODE_CACHE:
            self._nodes.popitem(last=False)
        return hit[0], key, (hit[1] if reply else hit[2]) == mine

    # -- requests --------------------------------------------------------------------------
    def request(self, body: bytes, conversation: str | None) -> tuple[Placed, str, str | None] | None:
        """A chat request body in the tree: where its history was placed, and its other
        fields' columns (`params`, `params_blobs`); None when it is not a chat request
        (ValueError: a message that cannot be read).

        A client resending its history sends the conversation's previous body again with
        more messages at the end of the array: such a body is not read again, only the new
        messages are (and the other fields' columns are the previous request's)."""
        prev = self._paths.get(conversation) if conversation else None
        new = _extension(body, prev) if prev is not None else None
        if new is not None and prev is not None and prev.params is not None:
            head, after, params = prev.head, prev.after, prev.params
            if new:
                array = body[len(head) : len(body) - len(after)]
                placed = self.place(array, conversation, (len(prev.raws), new))
                self._around(conversation, head, after, params)
            else:
                placed = self._again(conversation, prev)  # type: ignore[arg-type]
            for bid in params[2]:
                self.blob_refs[bid] = self.blob_refs.get(bid, 0) + 1
            return placed, params[0], params[1]
        split = split_body(body)
        if split is None:
            return None
        top, array = split
        placed = self.place(array, conversation)
        text, blobs = self.params(top, conversation)
        if conversation and array != b"[]":
            at = body.rfind(array)  # the array as a value: its bytes cannot occur inside a string
            if at > 0 and body[:at].rstrip().endswith(b'"messages":'):
                ids = tuple(orjson.loads(blobs).values()) if blobs else ()
                self._around(conversation, body[:at], body[at + len(array) :], (text, blobs, ids))
        return placed, text, blobs

    def _again(self, conversation: str, path: _Path) -> Placed:
        """The conversation's previous body sent again: its history is where it was."""
        self._paths.move_to_end(conversation)
        return Placed(path.ids[-1], path.keys[-1], path.last_user[-1] or None, path.assistants[-1] + 1, path.overrides)

    def _around(self, conversation: str | None, head: bytes, after: bytes, params: tuple[str, str | None, tuple[int, ...]]) -> None:
        """Remember the body around the conversation's array just placed."""
        path = self._paths.pop(conversation, None) if conversation else None
        if path is not None:
            self._path_bytes -= path.size()
            path.head, path.after, path.params = head, after, params
            self._remember(conversation, path)  # type: ignore[arg-type]

    def params(self, top: dict[str, msgspec.Raw], conversation: str | None = None) -> tuple[str, str | None]:
        """The body's fields but `messages`: (small ones as a JSON object, large ones as a
        JSON object of field -> blob id). A large field the conversation's previous request
        sent byte for byte the same (its tool list, say) is not hashed again."""
        small: list[bytes] = []
        blobs: dict[str, int] = {}
        prev = self._paths.get(conversation) if conversation else None
        for k, raw in top.items():
            if k == "messages":
                continue
            data = bytes(raw)
            if len(data) < BLOB_MIN_BYTES:
                small.append(orjson.dumps(k) + b":" + data)
                continue
            same = prev.fields.get(k) if prev is not None else None
            if same is not None and same[0] == data:
                blobs[k] = same[1]
                self.blob_refs[same[1]] = self.blob_refs.get(same[1], 0) + 1
            else:
                blobs[k] = self.blob(data)
            if prev is not None:
                prev.fields[k] = (data, blobs[k])
        text = self.redact((b"{" + b",".join(small) + b"}").decode("utf-8", "replace"))
        return text, (orjson.dumps(blobs).decode() if blobs else None)

    def blob(self, data: bytes) -> int:
        h = blob_hash(data)
        bid = self._blobs.get(h)
        if bid is None:
            row = self.conn.execute(FIND_BLOB, (h,)).fetchone()
            if row is None:
                bid = self._blob_id()
                self.blob_rows.append((bid, h, self.redact(data.decode("utf-8", "replace"))))
            else:
                bid = row[0]
            self._blobs[h] = bid
            if len(self._blobs) > 10_000:
                self._blobs.popitem(last=False)
        self.blob_refs[bid] = self.blob_refs.get(bid, 0) + 1
        return bid

    def _resend(self, array: bytes, prev: _Path | None) -> tuple[int, list[bytes]]:
        """How many of the previous request's messages this `messages` array starts with,
        and the messages after them, unread. A client that resends its history writes
        it the same way each time: when the array extends the previous one byte for
        byte, only the new tail is scanned."""
        if prev is not None and prev.raws:
            head = prev.array.rstrip()[:-1].rstrip()  # without its closing bracket
            if len(array) > len(head) and array.startswith(head):
                tail = array[len(head) :].lstrip()
                if tail.startswith(b","):
                    return len(prev.raws), [bytes(r) for r in _RAW_LIST.decode(b"[" + tail[1:])]
        raws = [bytes(r) for r in _RAW_LIST.decode(array)]
        k = 0
        if prev is not None:
            n = min(len(prev.raws), len(raws))
            while k < n and raws[k] == prev.raws[k]:
                k += 1
        return k, raws[k:]

    def place(self, array: bytes, conversation: str | None, known: tuple[int, list[bytes]] | None = None, root: bytes = b"") -> Placed:
        """Put a request's `messages` (the array as sent) in the tree; `conversation` (a
        session id) names where its previous request's resolution is remembered; `known`:
        how many of its messages the previous request's start with, and the others, when
        the caller has found them; `root`: the parent key of its first message."""
        placed = Placed()
        prev = self._paths.get(conversation) if conversation else None
        k, new = known if known is not None else self._resend(array, prev)
        if prev is not None and k:
            raws, keys, ids = prev.raws[:k], prev.keys[:k], prev.ids[:k]
            assistants, last_user = prev.assistants[:k], prev.last_user[:k]
            overrides = {i: v for i, v in prev.overrides.items() if i < k}
        else:
            raws, keys, ids, assistants, last_user, overrides = [], [], [], [], [], {}
        for i, raw in enumerate(new, start=k):
            m = orjson.loads(raw)  # a message nested past orjson's depth: ValueError
            if not isinstance(m, dict):
                raise ValueError(f"message {i} is not an object")
            nid, key, same = self.node(ids[-1] if ids else None, keys[-1] if keys else root, m, placed, f"messages[{i}]")
            if not same:
                overrides[i] = m
            raws.append(raw)
            keys.append(key)
            ids.append(nid)
            role = m.get("role")
            assistants.append((assistants[-1] if assistants else 0) + (role == "assistant"))
            last_user.append(nid if role == "user" else (last_user[-1] if last_user else 0))
        if ids:
            placed.tip, placed.tip_key = ids[-1], keys[-1]
            placed.prompt = last_user[-1] or None
            placed.turn = assistants[-1] + 1
        placed.overrides = overrides
        if conversation:
            old = self._paths.pop(conversation, None)
            if old is not None:
                self._path_bytes -= old.size()
            path = _Path(array, raws, keys, ids, assistants, last_user, overrides, old.fields if old else {})
            self._remember(conversation, path)
        return placed

    def _remember(self, conversation: str, path: _Path) -> None:
        self._paths[conversation] = path
        self._path_bytes += path.size()
        while self._path_bytes > CONVERSATION_CACHE_BYTES and self._paths:
            _, gone = self._paths.popitem(last=False)
            self._path_bytes -= gone.size()

    def reply(self, placed: Placed, message: dict[str, Any], where: str) -> tuple[int, bool]:
        """The reply's node under the request's tip, and whether its stored body is this
        message exactly (if not, the response keeps the message itself)."""
        nid, _, same = self.node(placed.tip, placed.tip_key, message, placed, where, reply=True)
        return nid, same


def _extension(body: bytes, prev: _Path) -> list[bytes] | None:
    """The messages `body` adds at the end of `prev`'s array, when it is `prev`'s body
    byte for byte around a longer array ([] when it is `prev`'s body itself; None
    otherwise). Only the new messages are read:
    `[` + them + `]` decoding as a non-empty list makes the whole body the same valid JSON
    object with a longer `messages` value."""
    head, after = prev.head, prev.after
    if not head or not prev.raws:
        return None
    if len(body) == len(head) + len(prev.array) + len(after) and body == head + prev.array + after:
        return []  # the same body again (a retry, a regenerated reply): nothing new
    inner = prev.array.rstrip()[:-1].rstrip()  # the array without its closing bracket
    start, end = len(head) + len(inner), len(body) - len(after)
    if end <= start or not body.startswith(head) or not body.startswith(inner, len(head)) or not body.endswith(after):
        return None
    middle = body[start:end].strip()
    if not middle.startswith(b",") or not middle.endswith(b"]"):
        return None
    try:
        new = [bytes(r) for r in _RAW_LIST.decode(b"[" + middle[1:])]
    except (msgspec.DecodeError, RecursionError):
        return None
    return new or None


def split_body(body: bytes) -> tuple[dict[str, msgspec.Raw], bytes] | None:
    """A chat request body as its top-level fields and its `messages` array, unread; None
    when it is not an object with a list of messages."""
    try:
        top = _RAW_OBJECT.decode(body)
    except (msgspec.DecodeError, TypeError, ValueError, RecursionError):  # deeper than msgspec reads
        return None
    raw = top.get("messages")
    if raw is None:
        return None
    array = bytes(raw)
    return (top, array) if array.startswith(b"[") else None
