"""Kafka-specific behaviour: group handover, key partitioning, topics made and deleted, tier records."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import types
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from bridge import Bridge, JobContext, Permanent, Retry, codec
from bridge.config import Settings
from bridge.dlq import Selection
from bridge.envelope import now_ms
from bridge.errors import ConfigError, PublishError, TransportError
from bridge.names import tier_queue
from bridge.policy import fixed
from bridge.registry import ENVELOPE
from bridge.transports import Outgoing, dlq_name
from bridge.transports.base import Delivery, InFlight
from bridge.transports.kafka import commit as kafka_commit
from bridge.transports.kafka import common as kafka_common
from bridge.transports.kafka import forwarder as kafka_forwarder
from bridge.transports.kafka import transport as kafka_transport
from bridge.transports.kafka.commit import Committer
from bridge.transports.kafka.common import QUEUE_HEADER, Headers, mapped, read_to_end, wait_until_served
from bridge.transports.kafka.returns import RUNNING, Gate
from bridge.worker import Stats, Worker
from tests import names
from tests.brokerio import (
    another_kafka,
    dead_letters,
    delete_queue,
    java_partition,
    read_partitions,
    read_queue,
    read_records,
    topic_config,
    topics_made_elsewhere,
)
from tests.conftest import SCHEMAS, failing_first, own_app, run, signalling, tiers_changed
from tests.processes import (
    assert_dead_lettered_for_coming_back,
    assert_one_line_error,
    bridge,
    consumer,
    finish,
    ledger_counts,
    publish,
    restart_until_drained,
    stop_while_three_run,
)
from tests.proxy import kafka_behind_proxy


async def second_joins_once(first: Bridge, second: Bridge, ready: Callable[[], bool]) -> None:
    """A burst consume of `first`, and of `second` (of the same group) once `ready()`."""
    running = asyncio.create_task(first.consume(burst=True))
    while not ready():
        await asyncio.sleep(0.05)
    await second.consume(burst=True)
    await running


def burst_of_five(kafka: str, queue: str, timeout: float = 60) -> tuple[list[str], Counter[str], set[int]]:
    """A burst consume, by an app of a group of its own, of 5 jobs published to `queue`: their
    ids, the runs of each, and the threads they ran on (the event loop's)."""
    ids = run(publish(kafka, queue, 5))
    app = Bridge(broker=kafka, registry=str(SCHEMAS), group=f"g-{uuid.uuid4().hex[:12]}")
    runs: Counter[str] = Counter()
    threads: set[int] = set()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        threads.add(threading.get_ident())
        runs[ctx.job_id] += 1

    async def scenario() -> None:
        async with app:
            await app.consume(burst=True)

    run(scenario(), timeout)
    return ids, runs, threads


def test_a_member_joining_mid_run_shares_the_partitions(brokers: dict[str, str], queue: str) -> None:
    # Given 600 jobs of 25 ms on 3 partitions and one consumer at work (two at a time, held
    # after 60 runs until the second has run one, since joining a group takes seconds),
    # When a second consumer of the same group joins (a cooperative rebalance: the first
    # commits what it finished for the partitions it gives up),
    # Then both run jobs, every job runs, and few run twice.
    ids = run(publish(brokers["kafka"], queue, 600, sleep_ms=25))
    group = f"g-{uuid.uuid4().hex[:12]}"
    runs: Counter[str] = Counter()
    by_member: Counter[str] = Counter()
    second_ran = asyncio.Event()

    def member(name: str) -> Bridge:
        app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS), group=group, concurrency=2)

        @app.job("test.Echo", queue=queue)
        async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
            if name == "first" and len(runs) >= 60:
                # Joining takes seconds: hold the first member until the second has partitions,
                # or it could finish every job before the handover.
                await second_ran.wait()
            await asyncio.sleep(payload["sleep_ms"] / 1000)
            runs[ctx.job_id] += 1
            by_member[name] += 1
            if name == "second":
                second_ran.set()

        return app

    async def scenario() -> None:
        first, second = member("first"), member("second")
        async with first, second:
            await second_joins_once(first, second, lambda: len(runs) >= 60)

    run(scenario(), timeout=120)
    assert set(ids) == set(runs)
    assert by_member["first"] > 0 and by_member["second"] > 0
    assert sum(runs.values()) - len(ids) <= 2 * 2  # at most what was in flight at the handover


@pytest.mark.parametrize("where", ["_on_assign", "_drop"])
def test_a_rebalance_callback_that_raises_is_logged_and_ends_the_round(
    brokers: dict[str, str],
    queue: str,
    where: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a burst consume of 5 jobs whose first assign (as it joins its group), or first
    # revoke (in its close, once they ran: `_drop`), raises,
    # Then the error is logged with its traceback, and consume ends well, each job run once:
    # after an assign that failed, in a new round; after a close that failed, at once (the
    # round was ending). (Raised into librdkafka, the error ended consume. One raised in C code
    # came out as "SystemError: _PyErr_SetObject: exception <class 'str'> is not a
    # BaseException subclass" on Python 3.11.)
    monkeypatch.setattr(kafka_transport, "RESTART_AFTER_S", 0.2)
    callback = getattr(kafka_transport.KafkaTransport, where)
    raised: list[int] = []

    def failing_once(transport: Any, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not raised:
            raised.append(len(partitions))
            raise RuntimeError("a bug in bridge")
        callback(transport, consumer, partitions)

    monkeypatch.setattr(kafka_transport.KafkaTransport, where, failing_once)
    with caplog.at_level(logging.ERROR, logger="bridge.kafka"):
        ids, runs, _ = burst_of_five(brokers["kafka"], queue, timeout=90)
    assert runs == Counter(ids) and raised == [3]
    said = [r for r in caplog.records if r.getMessage() == "a Kafka rebalance callback failed"]
    assert len(said) == 1 and said[0].exc_text and "RuntimeError: a bug in bridge" in said[0].exc_text
    again = [r for r in caplog.records if "consuming again" in r.getMessage()]
    assert [r.getMessage() for r in again] == (
        [
            "a Kafka rebalance callback failed (RuntimeError('a bug in bridge')); records since the "
            "last commit run again; consuming again in 0.2 s"
        ]
        if where == "_on_assign"
        else []
    )


def test_a_revoke_that_fails_as_a_member_joins_leaves_nothing_behind_for_the_next_round(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer at work on 300 jobs of 10 ms (held after 30 runs until then), whose
    # commit in the revoke raises when a second member of its group joins (its round ends, and
    # a new one joins again),
    # When both have run every job,
    # Then a third member of the group finds nothing left to run. (The failed revoke left its
    # partitions in the first member's tracker, and its next round's end committed positions
    # for partitions the second owned, or waited for their jobs for good.)
    monkeypatch.setattr(kafka_transport, "RESTART_AFTER_S", 0.2)
    commit_now = Committer.commit_now
    raised: list[int] = []
    revoked = asyncio.Event()

    def failing_once(committer: Committer, leaving: Any = None) -> None:
        if not raised:
            raised.append(1)
            revoked.set()  # (the callback runs on the event loop's thread)
            raise RuntimeError("a bug in bridge")
        commit_now(committer, leaving)

    monkeypatch.setattr(Committer, "commit_now", failing_once)
    ids = run(publish(brokers["kafka"], queue, 300, sleep_ms=10))
    group = f"g-{uuid.uuid4().hex[:12]}"
    runs: Counter[str] = Counter()

    def member(name: str) -> Bridge:
        app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS), group=group, concurrency=2)

        @app.job("test.Echo", queue=queue)
        async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
            if name == "first" and len(runs) >= 30:
                await revoked.wait()  # (or it could run every job before the second joins)
            await asyncio.sleep(payload["sleep_ms"] / 1000)
            runs[ctx.job_id] += 1

        return app

    async def scenario() -> None:
        first, second = member("first"), member("second")
        async with first, second:
            await second_joins_once(first, second, lambda: len(runs) >= 30)
        ran = sum(runs.values())
        async with member("third") as third:
            await third.consume(burst=True)
        assert sum(runs.values()) == ran

    run(scenario(), timeout=120)
    assert raised == [1] and set(ids) == set(runs)


def test_a_round_gives_up_its_partitions_on_the_event_loops_thread_not_inside_close(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a burst consume of 5 jobs,
    # When it ends,
    # Then its partitions were revoked by a rebalance callback on the event loop's thread, as
    # they were assigned. (Revoked inside consumer.close(), the callbacks ran in close()'s
    # thread, and once in CI close() then waited for good in librdkafka's unassign: librdkafka
    # issue 4884.)
    threads: dict[str, set[int]] = {"_on_assign": set(), "_on_revoke": set()}
    revoked: list[int] = []
    for name in ("_on_assign", "_on_revoke"):
        callback = getattr(kafka_transport.KafkaTransport, name)

        def noting(transport: Any, consumer: Consumer, partitions: list[TopicPartition], *,
                   name: str = name, callback: Any = callback) -> None:  # fmt: skip
            threads[name].add(threading.get_ident())
            if name == "_on_revoke":
                revoked.append(len(partitions))
            callback(transport, consumer, partitions)

        monkeypatch.setattr(kafka_transport.KafkaTransport, name, noting)
    ids, runs, loop = burst_of_five(brokers["kafka"], queue)
    assert runs == Counter(ids) and revoked == [3]
    assert threads["_on_assign"] == threads["_on_revoke"] == loop


def test_a_consumer_whose_close_never_returns_is_left_behind_with_an_error_line(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a burst consume of 5 jobs whose Kafka consumers' close() never returns (as it did
    # once in CI, in librdkafka),
    # When every job has run,
    # Then consume ends once close() has had its time, saying so for each consumer: the main
    # one's and the delay forwarder's. (It waited for close() for good: bridge consume never
    # exited, and a test run waited until CI's limit.)
    monkeypatch.setattr(kafka_common, "CLOSE_S", 0.5)
    released = threading.Event()

    class NeverCloses(Consumer):
        def close(self) -> None:
            released.wait()
            super().close()

    monkeypatch.setattr(kafka_transport, "Consumer", NeverCloses)
    # (On code that waits for close(), the test's event loop would wait for its thread at exit.)
    safety = threading.Timer(60, released.set)
    safety.start()
    try:
        with caplog.at_level(logging.ERROR, logger="bridge.kafka"):
            ids, runs, _ = burst_of_five(brokers["kafka"], queue, timeout=30)
    finally:
        released.set()
        safety.cancel()
    assert runs == Counter(ids)
    said = [r.getMessage() for r in caplog.records if "did not close" in r.getMessage()]
    left = "a Kafka consumer did not close within 0.5 s; bridge goes on without it"
    assert said == [left, left]  # the main consumer's and the delay forwarder's


def test_a_job_waiting_for_its_run_at_when_its_partition_moves_runs_once(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 30 jobs due 12 s ahead (sooner than the shortest tier, 30 s) on 3 partitions, each
    # waiting for its run_at in a first consumer, When a second consumer of the same group
    # joins (a cooperative rebalance moves partitions to it, which it reads from their committed
    # offsets), Then each job runs once: the first consumer's copies of the records of the
    # partitions it gave up do not run. (They ran at their run_at, beside the second's.)
    group = f"g-{uuid.uuid4().hex[:12]}"
    runs: Counter[int] = Counter()
    by_member: Counter[str] = Counter()
    waiting: list[int] = []
    until = Worker._until

    async def recording(worker: Worker, run_at: int) -> bool:
        waiting.append(run_at)
        return await until(worker, run_at)

    monkeypatch.setattr(Worker, "_until", recording)

    def member(name: str) -> Bridge:
        app = Bridge(
            broker=brokers["kafka"], registry=str(SCHEMAS), group=group, concurrency=32, delay_tiers="30s"
        )

        @app.job("test.Echo", queue=queue)
        async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
            runs[payload["n"]] += 1
            by_member[name] += 1

        return app

    async def scenario() -> None:
        first, second = member("first"), member("second")
        async with first, second:
            await first.apply_topology([queue])
            for n in range(30):
                await first.enqueue_async("test.Echo", {"n": n}, queue=queue, delay=12.0)
            await second_joins_once(first, second, lambda: len(waiting) == 30)

    run(scenario(), timeout=90)
    assert by_member["second"] > 0, "the second consumer took no partition before the jobs were due"
    assert runs == Counter(range(30)), runs


def test_a_second_consume_at_once_on_one_app_is_refused_and_the_first_runs_on(
    brokers: dict[str, str], queue: str
) -> None:
    # Given an app consuming a queue, When it is asked to consume again before the first ends,
    # Then the second is refused saying what to do instead, and the first consume still runs
    # and commits its jobs. (The second took over the first's commits; once it stopped, the
    # first ran its jobs and committed none, and a burst run never ended.)
    app = own_app(brokers["kafka"])
    ran = failing_first(app, queue, lambda: ValueError("unused"))

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            stop = asyncio.Event()
            first = asyncio.create_task(app.consume([queue], stop=stop))
            await app.enqueue_async("test.Echo", {"n": 2})
            while not ran:
                await asyncio.sleep(0.05)
            with pytest.raises(ConfigError, match="consuming already"):
                await app.consume([queue], burst=True)
            await app.enqueue_async("test.Echo", {"n": 3})
            while len(ran) < 2:
                await asyncio.sleep(0.05)
            stop.set()
            await first
            await app.consume([queue], burst=True)  # (their offsets were committed: none runs again)

    run(scenario(), timeout=90)
    assert ran == [2, 3]


def test_a_key_goes_to_the_partition_the_java_client_would_choose(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a 3-partition queue, When 40 jobs with distinct keys are enqueued (and one without),
    # Then each keyed job is on the partition of Kafka's own partitioner (murmur2 of the key, as
    # the Java client computes it), so one key lands on one partition whichever language
    # produced it (docs/envelope.md).
    app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS), partitions=3)
    keys = [f"order-{n}" for n in range(40)]

    async def scenario() -> None:
        async with app:
            await app.apply_topology([queue])
            await asyncio.gather(
                *(app.enqueue_async("test.Echo", {"n": n}, queue=queue, key=k) for n, k in enumerate(keys))
            )
            await app.enqueue_async("test.Echo", {"n": -1}, queue=queue)

    run(scenario())
    schema = app.registry.schema(ENVELOPE)
    placed = {}
    for partition, body in read_partitions(brokers["kafka"].partition("://")[2], queue):
        placed[codec.decode(body, app.registry, schema)[1]["key"]] = partition
    assert len(placed) == 41
    assert {key: placed[key] for key in keys} == {key: java_partition(key.encode(), 3) for key in keys}


def test_another_producers_record_key_goes_on_with_the_job_byte_for_byte(
    brokers: dict[str, str], queue: str
) -> None:
    # Given jobs from another producer whose envelopes have no key and whose record keys are
    # bytes that are not UTF-8 (a Java LongSerializer's, say), on a 3-partition queue,
    # When one fails once (its retry goes back to the queue) and one fails for good,
    # Then the retry and the dead letter carry the record key as it came, so the retry lands on
    # the partition of the job it repeats (the producer partitions as docs/envelope.md asks:
    # murmur2, as Java's client does, and so does bridge). (The key was decoded as UTF-8 with
    # replacement characters, and a retry whose envelope had no key went out with none, to any
    # partition.) And when the dead letter is replayed, the job goes back with that key too
    # (it went back with none).
    app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS), partitions=3, delay_tiers="1s")
    keys = {1: (2**63 - 5).to_bytes(8, "big"), 2: b"\xff\xfe order 2"}
    runs: list[int] = []

    @app.job("test.Echo", queue=queue, max_attempts=2, backoff=fixed(0))
    async def flaky(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append(payload["n"])
        if payload["n"] == 2:
            raise Permanent("no")
        if runs.count(1) == 1:
            raise RuntimeError("once")

    async def scenario() -> None:
        async with app:
            await app.apply_topology([queue])
            bootstrap = brokers["kafka"].partition("://")[2]
            foreign = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
            for n, key in keys.items():
                envelope = app.build_envelope("test.Echo", {"n": n}, queue=queue)
                foreign.produce(queue, codec.encode(app.registry.schema(ENVELOPE), envelope.to_avro()), key)
            assert foreign.flush(10) == 0
            await app.consume(burst=True)
            bootstrap = brokers["kafka"].partition("://")[2]
            assert [key for _, key, _ in read_records(bootstrap, dlq_name(queue))] == [keys[2]]
            report = await app.dead_letters(queue).replay(Selection())
            assert len(report.replayed) == 1

    run(scenario(), timeout=60)
    assert sorted(runs) == [1, 1, 2]
    bootstrap = brokers["kafka"].partition("://")[2]
    on_queue = [(key, partition) for partition, key, _ in read_records(bootstrap, queue)]
    # (1's retry, and 2 replayed)
    assert sorted(key or b"" for key, _ in on_queue) == sorted([keys[1], keys[1], keys[2], keys[2]])
    assert all(partition == java_partition(key or b"", 3) for key, partition in on_queue)


def test_apply_topology_returns_once_every_new_partition_is_served(
    brokers: dict[str, str], queue: str
) -> None:
    # Given ten queues whose topics do not exist yet (30 topics, 90 partitions),
    # When apply_topology creates them and returns,
    # Then the leader of every new partition answers for it at once: a job published next
    # cannot reach a broker that has not created its partition's log yet. (CreateTopics
    # returns when the controller has recorded the topics; here the logs follow 150 ms later.)
    queues = [f"{queue}-{n}" for n in range(10)]
    app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS), partitions=3)
    probe = Consumer({"bootstrap.servers": brokers["kafka"].partition("://")[2], "group.id": "probe"})
    probe.list_topics(timeout=10)  # connected before the topics are made, to look at once

    async def apply() -> list[str]:
        async with app:
            return await app.apply_topology(queues)

    try:
        plan = run(apply())
        created = [line.split()[3] for line in plan if line.startswith("kafka: create topic")]
        assert {topic for topic in created if "delay" not in topic} == {
            name for q in queues for name in (q, dlq_name(q), f"{dlq_name(q)}.done")
        }
        for topic in created:
            metadata = probe.list_topics(topic, timeout=10).topics[topic]
            partitions = metadata.partitions  # the .done topics are compacted, of one partition
            assert metadata.error is None and len(partitions) == (1 if topic.endswith(".done") else 3), topic
            for partition in partitions:  # NOT_LEADER_FOR_PARTITION while its log is not there
                probe.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    finally:
        probe.close()


