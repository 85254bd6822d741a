"""The narrow interface every broker implements: move bytes, and settle a delivery.

Transports know nothing of envelopes, handlers or retry policy. The worker hands a transport a
`process` callback; the transport feeds it deliveries with bounded concurrency and the worker
settles each one with `settle`, naming the messages that must be published before (or, on
Kafka later, atomically with) the acknowledgement: a dead letter, a retry, a delay hop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge.policy import tier_name


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish to `queue`; with `delay_s`, through the delay tier that fits it."""

    queue: str
    body: bytes
    key: str | None = None
    delay_s: float | None = None


@dataclass(slots=True, eq=False)
class Delivery:
    """One consumed message and where it came from."""

    body: bytes
    queue: str  # the queue or topic it was consumed from
    key: str | None = None
    partition: int | None = None
    offset: int | None = None
    redelivered: bool = False
    handle: Any = field(default=None, repr=False)  # the transport's own token for settling


Process = Callable[[Delivery], Awaitable[None]]
Decide = Callable[[bytes], Awaitable[Sequence["Outgoing"] | None]]


def dlq_name(queue: str) -> str:
    """The dead-letter queue or topic of `queue`."""
    return f"{queue}.dlq"


def tier_queue(prefix: str, tier_s: float) -> str:
    """The queue or topic of a delay tier: `<prefix>.delay.<tier>`, e.g. bridge.delay.30s."""
    return f"{prefix}.delay.{tier_name(tier_s)}"


class Transport(Protocol):
    """A broker connection for one event loop."""

    name: str  # "kafka", "rabbitmq" or "memory"

    async def connect(self) -> None:
        """Reach the broker, or raise TransportError saying what to fix."""

    async def close(self) -> None:
        """Flush and release everything; safe to call twice."""

    async def publish(self, message: Outgoing) -> None:
        """Publish and return once the broker acknowledged it (raises PublishError)."""

    async def settle(self, delivery: Delivery, publish: Sequence[Outgoing] = ()) -> None:
        """Publish `publish`, then mark `delivery` done so it is never delivered again."""

    async def consume(
        self,
        queues: Sequence[str],
        process: Process,
        *,
        concurrency: int,
        stop: asyncio.Event,
        burst: bool = False,
        grace_s: float = 30.0,
    ) -> None:
        """Feed deliveries to `process`, at most `concurrency` at once, until `stop` is set.

        With `burst`, also return once the queues are drained and nothing is in flight. On
        stop, fetch nothing more and wait up to `grace_s` for in-flight deliveries; those not
        settled by then are left to be redelivered.
        """

    async def apply_topology(self, queues: Sequence[str], *, dry_run: bool = False) -> list[str]:
        """Create the queues (and their dead-letter queues) idempotently; return the plan."""

    async def browse(self, queue: str) -> list[bytes]:
        """The bodies waiting in `queue`, oldest first, left where they are (for the DLQ tools)."""

    async def sweep(self, queue: str, decide: Decide) -> int:
        """Offer each message of `queue` once to `decide`; return how many it removed.

        `decide` returns None to leave a message, or the messages to publish (confirmed)
        before it is removed; an empty list removes it. On Kafka a removed record stays in the
        log but is marked done, so no later sweep or browse sees it again.
        """


class InFlight:
    """The deliveries being processed: at most `limit` at once, awaited on stop."""

    def __init__(self, process: Process, limit: int) -> None:
        self._process = process
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def has_room(self) -> bool:
        """Whether a delivery could start now without waiting."""
        return not self._slots.locked()

    async def wait_for_room(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a free slot; return whether there is one."""
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout_s)
        except TimeoutError:
            return False
        self._slots.release()
        return True

    async def start(self, delivery: Delivery) -> None:
        """Wait for a free slot, then process `delivery` in its own task."""
        await self._slots.acquire()
        task = asyncio.create_task(self._run(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, delivery: Delivery) -> None:
        try:
            await self._process(delivery)
        finally:
            self._slots.release()

    async def run(self, delivery: Delivery) -> None:
        """Wait for a free slot, then process `delivery` in the calling task."""
        await self._slots.acquire()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._process(delivery)
        finally:
            self._tasks.discard(task)
            self._slots.release()

    async def finish(self, grace_s: float) -> int:
        """Wait up to `grace_s` for in-flight work; cancel the rest and return how many."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        late = list(self._tasks)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        return len(late)
