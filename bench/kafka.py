"""The raw confluent-kafka baselines, and the topics they run on.

The producer is configured as bridge's is where it matters (idempotent, acks=all); the consumer
stores offsets by hand (enable.auto.offset.store=false) and lets librdkafka commit them, as
bridge does, and decodes each envelope with the parsed schema bridge's decoder uses.
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


def _servers(url: str) -> str:
    return url.partition("://")[2].rstrip("/")


async def create_topics(url: str, topics: Sequence[str]) -> None:
    """Bridge's topology for `topics`: each with its .dlq, as many partitions as bridge makes."""
    async with Bridge(broker=url, registry=str(SCHEMAS)) as app:
        await app.apply_topology(topics)


def delete_topics(url: str, topics: Sequence[str]) -> None:
    """Delete `topics` and every topic bridge's topology made for them (`<topic>.dlq`, ...)."""
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


def raw_publish(url: str, topic: str, bodies: Sequence[bytes]) -> Timing:
    """Produce `bodies` to `topic` without waiting on each; flush() returns once all are acked."""
    failed: list[str] = []

    def report(err: Any, _: Any) -> None:
        if err is not None:
            failed.append(err.str())

    producer = Producer({"bootstrap.servers": _servers(url), "enable.idempotence": True, "acks": "all"})
    producer.list_topics(topic, timeout=10)  # connected and the topic known before the clock starts
    producer.produce(warm_up_queue(topic), bodies[0])
    producer.flush(10)
    started = time.monotonic()
    for body in bodies:
        while True:
            try:
                producer.produce(topic, body, on_delivery=report)
                break
            except BufferError:  # the local queue is full: serve delivery reports
                producer.poll(0.01)
        producer.poll(0)
    left = producer.flush(timeout_for(len(bodies)))
    seconds = time.monotonic() - started
    if left or failed:
        raise BenchError(f"raw produce to {topic}: {left} unflushed, {len(failed)} failed {failed[:1]}")
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