def test_dead_letter_topics_keep_their_records_until_replayed_or_purged(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a queue's topology applied, with tiers of 1 s and 4 days, Then its dead-letter
    # topics (the queue's, and each tier's) delete nothing by age (a broker's default retention,
    # 7 days, would lose dead letters nobody looked at yet), each tier keeps its records a week,
    # or twice the tier if longer (the cluster's default, which may be shorter than a tier, had
    # the 4-day tier's jobs deleted before they were due), and the queue keeps the broker's.
    prefix = names.prefix()
    app = Bridge(
        broker=brokers["kafka"], registry=str(SCHEMAS), prefix=prefix, delay_tiers="1s,4d", partitions=1
    )

    async def apply() -> list[str]:
        async with app:
            return await app.apply_topology([queue])

    created = [line.split()[3] for line in run(apply()) if line.startswith("kafka: create topic")]
    kept = topic_config(brokers["kafka"].partition("://")[2], created, "retention.ms")
    assert {t for t, ms in kept.items() if ms == "-1"} == {t for t in created if t.endswith(".dlq")}
    assert len([t for t in created if t.endswith(".dlq")]) == 3  # the queue's and the tiers'
    week = 7 * 86_400_000
    assert kept[f"{prefix}.delay.1s"] == str(week) and kept[f"{prefix}.delay.4d"] == str(8 * 86_400_000)
    assert kept[queue] not in ("-1", str(8 * 86_400_000))


def test_waiting_for_topics_that_never_come_ends_with_an_error_naming_them(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a topic that does not exist (as if its creation were lost),
    # When apply_topology's wait for it runs out, Then it raises one error that names the topic.
    common = {"bootstrap.servers": brokers["kafka"].partition("://")[2]}
    with pytest.raises(TransportError, match=f"Kafka has not started serving {queue} 0s after"):
        wait_until_served(common, [queue], timeout_s=0.3)


def test_a_consume_of_topics_that_do_not_exist_names_each_of_them(brokers: dict[str, str]) -> None:
    # Given two queues whose topics were never made, under a prefix whose tiers were not either,
    # When a consume starts, Then it refuses in one error naming every missing topic.
    app = own_app(brokers["kafka"])
    first, second = names.queue(), names.queue()
    signalling(app, first)

    async def scenario() -> None:
        async with app:
            await app.consume([first, second], burst=True)

    tier = tier_queue(app.settings.prefix, 1.0)
    with pytest.raises(TransportError) as raised:
        run(scenario())
    assert str(raised.value) == (
        f"Kafka topics {first}, {second}, {tier} do not exist: run `bridge topology apply`"
    )


def test_a_single_broker_that_cannot_make_kafkas_internal_topics_stops_consume_saying_which_settings(
    brokers: dict[str, str], queue: str, tmp_path: Path
) -> None:
    # Given a fresh one-broker Kafka whose settings give its offsets and transaction topics 3
    # replicas (Confluent's images unless told otherwise), and a job on it,
    # When consumed,
    # Then consume stops at once with an error naming both settings and the fix, and the job
    # has not run. (It waited 30 s and said only "could not start Kafka transactions: Timed
    # out waiting for operation to finish", while enqueueing worked.)
    factors = {"offsets.topic.replication.factor": "3", "transaction.state.log.replication.factor": "3"}
    with another_kafka(tmp_path / "kafka", factors) as url:
        error = refused_consume(Bridge(broker=url, registry=str(SCHEMAS)), queue)
    assert error.startswith("Kafka cannot run bridge consume: offsets.topic.replication.factor is 3")
    assert "the cluster has 1 broker, so Kafka cannot make __consumer_offsets" in error
    assert "transaction.state.log.replication.factor is 3 (KAFKA_TRANSACTION_STATE_LOG_" in error
    assert "set it to at most 1 (and transaction.state.log.min.isr no higher)" in error


def test_a_session_timeout_the_broker_refuses_stops_consume_with_an_error_naming_the_setting(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a job waiting and a consumer asking for a 2 s session (the broker takes 3 s at least),
    # When it consumes,
    # Then consume stops with an error naming session_timeout_s, and the job has not run. (It
    # logged "JoinGroup failed: Broker: Invalid session timeout" every few milliseconds, for good.)
    group = f"g-{uuid.uuid4().hex[:12]}"
    app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS), group=group, session_timeout_s=2)
    error = refused_consume(app, queue)
    assert error.startswith("Kafka refuses session_timeout_s=2: a broker takes from group.min.session")


def test_a_session_timeout_over_five_minutes_runs_jobs(brokers: dict[str, str], queue: str) -> None:
    # Given a consumer asking for a 400 s session (the broker takes up to 30 minutes),
    # When it consumes a job,
    # Then the job runs. (librdkafka refused to make the consumer: its max.poll.interval.ms,
    # 300 s, must be at least the session timeout.)
    group = f"g-{uuid.uuid4().hex[:12]}"
    app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS), group=group, session_timeout_s=400)
    ran = signalling(app, queue)

    async def scenario() -> None:
        async with app:
            await app.apply_topology([queue])
            await app.enqueue_async("test.Echo", {"n": 1}, queue=queue)
            await asyncio.wait_for(app.consume(burst=True), 60)

    run(scenario(), timeout=90)
    assert ran.is_set()


