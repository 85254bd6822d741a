"""Bad bytes from independent clients (kcat, amqp-publish) end in `<queue>.dlq`, never in a crash."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import subprocess
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pamqp.decode
import pamqp.encode
import pytest
from confluent_kafka import Producer

from bridge import Bridge, JobContext, Permanent, Retry, codec
from bridge import testing as bridge_testing
from bridge.envelope import now_ms
from bridge.errors import JobTooLarge
from bridge.policy import fixed
from bridge.registry import ENVELOPE
from bridge.transports import amqp_frames
from bridge.transports.base import dlq_name
from bridge.worker import Stats
from tests import names
from tests.brokerio import dead_letters, rabbitmq_api, read_records, topics_made_elsewhere
from tests.conftest import SCHEMAS, failing_first, own_app, publish_envelope, run
from tests.processes import consumer, finish, ledger_counts, publish


@pytest.fixture(scope="module")
def tools() -> None:
    """kcat and amqp-tools, installed from Debian when missing (the same code as `bridge dev`)."""
    from bridge import dev

    dev.ensure_tools(log=lambda _: None)


def bad_inputs() -> dict[str, bytes]:
    """Four kinds of bytes that are not a job, by name."""
    app = Bridge(broker="memory://", registry=str(SCHEMAS))
    envelope = app.build_envelope("test.Echo", {"n": 1}, queue="q")
    good = codec.encode(app.registry.schema(ENVELOPE), envelope.to_avro())
    return {
        "random": b"\x7f" + os.urandom(63),
        "truncated": good[: len(good) // 2],
        "wrong magic": b"\xc3\x02" + good[2:],
        "unknown fingerprint": b"\xc3\x01" + b"\x5a" * 8 + good[10:],
    }


def send_with_kcat(bootstrap: str, topic: str, bodies: list[bytes], folder: Path) -> None:
    files = []
    for n, body in enumerate(bodies):
        files.append(folder / f"message-{n}")
        files[-1].write_bytes(body)
    # With file arguments kcat sends each file as one message; -p 0 keeps them in order.
    subprocess.run(["kcat", "-P", "-b", bootstrap, "-t", topic, "-p", "0", *map(str, files)], check=True)


def send_with_amqp_publish(url: str, queue: str, bodies: list[bytes]) -> None:
    # amqp-tools read the empty path of `amqp://host:port/` as vhost "", not the default "/".
    url = url.rstrip("/")
    exchange = f"{Bridge(broker=url).settings.prefix}.jobs"  # (BRIDGE_PREFIX may set it)
    for body in bodies:
        command = ["amqp-publish", f"--url={url}", "-e", exchange, "-r", queue, "-p"]
        subprocess.run(command, input=body, check=True)


@pytest.mark.parametrize("broker_name", ["kafka", "rabbitmq"])
@pytest.mark.usefixtures("tools")
def test_bad_bytes_are_dead_lettered_with_reason_and_original_bytes(
    broker_name: str, brokers: dict[str, str], queue: str, tmp_path: Path
) -> None:
    # Given four malformed messages from an independent client, then one good job,
    # When `bridge consume --burst` runs,
    # Then each malformed message is in <queue>.dlq with its exact bytes, as `undecodable`
    # (`unknown_schema` when it names a fingerprint known nowhere), the good job behind them
    # runs, and the daemon exits 0.
    broker = brokers[broker_name]
    ledger = tmp_path / "ledger"
    run(publish(broker, queue, 0))  # creates the queue and its dead-letter queue
    bad = bad_inputs()
    if broker_name == "kafka":
        send_with_kcat(broker.partition("://")[2], queue, list(bad.values()), tmp_path)
    else:
        send_with_amqp_publish(broker, queue, list(bad.values()))
    [good] = run(publish(broker, queue, 1))

    code, log = finish(consumer(broker, queue, ledger, f"g-{uuid.uuid4().hex[:8]}", "--burst"), ledger)

    assert code == 0, log
    assert ledger_counts(ledger, "done") == {good: 1}
    letters = dead_letters(Bridge(broker=broker, registry=str(SCHEMAS)), queue)
    assert sorted(letter.raw or b"" for letter in letters) == sorted(bad.values())
    reasons = {letter.raw: letter.reason for letter in letters}
    wanted = {name: "unknown_schema" if name == "unknown fingerprint" else "undecodable" for name in bad}
    assert reasons == {bad[name]: reason for name, reason in wanted.items()}
    assert all(letter.queue == queue and letter.envelope is None and letter.detail for letter in letters)
    details = " | ".join(letter.detail for letter in letters)
    for expected in ("not a framed Avro message", "unknown schema fingerprint", "does not decode"):
        assert expected in details


@pytest.mark.parametrize(
    ("broker_name", "named"),
    [
        ("kafka", "a queue that does not exist"),
        ("rabbitmq", "a queue that does not exist"),
        ("kafka", "kafka's own topic"),
        ("kafka", "a delay tier"),
        ("rabbitmq", "a delay tier"),
        ("kafka", "a delay tier of other settings"),
        ("rabbitmq", "a delay tier of other settings"),
        ("rabbitmq", "the direct reply-to pseudo-queue"),
        ("rabbitmq", "a name longer than AMQP allows"),
        ("rabbitmq", "a name AMQP refuses"),
        ("rabbitmq", "another connection's exclusive queue"),
        ("kafka", "its own dead-letter queue"),
        ("rabbitmq", "its own dead-letter queue"),
        ("kafka", "its dead-letter topic's done marks"),
    ],
)
def test_a_job_naming_a_queue_that_does_not_exist_is_dead_lettered_and_consuming_goes_on(
    broker_name: str, named: str, brokers: dict[str, str], queue: str
) -> None:
    # Given a job on a queue whose envelope (as a producer in another language might write it)
    # names a queue that does not exist, where its retries and delays would go, then a good job,
    # When consumed, Then the first is in <queue>.dlq as `unroutable`, with its envelope and the
    # missing queue's name, and the good job runs: consuming does not stop for it (it stopped,
    # and the same message stopped it again at each start). The same for a Kafka topic that
    # exists but takes no job: one of Kafka's own (its retry failed every transaction of the delay
    # forwarder, which then moved no delayed job again), or a delay tier (on RabbitMQ too: its
    # retry came back from the tier under the tier's name, bound to no queue, and was dropped);
    # and for a name no RabbitMQ queue can have, or a queue RabbitMQ keeps for another
    # connection (RESOURCE_LOCKED): the look at it raised, and the job went round the shortest
    # tier for good. A tier that these settings do not make (an earlier setting's) is a tier
    # too, and RabbitMQ's direct reply-to, which a passive declaration takes, is no queue: bound
    # by its name, the tier would take its retry back to itself, and the bind to reply-to failed.
    # And its own dead-letter queue, or on Kafka that queue's `.done` topic: the retry went
    # there as a bare job, which `bridge dlq` called undecodable. And a name aiormq's frames
    # refuse: the look at it raised ValueError, and the job went round the shortest tier for good.
    app = own_app(brokers[broker_name])
    ran = failing_first(app, queue, lambda: Retry(delay_s=1))

    async def scenario() -> tuple[str, Stats]:
        async with AsyncExitStack() as held, app:
            await app.apply_topology()
            missing = await queue_named(named, broker_name, app.settings.prefix, brokers, held, queue)
            envelope = app.build_envelope("test.Echo", {"n": 1}, queue=missing)
            await publish_envelope(app, queue, envelope)
            await app.enqueue_async("test.Echo", {"n": 2})
            return missing, await app.consume(burst=True)

    missing, stats = run(scenario())
    assert ran == [2] and stats.dead_lettered == 1
    [unroutable] = dead_letters(app, queue)
    assert unroutable.reason == "unroutable" and unroutable.envelope is not None
    assert unroutable.envelope.queue == missing
    assert missing in unroutable.detail and queue in unroutable.detail
    if broker_name == "rabbitmq" and named.startswith("a delay tier"):  # (bound, it would loop)
        bindings = rabbitmq_api(f"queues/%2F/{missing}/bindings")
        assert f"{app.settings.prefix}.jobs" not in {binding["source"] for binding in bindings}


async def queue_named(
    named: str, broker_name: str, prefix: str, brokers: dict[str, str], held: AsyncExitStack, queue: str
) -> str:
    """The name of a queue no job can go to, of the kind `named` says; what it takes stays in `held`."""
    if named == "another connection's exclusive queue":
        other = await held.enter_async_context(await aio_pika.connect(brokers["rabbitmq"]))
        return (await (await other.channel()).declare_queue(exclusive=True)).name
    if named == "a delay tier of other settings":  # (these have only 1s)
        tier = f"{prefix}.delay.5s"
        if broker_name == "kafka":
            await asyncio.to_thread(topics_made_elsewhere, brokers["kafka"].partition("://")[2], [tier])
            return tier
        async with await aio_pika.connect(brokers["rabbitmq"]) as connection:
            return (await (await connection.channel()).declare_queue(tier, durable=True)).name
    return {
        "a queue that does not exist": f"no-such-queue-{uuid.uuid4().hex[:8]}",
        "kafka's own topic": "__consumer_offsets",
        "a delay tier": f"{prefix}.delay.1s",
        "the direct reply-to pseudo-queue": "amq.rabbitmq.reply-to",
        "a name longer than AMQP allows": "q" * 256,
        "a name AMQP refuses": "bad name!",
        "its own dead-letter queue": f"{queue}.dlq",
        "its dead-letter topic's done marks": f"{queue}.dlq.done",
    }[named]


@pytest.mark.parametrize("broker_name", ["kafka", "rabbitmq"])
def test_a_job_failing_with_a_huge_error_message_is_dead_lettered_with_it_cut_short(
    broker_name: str, brokers: dict[str, str], queue: str
) -> None:
    # Given a handler that gives up with an error message of 2,000,000 characters, then a good job,
    # When consumed, Then the first is dead-lettered, its detail cut to 2,000 characters, and
    # the good job runs. (The whole message went into the dead letter, which Kafka refused as
    # too large: the transaction failed and `bridge consume` stopped, and at each start again.)
    app = own_app(brokers[broker_name])
    ran = failing_first(app, queue, lambda: Permanent("x" * 2_000_000))

    async def scenario() -> Stats:
        async with app:
            await app.apply_topology()
            await app.enqueue_async("test.Echo", {"n": 1})
            await app.enqueue_async("test.Echo", {"n": 2})
            return await app.consume(burst=True)

    stats = run(scenario())
    assert sorted(ran) == [1, 2] and stats.dead_lettered == 1
    [letter] = dead_letters(app, queue)
    assert letter.reason == "permanent" and len(letter.detail) == 2000
    assert letter.detail.startswith("Permanent: xxx") and letter.detail.endswith("x…")


def test_a_kafka_record_larger_than_a_dead_letter_holds_is_dead_lettered_cut_and_consuming_goes_on(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a 3 MB record that another producer compressed (gzip) below the topic's limit, so
    # Kafka took it, then a good job, When consumed, Then the record is dead-lettered
    # `undecodable` with its first queue_bytes bytes, the detail saying how many it had, and
    # the good job runs. (Its dead letter, written whole, was larger than the producer sends:
    # the transaction failed, and `bridge consume` stopped at every start.)
    app = own_app(brokers["kafka"])
    ran = failing_first(app, queue, lambda: Permanent("never raised: job 1 is the record"))
    big = b"\x00" * 3_000_000

    async def scenario() -> Stats:
        async with app:
            await app.apply_topology()
            settings = {"compression.type": "gzip", "message.max.bytes": 10_000_000}
            producer = Producer({"bootstrap.servers": brokers["kafka"].partition("://")[2], **settings})
            producer.produce(queue, big)
            assert producer.flush(10) == 0
            await app.enqueue_async("test.Echo", {"n": 2})
            return await app.consume(burst=True)

    stats = run(scenario())
    assert ran == [2] and stats.dead_lettered == 1
    [letter] = dead_letters(app, queue)
    limit = app.settings.queue_bytes
    assert letter.reason == "undecodable" and letter.raw == big[:limit]
    cut = f"(its 3,000,000 bytes cut to the first {limit:,}: a dead letter holds no more)"
    assert letter.detail.endswith(cut)


def test_kafka_record_keys_longer_than_a_topic_takes_go_on_as_their_digest_and_consuming_goes_on(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a record of bytes that are no job, whose 3 MB key another producer compressed
    # (gzip) below the topic's limit, so Kafka took it, and a job enqueued with a 700 KB key
    # that fails both its attempts, When consumed, Then the job is enqueued, retried and
    # dead-lettered, and the record dead-lettered, each under the SHA-256 digest of its key,
    # and the next job runs. (Each went out with its key as it came, larger than its topic
    # takes: the transaction failed, and `bridge consume` stopped at every start.)
    app = own_app(brokers["kafka"])
    ran = failing_first(app, queue, lambda: RuntimeError("no"), max_attempts=2, backoff=fixed(0))
    big_key, long_key = b"k" * 3_000_000, "j" * 700_000
    bootstrap = brokers["kafka"].partition("://")[2]

    async def scenario() -> Stats:
        async with app:
            await app.apply_topology()
            settings = {"compression.type": "gzip", "message.max.bytes": 10_000_000}
            producer = Producer({"bootstrap.servers": bootstrap, **settings})
            producer.produce(queue, b"not avro", big_key)
            assert producer.flush(10) == 0
            await app.enqueue_async("test.Echo", {"n": 1}, key=long_key)
            await app.enqueue_async("test.Echo", {"n": 2})
            return await app.consume(burst=True)

    stats = run(scenario())
    assert sorted(ran) == [1, 1, 2] and (stats.retried, stats.dead_lettered) == (1, 2)
    assert [letter.raw for letter in dead_letters(app, queue) if letter.reason == "undecodable"] == [
        b"not avro"
    ]
    big_digest, long_digest = (
        b"sha256:" + hashlib.sha256(k).hexdigest().encode() for k in (big_key, long_key.encode())
    )
    assert sorted(key or b"" for _, key, _ in read_records(bootstrap, dlq_name(queue))) == [
        big_digest,
        long_digest,
    ]
    assert [key for _, key, _ in read_records(bootstrap, queue)].count(long_digest) == 2  # enqueued, retried


@pytest.mark.parametrize("broker_name", ["kafka", "rabbitmq"])
def test_a_job_as_large_as_allowed_is_retried_and_dead_lettered_and_a_larger_one_refused(
    broker_name: str, brokers: dict[str, str], queue: str
) -> None:
    # Given a job just under max_message_bytes (1 MiB) whose handler always fails, then a good
    # job, When consumed, Then the first is retried twice and dead-lettered with its three
    # errors, and the good job runs. (Its retries and dead letter, a few KB larger, were more
    # than Kafka takes: the transaction failed and `bridge consume` stopped, at each start
    # again.) And enqueueing a job over max_message_bytes fails at once, saying so.
    app = own_app(brokers[broker_name])
    ran = failing_first(app, queue, lambda: ValueError("e" * 1000), max_attempts=3, backoff=fixed(0))

    async def scenario() -> Stats:
        async with app:
            await app.apply_topology()
            await app.enqueue_async("test.Echo", {"n": 1, "text": "x" * (1024 * 1024 - 200)})
            await app.enqueue_async("test.Echo", {"n": 2})
            with pytest.raises(JobTooLarge, match="max_message_bytes"):
                await app.enqueue_async("test.Echo", {"n": 3, "text": "x" * (1024 * 1024)})
            return await app.consume(burst=True)

    stats = run(scenario(), timeout=90)
    assert sorted(ran) == [1, 1, 1, 2] and stats.dead_lettered == 1
    [letter] = dead_letters(app, queue)
    assert letter.reason == "exhausted" and letter.envelope is not None
    assert len(letter.envelope.errors) == 3


def test_a_payload_larger_than_the_default_cap_runs_when_max_message_bytes_allows_it() -> None:
    # Given max_message_bytes raised to 3 MiB and a job with a 2 MiB payload, When consumed,
    # Then it runs. (enqueue took it, and every worker dead-lettered it: the payload inside
    # was held to 1 MiB whatever the setting.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS), max_message_bytes=3 * 1024 * 1024)
    sizes: list[int] = []

    @app.job("test.Echo", queue="q")
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        sizes.append(len(payload["text"]))

    async def scenario() -> None:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1, "text": "x" * (2 * 1024 * 1024)})
            await app.consume(burst=True)

    run(scenario())
    assert sizes == [2 * 1024 * 1024] and bridge_testing.dead_letters(app, "q") == []


def test_bad_bytes_inside_an_envelope_are_dead_lettered_with_a_reason_a_person_can_read() -> None:
    # Given envelopes from another producer whose payload is cut short, holds a string that is
    # not UTF-8 or an int beyond 32 bits (which a Java reader refuses), one whose run_at was
    # written in microseconds (year 58,000), and ones whose run_at or expires_at was written in
    # seconds, then a good job,
    # When the worker consumes them (decoding is the same on every broker: memory://),
    # Then each is dead-lettered as undecodable with a reason in words, and the good job runs.
    # (The details were Python reprs such as IndexError('index out of range'); the int was
    # taken; the far run_at went round the delay tiers for good.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS))
    ran: list[int] = []

    @app.job("test.Echo", queue="q")
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])

    zeros = codec.encode(app.registry.schema("test.Echo"), {"n": 0, "text": "", "sleep_ms": 0})
    header = zeros[:-3]  # (n, text and sleep_ms are a byte each)
    payloads = {
        "cut short": zeros[:-1],
        "not UTF-8": header + b"\x00\x02\xff\x00",
        "beyond 32 bits": header + b"\x80\x80\x80\x80\x80\x40\x00\x00",  # zig-zag 2**40
    }
    job = app.build_envelope("test.Echo", {"n": 1}, queue="q")
    far = replace(app.build_envelope("test.Echo", {"n": 2}, queue="q"), run_at=now_ms() * 1000)
    # (and one in seconds, as Go's time.Unix() gives: in 1970, it ran at once)
    soon = replace(app.build_envelope("test.Echo", {"n": 4}, queue="q"), run_at=now_ms() // 1000 + 3600)
    # (and an expiry in seconds: in 1970, it was dead-lettered as `expired`, a job that could run)
    ends = replace(app.build_envelope("test.Echo", {"n": 5}, queue="q"), expires_at=now_ms() // 1000 + 3600)

    async def scenario() -> None:
        async with app:
            await app.apply_topology(["q"])
            for payload in payloads.values():
                await publish_envelope(app, "q", replace(job, payload=payload))
            await publish_envelope(app, "q", far)
            await publish_envelope(app, "q", soon)
            await publish_envelope(app, "q", ends)
            await app.enqueue_async("test.Echo", {"n": 3}, queue="q")
            await app.consume(burst=True)

    run(scenario())
    assert ran == [3]
    letters = bridge_testing.dead_letters(app, "q")
    assert [letter.reason for letter in letters] == ["undecodable"] * 6
    prefix = "payload: body does not decode as test.Echo: "
    assert [letter.detail for letter in letters[:3]] == [
        prefix + "it ends early (cut short, or a length or count in it is wrong)",
        prefix + "a string in it is not UTF-8 text (byte 0xff)",
        prefix + "an int of 1099511627776, beyond 32 bits",
    ]
    assert letters[3].envelope is not None and letters[3].envelope.id == far.id
    assert "is more than 100 years ahead: an envelope's times are epoch milliseconds" in letters[3].detail
    assert letters[4].envelope is not None and letters[4].envelope.id == soon.id
    assert "is 1970-01-" in letters[4].detail and "(was it written in seconds? 20" in letters[4].detail
    assert letters[5].envelope is not None and letters[5].envelope.id == ends.id
    assert letters[5].detail.startswith(f"its expires_at, {ends.expires_at}, is 1970-01-"), letters[5].detail


# AMQP properties another producer may write that pamqp could not read: what goes in a frame,
# written raw through pamqp's encoder, in place of a value it would encode.
UNREADABLE_PROPERTIES: dict[str, tuple[dict[str, Any], str, bytes]] = {
    # (a time in microseconds: pamqp reads it as milliseconds, in the year 55,000 or so)
    "a timestamp in microseconds": (
        {"timestamp": datetime.now(UTC)}, "timestamp", struct.pack(">Q", time.time_ns() // 1000),
    ),
    "a content type that is not UTF-8": ({"content_type": "x"}, "shortstr", b"\x02\xff\xfe"),
    "a header named in bytes that are not UTF-8": (
        {"headers": {"x": "y"}}, "table", b"\x00\x00\x00\x08\x01\xffS\x00\x00\x00\x01y",
    ),
}  # fmt: skip


@pytest.mark.parametrize("written", list(UNREADABLE_PROPERTIES))
def test_a_job_whose_amqp_properties_pamqp_cannot_read_runs_and_so_does_the_next(
    brokers: dict[str, str], queue: str, written: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job published by another producer with `written` among its AMQP properties, then
    # a second job, When a burst consume runs, Then each runs once, and nothing is dead-lettered.
    # (aiormq's reader closed the connection at each delivery of the first: RabbitMQ delivered
    # it again on the next, for good; neither ran, and the burst never ended.)
    app = Bridge(broker=brokers["rabbitmq"], registry=str(SCHEMAS), prefix=names.prefix(), delay_tiers="1s")
    runs: list[int] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append(payload["n"])

    properties, kind, raw = UNREADABLE_PROPERTIES[written]

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            bodies = [
                codec.encode(
                    app.registry.schema(ENVELOPE),
                    app.build_envelope("test.Echo", {"n": n}, queue=queue).to_avro(),
                )
                for n in (1, 2)
            ]
            async with await aio_pika.connect(brokers["rabbitmq"]) as connection:
                channel = await connection.channel()
                [sentinel] = properties.values()
                encode = pamqp.encode.METHODS[kind]
                with monkeypatch.context() as writing:  # (the other producer's encoder, for that value)
                    writing.setitem(pamqp.encode.METHODS, kind, lambda v: raw if v == sentinel else encode(v))
                    await channel.default_exchange.publish(aio_pika.Message(bodies[0], **properties), queue)
                await channel.default_exchange.publish(aio_pika.Message(bodies[1]), queue)
            stats = await asyncio.wait_for(app.consume(burst=True), 30)
            assert stats.dead_lettered == 0, stats.summary()

    run(scenario(), timeout=60)
    assert sorted(runs) == [1, 2]


def test_amqp_properties_cut_short_still_fail_to_parse() -> None:
    # Given pamqp reading leniently (as bridge's RabbitMQ transport has it), When a timestamp or
    # a header table is cut short, Then it still fails: only values another producer wrote in
    # full, but past what pamqp reads, are taken.
    amqp_frames.install()
    for kind, cut in (("timestamp", b"\x00\x01"), ("table", b"\x00\x00\x00\x09\x01k")):
        with pytest.raises(ValueError):
            pamqp.decode.by_type(cut, kind)
    assert pamqp.decode.by_type(struct.pack(">Q", time.time_ns() // 1000), "timestamp") == (8, None)
