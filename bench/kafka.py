"""The raw confluent-kafka baselines, and the topics they run on.

The producer is configured as bridge's is where it matters (idempotent, acks=all, linger.ms);
the consumer stores offsets by hand (enable.auto.offset.store=false) and lets librdkafka commit
them, as bridge does, and decodes each envelope with the parsed schema bridge's decoder uses.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from fastavro import schemaless_reader

from bench.common import (
    SCHEMAS,
    BenchError,
    Clock,
    Timing,
    envelope_reader_schema,
    fresh,
    timeout_for,
    warm_up_queue,
)
from bridge import Bridge

BATCH = 500  # records per consume() call
HEADER = 10  # C3 01 + 8-byte fingerprint: the single-object framing before the Avro body
POLL_S = 1.0
LINGER_MS = 2  # bridge's producer's (bridge/transports/kafka/transport.py); librdkafka's default is 5


def _servers(url: str) -> str:
    return url.partition("://")[2].rstrip("/")


async def create_topics(url: str, topics: Sequence[str], *, prefix: str) -> None:
    """Bridge's topology for `topics` under `prefix`: each with its .dlq, as many partitions as
    bridge makes, and the prefix's delay tiers."""
    async with Bridge(broker=url, registry=str(SCHEMAS), prefix=prefix) as app:
        await app.apply_topology(topics)


def delete_topics(url: str, topics: Sequence[str]) -> None:
    """Delete `topics` and every topic bridge's topology made for them (`<topic>.dlq`, ...); a
    prefix among them takes its delay tiers (`<prefix>.delay.<tier>`, ...) with it."""
    admin = AdminClient({"bootstrap.servers": _servers(url)})
    existing = admin.list_topics(timeout=10).topics
    names = [name for name in existing if any(name == t or name.startswith(f"{t}.") for t in topics)]
    if not names:
        return
    for future in admin.delete_topics(names, operation_timeout=30).values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise


class Deliveries:
    """The delivery reports of a raw producer: how many came, and the failures among them."""

    def __init__(self) -> None:
        self.count = 0
        self.failed: list[str] = []

    def report(self, err: Any, _: Any) -> None:
        self.count += 1
        if err is not None:
            self.failed.append(err.str())


def ready_producer(url: str, topic: str) -> Producer:
    """An idempotent producer (acks=all, linger.ms as bridge's), connected, `topic` known, and
    one message sent (to `topic`'s dead-letter topic) before any clock starts."""
    producer = Producer(
        {
            "bootstrap.servers": _servers(url),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": LINGER_MS,
        }
    )
    producer.list_topics(topic, timeout=10)
    producer.produce(warm_up_queue(topic), b"warm-up")
    producer.flush(10)
    return producer


def produce(producer: Producer, topic: str, body: bytes, deliveries: Deliveries) -> None:
    """Hand `body` to librdkafka, serving delivery reports while its local queue is full."""
    while True:
        try:
            producer.produce(topic, body, on_delivery=deliveries.report)
            return
        except BufferError:
            producer.poll(0.01)


def raw_publish(url: str, topic: str, bodies: Sequence[bytes]) -> Timing:
    """Produce `bodies` to `topic` without waiting on each; flush() returns once all are acked.

    No window: as many in flight as librdkafka takes. Not what bridge's publish does (see
    `raw_publish_windowed`); shown for what the client alone can do.
    """
    producer, deliveries = ready_producer(url, topic), Deliveries()
    started = time.monotonic()
    for body in bodies:
        produce(producer, topic, body, deliveries)
        producer.poll(0)
    left = producer.flush(timeout_for(len(bodies)))
    seconds = time.monotonic() - started
    if left or deliveries.failed:
        failed = deliveries.failed
        raise BenchError(f"raw produce to {topic}: {left} unflushed, {len(failed)} failed {failed[:1]}")
    return Timing(len(bodies), seconds)


def raw_publish_windowed(url: str, topic: str, bodies: Sequence[bytes], window: int) -> Timing:
    """Produce `bodies` to `topic` `window` at a time, every delivery report of a window served
    before the next begins: what `bench.common.timed_windows` makes bridge's publish do."""
    producer, deliveries = ready_producer(url, topic), Deliveries()
    started = time.monotonic()
    deadline = started + timeout_for(len(bodies))
    for start in range(0, len(bodies), window):
        end = min(start + window, len(bodies))
        for body in bodies[start:end]:
            produce(producer, topic, body, deliveries)
        while deliveries.count < end:  # poll() returns as soon as it served a report
            if time.monotonic() > deadline:
                raise BenchError(f"raw produce to {topic}: {deliveries.count} of {len(bodies)} acked in time")
            producer.poll(POLL_S)
    seconds = time.monotonic() - started
    if deliveries.failed:
        failed = deliveries.failed
        raise BenchError(f"raw produce to {topic}: {len(failed)} failed {failed[:1]}")
    return Timing(len(bodies), seconds)


def noop(record: Any) -> None:
    """The raw consumer's job: nothing."""


def raw_consume(url: str, topic: str, jobs: int) -> Timing:
    """Consume `jobs` records of `topic` in batches: decode, run noop, store the offset of each."""
    reader = envelope_reader_schema()
    consumer = Consumer(
        {
            "bootstrap.servers": _servers(url),
            "group.id": fresh("group"),
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }
    )
    consumer.subscribe([topic])
    clock = Clock()
    deadline = time.monotonic() + timeout_for(jobs)
    try:
        while clock.count < jobs:
            if time.monotonic() > deadline:
                raise BenchError(f"raw consume of {topic}: {clock.count} of {jobs} in time")
            records = consumer.consume(BATCH, POLL_S)
            if not records:
                continue
            clock.started()
            for record in records:
                if record.error() is not None:
                    raise BenchError(f"raw consume of {topic}: {record.error()}")
                noop(fastavro_read(record.value() or b"", reader))
                consumer.store_offsets(message=record)
            clock.settled(len(records))
    except KafkaException as exc:
        raise BenchError(f"raw consume of {topic}: {exc}") from exc
    finally:
        consumer.close()
    return clock.timing()


def fastavro_read(value: bytes, reader: Any) -> Any:
    """The envelope in `value`, read straight after its single-object header."""
    return schemaless_reader(io.BytesIO(value[HEADER:]), reader, None)
