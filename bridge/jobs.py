"""What a handler is and what it is told about its job."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bridge.envelope import LONGEST_S, Envelope, JobError
from bridge.errors import Permanent
from bridge.idempotency import DEFAULT_LEASE_S, DEFAULT_WINDOW_S
from bridge.policy import RetryPolicy


class JobContext:
    """What a handler knows about the job it runs: a read-only view of the job's envelope.

    A view rather than a copy: it is made for every job, and copying ten fields into a frozen
    record cost more than some handlers do.
    """

    __slots__ = ("_envelope", "_inbox")

    def __init__(
        self, envelope: Envelope, inbox: Callable[[], AbstractAsyncContextManager[Any]] | None = None
    ) -> None:
        self._envelope = envelope
        self._inbox = inbox

    @property
    def job_id(self) -> str:
        return self._envelope.id

    @property
    def type(self) -> str:
        return self._envelope.type

    @property
    def queue(self) -> str:
        return self._envelope.queue

    @property
    def attempt(self) -> int:
        """1 for the first run, 2 for the first retry, ..."""
        return self._envelope.attempt

    @property
    def headers(self) -> Mapping[str, str]:
        """A copy: a handler's write went into the job's retry, or, not a string, failed it
        every time before its attempt was counted."""
        return dict(self._envelope.headers)

    @property
    def key(self) -> str | None:
        return self._envelope.key

    @property
    def idempotency_key(self) -> str | None:
        return self._envelope.idempotency_key

    @property
    def created_at_ms(self) -> int:
        """When the job was enqueued, in epoch milliseconds as in the envelope."""
        return self._envelope.created_at

    @property
    def errors(self) -> Sequence[JobError]:
        """One per earlier failed attempt (capped)."""
        return tuple(self._envelope.errors)

    @property
    def created_at(self) -> datetime:
        """When the job was enqueued; ValueError for a time a datetime cannot hold (years 1 to
        9999), which another producer may have written: `created_at_ms` has it as it came."""
        try:
            return datetime.fromtimestamp(self._envelope.created_at / 1000, UTC)
        except (ValueError, OverflowError, OSError) as exc:
            raise ValueError(
                f"job {self.job_id}'s created_at, {self._envelope.created_at} ms, is not a time a "
                f"datetime holds ({exc}): read ctx.created_at_ms"
            ) from None

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        """The inbox: a transaction of the idempotency store in which the job's key completes.

        `async with ctx.transaction() as db:` gives the store's own handle (a psycopg
        connection, a sqlite3 connection, or a Redis command recorder); writes made through it
        and the key's completion commit together or not at all. Jobs with an idempotency key
        only, in async handlers: otherwise it raises `Permanent`, as every retry would too.
        """
        if self._inbox is None:
            raise Permanent(f"ctx.transaction() needs an idempotency key on the job ({self.type})")
        if not _in_event_loop():  # a plain `def` handler, in one of the worker's threads
            raise Permanent(f"ctx.transaction() needs an `async def` handler ({self.type})")
        return self._inbox()

    def __repr__(self) -> str:
        return f"JobContext(job_id={self.job_id!r}, type={self.type!r}, attempt={self.attempt})"


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


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
    timeout_s: float | None = None  # how long a run may take before it is stopped; None: no limit

    def problems(self) -> list[str]:
        """Every way this job's settings cannot work, for reporting at start."""
        problems = self.policy.problems(self.type)
        if not callable(self.func):
            problems.append(f"{self.type}: the handler must be a function, not {self.func!r}")
        elif (takes := _parameters(self.func)) is not None:
            problems.append(f"{self.type}: the handler must take (payload, ctx), not {takes}")
        durations: list[tuple[str, float | None]] = [
            ("idempotency_ttl_s", self.idempotency_ttl_s), ("idempotency_lease_s", self.idempotency_lease_s),
        ]  # fmt: skip
        if self.timeout_s is not None:
            durations.append(("timeout_s", self.timeout_s))
        for name, seconds in durations:
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                problems.append(f"{self.type}: {name} must be a number of seconds, not {seconds!r}")
            elif not 0.001 <= seconds <= LONGEST_S:  # (NaN too; the SQL stores count whole ms)
                limits = "must be from 1 ms to 100 years"
                problems.append(f"{self.type}: {name} {limits}, not {seconds!r}")
        return problems


def _parameters(func: Callable[..., Any]) -> str | None:
    """`func`'s parameters if a worker cannot call it with a payload and a context (every one
    of its jobs would fail, retry and be dead-lettered); None if it can, or cannot be told."""
    try:
        # (not the function a functools.wraps decorator wraps: the wrapper is what is called)
        signature = inspect.signature(func, follow_wrapped=False)
    except Exception:  # (some built-in and C functions have none to read; an annotation may fail)
        return None
    try:
        signature.bind(None, None)
    except TypeError:
        parameters = [p.replace(annotation=p.empty) for p in signature.parameters.values()]
        return str(signature.replace(parameters=parameters, return_annotation=signature.empty))
    return None
