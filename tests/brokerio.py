"""Read what a queue holds straight from the broker, with each vendor's own client.

Test-side only: the assertions look at the broker itself, not through bridge's transports.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aio_pika
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType  # type: ignore[attr-defined]

from bridge import Bridge, codec, testing
from bridge.envelope import DeadLetter
from bridge.names import tier_queue
from bridge.registry import DEAD_LETTER, ENVELOPE
from bridge.transports import dlq_name
from bridge.transports.kafka.common import wait_until_served
from bridge.transports.rabbitmq import wait_queue
from tests.names import ended_sessions, left_behind


def read_queue(app: Bridge, queue: str) -> list[bytes]:
    """Every message body in `queue` (consumed, on RabbitMQ)."""
    url = app.settings.require_broker()
    if url.startswith("memory://"):
        return testing.memory_transport(app).messages(queue)
    if url.startswith("kafka"):
        return _read_topic(url.partition("://")[2], queue)
    return asyncio.run(_drain_rabbit_queue(url, queue))


def tier_held_in(app: Bridge, tier_s: float) -> str:
    """Where the jobs of `app`'s delay tier of `tier_s` seconds wait: its topic on Kafka, its
    `.wait` queue on RabbitMQ (the tier's name is its exchange's there)."""
    tier = tier_queue(app.settings.prefix, tier_s)
    return tier if app.settings.require_broker().startswith("kafka") else wait_queue(tier)


def envelopes_in(app: Bridge, queue: str) -> list[dict[str, Any]]:
    """The job envelopes in `queue`, decoded (consumed, on RabbitMQ)."""
    schema = app.registry.schema(ENVELOPE)
    return [codec.decode(body, app.registry, schema)[1] for body in read_queue(app, queue)]


def dead_letters(app: Bridge, queue: str) -> list[DeadLetter]:
    """The dead letters of `queue`, decoded."""
    schema = app.registry.schema(DEAD_LETTER)
    bodies = read_queue(app, dlq_name(queue))
    largest = app.settings.dlq_bytes
    return [
        DeadLetter.from_avro(codec.decode(body, app.registry, schema, max_bytes=largest)[1])
        for body in bodies
    ]


def delete_queue(app: Bridge, queue: str) -> None:
    """Delete `queue` (its topic, on Kafka) behind bridge's back; on Kafka, return once the
    broker's metadata no longer lists it. (DeleteTopics answers once the controller has
    recorded the deletion; a consume started a moment later still found the topic there.)"""
    url = app.settings.require_broker()
    if url.startswith("kafka"):
        admin = AdminClient({"bootstrap.servers": url.partition("://")[2]})
        for future in admin.delete_topics([queue]).values():
            future.result(30)
        deadline = time.monotonic() + 30
        while queue in admin.list_topics(timeout=10).topics:
            assert time.monotonic() < deadline, f"Kafka still lists topic {queue} 30 s after deleting it"
            time.sleep(0.05)
    else:
        asyncio.run(delete_rabbitmq_queue(url, queue))


async def delete_rabbitmq_queue(url: str, queue: str) -> None:
    """Delete RabbitMQ queue `queue` behind bridge's back."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
    finally:
        await connection.close()


def _read_topic(bootstrap: str, topic: str) -> list[bytes]:
    """Every committed record of `topic`, oldest first by timestamp."""
    return [body for _, body in read_partitions(bootstrap, topic)]


def read_partitions(bootstrap: str, topic: str) -> list[tuple[int, bytes]]:
    """Every committed record of `topic` with its partition, oldest first by timestamp."""
    return [(partition, body) for partition, _, body in read_records(bootstrap, topic)]


