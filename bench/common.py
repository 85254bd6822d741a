"""What every benchmark shares: the no-op job, fresh names, timing, and the bridge side of a run.

Each measurement's apps run under a prefix of their own (`fresh_prefix`), never the default
`bridge`: delayed jobs left in the shared tiers would keep a burst consume waiting, and on Kafka
the delay forwarder would join the shared `bridge.delay` group.

The bridge side is the same code on both brokers (a `Bridge` app with an `async def` no-op
handler); only the raw baselines differ per broker, in `bench.rabbitmq` and `bench.kafka`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge import Bridge, JobContext, codec
from bridge.registry import ENVELOPE
from bridge.transports.base import Outgoing, dlq_name

SCHEMAS = Path(__file__).resolve().parent / "schemas"
JOB_TYPE = "bench.Noop"
IN_FLIGHT = 1000  # publishes awaited together by the windowed publish measurements


class BenchError(Exception):
    """A measurement could not complete (lost jobs, a timeout): its number would be wrong."""


@dataclass(frozen=True)
class Timing:
    """How many jobs a measurement moved and how long that took."""

    jobs: int
    seconds: float

    @property
    def rate(self) -> float:
        """Jobs per second."""
        return self.jobs / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Clock:
    """First-to-last timing of a consumer: starts at the first delivery, ends at the last settle."""

    count: int = 0
    first_s: float = 0.0
    last_s: float = 0.0

    def started(self) -> None:
        """Note a delivery arriving (only the first one counts)."""
        if not self.first_s:
            self.first_s = time.monotonic()

    def settled(self, count: int = 1) -> None:
        """Note `count` deliveries settled just now."""
        self.count += count
        self.last_s = time.monotonic()

    def timing(self) -> Timing:
        return Timing(self.count, self.last_s - self.first_s)


def fresh(role: str) -> str:
    """A queue, topic or group name no earlier run used."""
    return f"bench-{role}-{uuid.uuid4().hex[:10]}"


def fresh_prefix() -> str:
    """A topology prefix no earlier run used: its own jobs exchange, delay tiers and forwarder group.

    Not `p<hex>.`: the tests' clean-up deletes names of that shape (tests/brokerio.py).
    """
    return f"bench{uuid.uuid4().hex[:8]}"


def warm_up_queue(queue: str) -> str:
    """Where a publisher sends one message before its clock starts: `queue`'s dead-letter queue.

    A new idempotent librdkafka producer sometimes holds its first message for ~0.5 s (it retries
    getting a producer id on a 500 ms timer), which would swamp a measurement of a second or two.
    Sending the warm-up elsewhere leaves exactly N jobs in `queue` for the consume measurements.
    """
    return dlq_name(queue)


def timeout_for(jobs: int) -> float:
    """A generous bound for moving `jobs` jobs, so a lost job fails the run instead of hanging it."""
    return 60.0 + jobs / 200


async def noop(payload: dict[str, Any], ctx: JobContext) -> None:
    """The handler of every benchmark job: nothing, so what is measured is the machinery."""


def bench_app(
    broker: str,
    queue: str,
    *,
    prefix: str,
    concurrency: int = 16,
    group: str | None = None,
    handler: Callable[[dict[str, Any], JobContext], Awaitable[None]] = noop,
    **settings: Any,
) -> Bridge:
    """A Bridge on `broker` under `prefix` whose handler (the no-op) runs `queue`, in a consumer
    group of its own."""
    group = group or fresh("group")
    app = Bridge(
        broker=broker, registry=str(SCHEMAS), prefix=prefix, group=group, concurrency=concurrency, **settings
    )
    app.job(JOB_TYPE, queue=queue)(handler)
    return app


def envelope_bodies(broker: str, queue: str, jobs: int) -> list[bytes]:
    """`jobs` framed bridge envelopes, byte for byte what `enqueue` would publish to `queue`."""
    app = bench_app(broker, queue, prefix=fresh_prefix())  # (never connects: any prefix will do)
    schema = app.registry.schema(ENVELOPE)
    return [codec.encode(schema, app.build_envelope(JOB_TYPE, {"n": n}).to_avro()) for n in range(jobs)]


def envelope_reader_schema() -> Any:
    """fastavro's parsed `bridge.JobEnvelope`, exactly as bridge's own decoder uses it."""
    return Bridge(registry=str(SCHEMAS)).registry.schema(ENVELOPE).parsed


async def timed_windows(jobs: int, window: int, publish: Callable[[int], Awaitable[object]]) -> Timing:
    """Call `publish(n)` for each job, `window` at a time, each window awaited in full."""
    started = time.monotonic()
    for start in range(0, jobs, window):
        await asyncio.gather(*(publish(n) for n in range(start, min(start + window, jobs))))
    return Timing(jobs, time.monotonic() - started)


async def bridge_publish(broker: str, queue: str, jobs: int, *, prefix: str) -> Timing:
    """`enqueue_async` of `jobs` no-op jobs, IN_FLIGHT at a time, onto a queue it creates first."""
    async with bench_app(broker, queue, prefix=prefix) as app:
        await app.apply_topology()  # also connects: the clock starts on a running service
        # (Through the transport: an enqueue to a dead-letter queue is refused, by its name.)
        warm_up = app.build_envelope(JOB_TYPE, {"n": -1}, queue=queue)
        body = codec.encode(app.registry.schema(ENVELOPE), warm_up.to_avro())
        await (await app.transport()).publish(Outgoing(warm_up_queue(queue), body, None))
        return await timed_windows(jobs, IN_FLIGHT, lambda n: app.enqueue_async(JOB_TYPE, {"n": n}))


async def bridge_consume(broker: str, queue: str, jobs: int, concurrency: int, *, prefix: str) -> Timing:
    """`consume(burst=True)` of a queue holding `jobs` jobs, from its first delivery to its last settle.

    Starting the clock at the first delivery leaves out connecting and, on Kafka, joining the group.
    """
    async with bench_app(broker, queue, prefix=prefix, concurrency=concurrency) as app:
        stats = await asyncio.wait_for(app.consume(burst=True), timeout_for(jobs))
    if stats.processed != jobs or stats.dead_lettered:
        raise BenchError(
            f"bridge consume of {queue}: {stats.processed} settled "
            f"({stats.dead_lettered} dead-lettered), expected {jobs}"
        )
    return Timing(stats.processed, stats.last_s - stats.first_s)
