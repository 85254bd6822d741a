"""Read what a queue holds straight from the broker, with each vendor's own client.

Test-side only: the assertions look at the broker itself, not through bridge's transports.
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bridge import Bridge, codec, testing
from bridge.envelope import DeadLetter
from bridge.registry import DEAD_LETTER
from bridge.transports import dlq_name


def read_queue(app: Bridge, queue: str) -> list[bytes]:
    """Every message body in `queue` (consumed, on RabbitMQ)."""
    url = app.settings.require_broker()
    if url.startswith("memory://"):
        return testing.memory_transport(app).messages(queue)
    if url.startswith("kafka"):
        return _read_topic(url.partition("://")[2], queue)
    return asyncio.run(_drain_rabbit_queue(url, queue))


def dead_letters(app: Bridge, queue: str) -> list[DeadLetter]:
    """The dead letters of `queue`, decoded."""
    schema = app.registry.schema(DEAD_LETTER)
    bodies = read_queue(app, dlq_name(queue))
    return [DeadLetter.from_avro(codec.decode(body, app.registry, schema)[1]) for body in bodies]


def _read_topic(bootstrap: str, topic: str) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        bodies: list[tuple[int, int, bytes]] = []
        remaining = {p for p, end in ends.items() if end > 0}
        while remaining:
            record = consumer.poll(10)
            assert record is not None, f"timed out reading {topic}"
            if record.error():
                continue
            partition, offset = record.partition(), record.offset()
            assert partition is not None and offset is not None
            bodies.append((record.timestamp()[1], offset, record.value() or b""))
            if offset + 1 >= ends[partition]:
                remaining.discard(partition)
        return [body for _, _, body in sorted(bodies)]
    finally:
        consumer.close()


async def _drain_rabbit_queue(url: str, queue: str) -> list[bytes]:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        bodies = []
        while (message := await declared.get(fail=False)) is not None:
            bodies.append(message.body)
            await message.ack()
        return bodies
    finally:
        await connection.close()