def read_records(bootstrap: str, topic: str) -> list[tuple[int, bytes | None, bytes]]:
    """Every committed record of `topic` as (partition, key, value), oldest first by timestamp."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
         "enable.auto.commit": False, "isolation.level": "read_committed", "enable.partition.eof": True,
         "fetch.wait.max.ms": 10}  # at the end of a partition there is nothing to wait for
    )  # fmt: skip
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        bodies: list[tuple[int, int, int, bytes | None, bytes]] = []
        at_end: set[int | None] = set()
        deadline = time.monotonic() + 30
        # Transaction markers take offsets too and are never delivered: the end of a partition
        # is where the consumer says so, not after the offset below the high watermark.
        while len(at_end) < len(partitions):
            assert time.monotonic() < deadline, f"timed out reading {topic}"
            record = consumer.poll(0.2)
            if record is None:
                continue
            error = record.error()
            if error is None:
                bodies.append(
                    (
                        record.timestamp()[1],
                        record.offset() or 0,
                        record.partition() or 0,
                        record.key(),
                        record.value() or b"",
                    )
                )
            elif error.code() == KafkaError._PARTITION_EOF:
                at_end.add(record.partition())
        bodies.sort(key=lambda record: record[:3])
        return [(partition, key, body) for _, _, partition, key, body in bodies]
    finally:
        consumer.close()


def topics_made_elsewhere(
    bootstrap: str, topics: list[str], partitions: int = 1, config: dict[str, str] | None = None
) -> None:
    """Create `topics` as another tool would: with the broker's default config (or `config`); return once
    Kafka serves them. (CreateTopics answers once the controller has recorded a topic; the
    broker's metadata may lack it a moment longer, as Kafka's AdminClient documents, and a
    worker started then refused to start: "topic ... does not exist".)"""
    admin = AdminClient({"bootstrap.servers": bootstrap})  # (kept: its futures fail once it is freed)
    made = admin.create_topics([NewTopic(t, partitions, config=config or {}) for t in topics])
    for future in made.values():
        future.result(30)
    wait_until_served({"bootstrap.servers": bootstrap}, topics, 30)


def topic_config(bootstrap: str, topics: list[str], name: str) -> dict[str, str]:
    """Each topic's setting `name` (`max.message.bytes`, say), as the broker reports it."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in topics])
    return {r.name: f.result(30)[name].value for r, f in futures.items()}


def java_partition(key: bytes, partitions: int) -> int:
    """The Java client's partition for `key`: `toPositive(Utils.murmur2(key)) % partitions`."""
    m, length = 0x5BD1E995, len(key)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(key[i : i + 4], "little") * m & 0xFFFFFFFF
        k = (k ^ k >> 24) * m & 0xFFFFFFFF
        h = (h * m & 0xFFFFFFFF) ^ k
    tail = key[whole:]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h = (h ^ tail[0]) * m & 0xFFFFFFFF
    h = (h ^ h >> 13) * m & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


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


# The RabbitMQ under test: the local one, or the one `make pytest-rabbitmq4` starts beside it.
RABBITMQ_API = os.environ.get("BRIDGE_TEST_RABBITMQ_API", "http://127.0.0.1:15672/api")


def delete_test_objects(brokers: dict[str, str]) -> None:
    """Delete the queues, exchanges and topics that this session made, and those of sessions
    that have ended (tests.names), so the dev brokers do not fill up."""
    with ended_sessions() as ended:
        admin = AdminClient({"bootstrap.servers": brokers["kafka"].partition("://")[2]})
        topics = [t for t in admin.list_topics(timeout=10).topics if left_behind(t, ended)]
        for future in admin.delete_topics(topics).values() if topics else ():
            future.exception()  # wait; a topic already gone is fine
        for kind in ("queues", "exchanges"):
            for item in rabbitmq_api(f"{kind}/%2F"):
                if left_behind(item["name"], ended):
                    rabbitmq_api(f"{kind}/%2F/{_quoted(item['name'])}", "DELETE")


