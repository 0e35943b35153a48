"""The SSE parser: the same events whatever way the bytes are split."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from provider_router.sse import SSEEvent, SSEParser, encode_event

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40)


def _parse(data: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser, out, prev = SSEParser(), [], 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        out += parser.feed(data[prev:cut])
        prev = cut
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(texts, min_size=1, max_size=8), st.lists(st.integers(0, 10_000), max_size=30), st.sampled_from(["\n", "\r\n", "\r"]))
def test_any_split_gives_the_same_events(payloads: list[str], cuts: list[int], eol: str) -> None:
    """Events split at arbitrary byte boundaries (inside UTF-8, inside line endings) parse whole."""
    data = "".join(f"data: {p}{eol}{eol}" for p in payloads).encode()
    assert [e.data for e in _parse(data, cuts)] == payloads


@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=20))
def test_garbage_never_raises(data: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes never make the parser raise."""
    assert isinstance(_parse(data, cuts), list)


def test_fields_comments_and_multiline_data() -> None:
    """`event:`/`id:` are kept, comments ignored, several `data:` lines join with newlines."""
    p = SSEParser()
    events = p.feed(b": keep-alive\n\nevent: x\nid: 7\ndata: a\ndata: b\n\ndata: tail")
    assert events == [SSEEvent("a\nb", "x", "7")]
    assert p.pending
    assert encode_event(b'{"a":1}') == b'data: {"a":1}\n\n'