@pytest.mark.parametrize(("grace_s", "poll_s"), [(30, 300), (900, 960), (10**9, 86_400)])
def test_a_consumer_is_polled_often_enough_for_its_grace_period(
    grace_s: float, poll_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a stop's grace period, during which nothing polls the consumer,
    # When the transport makes its group consumer,
    # Then librdkafka is told to wait that long and a minute more (300 s at least, a day at
    # most) before it takes the member for dead. (It waited librdkafka's 300 s: a grace period
    # longer than that had the group run its jobs elsewhere and refuse its last commit.)
    made: list[dict[str, Any]] = []
    monkeypatch.setattr(kafka_transport, "Consumer", made.append)
    app = Bridge(broker="kafka://127.0.0.1:1", registry=str(SCHEMAS), grace_s=grace_s)
    kafka_transport.KafkaTransport(app.settings.require_broker(), app.settings).group_consumer("g")
    assert made[0]["max.poll.interval.ms"] == poll_s * 1000


def test_a_consume_that_starts_before_another_tool_has_made_its_topic_waits_a_moment_for_it(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consume of a queue whose topic another tool makes only once the consume has found
    # it absent (as a broker's metadata may lag a topic made a moment before),
    # When a job is enqueued on it,
    # Then the consume runs it, instead of refusing to start ("does not exist").
    # (However long this machine takes to make the topic: the grace is not what is tested.)
    monkeypatch.setattr(kafka_transport, "NEW_TOPIC_GRACE_S", 60.0)
    app, bootstrap = own_app(brokers["kafka"]), brokers["kafka"].partition("://")[2]
    ran = signalling(app, queue)

    async def scenario() -> None:
        async with app:
            await app.apply_topology([f"{queue}-other"])  # the delay tiers, not the queue
            transport = await app.transport()
            found_absent = asyncio.Event()
            absent = transport.absent  # type: ignore[attr-defined]

            async def watched(topics: list[str]) -> list[str]:
                missing: list[str] = await absent(topics)
                if queue in missing:
                    found_absent.set()
                return missing

            monkeypatch.setattr(transport, "absent", watched)
            stop = asyncio.Event()
            consuming = asyncio.create_task(app.consume([queue], stop=stop))
            await asyncio.wait_for(found_absent.wait(), 30)
            await asyncio.to_thread(topics_made_elsewhere, bootstrap, [queue])
            await app.enqueue_async("test.Echo", {"n": 0}, queue=queue)
            running = asyncio.create_task(ran.wait())
            await asyncio.wait([running, consuming], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            if consuming.done():
                consuming.result()  # (raises its error: it refused to start)
            assert running.done(), "the job did not run within 30 s"
            stop.set()
            await consuming

    run(scenario(), timeout=60)


def refused_consume(app: Bridge, queue: str) -> str:
    """The error of a consume of one job on `queue`, which must fail without running the job."""
    ran: list[str] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(ctx.job_id)

    async def scenario() -> str:
        async with app:
            await app.apply_topology([queue])
            await app.enqueue_async("test.Echo", {"n": 0}, queue=queue)
            with pytest.raises(TransportError) as raised:
                await asyncio.wait_for(app.consume(), 30)
        return str(raised.value)

    error = run(scenario(), timeout=60)
    assert ran == []
    return error


@pytest.mark.parametrize(
    ("busy", "look_s", "error"),
    [
        # The job's offset fails its transaction (no look at the topics in the test's time).
        (True, 3600.0, "Kafka topic {queue} was deleted; `bridge topology apply` makes it again"),
        # Nothing to commit: the consumer's look at its topics while idle finds it gone.
        (False, 0.5, "Kafka topic {queue} was deleted while bridge consume read it"),
    ],
    ids=["job-running", "idle"],
)
def test_a_topic_deleted_under_the_consumer_stops_it_with_an_error_naming_the_topic(
    brokers: dict[str, str],
    queue: str,
    busy: bool,
    look_s: float,
    error: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a consumer of a queue, running a job of it or idle,
    # When the queue's topic is deleted (before the job settles),
    # Then consume stops with an error naming the topic. (A settled job's offset can never be
    # committed: retrying it every 10 s held back every other queue's commits too, for good.
    # An idle consumer sat there for good.)
    monkeypatch.setattr(kafka_transport, "TOPIC_LOOK_S", look_s)
    # A transaction with offsets of a deleted topic fails when it times out: sooner, here.
    monkeypatch.setattr(kafka_commit, "TRANSACTION_TIMEOUT_S", 2.0)
    # (Its transactions' INFO lines in the report, should it fail: it failed once under a heavy
    # load, the consume not stopping within the 40 s this test then gave it, and the failed
    # transaction was logged only after that, while the test cleaned up.) A transaction's
    # calls may each wait CALL_TIMEOUT_S before they fail; the consumer stops at the latest
    # once one runs WEDGED_PAST_TIMEOUT_S past that, with another error, which this test would
    # report.
    caplog.set_level(logging.INFO, logger="bridge.kafka")
    wedged_s = kafka_commit.CALL_TIMEOUT_S + kafka_commit.WEDGED_PAST_TIMEOUT_S
    app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS), group=f"g-{uuid.uuid4().hex[:12]}")
    started, release = asyncio.Event(), asyncio.Event()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        started.set()
        if busy:
            await release.wait()

    async def scenario() -> None:
        async with app:
            await app.apply_topology([queue])
            await app.enqueue_async("test.Echo", {"n": 0}, queue=queue)
            consuming = asyncio.create_task(app.consume())
            await asyncio.wait_for(started.wait(), 30)
            await asyncio.to_thread(delete_queue, app, queue)
            release.set()
            with pytest.raises(TransportError, match=error.format(queue=queue)):
                await asyncio.wait_for(consuming, 2 * wedged_s + 10)
            assert queue in str(consuming.exception())

    run(scenario(), timeout=2 * wedged_s + 60)


def test_a_delayed_job_whose_queue_was_deleted_as_it_waited_is_dead_lettered_in_its_tier(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a job delayed by 1 s for a queue this consumer does not read, whose topic is
    # deleted while the job waits in its tier (the consumer still believes the topic exists),
    # and a job delayed for the consumer's own queue,
    # When consumed to the end, Then the forward fails, the forwarder looks again at where the
    # job goes, and dead-letters it `unroutable` in its tier, naming the queue; the other job
    # runs, and consume ends normally. (It stopped `bridge consume`, saying to make the queue
    # again, where a forward 5 s later dead-lettered the job: one deleted queue stopped every
    # delayed job of the prefix until a restart.)
    # No look at the topics while idle: it would refresh the consumer's list, and the forwarder
    # would dead-letter the job without the failed forward this test is about.
    monkeypatch.setattr(kafka_transport, "TOPIC_LOOK_S", 3600.0)
    monkeypatch.setattr(kafka_commit, "TRANSACTION_TIMEOUT_S", 2.0)  # (when the forward fails)
    caplog.set_level(logging.WARNING, logger="bridge.kafka")
    prefix, elsewhere = names.prefix(), names.queue()
    app, ran = _one_tier_app(brokers, queue, prefix)

    async def scenario() -> str:
        async with app:
            await app.apply_topology([queue, elsewhere])
            # (A retry on its third attempt, replayed twice before, as bridge writes one to its tier)
            job = app.build_envelope("test.Echo", {"n": 0}, queue=elsewhere)
            job = replace(job, attempt=3, replays=2, run_at=now_ms() + 1000)
            body = codec.encode(app.registry.schema(ENVELOPE), job.to_avro())
            _put_in_tier(
                brokers["kafka"].partition("://")[2],
                f"{prefix}.delay.1s",
                [(body, [(QUEUE_HEADER, elsewhere)])],
            )
            await app.enqueue_async("test.Echo", {"n": 1}, queue=queue, delay=1)
            consuming = asyncio.create_task(app.consume([queue], burst=True))
            await asyncio.to_thread(delete_queue, app, elsewhere)
            await asyncio.wait_for(consuming, 60)
            return job.id

    job_id = run(scenario(), timeout=90)
    assert ran == [1]
    [letter] = dead_letters(app, f"{prefix}.delay.1s")
    assert letter.reason == "unroutable" and f"names {elsewhere!r}, which is no queue" in letter.detail
    assert letter.raw is not None
    assert codec.decode(letter.raw, app.registry, app.registry.schema(ENVELOPE))[1]["id"] == job_id
    assert any(f"topic {elsewhere} it wrote to is gone" in r.getMessage() for r in caplog.records)

    # And once the queue is made again, a replay puts the job back as it was: it never ran, so
    # no `max_replays` holds it back, and its attempt is kept (as RabbitMQ's delay.dlq's are).
    async def replay() -> list[str]:
        async with app:
            await app.apply_topology([queue, elsewhere])
            report = await app.dead_letters(f"{prefix}.delay.1s").replay(Selection(), max_replays=2)
            return report.replayed

    assert run(replay(), timeout=60) == [job_id]
    [back] = read_queue(app, elsewhere)
    put_back = codec.decode(back, app.registry, app.registry.schema(ENVELOPE))[1]
    assert (put_back["attempt"], put_back["replays"]) == (3, 3)


def test_a_partition_with_an_open_transaction_is_not_read_to_its_end(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a topic whose only record is in a transaction not committed yet (as a delay hop is
    # for a moment after its consumer's commit returns, until the coordinator writes markers),
    # When a burst run asks whether its group has read the topic to the end, Then the answer is
    # no (a read_committed reader stops before that record and saw nothing); and once the
    # transaction commits, still no: the record is there to read.
    common: dict[str, Any] = {"bootstrap.servers": brokers["kafka"].partition("://")[2]}
    topics_made_elsewhere(common["bootstrap.servers"], [queue])
    wait_until_served(common, [queue], timeout_s=30)
    producer = Producer({**common, "transactional.id": f"test-{queue}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(queue, b"a delay hop")
    producer.flush(10)
    group = Consumer({**common, "group.id": f"g-{uuid.uuid4().hex[:12]}"})
    try:
        assert not run(read_to_end(group, [queue], common))
        producer.commit_transaction(30)
        assert not run(read_to_end(group, [queue], common))
    finally:
        group.close()


def test_a_commit_asked_for_while_the_run_loops_transaction_is_out_waits_for_it(
    brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a committer whose run loop has taken everything settled and whose transaction is
    # out (held here until released),
    # When a burst run's drain check asks it to commit too, Then that commit returns only once
    # the loop's transaction is done. (It returned "all committed" at once, having found nothing
    # left to take; the drain check then found the tiers empty while the transaction's delay
    # hops were not in Kafka yet, and the run ended before they came back.)
    committer, consumer = a_committer(brokers["kafka"])
    out, release = threading.Event(), threading.Event()
    committed: list[dict[Any, int]] = []

    def transact(records: list[Any], offsets: dict[Any, int], notes: object, metadata: object) -> bool:
        out.set()
        release.wait(10)
        committed.append(offsets)
        return True

    monkeypatch.setattr(committer, "_transact", transact)
    committer.add(("jobs", 0), 5, [], 6)

    async def scenario() -> list[bool]:
        loops = asyncio.create_task(committer.commit())
        await asyncio.to_thread(out.wait, 10)
        check = asyncio.create_task(committer.commit())
        await asyncio.sleep(0.05)  # the loop goes idle: time in which it would have returned
        assert not check.done(), "the drain check's commit returned while a transaction was out"
        release.set()
        return [await loops, await check]

    try:
        assert run(scenario(), timeout=20) == [True, True]
    finally:
        release.set()
        consumer.close()
    assert committed == [{("jobs", 0): 6}]


def test_a_transaction_larger_than_librdkafka_queues_stops_the_consumer_with_its_error(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a committer whose producer queues at most 2 records (100,000 by default, which one
    # transaction can hold: a slow job at the head of a partition holds back every later job's
    # retry behind it), When a transaction holds 3, Then the commit fails and the committer's
    # failure is the error, which stops the consumer (its records run again). (BufferError went
    # past the committer: its loop ended, every later commit raised it again, and the consumer
    # ran on, committing nothing.)
    common: dict[str, Any] = {"bootstrap.servers": brokers["kafka"].partition("://")[2]}
    consumer = Consumer({**common, "group.id": f"g-{uuid.uuid4().hex[:12]}"})
    committer = Committer(
        {**common, "queue.buffering.max.messages": 2}, consumer, f"test-{uuid.uuid4().hex}", lambda tp: True
    )
    committer.add((queue, 0), 0, [(queue, b"retry", None, None, 0)] * 3, 1)

    async def scenario() -> bool:
        await committer.start()
        return await committer.commit()

    try:
        assert run(scenario(), timeout=60) is False
        assert isinstance(committer.failure, BufferError), committer.failure
    finally:
        consumer.close()


class FirstTransactionFails:
    """A committer's `_transact` whose first transaction is held out until `release`, then
    fails (as one sent with the group's generation before a rebalance does); the others
    commit, and are recorded in `committed` (records' values, offsets)."""

    def __init__(self) -> None:
        self.out, self.release = threading.Event(), threading.Event()
        self.committed: list[tuple[list[bytes], dict[Any, int]]] = []
        self._first = True

    def __call__(self, records: list[Any], offsets: dict[Any, int], notes: object, metadata: object) -> bool:
        if self._first:
            self._first = False
            self.out.set()
            self.release.wait(10)
            return False
        self.committed.append(([record[1] for record in records], offsets))
        return True


@pytest.fixture
def first_fails(
    brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Committer, FirstTransactionFails]]:
    """A committer (of a real consumer) whose first transaction is held out, then fails."""
    committer, consumer = a_committer(brokers["kafka"])
    monkeypatch.setattr(committer, "_transact", transact := FirstTransactionFails())
    try:
        yield committer, transact
    finally:
        transact.release.set()
        consumer.close()


def retry_of(n: int) -> tuple[str, bytes, None, None, int]:
    """A record that a job's settling publishes (as a retry's hop to a delay tier would be)."""
    return ("bridge.delay.1s", f"retry of {n}".encode(), None, None, 0)


@pytest.mark.parametrize("then", ["a rebalance commits", "the commit is cancelled", "the partition is lost"])
def test_what_a_failed_transaction_held_goes_out_with_the_next_commit_not_behind_it(
    first_fails: tuple[Committer, FirstTransactionFails], then: str
) -> None:
    # Given a committer whose transaction is out with record 0's retry, and record 1 settled
    # since with a retry of its own,
    # When a rebalance commits before the partition goes (on the loop's thread, as its callback
    # does), or that commit is cancelled (its round ended) and the round's last commit hands the
    # partition over, and the transaction out then fails,
    # Then the next transaction publishes both retries with the offset past them. (It committed
    # offset 2 with record 1's retry alone: record 0's was put back only after that, or never,
    # and its job was lost.)
    # When instead the partition is lost (no commit waits for that transaction, as a revoke's
    # does) and assigned here again before the transaction fails,
    # Then nothing of the old assignment goes out: the new one runs records 0 and 1 again from
    # the committed offset. (The batch was put back: record 0's retry went out twice.)
    committer, transact = first_fails
    tp = ("jobs", 0)
    committer.add(tp, 0, [retry_of(0)], 1)

    async def scenario() -> None:
        first = asyncio.create_task(committer.commit())
        await asyncio.to_thread(transact.out.wait, 10)
        committer.add(tp, 1, [retry_of(1)], 2)
        if then == "a rebalance commits":
            threading.Timer(0.2, transact.release.set).start()  # while the rebalance's commit waits
            committer.commit_now(leaving={tp: 2})
            assert await first is False
        elif then == "the commit is cancelled":
            first.cancel()
            transact.release.set()
            assert await committer.commit(leaving={tp: 2}) is True
        else:
            committer.forget(tp)  # lost; `owns` says it is assigned again at once
            transact.release.set()
            assert await first is False
            assert await committer.commit() is True

    run(scenario(), timeout=20)
    both = [([b"retry of 0", b"retry of 1"], {tp: 2})]
    assert transact.committed == ([] if then == "the partition is lost" else both)


@pytest.mark.parametrize("sent_by", ["commit", "transact"])
def test_a_transaction_that_returns_after_the_committer_gave_up_on_it_is_dropped_quietly(
    quick_to_wedge: Committer, monkeypatch: pytest.MonkeyPatch, sent_by: str
) -> None:
    # Given a committer whose transaction's call runs on past its timeout and past
    # WEDGED_PAST_TIMEOUT_S (held here), sent by a commit (the run loop's batch) or by transact
    # (the delay forwarder's records),
    # When the committer gives up on it, and then it returns,
    # Then the commit counted as failed (the producer is done for), the round's last commit and
    # a rebalance's come back at once, failed too, and the late return is dropped without an
    # error in its thread. (It raised InvalidStateError there, setting the result of the future
    # the wait had cancelled: pytest failed the chaos test for it. The commits after it each
    # waited the wedge limit again for it, 160 s in all, before a stop or a new round went on.)
    committer = quick_to_wedge
    release = threading.Event()
    threads: list[threading.Thread] = []

    def transact(records: list[Any], offsets: dict[Any, int], notes: object, metadata: object) -> bool:
        threads.append(threading.current_thread())
        return committer._call(lambda timeout: release.wait(60), timeout=0.1)  # (released by the test)

    monkeypatch.setattr(committer, "_transact", transact)
    sent = committer.commit() if sent_by == "commit" else committer.transact([], {("jobs", 0): 6})
    try:
        assert run(sent, timeout=10) is False
        assert committer.failure is not None
        monkeypatch.setattr(kafka_commit, "WEDGED_PAST_TIMEOUT_S", 30.0)  # a wait for it again takes this
        assert run(committer.commit(leaving={("jobs", 0): 6}), timeout=10) is False
        committer.commit_now(leaving={("jobs", 0): 6})
    finally:
        release.set()
    threads[0].join(10)  # its error, if any, fails this test (pytest's unhandled thread exception)
    assert not threads[0].is_alive()


@pytest.mark.parametrize("sent_by", ["commit", "transact", "commit_now"])
def test_a_transaction_whose_calls_each_return_within_their_timeout_is_waited_for_however_long_in_all(
    quick_to_wedge: Committer, monkeypatch: pytest.MonkeyPatch, sent_by: str
) -> None:
    # Given a committer whose transaction makes two calls, each returning within its timeout,
    # that take longer in all than one call's timeout and WEDGED_PAST_TIMEOUT_S together,
    # When a commit, transact or a rebalance's commit_now waits for it,
    # Then it commits, and the committer goes on. (A limit on the whole transaction, not per
    # call, held consumers up to 100 s after a Kafka restart: it had to allow for every call.)
    committer = quick_to_wedge
    calls: list[str] = []

    def transact(records: list[Any], offsets: dict[Any, int], notes: object, metadata: object) -> bool:
        for call in ("send_offsets", "commit"):
            committer._call(lambda timeout: time.sleep(0.4), timeout=0.5)
            calls.append(call)
        return True

    monkeypatch.setattr(committer, "_transact", transact)
    if sent_by == "commit_now":
        committer.commit_now()
    else:
        sent = committer.commit() if sent_by == "commit" else committer.transact([], {("jobs", 0): 6})
        assert run(sent, timeout=10) is True
    assert calls == ["send_offsets", "commit"]
    assert committer.failure is None and committer._out is None


@pytest.mark.parametrize("abort", ["aborts", "cannot abort"])
def test_a_failed_transaction_is_tried_again_only_by_a_producer_that_could_abort_it(
    brokers: dict[str, str], abort: str
) -> None:
    # Given a committer whose transaction failed as one that may be tried again (timed out),
    # When its abort goes through, or fails (here: a producer whose transactions never started),
    # Then the committer tries again in the first case, and in the second fails (the round
    # ends; a new one takes over with a new producer). (A producer whose abort was still out
    # refused every transaction after it, "Conflicting abort_transaction API call is already in
    # progress": a consumer tried again every 10 s after a Kafka restart, committing nothing.)
    committer, consumer = a_committer(brokers["kafka"])
    try:
        if abort == "aborts":
            run(committer.start(), timeout=60)
            committer.producer.begin_transaction()
        assert committer._failed(TIMED_OUT, set()) is False
        assert (committer.failure is None) == (abort == "aborts")
    finally:
        consumer.close()


TIMED_OUT = KafkaException(KafkaError(KafkaError._TIMED_OUT, "a stand-in", retriable=True))


def test_transactions_aborted_for_long_are_a_warning_with_how_long_and_how_many_tries(
    brokers: dict[str, str], queue: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a committer whose transactions are aborted, each tried again (its clock set by the
    # test), When they fail for 30 s, Then that is a WARNING with how long and how many tries,
    # at most every 30 s, each other try an INFO line; once one commits, or after 30 s without
    # a try, the count starts again.
    # (A broker refusing every try's records, its clock an hour off, held back every commit of
    # the process, and only INFO lines said so.)
    clock = [0.0]
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0], time_ns=time.time_ns)
    monkeypatch.setattr(kafka_commit, "time", fake_time)
    committer, consumer = a_committer(brokers["kafka"])
    said: list[tuple[int, str]] = []
    topics_made_elsewhere(brokers["kafka"].partition("://")[2], [queue])  # (for the one that commits)

    def aborted_at(t: float) -> None:
        clock[0] = t
        committer.producer.begin_transaction()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bridge.kafka"):
            assert committer._failed(TIMED_OUT, set()) is False
        said.extend((r.levelno, r.getMessage()) for r in caplog.records if "aborted" in r.getMessage())

    try:
        run(committer.start(), timeout=60)
        for t in (0, 29, 30, 40, 60):
            aborted_at(t)
        clock[0] = 61
        assert run(committer.transact([(queue, b"x", None, None, 0)], {}), timeout=60)
        aborted_at(100)
        aborted_at(3700)  # (an hour on, nothing to commit meanwhile: no streak)
        committer._try_started = 3701.0  # (a try begun at once that took 39 s to fail: the streak goes on)
        aborted_at(3740)
    finally:
        consumer.close()
    assert committer.failure is None
    info, warning = logging.INFO, logging.WARNING
    assert [level for level, _ in said] == [info, info, warning, info, warning, info, info, warning]
    assert "aborted for 30 s (3 tries, nothing committed; the last: a stand-in)" in said[2][1]
    assert "aborted for 60 s (5 tries" in said[4][1]


def test_a_failed_transaction_that_could_not_be_aborted_still_names_a_topic_it_wrote_to_that_is_gone(
    brokers: dict[str, str],
) -> None:
    # Given a committer whose transaction failed and cannot be aborted (here: a producer whose
    # transactions never started), When a topic the transaction wrote to is gone,
    # Then its failure names the topic, and is not one a new round tries again. (In CI such an
    # abort failed, fenced, and the consumer went round every 5 s saying only that.)
    committer, consumer = a_committer(brokers["kafka"])
    gone = f"gone-{uuid.uuid4().hex[:12]}"
    try:
        assert committer._failed(TIMED_OUT, {gone}) is False
    finally:
        consumer.close()
    assert isinstance(committer.failure, TransportError) and not committer.failure.retriable
    assert f"Kafka topic {gone} was deleted" in str(committer.failure)


@pytest.mark.parametrize("retired", [False, True], ids=["its round runs", "its round ended"])
def test_a_late_failure_of_a_committer_whose_round_ended_is_logged_at_debug(
    brokers: dict[str, str], caplog: pytest.LogCaptureFixture, retired: bool
) -> None:
    # Given a committer whose round runs, or has ended (a call of it was stuck then),
    # When its transaction fails and cannot be aborted, Then that is an ERROR of the round that
    # runs, and only a DEBUG line of one that ended. (Calls stuck in rounds long gone returned at
    # the next Kafka restart and logged "stopping so its records run again": nothing stopped.)
    committer, consumer = a_committer(brokers["kafka"])
    committer.retired = retired
    try:
        with caplog.at_level(logging.DEBUG, logger="bridge.kafka"):
            committer._failed(TIMED_OUT, set())
    finally:
        consumer.close()
    said = [r.levelno for r in caplog.records if "could not be aborted" in r.getMessage()]
    assert said == [logging.DEBUG if retired else logging.ERROR]


@pytest.fixture
def quick_to_wedge(brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Committer]:
    """A committer (of a real consumer) that gives up on a call 0.2 s past its timeout, with
    offset 5 of ("jobs", 0) settled."""
    monkeypatch.setattr(kafka_commit, "WEDGED_PAST_TIMEOUT_S", 0.2)
    monkeypatch.setattr(kafka_commit, "WEDGE_LOOK_S", 0.05)
    committer, consumer = a_committer(brokers["kafka"])
    committer.add(("jobs", 0), 5, [], 6)
    try:
        yield committer
    finally:
        consumer.close()


def a_committer(kafka: str) -> tuple[Committer, Consumer]:
    """A Committer of a new group's consumer (close the consumer when done)."""
    common: dict[str, Any] = {"bootstrap.servers": kafka.partition("://")[2]}
    consumer = Consumer({**common, "group.id": f"g-{uuid.uuid4().hex[:12]}"})
    return Committer(common, consumer, f"test-{uuid.uuid4().hex}", owns=lambda tp: True), consumer


def test_a_foreign_tier_record_without_a_queue_to_return_to_is_dead_lettered_in_its_tier(
    brokers: dict[str, str], queue: str
) -> None:
    # Given delay-tier records from another producer that bridge cannot route (no bridge-queue
    # header; a header naming a topic that does not exist), then a job delayed by bridge,
    # When consumed, Then the delayed job still comes back and runs, the consumer ends
    # normally, and each foreign record is in the tier's own dead-letter topic with the
    # reason, where it came from and its bytes (docs/envelope.md).
    prefix = names.prefix()
    tier = f"{prefix}.delay.1s"
    foreign: list[tuple[bytes, Headers]] = [
        (b"no header", []),
        (b"no such queue", [("bridge-queue", b"t-nowhere")]),
        (b"not text", [("bridge-queue", b"\xff\xfe")]),
        (b"kafka's own", [("bridge-queue", b"__consumer_offsets")]),
        (b"round and round", [("bridge-queue", tier.encode())]),
    ]
    app, ran = _foreign_tier_records_then_a_delayed_job(brokers, queue, prefix, foreign, topology=True)
    assert ran == [1]
    letters = {letter.raw: letter for letter in dead_letters(app, tier)}
    assert set(letters) == {value for value, _ in foreign}
    assert "no bridge-queue header" in letters[b"no header"].detail
    assert "'t-nowhere', which is no queue" in letters[b"no such queue"].detail
    assert "bridge-queue header is not UTF-8 text: b'\\xff\\xfe'" in letters[b"not text"].detail
    assert "'__consumer_offsets', which is no queue" in letters[b"kafka's own"].detail
    assert f"{tier!r}, which is no queue" in letters[b"round and round"].detail
    for letter in letters.values():
        assert letter.reason == "unroutable" and letter.queue == tier and letter.envelope is None
        assert letter.consumer_group == f"{prefix}.delay" and letter.offset is not None


def test_a_tier_record_larger_than_a_queue_takes_is_dead_lettered_in_its_tier(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a 3 MB delay-tier record for a queue, which another producer compressed (gzip)
    # below the tier's limit, so Kafka took it, then a job delayed by bridge,
    # When consumed, Then the delayed job runs, and the record is in the tier's dead-letter
    # topic, cut, saying how large it was. (Forwarded whole, the queue refused it: every
    # transaction of the forwarder failed, and `bridge consume` stopped at every start.)
    prefix = names.prefix()
    big = b"\x00" * 3_000_000
    settings = {"compression.type": "gzip", "message.max.bytes": 10_000_000}
    records: list[tuple[bytes, Headers]] = [(big, [("bridge-queue", queue.encode())])]
    app, ran = _foreign_tier_records_then_a_delayed_job(
        brokers, queue, prefix, records, topology=True, producer=settings
    )
    assert ran == [1]
    [letter] = dead_letters(app, f"{prefix}.delay.1s")
    limit = app.settings.queue_bytes
    assert letter.reason == "unroutable" and letter.raw == big[:limit]
    assert f"it is 3,000,000 bytes, more than a queue takes ({limit:,})" in letter.detail


def test_a_due_record_whose_forward_failed_is_forwarded_again_at_once_not_with_the_next_head(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a 2m tier partition holding a due job, then one not due for two minutes, fetched
    # together, and a delay forwarder whose first transaction fails (as one does in a rebalance),
    # When consumed, Then the due job is forwarded again and runs within seconds. (The record
    # not due had paused the partition: the due one, sought back to, waited two minutes with it.)
    forwards: list[int] = []

    class FirstFails(Committer):
        async def transact(self, records: list[Any], offsets: dict[Any, int], notes: Any = None) -> bool:
            forwards.append(len(records))
            return len(forwards) > 1 and await super().transact(records, offsets, notes)

    monkeypatch.setattr(kafka_forwarder, "Committer", FirstFails)
    first_of_tier_records_runs_soon(brokers["kafka"], queue, "2m", written_s_ago=[180, 0])
    assert forwards[:2] == [1, 1]  # the due job, twice


def test_a_tier_record_stamped_in_the_future_waits_one_tier_not_until_then(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a 1s tier record stamped an hour ahead (another host's clock, another producer),
    # When consumed, Then it is forwarded and runs within seconds. (It was due an hour and a
    # second from its stamp, and held every record behind it in its partition till then.)
    first_of_tier_records_runs_soon(brokers["kafka"], queue, "1s", written_s_ago=[-3600])


def test_a_burst_run_ends_when_a_tier_the_settings_no_longer_name_is_deleted_as_it_runs(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a 5s tier topic left by an app with other tiers, and a burst run of an app whose
    # tiers are 1s and 2s (it forwards from the 5s tier too), When the 5s topic is deleted
    # once a job delayed 1 s has run, while another delayed 8 s waits (the README says to
    # delete such a tier once it is empty), Then the run ends once that one has run too. (The
    # forwarder kept reading the deleted topic, never read to its end: the run waited for good.)
    prefix, before, after = tiers_changed(brokers["kafka"])
    ran: list[int] = []
    first = asyncio.Event()

    @after.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])
        first.set()

    async def scenario() -> None:
        async with before:
            await before.apply_topology([queue])
        async with after:
            await after.apply_topology([queue])
            for n, delay_s in ((1, 1), (2, 8)):
                await after.enqueue_async("test.Echo", {"n": n}, queue=queue, delay=delay_s)
            consuming = asyncio.create_task(after.consume(burst=True))
            await asyncio.wait_for(first.wait(), 30)
            await asyncio.to_thread(delete_queue, after, f"{prefix}.delay.5s")
            await asyncio.wait_for(consuming, 30)

    run(scenario(), timeout=90)
    assert ran == [1, 2]


def test_a_partition_runs_so_far_past_a_slow_job_and_no_further_until_it_ends(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a limit of 50 records handed out past a partition's first unsettled one, and on one
    # partition a job that runs until told to end, then 1,000 quick jobs,
    # When they run, Then while the first one runs, its partition stops short of the 1,000
    # (what was fetched before the pause aside); once it ends, the rest run, each once. (Every
    # one ran meanwhile, held in memory uncommitted with what it published: after a 10-minute
    # job, millions.)
    monkeypatch.setattr(kafka_transport, "RUN_AHEAD_MAX", 50)
    app = Bridge(
        broker=brokers["kafka"], registry=str(SCHEMAS), prefix=names.prefix(), delay_tiers="1s",
        partitions=1, group=f"g-{uuid.uuid4().hex[:12]}", concurrency=8,
    )  # fmt: skip
    runs: Counter[int] = Counter()
    release = asyncio.Event()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        runs[payload["n"]] += 1
        if payload["n"] == 0:
            await release.wait()

    async def scenario() -> int:
        async with app:
            await app.apply_topology()
            for start in range(0, 1001, 250):
                await asyncio.gather(*(
                    app.enqueue_async("test.Echo", {"n": n}) for n in range(start, min(start + 250, 1001))
                ))  # fmt: skip
            consuming = asyncio.create_task(app.consume(burst=True))
            while len(runs) < 50:
                await asyncio.sleep(0.05)
            await asyncio.sleep(2)  # (time to run on, were it not held back)
            meanwhile = len(runs)
            release.set()
            await asyncio.wait_for(consuming, 60)
            return meanwhile

    meanwhile = run(scenario(), timeout=120)
    assert meanwhile < 200, meanwhile  # (1,001 without the limit)
    assert set(runs) == set(range(1001)) and set(runs.values()) == {1}


def test_a_tier_a_producer_makes_while_a_consumer_runs_is_forwarded_without_a_restart(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer with the delay tier 1s at work, When a producer with tiers 1s and 3s
    # applies its topology (making the 3s tier topic) and enqueues a job 4 s ahead, which waits
    # in that tier, Then the consumer runs the job within seconds of its time. (Its forwarder
    # read only the tier topics there were at its start: the job waited for the next restart,
    # or went at the topic's retention.)
    monkeypatch.setattr(kafka_transport, "TOPIC_LOOK_S", 0.5)
    prefix, group = names.prefix(), f"g-{uuid.uuid4().hex[:12]}"
    settings: dict[str, Any] = {"broker": brokers["kafka"], "registry": str(SCHEMAS), "prefix": prefix}
    worker = Bridge(**settings, delay_tiers="1s", group=group, partitions=1)
    producer = Bridge(**settings, delay_tiers="1s,3s", partitions=1)
    ran = signalling(worker, queue)

    async def scenario() -> float:
        async with worker, producer:
            await worker.apply_topology()
            stop = asyncio.Event()
            consuming = asyncio.create_task(worker.consume(stop=stop))
            try:
                await asyncio.sleep(3)  # (at work: its forwarder subscribed)
                await producer.apply_topology([queue])
                await producer.enqueue_async("test.Echo", {"n": 1}, queue=queue, delay=4)
                due = time.monotonic() + 4
                await asyncio.wait_for(ran.wait(), 30)
                return time.monotonic() - due
            finally:
                stop.set()
                await consuming

    late_s = run(scenario(), timeout=90)
    assert late_s < 8, late_s


def test_a_tier_a_producer_makes_while_a_consumer_is_busy_is_forwarded_without_waiting_for_it(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer with the delay tier 1s, busy all along (600 jobs of 50 ms, one at a time),
    # When a producer with tiers 1s and 3s makes the 3s tier topic and enqueues a job 4 s ahead
    # to a queue of its own, which waits in that tier,
    # Then the consumer's forwarder moves the job to its queue within seconds of its time, while
    # still busy. (A consumer looked for new tier topics only at a moment it had nothing to
    # fetch: the job waited for the backlog's end.)
    monkeypatch.setattr(kafka_transport, "TOPIC_LOOK_S", 0.5)
    prefix, group, later = names.prefix(), f"g-{uuid.uuid4().hex[:12]}", names.queue()
    settings: dict[str, Any] = {"broker": brokers["kafka"], "registry": str(SCHEMAS), "prefix": prefix}
    worker = Bridge(**settings, delay_tiers="1s", group=group, partitions=1, concurrency=1)
    producer = Bridge(**settings, delay_tiers="1s,3s", partitions=1)
    ran = 0

    @worker.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        nonlocal ran
        await asyncio.sleep(payload["sleep_ms"] / 1000)
        ran += 1

    async def scenario() -> tuple[float, int]:
        await publish(brokers["kafka"], queue, 600, sleep_ms=50, partitions=1)
        async with worker, producer:
            await worker.apply_topology()
            stop = asyncio.Event()
            consuming = asyncio.create_task(worker.consume(stop=stop))
            try:
                while not ran:  # (at work)
                    await asyncio.sleep(0.1)
                await producer.apply_topology([later])
                await producer.enqueue_async("test.Echo", {"n": 1}, queue=later, delay=4)
                due = time.monotonic() + 4
                while not await asyncio.to_thread(read_records, brokers["kafka"].partition("://")[2], later):
                    assert time.monotonic() < due + 20, "the delayed job never reached its queue"
                    await asyncio.sleep(0.5)
                return time.monotonic() - due, ran
            finally:
                stop.set()
                await consuming

    late_s, ran_by_then = run(scenario(), timeout=120)
    assert late_s < 8 and ran_by_then < 600, (late_s, ran_by_then)


def test_a_kafka_ssl_url_to_a_plaintext_listener_says_to_use_kafka(brokers: dict[str, str]) -> None:
    # Given the local Kafka's plaintext listener, When a job is enqueued to it as kafka+ssl://,
    # Then one line says that it answers, but not in TLS, and what to use. (It said only "cannot
    # reach Kafka ...; is it running?", as for a broker that is down.)
    servers = brokers["kafka"].partition("://")[2]
    done = bridge(
        "enqueue", "test.Echo", '{"n": 1}', "--queue", "q", "--registry", str(SCHEMAS),
        "--broker", f"kafka+ssl://{servers}",
    )  # fmt: skip
    assert_one_line_error(done, f"{servers} answers, but not in TLS: for a plaintext listener, use kafka://")


def test_a_kafka_url_to_a_tls_listener_says_to_use_kafka_ssl(tmp_path: Path) -> None:
    # Given a listener that speaks TLS (a self-signed certificate), When bridge looks at why a
    # kafka:// URL to it could not be used, Then it says to use kafka+ssl://. (librdkafka calls
    # it a "Broker transport failure", as it does a broker that is down.)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            with contextlib.suppress(OSError):  # (the listener closed: the test ended without a look)
                connection, _ = listener.accept()
                with context.wrap_socket(connection, server_side=True):
                    pass

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        said = kafka_transport._tls_mismatch(f"127.0.0.1:{port}", tls=False)
        server.join(10)
    assert said == f"127.0.0.1:{port} speaks TLS: use kafka+ssl:// for it"


def test_a_look_for_deleted_topics_that_takes_long_holds_back_no_job(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer whose look at Kafka's topics (every TOPIC_LOOK_S, busy or idle) does not
    # answer until a job has run, When 3 jobs are consumed in burst mode, Then they run, and the
    # consume ends. (The look was awaited in the fetch loop: nothing was fetched while Kafka
    # took its time to answer, up to 5 s at each look; here, never.)
    monkeypatch.setattr(kafka_transport, "TOPIC_LOOK_S", 0.0)
    looked = kafka_transport.KafkaTransport._require_still_there
    ran: list[asyncio.Event] = []

    async def slow_look(self: kafka_transport.KafkaTransport, queues: Any) -> None:
        await ran[0].wait()
        await looked(self, queues)

    monkeypatch.setattr(kafka_transport.KafkaTransport, "_require_still_there", slow_look)
    app = own_app(brokers["kafka"])

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran[0].set()

    async def scenario() -> Stats:
        ran.append(asyncio.Event())
        await publish(brokers["kafka"], queue, 3, partitions=1)
        async with app:
            await app.apply_topology()
            return await app.consume(burst=True)

    stats = run(scenario(), timeout=30)
    assert stats.processed == 3


def test_a_retry_held_behind_a_slow_job_runs_on_time_though_later_retries_went_into_its_tier_first(
    brokers: dict[str, str], queue: str
) -> None:
    # Given tiers of 1 s and 3 s (one partition each), a job on queue A that runs 3.2 s and one
    # beside it that fails at once (retry due 3 s later: its hop waits for the slow job, the
    # record before it), and a job on queue B that fails 2.5 s in (its hop goes into the 3 s
    # tier at once),
    # When the slow job ends and A's hop goes out, Then A's retry starts within 1 s of its due
    # time. (Stamped as it settled, its hop went into the tier behind B's, stamped later, and
    # waited for it: 2.5 s late.)
    app = Bridge(
        broker=brokers["kafka"], registry=str(SCHEMAS), prefix=names.prefix(), delay_tiers="1s,3s",
        partitions=1, group=f"g-{uuid.uuid4().hex[:12]}", concurrency=4,
    )  # fmt: skip
    other = f"{queue}-b"
    failed: dict[int, float] = {}
    again: dict[int, float] = {}
    slow_started = asyncio.Event()

    @app.job("test.Echo", queue=queue, backoff=fixed(3))
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        n = payload["n"]
        if n == 1:
            slow_started.set()
            await asyncio.sleep(3.2)
        elif ctx.attempt == 1:
            failed[n] = time.time()
            raise ConnectionError("once")
        else:
            again[n] = time.time()

    async def scenario() -> None:
        async with app:
            await app.apply_topology([queue, other])
            await app.enqueue_async("test.Echo", {"n": 1})
            await app.enqueue_async("test.Echo", {"n": 2})
            consuming = asyncio.create_task(app.consume([queue, other], burst=True))
            await asyncio.wait_for(slow_started.wait(), 30)
            await asyncio.sleep(2.5)
            await app.enqueue_async("test.Echo", {"n": 3}, queue=other)
            await asyncio.wait_for(consuming, 60)

    run(scenario(), timeout=90)
    assert set(again) == {2, 3}
    late = {n: again[n] - (failed[n] + 3) for n in again}
    assert late[2] < 1.0, late


def first_of_tier_records_runs_soon(kafka: str, queue: str, tier: str, written_s_ago: list[float]) -> None:
    """Write a job for `queue` to delay tier `tier` per entry of `written_s_ago` (its record's
    timestamp), in one partition, then consume: the first must run within 20 s."""
    app = Bridge(
        broker=kafka, registry=str(SCHEMAS), prefix=names.prefix(), delay_tiers=f"1s,{tier}",
        partitions=1, group=f"g-{uuid.uuid4().hex[:12]}",
    )  # fmt: skip
    ran = signalling(app, queue)

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            producer = Producer({"bootstrap.servers": kafka.partition("://")[2]})
            now_ms, topic = int(time.time() * 1000), f"{app.settings.prefix}.delay.{tier}"
            for n, ago_s in enumerate(written_s_ago, 1):
                envelope = app.build_envelope("test.Echo", {"n": n}, queue=queue)
                body = codec.encode(app.registry.schema(ENVELOPE), envelope.to_avro())
                headers: Headers = [("bridge-queue", queue.encode())]
                stamp = now_ms - int(ago_s * 1000)
                producer.produce(topic, body, headers=headers, timestamp=stamp)
            producer.flush(10)
            stop = asyncio.Event()
            consuming = asyncio.create_task(app.consume(stop=stop))
            try:
                await asyncio.wait_for(ran.wait(), 20)
            finally:
                stop.set()
                await consuming

    run(scenario(), timeout=60)


def test_a_publish_kafka_has_not_acknowledged_when_the_app_closes_fails_rather_than_waits(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an app that knows a topic which is then deleted (the client keeps each publish to
    # it, waiting for the topic, until its 30 s timeout),
    # When an enqueue to it still waits as the app closes, Then the enqueue fails with a
    # PublishError saying the client closed first. (It waited for good: with the client gone,
    # nothing would ever report on it.)
    monkeypatch.setattr(kafka_transport, "CLOSE_FLUSH_S", 0.5)
    bootstrap = brokers["kafka"].partition("://")[2]
    topics_made_elsewhere(bootstrap, [queue])
    app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS))

    async def scenario() -> None:
        await app.transport()  # (it learns the topics)
        await asyncio.to_thread(delete_queue, app, queue)
        enqueue = asyncio.create_task(app.enqueue_async("test.Echo", {"n": 1}, queue=queue))
        with pytest.raises(TimeoutError):  # not acknowledged: it cannot be
            await asyncio.wait_for(asyncio.shield(enqueue), 1.0)
        await app.aclose()
        with pytest.raises(PublishError, match="the client closed first; it may still be published"):
            await enqueue

    run(scenario(), timeout=30)


def test_a_dead_letter_topic_made_again_shows_its_new_letters(brokers: dict[str, str], queue: str) -> None:
    # Given a dead-letter topic whose first letter was purged (marked done at 0:0), then the
    # topic deleted and made again by `bridge topology apply`, as its error message asks,
    # When a job is dead-lettered there again, Then the DLQ lists it. (The old mark 0:0 hid the
    # new letter at the same offset from list, show, replay and purge.)
    app = own_app(brokers["kafka"])
    failing_first(app, queue, lambda: Permanent("declined"))

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            await app.enqueue_async("test.Echo", {"n": 1})
            await app.consume(burst=True)
            dlq = app.dead_letters(queue)
            assert len(await dlq.purge(Selection())) == 1
            await asyncio.to_thread(delete_queue, app, dlq_name(queue))
            plan = await app.apply_topology()
            cleared = f"kafka: clear the marks in topic {dlq_name(queue)}.done (its dead-letter topic is new)"
            assert cleared in plan
            second = await app.enqueue_async("test.Echo", {"n": 1})
            await app.consume(burst=True)
            assert [item.id for item in await dlq.find()] == [second]

    run(scenario(), timeout=120)


def test_an_enqueue_to_a_delay_tier_is_refused_saying_so(brokers: dict[str, str]) -> None:
    # Given an app whose delay tiers exist, When a job is enqueued to one of them as its queue,
    # Then the enqueue fails at once, saying the topic is a delay tier and not a queue. (It was
    # published, without the header that names a queue, and dead-lettered by the forwarder.)
    prefix = names.prefix()
    app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS), prefix=prefix, delay_tiers="1s")
    tier = f"{prefix}.delay.1s"

    async def scenario() -> None:
        async with app:
            await app.apply_topology([names.queue()])
            await app.enqueue_async("test.Echo", {"n": 1}, queue=tier)

    with pytest.raises(PublishError) as refused:
        run(scenario())
    assert str(refused.value) == (
        f"Kafka topic {tier} is a delay tier, not a queue: enqueue the job to its own queue"
    )


def test_a_foreign_record_in_a_tier_without_its_dead_letter_topic_stops_consuming_and_is_kept(
    brokers: dict[str, str], queue: str
) -> None:
    # Given topics made before tiers had dead-letter topics (the queue, its DLQ and the tier
    # only), a foreign tier record with no bridge-queue header, then a job delayed by bridge,
    # When consumed, Then consume stops, naming the record and what to run, And once `bridge
    # topology apply` has made the tier's dead-letter topic, the next consume dead-letters the
    # record there and runs the job. (The record was skipped with an error line, and the
    # offset past it committed: lost.)
    prefix, bootstrap = names.prefix(), brokers["kafka"].partition("://")[2]
    tier = f"{prefix}.delay.1s"
    topics_made_elsewhere(bootstrap, [queue, dlq_name(queue), tier], partitions=3)
    app, ran = _one_tier_app(brokers, queue, prefix)

    async def scenario() -> str:
        async with app:
            _put_in_tier(bootstrap, tier, [(b"no header", [])])
            await app.enqueue_async("test.Echo", {"n": 1}, queue=queue, delay=1)
            with pytest.raises(TransportError) as stopped:
                await app.consume(burst=True)
            assert ran == []
            await app.apply_topology([queue])
            await app.consume(burst=True)
            return str(stopped.value)

    stopped = run(scenario(), timeout=90)
    assert re.search(
        rf"record 0 of {re.escape(tier)} partition \d goes nowhere: it has no bridge-queue header, and "
        rf"there is no {re.escape(tier)}\.dlq to dead-letter it to: run `bridge topology apply`",
        stopped,
    ), stopped
    assert ran == [1]
    [letter] = dead_letters(app, tier)
    assert letter.reason == "unroutable" and letter.raw == b"no header"


def _foreign_tier_records_then_a_delayed_job(
    brokers: dict[str, str],
    queue: str,
    prefix: str,
    records: list[tuple[bytes, Headers]],
    *,
    topology: bool,
    producer: dict[str, Any] | None = None,
) -> tuple[Bridge, list[int]]:
    """Put `records` (value, headers) in the 1s tier of `prefix` with a plain producer (of
    `producer`'s settings), enqueue a job delayed by 1 s, and consume to the end: the app, and
    the jobs that ran."""
    app, ran = _one_tier_app(brokers, queue, prefix)

    async def scenario() -> None:
        async with app:
            if topology:
                await app.apply_topology([queue])
            _put_in_tier(brokers["kafka"].partition("://")[2], f"{prefix}.delay.1s", records, producer)
            await app.enqueue_async("test.Echo", {"n": 1}, queue=queue, delay=1)
            await app.consume(burst=True)

    run(scenario(), timeout=60)
    return app, ran


def _one_tier_app(brokers: dict[str, str], queue: str, prefix: str) -> tuple[Bridge, list[int]]:
    """An app of `prefix` with a 1s tier, and the list its test.Echo handler on `queue` adds
    each job's n to."""
    app = Bridge(
        broker=brokers["kafka"], registry=str(SCHEMAS), prefix=prefix, delay_tiers="1s", group=f"g-{prefix}"
    )
    ran: list[int] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])

    return app, ran


def _put_in_tier(
    bootstrap: str, tier: str, records: list[tuple[bytes, Headers]], producer: dict[str, Any] | None = None
) -> None:
    """Write `records` (value, headers) to `tier` as another producer (of `producer`'s settings)."""
    foreign = Producer({"bootstrap.servers": bootstrap, **(producer or {})})
    for value, headers in records:
        foreign.produce(tier, value, headers=headers)
    assert foreign.flush(10) == 0


def test_topology_apply_raises_the_record_size_of_topics_made_elsewhere(
    brokers: dict[str, str], queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given every topic bridge needs made by another tool (the broker's default limit, 1 MB),
    # When a worker starts, Then it warns, naming each topic and what to run; When `topology
    # apply --dry-run` runs, Then it plans to raise each limit and changes none; When `topology
    # apply` runs, Then the broker reports the new limits (dead-letter topics the larger), and a
    # failing job just under max_message_bytes is retried, then dead-lettered with its errors.
    app = own_app(brokers["kafka"])
    ran = failing_first(app, queue, lambda: ValueError("e" * 1000), max_attempts=3, backoff=fixed(0))
    bootstrap = brokers["kafka"].partition("://")[2]

    async def scenario() -> tuple[list[str], dict[str, str], dict[str, str], Stats]:
        async with app:
            sized = [t for t in await _made_elsewhere(app) if not t.endswith(".done")]
            with caplog.at_level(logging.WARNING, logger="bridge.kafka"):
                await app.consume(burst=True)  # nothing to run yet
            plan = await app.apply_topology(dry_run=True)
            before = await asyncio.to_thread(topic_config, bootstrap, sized, "max.message.bytes")
            await app.apply_topology()
            after = await asyncio.to_thread(topic_config, bootstrap, sized, "max.message.bytes")
            await app.enqueue_async("test.Echo", {"n": 1, "text": "x" * (1024 * 1024 - 200)})
            await app.enqueue_async("test.Echo", {"n": 2})
            return plan, before, after, await app.consume(burst=True)

    plan, before, after, stats = run(scenario(), timeout=90)
    [warning] = [r.getMessage() for r in caplog.records if "max.message.bytes" in r.getMessage()]
    assert all(f"topic {t} takes {before[t]} bytes" in warning for t in before)
    assert "`bridge topology apply` raises max.message.bytes" in warning
    settings = app.settings
    wanted = {t: str(settings.dlq_bytes if t.endswith(".dlq") else settings.queue_bytes) for t in before}
    assert all(int(before[t]) < int(wanted[t]) for t in before)  # the dry run changed nothing
    raises = [f"kafka: raise max.message.bytes of topic {t} from {before[t]} to {wanted[t]}" for t in before]
    assert all(line in plan for line in raises)
    assert after == wanted
    assert sorted(ran) == [1, 1, 1, 2] and stats.dead_lettered == 1
    [letter] = dead_letters(app, queue)
    assert letter.reason == "exhausted" and letter.envelope is not None and len(letter.envelope.errors) == 3


def test_topology_apply_raises_the_retention_of_tier_topics_made_elsewhere(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a delay tier topic made by another tool, or a bridge from before tiers had their
    # own retention, keeping records an hour, When `topology apply --dry-run` runs, Then it
    # plans to raise the tier's retention.ms to a week and changes nothing; When `topology
    # apply` runs, Then the broker reports a week. (A tier kept what it was made with, which
    # may be shorter than the tier: its jobs were deleted before they were due.)
    app = own_app(brokers["kafka"])
    tier, bootstrap = f"{app.settings.prefix}.delay.1s", brokers["kafka"].partition("://")[2]
    topics_made_elsewhere(bootstrap, [tier], config={"retention.ms": "3600000"})

    async def scenario() -> tuple[list[str], dict[str, str]]:
        async with app:
            plan = await app.apply_topology([queue], dry_run=True)
            before = await asyncio.to_thread(topic_config, bootstrap, [tier], "retention.ms")
            await app.apply_topology([queue])
            return plan, before

    plan, before = run(scenario(), timeout=60)
    assert f"kafka: raise retention.ms of topic {tier} from 3600000 to 604800000" in plan
    assert f"kafka: topic {tier} exists" not in plan
    assert before == {tier: "3600000"}
    assert topic_config(bootstrap, [tier], "retention.ms") == {tier: "604800000"}


def test_a_record_too_large_for_its_topic_stops_consuming_with_what_to_run(
    brokers: dict[str, str], queue: str
) -> None:
    # Given topics made by another tool and left at the broker's limit, and a failing job just
    # under max_message_bytes, When consumed, Then its retry, larger than the topic takes,
    # stops `bridge consume` at once, saying what to run. (The transaction was tried again and
    # again, failing the same way and holding back every other commit, for good.)
    app = own_app(brokers["kafka"])
    failing_first(app, queue, lambda: ValueError("e" * 1000), max_attempts=3, backoff=fixed(0))

    async def scenario() -> None:
        async with app:
            await _made_elsewhere(app)
            await app.enqueue_async("test.Echo", {"n": 1, "text": "x" * (1024 * 1024 - 200)})
            await app.consume(burst=True)

    with pytest.raises(TransportError, match=r"too large.*`bridge topology apply` raises"):
        run(scenario(), timeout=60)


def test_a_write_kafka_refuses_whatever_the_try_stops_consuming_naming_it(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a dead-letter topic made compacted by another tool (Kafka refuses a record without
    # a key there, INVALID_RECORD), When a job without a key is dead-lettered, Then `bridge
    # consume` stops at once, naming the error. (librdkafka has such a transaction aborted,
    # which read as one a try gets past: it was tried every 50 ms for good, at INFO, holding
    # back every commit. A missing right, TOPIC_AUTHORIZATION_FAILED, went the same way.)
    app = own_app(brokers["kafka"])
    failing_first(app, queue, lambda: Permanent("it cannot work"))

    async def scenario() -> None:
        async with app:
            compacted, bootstrap = dlq_name(queue), brokers["kafka"].partition("://")[2]
            await asyncio.to_thread(
                topics_made_elsewhere, bootstrap, [compacted], config={"cleanup.policy": "compact"}
            )
            await app.apply_topology([queue])
            await app.enqueue_async("test.Echo", {"n": 1}, queue=queue)
            await app.consume([queue], burst=True)

    with pytest.raises(
        TransportError, match=r"refuses a write of this transaction whatever the try \(INVALID_RECORD"
    ):
        run(scenario(), timeout=60)


async def _made_elsewhere(app: Bridge) -> list[str]:
    """Make every topic that `topology apply` would make for `app`, as another tool would."""
    plan = await app.apply_topology(dry_run=True)
    topics = [line.split()[3] for line in plan if line.startswith("kafka: create topic")]
    await asyncio.to_thread(topics_made_elsewhere, app.settings.require_broker().partition("://")[2], topics)
    return topics


def test_a_job_that_kills_its_worker_is_dead_lettered_once_it_came_back_delivery_limit_times(
    brokers: dict[str, str], queue: str, tmp_path: Path
) -> None:
    # Given 30 jobs on 3 partitions, one of which kills its `bridge consume` with SIGKILL on
    # every run (Kafka keeps no delivery count: each next owner of the partition reads it again
    # from the committed offset, and dies too), and a delivery_limit of 2,
    # When consumers of one group are started one after another until one drains the queue,
    # Then the killer ran twice and the third consumer dead-lettered it as `delivery_limit`
    # without running it; every other job ran to success and none was dead-lettered.
    url, ledger, group = brokers["kafka"], tmp_path / "ledger", f"g-{uuid.uuid4().hex[:12]}"
    jobs = run(publish(url, queue, 30))
    killer = jobs[0]
    env = {"LEDGER_KILL": "0", "BRIDGE_DELIVERY_LIMIT": "2"}
    codes, log = restart_until_drained(url, queue, ledger, group, env)
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0], log
    assert ledger_counts(ledger, "start")[killer] == 2
    assert set(ledger_counts(ledger, "done")) == set(jobs) - {killer}
    assert_dead_lettered_for_coming_back(url, queue, killer, 2)


def test_a_job_running_beside_a_killer_in_another_partition_is_not_counted_with_it(
    brokers: dict[str, str], queue: str, tmp_path: Path
) -> None:
    # Given two 1 s jobs on two partitions, one of which kills its `bridge consume` at once on
    # every run, and a delivery_limit of 2,
    # When consumers of one group are started one after another until one drains the queue,
    # Then the killer is dead-lettered and the other job ran to success. (While the records of
    # a careful start ran one at a time per partition, the slow job ran beside the killer in
    # the second consumer, was counted with it and dead-lettered with it by the third.)
    url, ledger, group = brokers["kafka"], tmp_path / "ledger", f"g-{uuid.uuid4().hex[:12]}"
    keys = ["a", next(k for k in "bcdefgh" if java_partition(k.encode(), 3) != java_partition(b"a", 3))]

    async def enqueue() -> list[str]:
        app = Bridge(broker=url, registry=str(SCHEMAS))
        async with app:
            await app.apply_topology([queue])
            return [
                await app.enqueue_async("test.Echo", {"n": n, "sleep_ms": 1000}, queue=queue, key=key)
                for n, key in enumerate(keys)
            ]

    innocent, killer = run(enqueue())
    env = {"LEDGER_KILL": "1", "BRIDGE_DELIVERY_LIMIT": "2"}
    codes, log = restart_until_drained(url, queue, ledger, group, env)
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0], log
    assert innocent in ledger_counts(ledger, "done")
    assert [letter.envelope.id for letter in dead_letters(own_app(url), queue) if letter.envelope] == [killer]


def test_a_delay_forwarder_that_cannot_start_ends_the_round_and_the_next_one_forwards(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a job whose first attempt asks to be retried in 1 s, and a delay forwarder whose
    # first producer cannot start its transactions (Kafka does not answer in time, as while it
    # loads its transaction coordinator after a restart),
    # When consumed in a burst run, Then consume logs it, consumes again in a new round, and
    # the retry comes back and runs. (The forwarder's task died unseen: jobs went on running,
    # but no retry or delayed job came back again, and the burst run never ended.)
    monkeypatch.setattr(kafka_transport, "RESTART_AFTER_S", 0.5)
    starts: list[str] = []

    class FailsFirst(Committer):
        async def start(self) -> None:
            starts.append("start")
            if len(starts) == 1:
                with mapped("could not start Kafka transactions"):  # as `start` maps it
                    self.producer.init_transactions(0)  # librdkafka's own timeout, with no time given
            await super().start()

    monkeypatch.setattr(kafka_forwarder, "Committer", FailsFirst)
    attempts: list[int] = []
    app = retried_in_1_s(brokers["kafka"], queue, attempts)

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            await app.enqueue_async("test.Echo", {"n": 1})
            await app.consume(burst=True)

    with caplog.at_level(logging.ERROR, "bridge"):
        run(scenario(), timeout=60)
    assert attempts == [1, 2] and len(starts) == 2
    assert "the delay forwarder stopped: could not start Kafka transactions" in caplog.text


def test_a_round_ends_without_waiting_for_a_forward_whose_transaction_does_not_return(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job whose first attempt asks to be retried in 1 s, and a delay forwarder whose
    # first transaction's call does not return (as librdkafka's may not, after a Kafka restart),
    # When consume is stopped while it is out, Then consume returns before that call could even
    # time out, and the next run forwards the retry, which runs. (The round waited for the
    # forwarder until its call wedged: 80 s and more after Kafka was back, with nothing consumed.)
    out, release = threading.Event(), threading.Event()

    class FirstHangs(Committer):
        def _transact(
            self, records: list[Any], offsets: dict[Any, int], notes: Any, metadata: object
        ) -> bool:
            if out.is_set():
                return super()._transact(records, offsets, notes, metadata)
            out.set()
            return self._call(lambda timeout: release.wait(60) and False, timeout=kafka_commit.CALL_TIMEOUT_S)

    monkeypatch.setattr(kafka_forwarder, "Committer", FirstHangs)
    attempts: list[int] = []
    app = retried_in_1_s(brokers["kafka"], queue, attempts)

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            await app.enqueue_async("test.Echo", {"n": 1})
            stop = asyncio.Event()
            consuming = asyncio.create_task(app.consume(stop=stop))
            await asyncio.to_thread(out.wait, 30)
            stop.set()
            await asyncio.wait_for(consuming, kafka_commit.CALL_TIMEOUT_S)
            await app.consume(burst=True)

    try:
        run(scenario(), timeout=90)
    finally:
        release.set()
    assert out.is_set() and attempts == [1, 2]


def retried_in_1_s(kafka: str, queue: str, attempts: list[int]) -> Bridge:
    """An app of its own whose test.Echo jobs ask to be retried in 1 s at their first attempt;
    each attempt's number goes to `attempts`."""
    app = own_app(kafka)

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise Retry(delay_s=1)

    return app


class Recorded(Committer):
    """A Committer that records the transactional ids of `group`'s consumer, round by round,
    in `producers` (not the delay forwarder's): give the transport
    `functools.partial(Recorded, group, producers)`."""

    def __init__(
        self, group: str, producers: list[str], common: dict[str, Any], consumer: Consumer, producer_id: str,
        *args: Any, **kw: Any,
    ) -> None:  # fmt: skip
        self.ours = producer_id.startswith(f"{group}.")
        if self.ours:
            producers.append(producer_id)
        super().__init__(common, consumer, producer_id, *args, **kw)


def fence(broker: str, producer_id: str) -> None:
    """Fence `producer_id`'s transactions: another producer takes its transactional id (its
    next transaction fails for good, as one did after a Kafka restart)."""
    bootstrap = broker.partition("://")[2]
    Producer({"bootstrap.servers": bootstrap, "transactional.id": producer_id}).init_transactions(30)


def test_a_transaction_that_fails_for_good_starts_a_new_round_from_the_committed_offsets(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a consumer at work on 300 jobs of 10 ms,
    # When its transactional producer is fenced after 50 runs (another producer takes its
    # transactional id: its next transaction fails for good, as one did after a Kafka restart;
    # the jobs wait for the fence, which may take longer than the 250 left would),
    # and the next round's producer cannot start its transactions at the first try (Kafka does
    # not answer in time, as while it loads its transaction coordinator after a restart),
    # Then consume logs both, consumes again from the committed offsets with a new producer,
    # and runs every job; once a burst run drained, nothing is left to run again.
    # (consume stopped with the error: `bridge consume` exited until something restarted it.)
    ids = run(publish(brokers["kafka"], queue, 300, sleep_ms=10))
    monkeypatch.setattr(kafka_transport, "RESTART_AFTER_S", 0.5)
    group = f"g-{uuid.uuid4().hex[:12]}"
    producers: list[str] = []  # the consumer's transactional ids, round by round

    class SlowToStart(Recorded):
        async def start(self) -> None:
            if self.ours and len(producers) == 2:  # the round after the fenced one
                with mapped("could not start Kafka transactions"):  # as `start` maps it
                    self.producer.init_transactions(0)  # librdkafka's own timeout, with no time given
            await super().start()

    monkeypatch.setattr(kafka_transport, "Committer", functools.partial(SlowToStart, group, producers))
    app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS), group=group, concurrency=4)
    runs: Counter[str] = Counter()
    fenced = asyncio.Event()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        if len(runs) >= 50:
            await fenced.wait()
        await asyncio.sleep(payload["sleep_ms"] / 1000)
        runs[ctx.job_id] += 1

    async def scenario() -> None:
        async with app:
            consuming = asyncio.create_task(app.consume(burst=True))
            while len(runs) < 50:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(fence, brokers["kafka"], producers[0])
            fenced.set()
            await asyncio.wait_for(consuming, 90)  # drained: every offset committed
            again = await asyncio.wait_for(app.consume(burst=True), 60)
            assert again.processed == 0, again.summary()

    with caplog.at_level(logging.ERROR, logger="bridge.kafka"):
        run(scenario(), timeout=150)
    assert set(runs) == set(ids)
    assert len(producers) >= 3, producers
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.endswith("; consuming again in 0.5 s") for line in lines), caplog.text
    timed_out = "could not start Kafka transactions: Timed out waiting for operation to finish"
    assert any(line.startswith(timed_out) and line.endswith("; trying again in 0.5 s") for line in lines), (
        lines
    )


def test_a_stop_whose_last_transaction_fails_ends_well_and_its_jobs_run_again(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a consumer running four of 20 jobs, When it is stopped (as by SIGTERM) and its
    # transactional producer is fenced before the jobs end, so that the stop's last transaction
    # fails, Then consume returns (`bridge consume` exits 0: the stop was asked for), logging
    # that the records since the last commit run again, and a second consume runs them again.
    # (consume raised the failure, and `bridge consume` exited 1.)
    ids = run(publish(brokers["kafka"], queue, 20))
    group = f"g-{uuid.uuid4().hex[:12]}"
    producers: list[str] = []  # the consumer's transactional ids, round by round
    monkeypatch.setattr(kafka_transport, "Committer", functools.partial(Recorded, group, producers))
    app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS), group=group, concurrency=4)
    runs: Counter[str] = Counter()
    fenced = asyncio.Event()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        runs[ctx.job_id] += 1
        await fenced.wait()

    async def scenario() -> Counter[str]:
        async with app:
            stop = asyncio.Event()
            consuming = asyncio.create_task(app.consume(stop=stop))
            while sum(runs.values()) < 4:
                await asyncio.sleep(0.01)
            first = Counter(runs)
            stop.set()
            await asyncio.to_thread(fence, brokers["kafka"], producers[0])
            fenced.set()
            await asyncio.wait_for(consuming, 60)
            await asyncio.wait_for(app.consume(burst=True), 60)
            return first

    with caplog.at_level(logging.ERROR, logger="bridge.kafka"):
        first = run(scenario(), timeout=150)
    assert set(runs) == set(ids)
    assert {job: runs[job] for job in first} == {job: 2 for job in first}, runs
    assert any(r.getMessage().endswith("; stopping, as asked") for r in caplog.records), caplog.text


# The producer of a round that ended may still be connecting to the proxy when its loop closes
# (a ResourceWarning about the proxy's socket, not bridge's).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_consumer_whose_partitions_were_lost_consumes_again_with_a_new_producer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a Kafka of its own that clients reach only through a proxy (the address it
    # advertises), and a consumer (sessions of 3 s) that ran a job and has nothing to commit,
    # When the proxy cuts every connection for 10 s (its group session ends: its partitions
    # are lost, as when Kafka restarts),
    # Then its round ends, saying so, and a job enqueued after runs in a new round, with a new
    # transactional producer. (The producer that lived through a Kafka restart was seen to
    # wedge at its first transaction after it: nothing ran for 20 s more, 3 restarts in 8.)
    monkeypatch.setattr(kafka_transport, "RESTART_AFTER_S", 0.5)
    group = f"g-{uuid.uuid4().hex[:12]}"
    producers: list[str] = []  # the consumer's transactional ids, round by round
    committed: dict[tuple[str, int], int] = {}  # the offsets its transactions committed

    class Committing(Recorded):
        def _transact(
            self, records: list[Any], offsets: dict[Any, int], notes: Any, metadata: object
        ) -> bool:
            done = super()._transact(records, offsets, notes, metadata)
            if done and self.ours:
                committed.update(offsets)
            return done

    monkeypatch.setattr(kafka_transport, "Committer", functools.partial(Committing, group, producers))
    with kafka_behind_proxy(tmp_path / "kafka") as proxy:
        queue = f"q-{uuid.uuid4().hex[:8]}"
        app = Bridge(broker=proxy.url, registry=str(SCHEMAS), group=group, session_timeout_s=3)
        ran: list[int] = []

        @app.job("test.Echo", queue=queue)
        async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
            ran.append(payload["n"])

        async def until_ran(jobs: list[int]) -> None:
            while ran != jobs:
                await asyncio.sleep(0.05)

        async def scenario() -> None:
            async with app:
                await app.apply_topology([queue])
                stop = asyncio.Event()
                consuming = asyncio.create_task(app.consume(stop=stop))
                await app.enqueue_async("test.Echo", {"n": 1, "sleep_ms": 0}, queue=queue)
                await asyncio.wait_for(until_ran([1]), 30)
                # Its commit is not cut off: a transaction out at the cut would fail and end
                # the round by itself, with or without the loss.
                while not any(tp[0] == queue and at > 0 for tp, at in committed.items()):
                    await asyncio.sleep(0.05)
                proxy.cut(10.0)
                await asyncio.sleep(12.0)
                await app.enqueue_async("test.Echo", {"n": 2, "sleep_ms": 0}, queue=queue)
                # (before a call stuck in the old producer could even time out)
                await asyncio.wait_for(until_ran([1, 2]), kafka_commit.CALL_TIMEOUT_S)
                stop.set()
                await asyncio.wait_for(consuming, 30)

        with caplog.at_level(logging.ERROR, logger="bridge.kafka"):
            run(scenario(), timeout=150)
    assert len(producers) >= 2, producers
    lost = "the Kafka consumer's group session ended, and its partitions with it; records since"
    assert any(r.getMessage().startswith(lost) for r in caplog.records), caplog.text


@pytest.mark.parametrize("settling", ["fails for good", "fails once"])
def test_a_careful_start_does_not_commit_past_a_record_whose_settling_failed(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch, settling: str
) -> None:
    # Given a partition whose last owner stopped holding records (its note says `bridge:run`),
    # so that its next records run one at a time, and two jobs on it, the first of which fails
    # for good, When a consumer starts on it,
    # and the first job's dead letter cannot be written, its dead-letter topic gone (its worker
    # stops), Then the second job does not run, and the committed offset stays at the first
    # job, which runs again once the topology is back. (The second job's turn committed its own
    # offset, past the first, which was lost.)
    # Or the dead letter's settling fails once in a way a retry may get past (its worker goes
    # on), Then the round ends and the next one runs both jobs, and dead-letters the first.
    # (The partition stood still for good: every later record waited behind the first.)
    monkeypatch.setattr(kafka_transport, "RESTART_AFTER_S", 0.2)
    app = own_app(brokers["kafka"])
    group, bootstrap = app.settings.group, brokers["kafka"].partition("://")[2]
    ran = failing_first(app, queue, lambda: Permanent("broken for good"))

    # (Another app sets it up: the consumer's must not have seen the dead-letter topic.)
    setup = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS), prefix=app.settings.prefix, partitions=1)

    async def scenario() -> None:
        async with setup:
            await setup.apply_topology([queue])
            if settling == "fails for good":
                await asyncio.to_thread(delete_queue, setup, dlq_name(queue))
            left = [TopicPartition(queue, 0, 0, metadata="bridge:run")]
            await asyncio.to_thread(marker.commit, offsets=left, asynchronous=False)
            for n in (1, 2):
                await setup.enqueue_async("test.Echo", {"n": n}, queue=queue)
        async with app:
            if settling == "fails for good":
                with pytest.raises(TransportError, match=f"{dlq_name(queue)} does not exist"):
                    await asyncio.wait_for(app.consume(), 60)
                return
            transport = await app.transport()
            route, failures = transport._route, [TransportError("Kafka did not answer", retriable=True)]  # type: ignore[attr-defined]

            async def fails_once(message: Outgoing) -> Any:
                if failures:
                    raise failures.pop()
                return await route(message)

            monkeypatch.setattr(transport, "_route", fails_once)
            await asyncio.wait_for(app.consume(burst=True), 60)

    marker = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        run(scenario(), timeout=90)
        [committed] = marker.committed([TopicPartition(queue, 0)], timeout=30)
    finally:
        marker.close()
    if settling == "fails for good":
        assert ran == [1] and committed.offset == 0
    else:
        assert ran == [1, 1, 2] and committed.offset == 2
        assert [letter.reason for letter in dead_letters(app, queue)] == ["permanent"]


def test_partitions_handed_over_by_a_stop_in_time_count_no_returns(
    brokers: dict[str, str], queue: str, tmp_path: Path
) -> None:
    # Given six jobs, a consumer running three at a time that gets SIGTERM while they run
    # (they finish; the other three were never started), and a delivery_limit of 1, so that a
    # single counted return dead-letters a job,
    # When a second consumer of the group drains the queue,
    # Then every job ran once, and none was dead-lettered: a partition handed over with nothing
    # in flight is not taken for one whose owner stopped holding records.
    url, ledger, group = brokers["kafka"], tmp_path / "ledger", f"g-{uuid.uuid4().hex[:12]}"
    gate = tmp_path / "gate"
    jobs = run(publish(url, queue, 6, sleep_ms=500))
    env = {"BRIDGE_DELIVERY_LIMIT": "1"}
    gated = {**env, "LEDGER_GATE": str(gate)}
    process = consumer(url, queue, ledger, group, "--concurrency", "3", "--grace", "20", env=gated)
    stop_while_three_run(process, ledger, gate)
    code, log = finish(process, ledger, timeout=30)
    assert code == 0, log
    code, log = finish(consumer(url, queue, ledger, group, "--burst", env=env), ledger)
    assert code == 0, log
    assert ledger_counts(ledger, "done") == {job: 1 for job in jobs}
    assert dead_letters(own_app(url), queue) == []


def test_records_of_a_careful_start_pass_its_gate_in_the_order_they_were_started() -> None:
    # Given a partition whose last owner stopped holding records (its note says `bridge:run`
    # at offset 10), and records 10 and 11 waiting at its gate while the consumer reads that,
    # When record 12 is started in the same loop pass as the read ends (the fetch loop's step,
    # then the read's), Then 10, 11 and 12 run in that order and the round goes on. (12 took
    # the gate's lock before 10 and 11 woke, found 10 unsettled, as after a failed settling,
    # and ended the round.) No Kafka takes part: the order is the transport's own; a committer
    # that commits every note stands in for Kafka's transactions.
    class Committing:
        failure: BaseException | None = None

        def mark(self, tp: Any, offset: int, note: str) -> None:
            pass

        async def commit(self) -> bool:
            return True

        def fail(self, failure: BaseException) -> None:
            self.failure = self.failure or failure

    url = "kafka://127.0.0.1:9"  # (never connected)
    transport = kafka_transport.KafkaTransport(url, Settings(broker=url))
    transport._committer = committer = Committing()  # type: ignore[assignment]
    tp, ran = ("q", 0), []

    async def process(delivery: Delivery) -> None:
        assert delivery.offset is not None
        ran.append(delivery.offset)
        await asyncio.sleep(0)
        transport._offsets.done(tp, delivery.offset, delivery.handle)

    async def scenario() -> None:
        transport._process, transport._alone = process, asyncio.Lock()
        transport._offsets.assign(tp)
        gate = transport._gates[tp] = Gate(careful=8)
        inflight = InFlight(transport._run, 8)

        def start(offset: int) -> None:
            inflight.start(Delivery(b"", "q", None, 0, offset, handle=transport._offsets.started(tp, offset)))

        def waiting() -> int:  # records waiting at the gate: for it to learn, or for its lock
            return len(gate.ready._waiters) + len(gate.lock._waiters or ())

        start(10)
        start(11)
        while waiting() < 2:  # (each loop pass takes them a step further)
            await asyncio.sleep(0)
        start(12)
        gate.learn(10, RUNNING)  # what the read of the committed offset ends with
        transport._offsets.found(tp, 10)
        gate.ready.set()
        assert await inflight.finish(5) == 0  # (none left running)

    run(scenario(), timeout=10)
    assert ran == [10, 11, 12] and committer.failure is None
