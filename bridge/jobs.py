"""What a handler is and what it is told about its job."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bridge.envelope import JobError
from bridge.errors import ConfigError
from bridge.idempotency import DEFAULT_LEASE_S, DEFAULT_WINDOW_S
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
    inbox: Callable[[], AbstractAsyncContextManager[Any]] | None = field(default=None, repr=False)

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        """The inbox: a transaction of the idempotency store in which the job's key completes.

        `async with ctx.transaction() as db:` gives the store's own handle (a psycopg
        connection, a sqlite3 connection, or a Redis command recorder); writes made through it
        and the key's completion commit together or not at all. Jobs with an idempotency key only.
        """
        if self.inbox is None:
            raise ConfigError(f"ctx.transaction() needs an idempotency key on the job ({self.type})")
        return self.inbox()

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
    idempotency_ttl_s: float = DEFAULT_WINDOW_S  # how long a key stays done after its job succeeded
    idempotency_lease_s: float = DEFAULT_LEASE_S  # a claim's lease, renewed while the handler runs

    def problems(self) -> list[str]:
        """Every way this job's settings cannot work, for reporting at start."""
        problems = self.policy.problems(self.type)
        for name, seconds in (("idempotency_ttl_s", self.idempotency_ttl_s),
                              ("idempotency_lease_s", self.idempotency_lease_s)):  # fmt: skip
            if not seconds > 0:
                problems.append(f"{self.type}: {name} must be above zero")
        return problems
