"""The narrow interface every broker implements: move bytes, and settle a delivery.

Transports know nothing of envelopes, handlers or retry policy. The worker hands a transport a
`process` callback; the transport feeds it deliveries with bounded concurrency and the worker
settles each one with `settle`, naming the messages that must be published before (or, on
Kafka later, atomically with) the acknowledgement: a dead letter, a retry, a delay hop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge.logs import REPEAT_WINDOW_S

# How long `Transport.publish` (an enqueue, a dead-letter replay) waits for the broker to take a
# message before it fails: Kafka's `message.timeout.ms`, RabbitMQ's wait for its confirm.
PUBLISH_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish to `queue`; with `delay_s`, through the delay tier that fits it."""

    queue: str
    body: bytes
    key: str | bytes | None = None  # Kafka's record key (bytes: another producer's, passed on as they came)
    delay_s: float | None = None


@dataclass(slots=True, eq=False)
class Delivery:
    """One consumed message and where it came from."""

    body: bytes
    queue: str  # the queue or topic it was consumed from
    key: str | bytes | None = None  # Kafka's record key, as it came
    partition: int | None = None
    offset: int | None = None
    redelivered: bool = False
    returns: int = 0  # times it came back to its queue unsettled, where the broker counts them
    handle: Any = field(default=None, repr=False)  # the transport's own token for settling


Process = Callable[[Delivery], Awaitable[None]]
# A sweep's choice for one message: its body and its record key (Kafka's; None elsewhere).
Decide = Callable[[bytes, str | bytes | None], Awaitable[Sequence["Outgoing"] | None]]


def cancelled_here() -> bool:
    """Whether the running task was asked to stop (`task.cancel()`), rather than a
    CancelledError having come out of what it awaited (aiormq cancels the calls waiting on a
    connection it finds stuck, for one)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


# The tasks that `InFlight.finish` cut off: the only ones bridge cancels while a handler runs.
_CUT_OFF: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


def cut_off(task: asyncio.Task[Any] | None) -> bool:
    """Whether a stop cut `task` off (`InFlight.finish`). (Only `InFlight.finish` cuts off a
    handler's task in a consume: `asyncio.run`'s cancel of every task left at its end, after a
    consume not awaited, does not count.)"""
    return task is None or task in _CUT_OFF


def unheard() -> None:
    """A sweep's `removed` when nobody asks."""


class SweepStopped(Exception):
    """Raised by a sweep's `decide` to end the sweep there, leaving that message and the rest."""


