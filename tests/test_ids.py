"""Request ids (`records.new_id`): 28 hex digits that sort in creation order."""

from __future__ import annotations

import time

from provider_router.records import new_id


def test_ids_sort_in_creation_order_within_a_millisecond() -> None:
    """Many ids made at once (far more than one millisecond's 65,536 sequence numbers) are
    distinct, 28 lower-case hex digits each, and sort as they were made; the first 12
    digits are the millisecond they were made in (or a later one, past a full sequence)."""
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(70_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 28 and int(i, 16) >= 0 and i == i.lower() for i in ids)
    assert int(ids[0][:12], 16) >= before
