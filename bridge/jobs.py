"""What a handler is and what it is told about its job."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bridge.envelope import JobError
from bridge.policy import RetryPolicy


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a handler knows about the job it runs."""

    job_id: str
    type: str
    queue: str
    attempt: int
    headers: Mapping[str, str]
    key: str | None
    idempotency_key: str | None
    created_at_ms: int  # epoch milliseconds, as in the envelope
    errors: Sequence[JobError] = ()  # one per earlier failed attempt (capped)

    @property
    def created_at(self) -> datetime:
        """When the job was enqueued."""
        return datetime.fromtimestamp(self.created_at_ms / 1000, UTC)


Handler = Callable[[Any, "JobContext"], Any]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A handler bound to a job type and the queue its jobs run on."""

    type: str
    queue: str
    func: Handler
    is_async: bool
    policy: RetryPolicy