class BurstWait:
    """Says why a burst run whose queues are drained goes on: delayed jobs in the tiers, which
    every queue under the prefix shares (a job delayed by hours elsewhere holds it for hours).
    Once per REPEAT_WINDOW_S at most."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._said_at: float | None = None

    def delayed(self, what: str) -> None:
        """`what` waits in the tiers: "3 delayed jobs", say."""
        now = time.monotonic()
        if self._said_at is not None and now - self._said_at < REPEAT_WINDOW_S:
            return
        self._said_at = now
        logging.getLogger("bridge.worker").info(
            "burst: the queues are drained, but %s wait in the delay tiers, which every queue"
            " under prefix %r shares; the run ends once they have run",
            what, self.prefix,
        )  # fmt: skip


def dlq_name(queue: str) -> str:
    """The dead-letter queue or topic of `queue`."""
    return f"{queue}.dlq"


def tier_names(prefix: str) -> re.Pattern[str]:
    """What a delay tier's queue or topic, a tier's dead-letter topic or, on RabbitMQ, a tier's
    queue (`.wait`) is called under `prefix`, whatever tiers the settings make: one an earlier
    setting made is a tier all the same. `<prefix>.delay` is bridge's too: on RabbitMQ its
    `.dlq` keeps the delayed jobs whose queue was gone when they were due. (`<prefix>.delay.reports`
    is not one: a job queue may be called so.)"""
    return re.compile(rf"{re.escape(prefix)}\.delay(\.\d+(ms|s|m|h|d)(\.dlq(\.done)?|\.wait)?)?")


class Transport(Protocol):
    """A broker connection for one event loop."""

    name: str  # "kafka", "rabbitmq" or "memory"

    async def connect(self) -> None:
        """Reach the broker, or raise TransportError saying what to fix."""

    async def close(self) -> None:
        """Flush and release everything; safe to call twice."""

    async def publish(self, message: Outgoing) -> None:
        """Publish and return once the broker acknowledged it (raises PublishError)."""

    async def settle(self, delivery: Delivery, publish: Sequence[Outgoing] = ()) -> bool:
        """Publish `publish`, then mark `delivery` done so it is never delivered again. False if
        the broker took `delivery` back first (see `held`), and it comes again: publishing
        nothing, unless it went back after the publish (RabbitMQ: the ack was lost)."""

    def held(self, delivery: Delivery) -> bool:
        """Whether this consumer still holds `delivery`: False once the broker has taken it back
        (its RabbitMQ channel closed, its Kafka partition was revoked), when running its job
        would only run it twice."""

    async def missing(self, queues: Collection[str]) -> list[str]:
        """Those of `queues` that no job can go to (a look at the broker for any not seen before):
        queues that do not exist, dead-letter queues, the delay tiers and on Kafka its own topics."""

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

    async def sweep(self, queue: str, decide: Decide, removed: Callable[[], None] = unheard) -> int:
        """Offer each message of `queue` once to `decide`; return how many it removed.

        `decide` returns None to leave a message, or the messages to publish (confirmed)
        before it is removed; an empty list removes it. On Kafka a removed record stays in the
        log but is marked done, so no later sweep or browse sees it again.

        One message at a time: `removed` is called once the message last offered is removed,
        its publishes confirmed, before the next is offered. (So a tool stopped halfway knows
        what it did.) `decide` may raise SweepStopped to end the sweep early.
        """


class InFlight:
    """The deliveries being processed: at most `limit` at once, awaited on stop.

    `start` queues a delivery for a pool of `limit` long-lived worker tasks rather than creating
    a task per delivery. A worker that takes a delivery while more are waiting wakes one more
    worker before running its own, and `spread` wakes one for each still waiting. So handlers
    that never suspend let one worker run a whole fetched batch in one step, with no task switch
    per job (the largest per-job cost of a fast handler), while handlers that wait on I/O still
    run side by side. `run` processes one in the caller's task (the RabbitMQ transport makes one
    per delivery), once a slot is free; a delivery still waiting for one when `finish` begins is
    left alone, unsettled, for the broker to deliver again. `run_alone` is `run` for a delivery
    that may have stopped the last process that held it: it waits until nothing runs, and
    nothing else starts until it is done.
    """

    def __init__(self, process: Process, limit: int) -> None:
        self._process = process
        self._limit = limit
        self._count = 0  # started and not finished
        self._room = asyncio.Event()  # set while _count < _limit
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._waiting: deque[Delivery] = deque()  # started, not yet taken by a worker
        self._sleepers: deque[asyncio.Future[None]] = deque()  # workers with nothing to do
        self._woken = 0  # sleepers woken that have not run yet
        self._workers: list[asyncio.Task[None]] = []
        self._callers: set[asyncio.Task[Any]] = set()
        self._finishing = False  # `finish` began: `run` starts nothing more
        self._alone = False  # a `run_alone` delivery is running: nothing else starts
        self._in_turn = asyncio.Lock()  # the callers of `run_alone`, one after another

    def __len__(self) -> int:
        return self._count

    def has_room(self) -> bool:
        """Whether a delivery could start now."""
        return self._count < self._limit and not self._alone

    async def wait_for_room(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a free slot; return whether there is one."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), timeout_s)
        return self.has_room()

    def start(self, delivery: Delivery) -> None:
        """Have a worker task process `delivery`; only when `has_room()`."""
        assert self.has_room(), "InFlight.start() with every slot busy"
        self._begin()
        if not self._workers:
            self._workers = [asyncio.create_task(self._work()) for _ in range(self._limit)]
        self._waiting.append(delivery)
        self._wake_one()

    def spread(self) -> None:
        """Wake a worker for every delivery still waiting.

        For a caller that yielded after `start`: deliveries still waiting then mean a handler
        suspended, so the rest should run side by side now (their I/O overlapping, e.g. one
        store transaction for all their idempotency claims) rather than one more per tick.
        """
        for _ in range(min(len(self._waiting) - self._woken, len(self._sleepers))):
            self._wake()

    def _wake_one(self) -> None:
        """Wake a sleeping worker, unless one is already on its way."""
        if not self._woken and self._sleepers:
            self._wake()

    def _wake(self) -> None:
        self._woken += 1
        self._sleepers.popleft().set_result(None)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        # (A cancelled delivery may swallow the CancelledError, a handler's own cleanup that
        # returns; `finish` still waits for this task to end.)
        while not task.cancelling():
            if not self._waiting:
                sleeper = loop.create_future()
                self._sleepers.append(sleeper)
                await sleeper
                self._woken -= 1
                continue
            delivery = self._waiting.popleft()
            if self._waiting:
                self._wake_one()  # should this handler suspend, the next delivery has a worker
            try:
                await self._process(delivery)
            finally:
                self._end()

    async def run(self, delivery: Delivery) -> None:
        """Wait for a free slot, then process `delivery` in the calling task."""
        while not self.has_room() and not self._finishing:
            await self._room.wait()
        if self._finishing:
            return  # shutting down: it was prefetched, not started, and comes back
        await self._run_here(delivery)

    async def run_alone(self, delivery: Delivery) -> None:
        """`run`, once nothing else runs; nothing else starts until it is done."""
        async with self._in_turn:
            while self._count and not self._finishing:
                await self._idle.wait()
            if self._finishing:
                return  # as in `run`
            self._alone = True
            self._room.clear()
            try:
                await self._run_here(delivery)
            finally:  # (`_end` set `_room` already; no one waiting on it runs before this)
                self._alone = False

    async def _run_here(self, delivery: Delivery) -> None:
        """Process `delivery` in the calling task, in a slot of its own."""
        self._begin()
        task = asyncio.current_task()
        assert task is not None
        self._callers.add(task)
        try:
            await self._process(delivery)
        finally:
            self._callers.discard(task)
            self._end()

    def _begin(self) -> None:
        self._count += 1
        self._idle.clear()
        if self._count >= self._limit:
            self._room.clear()

    def _end(self) -> None:
        self._count -= 1
        self._room.set()
        if not self._count:
            self._idle.set()

    async def finish(self, grace_s: float) -> int:
        """Wait up to `grace_s` for in-flight work; cancel the rest and return how many."""
        self._finishing = True
        with suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        late = self._count
        tasks = [*self._workers, *self._callers]
        for task in tasks:
            _CUT_OFF.add(task)
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._workers = []
        self._sleepers.clear()
        self._woken = 0
        return late