def rabbitmq_api(path: str, method: str = "GET", body: Any = None) -> Any:
    """RabbitMQ's own HTTP API (its management plugin) at `path`, e.g. `queues/%2F/<name>`."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{RABBITMQ_API}/{path}", data=data, method=method)
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = response.read()
    return json.loads(answer) if answer else None


def queue_arguments(queue: str) -> dict[str, Any]:
    """The arguments RabbitMQ holds for `queue` (those it was declared with)."""
    arguments: dict[str, Any] = rabbitmq_api(f"queues/%2F/{_quoted(queue)}")["arguments"]
    return arguments


@functools.cache
def _rabbitmqctl() -> list[str]:
    """`rabbitmqctl` of the RabbitMQ under test: BRIDGE_TEST_RABBITMQCTL if set (RabbitMQ 4's, in
    its chroot), the container's if `bridge dev` runs RabbitMQ with docker compose, else the
    local one."""
    given = os.environ.get("BRIDGE_TEST_RABBITMQCTL")
    if given:
        return shlex.split(given)
    from bridge.dev import compose

    if compose.engine_available() and "rabbitmq" in compose.running_here():
        in_container = ["exec", "-T", "rabbitmq", "rabbitmqctl"]
        return ["docker", "compose", "-f", str(compose.compose_file()), *in_container]
    return ["rabbitmqctl"]


def rabbitmqctl(*args: str) -> None:
    """Run `rabbitmqctl -q ARGS` on the node under test."""
    subprocess.run([*_rabbitmqctl(), "-q", *args], check=True, capture_output=True)


def close_rabbitmq_connections(named: str) -> int:
    """Have RabbitMQ close every connection whose client named it `named`; how many it closed."""
    listed = subprocess.run(
        [*_rabbitmqctl(), "-q", "list_connections", "pid", "client_properties"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    pids = [line.split("\t")[0] for line in listed.stdout.splitlines() if f'"{named}"' in line]
    for pid in pids:
        rabbitmqctl("close_connection", pid, "closed by a test")
    return len(pids)


@contextmanager
def rabbitmq_settings(**values: int) -> Iterator[None]:
    """RabbitMQ's `rabbit` application settings at `values` (for the channels opened meanwhile),
    then as they were: e.g. a consumer_timeout that tests can wait out."""
    before = {name: _rabbitmq_setting(name) for name in values}
    try:
        for name, value in values.items():
            rabbitmqctl("eval", f"application:set_env(rabbit, {name}, {value}).")
        yield
    finally:
        for name, was in before.items():
            undo = f"unset_env(rabbit, {name})" if was is None else f"set_env(rabbit, {name}, {was})"
            rabbitmqctl("eval", f"application:{undo}.")


@contextmanager
def rabbitmq_max_message_size(size: int) -> Iterator[None]:
    """RabbitMQ taking messages up to `size` bytes (for the channels opened meanwhile), then as
    many as before. RabbitMQ 4 reads the setting once, at boot, into a persistent term."""
    term = "persistent_term:get(max_message_size, undefined)"
    was = subprocess.run(
        [*_rabbitmqctl(), "-q", "eval", f"{term}."], check=True, capture_output=True, text=True
    ).stdout.strip()  # (`undefined` before RabbitMQ 4)
    with rabbitmq_settings(max_message_size=size):
        if was != "undefined":
            rabbitmqctl("eval", f"persistent_term:put(max_message_size, {size}).")
        try:
            yield
        finally:
            if was != "undefined":
                rabbitmqctl("eval", f"persistent_term:put(max_message_size, {was}).")


@contextmanager
def rabbitmq_disk_alarm() -> Iterator[None]:
    """RabbitMQ in a disk alarm (its free-space limit far above the disk): it blocks every
    connection that publishes until the limit is put back."""
    limit = _rabbitmq_setting("disk_free_limit") or "50000000"  # (RabbitMQ's default, in bytes)
    rabbitmqctl("set_disk_free_limit", "1000000GB")
    try:
        yield
    finally:
        rabbitmqctl("set_disk_free_limit", limit)


def _rabbitmq_setting(name: str) -> str | None:
    """The value of RabbitMQ's `rabbit` application setting `name` as Erlang writes it; None if unset."""
    result = subprocess.run(
        [*_rabbitmqctl(), "-q", "eval", f"application:get_env(rabbit, {name})."],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    answer = result.stdout.strip()  # `{ok,1800000}`, or `undefined`
    return answer.removeprefix("{ok,").removesuffix("}") if answer.startswith("{ok,") else None


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


@contextmanager
def another_kafka(root: Path, settings: dict[str, str], client_port: int | None = None) -> Iterator[str]:
    """A Kafka node of its own, its files in `root`, on free ports (or `client_port` and the next
    one), with broker `settings` over those of `bridge dev up` (a cluster configured as users'
    may be); its URL. Killed after."""
    from bridge.dev import kafka

    client_port = client_port or free_port_pair()
    layout = kafka._Layout(root)
    pid = kafka._start(layout, client_port, log=lambda _: None, settings=settings)
    try:
        kafka._wait_ready(client_port, pid, layout)
        yield f"kafka://127.0.0.1:{client_port}"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


_PORTS = random.Random()  # (its own: a test that seeds `random` must not repeat our ports)


def free_port_pair() -> int:
    """A port free on loopback, and the next one too (Kafka's controller takes it).

    Taken above the ephemeral range, from which the system hands a port to every client
    connection and every bind to port 0: a port found free there could be a connection's own
    by the time Kafka, seconds later, binds it (a test failed so while another session ran).
    """
    low, high = _ephemeral_range()
    first_port, last_port = (high + 1, 65534) if high < 65000 else (10000, low - 2)
    while True:
        port = _PORTS.randint(first_port, last_port)
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def _ephemeral_range() -> tuple[int, int]:
    """The ports the system picks for clients and binds to port 0 (Linux's default if unknown)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999
