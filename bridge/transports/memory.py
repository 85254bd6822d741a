"""An in-process transport for users' unit tests and fast checks; never the proof of a broker.

Queues are deques shared by every event loop of the process (the sync API runs on its own loop
thread), so access goes through one lock and consumers are woken thread-safely. Delayed
messages wait in a heap until the clock (which a test may replace) reaches their time; as on a
broker, each waits in a delay tier (the longest not past its delay), so a job due later than
that comes back early and the worker sends it round again: a unit test sees the hops it would
see on Kafka or RabbitMQ. A delay shorter than every tier, which a broker's queue would hand
the worker at once to wait out, waits here by the clock too.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace

from bridge.envelope import now_ms
from bridge.errors import PublishError
from bridge.names import is_dead_letters
from bridge.policy import tier_for
from bridge.transports.base import (
    Decide,
    Delivery,
    InFlight,
    Outgoing,
    Process,
    SweepStopped,
    dlq_name,
    tier_names,
    unheard,
)


class MemoryTransport:
    """Queues in memory with at-least-once settling: unsettled deliveries go back on stop."""

    name = "memory"

    def __init__(
        self, clock: Callable[[], int] = now_ms, tiers: tuple[float, ...] = (), prefix: str = "bridge"
    ) -> None:
        self.clock = clock
        self._tiers = tiers  # seconds; none: a delay is held as given
        self._tier_names = tier_names(prefix)
        self._delayed: list[tuple[int, int, Outgoing]] = []  # (due ms, sequence, message)
        self._sequence = itertools.count()
        self._queues: dict[str, deque[Outgoing]] = {}
        self._lock = threading.Lock()
        self._wakeups: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._unsettled: dict[int, dict[int, Delivery]] = {}  # a delivery's id -> its consume's `held`

    async def connect(self) -> None:
        """Nothing to reach."""

    async def close(self) -> None:
        """Nothing to release; the queues stay for inspection."""

    def messages(self, queue: str) -> list[bytes]:
        """The bodies waiting in `queue`, oldest first."""
        with self._lock:
            return [m.body for m in self._queues.get(queue, ())]

    def delayed(self) -> int:
        """How many messages wait for their time."""
        with self._lock:
            return len(self._delayed)

    def held(self, delivery: Delivery) -> bool:
        return True

    async def missing(self, queues: Collection[str]) -> list[str]:
        """Dead-letter queues: any other queue is made by the first message published to it."""
        return [name for name in queues if is_dead_letters(name)]

    async def publish(self, message: Outgoing) -> None:
        if self._tier_names.fullmatch(message.queue):  # (as the brokers' transports refuse it)
            raise PublishError(
                f"queue {message.queue} is a delay tier, not a queue: enqueue the job to its own queue",
                retriable=False,
            )
        with self._lock:
            wait_s = message.delay_s
            if wait_s and self._tiers:  # (held as it is if shorter than every tier, by the clock)
                wait_s = tier_for(wait_s, self._tiers) or wait_s
            if wait_s:
                due = self.clock() + int(wait_s * 1000)
                heapq.heappush(self._delayed, (due, next(self._sequence), replace(message, delay_s=None)))
            else:
                self._queues.setdefault(message.queue, deque()).append(message)
            wakeups = list(self._wakeups)
        for loop, event in wakeups:
            loop.call_soon_threadsafe(event.set)

    async def settle(self, delivery: Delivery, publish: Sequence[Outgoing] = ()) -> bool:
        for message in publish:
            await self.publish(message)
        with self._lock:
            held = self._unsettled.pop(id(delivery), None)
            if held is not None:
                held.pop(id(delivery), None)
        return True

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
        inflight = InFlight(process, concurrency)
        wakeup = (asyncio.get_running_loop(), asyncio.Event())
        held: dict[int, Delivery] = {}  # what this consume was given and has not settled
        with self._lock:
            self._wakeups.append(wakeup)
        try:
            await self._feed(queues, inflight, wakeup[1], stop, burst, held)
        finally:
            with self._lock:
                self._wakeups.remove(wakeup)
            await inflight.finish(grace_s)
            self._return_unsettled(held)

    def _return_unsettled(self, held: dict[int, Delivery]) -> None:
        # Like a broker: what this consumer was given but never settled is delivered again,
        # first, in the order it was given (another consume's is still its own).
        with self._lock:
            for delivery in reversed(held.values()):
                self._unsettled.pop(id(delivery), None)
                self._queues[delivery.queue].appendleft(delivery.handle)
            held.clear()

    async def _feed(
        self,
        queues: Sequence[str],
        inflight: InFlight,
        wakeup: asyncio.Event,
        stop: asyncio.Event,
        burst: bool,
        held: dict[int, Delivery],
    ) -> None:
        while not stop.is_set():
            if not inflight.has_room():
                await inflight.wait_for_room(0.1)  # then look at `stop` again
                continue
            delivery = self._pop(queues, held)
            if delivery is not None:
                inflight.start(delivery)
                continue
            if burst and not inflight and not self.delayed():
                return
            wakeup.clear()
            waiters = [asyncio.ensure_future(wakeup.wait()), asyncio.ensure_future(stop.wait())]
            # A settle may publish nothing and the clock moves on its own: look again soon.
            timeout = 0.01 if burst or self.delayed() else None
            await asyncio.wait(waiters, timeout=timeout, return_when="FIRST_COMPLETED")
            for waiter in waiters:
                waiter.cancel()

    def _pop(self, queues: Sequence[str], held: dict[int, Delivery]) -> Delivery | None:
        with self._lock:
            now = self.clock()
            while self._delayed and self._delayed[0][0] <= now:
                _, _, due = heapq.heappop(self._delayed)
                self._queues.setdefault(due.queue, deque()).append(due)
            for queue in queues:
                pending = self._queues.get(queue)
                if pending:
                    message = pending.popleft()
                    delivery = Delivery(message.body, queue, message.key, handle=message)
                    self._unsettled[id(delivery)] = held
                    held[id(delivery)] = delivery
                    return delivery
        return None

    async def apply_topology(self, queues: Sequence[str], *, dry_run: bool = False) -> list[str]:
        names = [name for queue in queues for name in (queue, dlq_name(queue))]
        if not dry_run:
            with self._lock:
                for name in names:
                    self._queues.setdefault(name, deque())
        return [f"memory: queue {name}" for name in names]

    async def browse(self, queue: str) -> list[bytes]:
        return self.messages(queue)

    async def sweep(self, queue: str, decide: Decide, removed: Callable[[], None] = unheard) -> int:
        with self._lock:
            pending = list(self._queues.get(queue, ()))
        count = 0
        for message in pending:
            try:
                publish = await decide(message.body, message.key)
            except SweepStopped:
                break
            if publish is None:
                continue
            for outgoing in publish:
                await self.publish(outgoing)
            with self._lock:
                self._queues[queue].remove(message)
            count += 1
            removed()
        return count
