"""The raw aio-pika baselines on RabbitMQ, and the queues they run on.

They do what bridge does on the wire and nothing more: publish persistent, mandatory messages to
the `<prefix>.jobs` exchange on a channel with publisher confirms; consume with manual acks,
holding as many deliveries at once as bridge's consumer does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench.common import SCHEMAS, BenchError, Clock, Timing, timed_windows, timeout_for, warm_up_queue
from bridge import Bridge
from bridge.config import MAX_PREFETCH
from bridge.names import tier_queue
from bridge.policy import DEFAULT_TIERS_S
from bridge.transports.base import dlq_name
from bridge.transports.rabbitmq import PREFETCH_PER_SLOT


def prefetch_for(concurrency: int) -> int:
    """The prefetch of bridge's consumer at `concurrency` (no `prefetch` setting): twice it."""
    return min(max(PREFETCH_PER_SLOT * concurrency, concurrency), MAX_PREFETCH)


def exchange_name(prefix: str) -> str:
    """Bridge's jobs exchange under `prefix`."""
    return f"{prefix}.jobs"


async def create_queues(url: str, queues: Sequence[str], *, prefix: str) -> None:
    """Bridge's topology for `queues` under `prefix`: quorum queues (and their .dlq) bound to
    `<prefix>.jobs`, and the prefix's delay tiers."""
    async with Bridge(broker=url, registry=str(SCHEMAS), prefix=prefix) as app:
        await app.apply_topology(queues)


async def delete_queues(url: str, queues: Sequence[str]) -> None:
    """Delete `queues` and their dead-letter queues, whatever they still hold."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)
            await channel.queue_delete(dlq_name(name))


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete what bridge's topology made for `prefix` beside the queues: the jobs exchange and
    the delay tiers (each a queue and an exchange). Idle quorum queues left behind cost CPU."""
    tiers = [tier_queue(prefix, tier_s) for tier_s in DEFAULT_TIERS_S]
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for name in tiers:
            await channel.queue_delete(name)
        for name in [exchange_name(prefix), *tiers]:
            await channel.exchange_delete(name)


async def raw_publish(
    url: str, queue: str, bodies: Sequence[bytes], in_flight: int, *, prefix: str
) -> Timing:
    """Publish `bodies` to `queue`, `in_flight` awaited together (1: each confirm in turn).

    One message goes to `queue`'s dead-letter queue before the clock starts, as bridge's
    publisher sends one (`bench.common.bridge_publish`): the first confirm is not timed.
    """
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(exchange_name(prefix))

        async def send(body: bytes, routing_key: str) -> None:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, routing_key=routing_key, mandatory=True)

        await send(bodies[0], warm_up_queue(queue))
        return await timed_windows(len(bodies), in_flight, lambda n: send(bodies[n], queue))


async def raw_consume(url: str, queue: str, jobs: int, prefetch: int) -> Timing:
    """Consume and ack `jobs` messages from `queue`, `prefetch` held at once, from first to last ack."""
    clock = Clock()
    done = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        clock.started()
        await message.ack()
        clock.settled()
        if clock.count >= jobs:
            done.set()

    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        source = await channel.declare_queue(queue, passive=True)
        tag = await source.consume(on_message)
        try:
            await asyncio.wait_for(done.wait(), timeout_for(jobs))
        except TimeoutError:
            raise BenchError(f"raw consume of {queue}: {clock.count} of {jobs} in time") from None
        await source.cancel(tag)
    return clock.timing()
