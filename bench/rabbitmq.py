"""The raw aio-pika baselines on RabbitMQ, and the queues they run on.

They do what bridge does on the wire and nothing more: publish persistent, mandatory messages to
the `bridge.jobs` exchange on a channel with publisher confirms; consume with manual acks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench.common import SCHEMAS, BenchError, Clock, Timing, timed_windows, timeout_for
from bridge import Bridge
from bridge.transports.base import dlq_name

EXCHANGE = "bridge.jobs"  # bridge's exchange with the default prefix
PREFETCH = 100


async def create_queues(url: str, queues: Sequence[str]) -> None:
    """Bridge's topology for `queues`: quorum queues (and their .dlq) bound to `bridge.jobs`."""
    async with Bridge(broker=url, registry=str(SCHEMAS)) as app:
        await app.apply_topology(queues)


async def delete_queues(url: str, queues: Sequence[str]) -> None:
    """Delete `queues` and their dead-letter queues, whatever they still hold."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)
            await channel.queue_delete(dlq_name(name))


async def raw_publish(url: str, queue: str, bodies: Sequence[bytes], in_flight: int) -> Timing:
    """Publish `bodies` to `queue`, `in_flight` awaited together (1: each confirm in turn)."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(EXCHANGE)

        async def publish(n: int) -> None:
            message = aio_pika.Message(bodies[n], delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, routing_key=queue, mandatory=True)

        return await timed_windows(len(bodies), in_flight, publish)


async def raw_consume(url: str, queue: str, jobs: int) -> Timing:
    """Consume and ack `jobs` messages from `queue`, prefetch PREFETCH, from first to last ack."""
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
        await channel.set_qos(prefetch_count=PREFETCH)
        source = await channel.declare_queue(queue, passive=True)
        tag = await source.consume(on_message)
        try:
            await asyncio.wait_for(done.wait(), timeout_for(jobs))
        except TimeoutError:
            raise BenchError(f"raw consume of {queue}: {clock.count} of {jobs} in time") from None
        await source.cancel(tag)
    return clock.timing()
