"""What a handler's JobContext tells it about its job."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bridge import JobContext
from bridge.envelope import Envelope


def context(created_at: int) -> JobContext:
    return JobContext(Envelope(id="j-1", type="test.Echo", payload=b"", queue="q", created_at=created_at))


def test_created_at_is_the_envelope_time_as_a_datetime() -> None:
    ctx = context(1_733_000_000_123)
    assert ctx.created_at == datetime(2024, 11, 30, 20, 53, 20, 123000, tzinfo=UTC)
    assert ctx.created_at_ms == 1_733_000_000_123


@pytest.mark.parametrize("created_at", [2**62, -(2**62), 253_402_300_800_000])
def test_a_created_at_no_datetime_holds_says_so_and_where_to_read_it(created_at: int) -> None:
    # Given a job from another producer whose created_at is past the years a datetime holds,
    # Then ctx.created_at raises a ValueError naming the job, the value and created_at_ms,
    # And created_at_ms still has it as it came.
    ctx = context(created_at)
    with pytest.raises(ValueError, match=rf"job j-1's created_at, {created_at} ms, .*read ctx.created_at_ms"):
        _ = ctx.created_at
    assert ctx.created_at_ms == created_at
