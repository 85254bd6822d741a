"""The pure core: offset bookkeeping, in-flight slots, settings, ids, the consume summary."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
import uuid
from contextlib import suppress
from datetime import timedelta
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer

from bridge import config
from bridge.config import Settings
from bridge.envelope import uuid7
from bridge.errors import ConfigError, Permanent, PublishError, Retry, safe_url
from bridge.logs import MAX_KINDS, OneLine, Repeats
from bridge.policy import (
    DEFAULT_BACKOFF,
    MAX_BACKOFF_ATTEMPT,
    GiveUp,
    RetryAt,
    RetryPolicy,
    decide,
    fixed,
    tier_for,
    tier_name,
)
from bridge.transports.base import Delivery, InFlight
from bridge.transports.kafka.common import client_text
from bridge.transports.kafka.returns import Gate
from bridge.transports.kafka.transport import _resolve
from bridge.transports.offsets import OffsetTracker
from bridge.worker import Stats, _job_error
from tests.brokerio import free_port_pair
from tests.conftest import run

TP = ("jobs", 0)


def test_commits_only_up_to_the_lowest_unfinished_offset() -> None:
    # Given offsets 5..8 in flight, When they finish out of order,
    # Then the committable offset only ever moves past a contiguous finished prefix.
    tracker = OffsetTracker()
    tracker.assign(TP)
    generation = tracker.started(TP, 5)
    assert generation is not None
    for offset in (6, 7, 8):
        tracker.started(TP, offset)
    assert tracker.done(TP, 7, generation) is None
    assert tracker.done(TP, 5, generation) == 6
    assert tracker.done(TP, 6, generation) == 8
    assert tracker.done(TP, 8, generation) == 9
    assert tracker.in_flight() == 0


def test_an_offset_handed_out_twice_in_one_assignment_settles_twice_and_commits_go_on() -> None:
    # Given offsets 5 and 6 handed out, then 5 again before they settled (the log went back
    # under the consumer: a broker lost records and auto.offset.reset moved the position back),
    # When all three settle, Then the commits follow delivery order, ending where the consumer
    # is (after the second 5), and the partition is settled. (The second 5 replaced the first
    # in the tracker, which then stayed unsettled: the partition never committed again.)
    tracker = OffsetTracker()
    tracker.assign(TP)
    generation = tracker.started(TP, 5)
    assert generation is not None
    tracker.started(TP, 6)
    tracker.started(TP, 5)
    assert tracker.in_flight() == 3
    assert [tracker.done(TP, offset, generation) for offset in (5, 6, 5)] == [6, 7, 6]
    assert tracker.in_flight() == 0 and tracker.settled() == {TP: 6}


def test_gaps_in_offsets_do_not_stall_commits() -> None:
    # Transaction markers and compaction leave gaps: the next delivered offset is what counts.
    tracker = OffsetTracker()
    tracker.assign(TP)
    generation = tracker.started(TP, 10)
    assert generation is not None
    tracker.started(TP, 13)
    assert tracker.done(TP, 13, generation) is None
    assert tracker.done(TP, 10, generation) == 14


def test_a_job_finishing_after_its_partition_was_revoked_moves_nothing() -> None:
    tracker = OffsetTracker()
    tracker.assign(TP)
    old = tracker.started(TP, 1)
    tracker.revoke(TP)
    assert tracker.started(TP, 2) is None  # fetched before the revoke: its next owner's
    tracker.assign(TP)
    new = tracker.started(TP, 1)
    assert old is not None and new is not None
    assert tracker.done(TP, 1, old) is None
    assert tracker.in_flight() == 1
    assert tracker.done(TP, 1, new) == 2
    assert old.ended and not new.ended  # (a record of the old one no longer starts: Transport.held)


def test_only_partitions_with_nothing_in_flight_and_a_known_offset_can_be_handed_over() -> None:
    # A partition is committed as handed over (`bridge:end`) where it is settled up to; one
    # with a record in flight is not (that record may be what stopped its owner), nor one
    # whose offset is unknown (nothing of it came, nor was its committed offset read).
    tracker = OffsetTracker()
    busy, idle, unknown = ("jobs", 0), ("jobs", 1), ("jobs", 2)
    for tp in (busy, idle, unknown):
        tracker.assign(tp)
    tracker.found(idle, 40)
    generation = tracker.started(busy, 7)
    assert generation is not None
    tracker.started(busy, 8)
    assert tracker.settled() == {idle: 40}
    tracker.done(busy, 7, generation)
    assert tracker.settled() == {idle: 40}
    tracker.done(busy, 8, generation)
    assert tracker.settled() == {busy: 9, idle: 40}


@pytest.mark.parametrize(
    ("note", "returns_at_5", "returns_at_6"),
    [
        ("bridge:end", 0, 0),  # handed over: records run side by side
        ("", 0, 0),  # committed by something else: the same
        (None, 0, 0),  # never committed
        ("bridge:run", 1, 1),  # its owner stopped holding records: each may have been running
        ("bridge:try:3", 4, 1),  # its owner stopped while running offset 5 alone, its 3rd return
        ("bridge:try:x", 0, 0),  # not bridge's: read as handed over
    ],
)
def test_a_gate_counts_returns_from_the_note_where_its_partition_was_left(
    note: str | None, returns_at_5: int, returns_at_6: int
) -> None:
    gate = Gate(careful=16)
    gate.learn(5, note)
    assert (gate.returns(5), gate.returns(6)) == (returns_at_5, returns_at_6)


def test_a_careful_start_opens_after_concurrency_records_ran_alone() -> None:
    # Its note must stay until its first record ran again (it may carry that record's count).
    gate = Gate(careful=2)
    assert gate.keeps_note  # not read yet
    gate.learn(5, "bridge:try:1")
    gate.ready.set()
    assert gate.keeps_note
    gate.passed(gate.returns(5))
    assert not gate.keeps_note and not gate.open and gate.returns(6) == 1
    gate.passed(gate.returns(6))
    assert gate.open and gate.returns(7) == 0


def test_a_delivery_waiting_for_a_slot_when_finish_begins_is_not_processed() -> None:
    # Given one slot, a delivery running in it and a second one waiting for it (RabbitMQ's
    # prefetch holds more deliveries than there are slots),
    # When finish begins and then the running one ends, Then the waiting one is never
    # processed (it stays unsettled, and the broker delivers it again), and nothing is late.
    first, second = Delivery(b"first", "jobs"), Delivery(b"second", "jobs")
    processed: list[Delivery] = []
    release = asyncio.Event()

    async def process(delivery: Delivery) -> None:
        processed.append(delivery)
        await release.wait()

    async def scenario() -> int:
        inflight = InFlight(process, 1)
        running = asyncio.create_task(inflight.run(first))
        waiting = asyncio.create_task(inflight.run(second))
        await asyncio.sleep(0)  # one turn: the first takes the slot, the second waits for it
        finishing = asyncio.create_task(inflight.finish(grace_s=5))
        await asyncio.sleep(0)
        release.set()
        late = await finishing
        await asyncio.gather(running, waiting)
        return late

    assert run(scenario(), timeout=10) == 0
    assert processed == [first]


def test_finish_ends_when_a_cancelled_delivery_swallows_its_cancellation() -> None:
    # Given a delivery whose processing catches CancelledError and returns (a handler's
    # cleanup that does not raise again; asyncio.wait_for can swallow one too),
    # When finish cancels it after the grace period, Then finish returns, counting it late.
    # (Its worker task went back to wait for the next delivery, and finish waited for good.)
    async def process(delivery: Delivery) -> None:
        with suppress(asyncio.CancelledError):
            await asyncio.sleep(30)

    async def scenario() -> int:
        inflight = InFlight(process, 2)
        inflight.start(Delivery(b"stubborn", "jobs"))
        await asyncio.sleep(0)
        return await inflight.finish(grace_s=0.05)

    assert run(scenario(), timeout=10) == 1


def test_a_delivery_run_alone_waits_for_the_running_ones_and_nothing_starts_beside_it() -> None:
    # Given three slots, two deliveries running and one to run alone,
    # When the running ones end one by one, and one more comes while the one alone runs,
    # Then the one alone starts only once both ended, and the last one (with slots free)
    # starts only once the one alone ended.
    deliveries = [Delivery(name.encode(), "jobs") for name in ("a", "b", "alone", "after")]
    order: list[str] = []
    releases = {delivery.body: asyncio.Event() for delivery in deliveries}

    async def process(delivery: Delivery) -> None:
        order.append(f"start {delivery.body.decode()}")
        await releases[delivery.body].wait()
        order.append(f"end {delivery.body.decode()}")

    async def turns() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    async def scenario() -> None:
        inflight = InFlight(process, 3)
        a, b, alone, after = deliveries
        tasks = [asyncio.create_task(inflight.run(a)), asyncio.create_task(inflight.run(b))]
        tasks.append(asyncio.create_task(inflight.run_alone(alone)))
        for delivery in (a, b):
            await turns()
            releases[delivery.body].set()
        await turns()
        tasks.append(asyncio.create_task(inflight.run(after)))
        for delivery in (alone, after):
            await turns()
            releases[delivery.body].set()
        await asyncio.gather(*tasks)

    run(scenario(), timeout=10)
    assert order == [
        "start a",
        "start b",
        "end a",
        "end b",
        "start alone",
        "end alone",
        "start after",
        "end after",
    ]


def test_settings_come_from_arguments_then_environment_then_toml(tmp_path: Path) -> None:
    toml = tmp_path / "bridge.toml"
    toml.write_text('[bridge]\nbroker = "kafka://toml:9092"\nconcurrency = 4\ngroup = "from-toml"\n')
    environ = {"BRIDGE_CONCURRENCY": "8", "BRIDGE_GROUP": "from-env"}
    settings = Settings.load({"group": "from-arg"}, environ=environ, toml_path=toml)
    assert (settings.broker, settings.concurrency, settings.group) == ("kafka://toml:9092", 8, "from-arg")


def test_every_settings_problem_is_reported_at_once(tmp_path: Path) -> None:
    environ = {"BRIDGE_CONCURRENCY": "0", "BRIDGE_PARTITIONS": "many", "BRIDGE_BROKER": "nats://x"}
    with pytest.raises(ConfigError) as caught:
        Settings.load({"colour": "blue"}, environ=environ, toml_path=tmp_path / "none.toml")
    message = str(caught.value)
    assert "unknown setting 'colour'" in message and "partitions must be a whole number" in message
    assert "concurrency must be at least 1" in message
    with pytest.raises(ConfigError, match=r"nats.*concurrency must be at least 1"):
        Settings.load(environ={"BRIDGE_CONCURRENCY": "0", "BRIDGE_BROKER": "nats://x"})


def test_a_store_url_with_a_mistyped_scheme_is_reported_without_its_password(tmp_path: Path) -> None:
    environ = {"BRIDGE_IDEMPOTENCY": "postgresq://bridge:not-the-password@db.example:5432/bridge"}
    with pytest.raises(ConfigError) as caught:
        Settings.load(environ=environ, toml_path=tmp_path / "none.toml")
    message = str(caught.value)
    assert "'postgresq://bridge:***@db.example:5432/bridge': use sqlite:///path" in message
    assert "not-the-password" not in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://bridge:secret@db:5432/bridge", "postgresql://bridge:***@db:5432/bridge"),
        ("postgresql://bridge:pa/ss@db/bridge", "postgresql://bridge:***@db/bridge"),
        ("redis://:pa#ss@cache:6379/0", "redis://:***@cache:6379/0"),
        ("amqp://guest:a?b@c@rabbit/", "amqp://guest:***@rabbit/"),
        ("redis://user@cache/0", "redis://user@cache/0"),
        ("sqlite:///var/data@host/keys.db", "sqlite:///var/data@host/keys.db"),
        ("postgresql://bridge:secret@db:port/bridge", "postgresql://bridge:***@db:port/bridge"),
    ],
)
def test_a_url_is_shown_without_its_password_however_it_is_written(url: str, shown: str) -> None:
    # (A password with an unencoded / # ? or @ showed in part: the parser ends the host there.)
    assert safe_url(url) == shown


def test_uuid7_is_version_7_and_sorts_by_time() -> None:
    ids = [uuid7(now_ms=ms) for ms in (1_700_000_000_000, 1_700_000_000_001, 1_800_000_000_000)]
    assert ids == sorted(ids)
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert len({uuid7(now_ms=1) for _ in range(1000)}) == 1000
    # Within one millisecond, in the order they were made (they sorted at random)
    same_ms = [uuid7(now_ms=1_900_000_000_000) for _ in range(1000)]
    assert same_ms == sorted(same_ms)
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in same_ms)
    assert all(uuid.UUID(i).int >> 80 == 1_900_000_000_000 for i in same_ms)


@pytest.mark.parametrize("from_envelope", [None, 0, -1, -(2**31)])
def test_an_envelope_s_max_attempts_below_one_leaves_the_handler_s_limit(from_envelope: int | None) -> None:
    # Given a handler allowing 3 attempts and an envelope from another producer whose
    # max_attempts is unset, 0, or negative (-1 meaning "unlimited" in many libraries),
    # Then attempt 1 and 2 retry and attempt 3 is the last. (-1 dead-lettered attempt 1.)
    policy, now = RetryPolicy(max_attempts=3, backoff=fixed(1)), 1_700_000_000_000
    decisions = [decide(policy, RuntimeError("x"), n, from_envelope, now) for n in (1, 2, 3)]
    assert decisions[:2] == [RetryAt(now + 1000)] * 2
    assert isinstance(decisions[2], GiveUp) and decisions[2].reason == "exhausted"


def test_a_retry_asked_for_with_a_timedelta_waits_that_long() -> None:
    # (As enqueue's delay= takes one. Compared with a number in `decide`, it raised TypeError,
    # and the job was dead-lettered with "its retry policy failed".)
    policy, now = RetryPolicy(max_attempts=3, backoff=fixed(1)), 1_700_000_000_000
    assert decide(policy, Retry(delay_s=timedelta(minutes=2)), 1, None, now) == RetryAt(now + 120_000)


def test_a_tier_of_whole_milliseconds_is_named_by_them() -> None:
    # (int() cut 4.007 s to 4006 ms: tiers of 4006 and 4007 ms shared one topic and queue.)
    names = [tier_name(s) for s in (4.006, 4.007, 0.25, 90, 7200)]
    assert names == ["4006ms", "4007ms", "250ms", "90s", "2h"]


def test_a_delay_of_exactly_a_tier_of_milliseconds_fits_it() -> None:
    # (`700ms` read as 0.7000000000000001 s: a delay of 0.7 s went one tier lower, or waited in
    # the worker, as one shorter than the tier)
    tiers = Settings.load({"delay_tiers": "700ms,1.1s,4007ms"}, environ={}).delay_tiers
    assert [tier_for(s, tiers) for s in (0.7, 1.1, 4.007)] == [0.7, 1.1, 4.007]


def test_a_backoff_is_asked_about_an_attempt_no_larger_than_it_can_cost() -> None:
    # Given an envelope from another producer at attempt 2**31 - 2 of 2**31 - 1 (valid ints),
    # Then its backoff is asked about attempt MAX_BACKOFF_ATTEMPT at most, and the default one
    # answers its cap. (tenacity's exponential wait computed 2 ** (2**31 - 3) exactly: the
    # event loop stalled for 15 s and grew by 860 MB; at 2**40, by 22 GB.)
    asked: list[int] = []

    def backoff(attempt: int) -> float:
        asked.append(attempt)
        return 1.0

    policy = RetryPolicy(max_attempts=3, backoff=backoff)
    assert decide(policy, RuntimeError("x"), 2**31 - 2, 2**31 - 1, 0) == RetryAt(1000)
    assert asked == [MAX_BACKOFF_ATTEMPT]
    delay_ms = decide(RetryPolicy(backoff=DEFAULT_BACKOFF), RuntimeError("x"), 2**31 - 2, 2**31 - 1, 0)
    assert isinstance(delay_ms, RetryAt) and 600_000 <= delay_ms.run_at <= 602_000


def test_the_default_backoff_keeps_its_jitter_past_its_cap() -> None:
    # Given a job that keeps failing, its retries past the 10-minute cap still wait from 600 to
    # 602 s, each its own. (tenacity's wait_exponential_jitter adds the jitter before the cap:
    # from the 10th attempt on every retry waited exactly 600 s, in lockstep.)
    policy = RetryPolicy(max_attempts=100, backoff=DEFAULT_BACKOFF)
    waits = [decide(policy, RuntimeError("x"), 20, None, 0) for _ in range(50)]
    assert all(isinstance(wait, RetryAt) and 600_000 <= wait.run_at <= 602_000 for wait in waits)
    assert len(set(waits)) > 1, waits
    first = decide(policy, RuntimeError("x"), 1, None, 0)
    assert isinstance(first, RetryAt) and 2_000 <= first.run_at <= 4_000


def test_a_bare_permanent_gives_up_and_a_retry_given_a_reason_takes_the_backoff() -> None:
    # `raise Permanent` (no reason) raised TypeError, which was retried; `Retry("rate limited")`
    # took the reason for the delay, and dead-lettered the job as its policy failing.
    policy = RetryPolicy(backoff=fixed(7))
    assert decide(policy, Permanent(), 1, None, 0) == GiveUp("permanent", "Permanent")
    retry = Retry("rate limited")
    assert retry.delay_s is None and str(retry) == "rate limited"
    assert decide(policy, retry, 1, None, 0) == RetryAt(7000)
    assert Retry(3, "slow down").delay_s == 3 and Retry(timedelta(seconds=2)).delay_s == 2.0


def test_a_long_exception_message_leaves_the_frames_in_the_stored_traceback() -> None:
    # Given an exception whose message is 2,500 characters (an HTTP error's body), raised
    # three calls deep, Then its stored traceback still names each frame, within 2,000
    # characters, and the message is kept apart. (The message filled the traceback: no frame.)
    def charge() -> None:
        raise RuntimeError("upstream said: " + "x" * 2500)

    def through() -> None:
        charge()

    try:
        through()
    except RuntimeError as exc:
        error = _job_error(1, exc, 0)
    assert error.traceback is not None and len(error.traceback) <= 2000
    assert "in through" in error.traceback and "in charge" in error.traceback
    assert error.message.startswith("upstream said: xxx") and len(error.message) == 2000


def test_a_tenacity_wait_that_looks_at_the_exception_chooses_the_delay() -> None:
    # Given a backoff of tenacity's wait_exception, 7 s after a timeout and 1 s after anything
    # else, Then each failure waits what its exception chooses. (It raised "called before
    # outcome was set", and every failure was dead-lettered `permanent` at its first attempt.)
    from tenacity import wait_exception

    policy = RetryPolicy(backoff=wait_exception(lambda exc: 7 if isinstance(exc, TimeoutError) else 1))
    assert decide(policy, TimeoutError("slow"), 1, None, 0) == RetryAt(7000)
    assert decide(policy, KeyError("x"), 2, None, 0) == RetryAt(1000)


@pytest.mark.parametrize("delay_s", [-1.0, float("-inf")])
def test_a_retry_asked_for_before_now_is_retried_at_once(delay_s: float) -> None:
    # (-inf raised OverflowError, and the job was dead-lettered: its retry policy failed)
    assert decide(RetryPolicy(), Retry(delay_s=delay_s), 1, None, 5) == RetryAt(5)


def test_a_log_line_cannot_be_forged_by_a_newline_in_what_it_quotes() -> None:
    # Given a job type with a newline and a forged line after it (another producer's input),
    # Then the daemon's log shows it escaped on one line; a traceback still takes its lines.
    formatter = OneLine("%(levelname)s %(message)s")
    forged = "billing.Charge\n2026-01-01 INFO bridge.worker job 42 done\r\x1b[2J"
    record = logging.LogRecord("bridge.worker", logging.WARNING, __file__, 1, "job %s", (forged,), None)
    assert formatter.format(record) == (
        "WARNING job billing.Charge\\n2026-01-01 INFO bridge.worker job 42 done\\r\\x1b[2J"
    )
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("bridge", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert formatter.format(record).startswith("ERROR failed\nTraceback (most recent call last):\n")
    # Nor can a mark that turns text right to left make a quoted id read as something else.
    record = logging.LogRecord(
        "bridge", logging.INFO, __file__, 1, "job %s ok", ("\u202egnp.exe\u202c",), None
    )
    assert formatter.format(record) == "INFO job \\u202egnp.exe\\u202c ok"


def test_a_forked_child_makes_other_uuid7s_than_its_parent_in_the_same_millisecond() -> None:
    ms = 1_900_000_000_000
    uuid7(now_ms=ms)  # the parent has a last id in this millisecond
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # (the child writes its next ids and exits at once)
        os.write(writing, "\n".join(uuid7(now_ms=ms) for _ in range(3)).encode())
        os._exit(0)
    os.close(writing)
    os.waitpid(child, 0)
    with os.fdopen(reading) as pipe:
        childs = set(pipe.read().split())
    assert len(childs) == 3 and not childs & {uuid7(now_ms=ms) for _ in range(3)}


def test_a_consume_stopped_before_its_first_settle_reports_no_time() -> None:
    # Given a consume that began a delivery (at monotonic time 8,000 s) and settled none,
    # Then its summary says 0 settled in 0.00 s (it said "in -8000.00 s").
    stats = Stats(first_s=8000.0)
    assert stats.summary() == "0 settled (0 retried, 0 delayed, 0 dead-lettered, 0 duplicates) in 0.00 s"


def test_a_kafka_publish_that_timed_out_says_what_to_look_at() -> None:
    # Given librdkafka's report that a message was not taken within message.timeout.ms (its
    # code; a broker that takes nothing cannot be made to answer on cue), When it settles the
    # publish, Then the error says how long it waited and what to look at, as RabbitMQ's does.
    async def resolved() -> BaseException | None:
        future = asyncio.get_running_loop().create_future()
        _resolve(future, KafkaError(KafkaError._MSG_TIMED_OUT), "billing")
        return future.exception()

    error = run(resolved())
    assert isinstance(error, PublishError) and error.retriable
    assert "publish to billing: not taken within 30 s: is Kafka reachable" in str(error), error


def test_more_kinds_of_line_at_once_than_held_back_pass_and_take_no_more_memory() -> None:
    # Given a filter with a long window, When more kinds of line arrive within it than it
    # keeps (each a client's line with other words), Then every one is logged, a kind seen
    # before its cap is still held back, and the kinds kept stay within the cap (they grew
    # without end, and every new kind rebuilt them all).
    repeats = Repeats(60)

    def passes(text: str) -> bool:
        return repeats.filter(logging.LogRecord("c", logging.ERROR, __file__, 1, text, (), None))

    kinds = [f"broker {word} is down" for word in (uuid.uuid4().hex for _ in range(MAX_KINDS * 2))]
    assert all(passes(kind) for kind in kinds)
    assert not passes(kinds[0])
    assert len(repeats._kinds) <= MAX_KINDS


def test_librdkafkas_lines_while_kafka_is_unreachable_are_logged_once_per_window_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a real producer and consumer whose Kafka refuses connections (a free port), their
    # lines through bridge's client log with a window of 0.5 s,
    # When they try to connect for 2.6 s (librdkafka logs a refused connect about ten times a
    # second per client: a Kafka restart gave 900 ERROR lines),
    # Then the refused connects are logged once per window, whichever client, each after the
    # first saying how many it stands for, and most are held back.
    bootstrap = f"127.0.0.1:{free_port_pair()}"
    log = logging.getLogger(f"bridge.kafka.client.test-{uuid.uuid4().hex[:6]}")
    repeats = Repeats(0.5, client_text)
    log.addFilter(repeats)
    common = {"bootstrap.servers": bootstrap, "logger": log, "log.connection.close": False}
    producer = Producer(common)
    consumer = Consumer({**common, "group.id": "g"})
    consumer.subscribe(["t"])
    with caplog.at_level(logging.INFO, logger=log.name):
        deadline = time.monotonic() + 2.6
        while time.monotonic() < deadline:
            producer.poll(0.05)
            consumer.consume(1, 0.05)
    consumer.close()
    refused = [r.getMessage() for r in caplog.records if "Connection refused" in r.getMessage()]
    assert 3 <= len(refused) <= 7, refused
    held = [int(match[1]) for line in refused[1:] if (match := re.search(r"\(and (\d+) like it since", line))]
    assert len(held) == len(refused) - 1 and "like it since" not in refused[0], refused
    assert sum(held) > len(refused), refused


def test_a_mistyped_settings_variable_is_warned_of_once_with_the_one_it_may_mean(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A typo left the default in place without a word. Another program's BRIDGE_* variable,
    # and bridge dev's own, are left alone.
    environ = {
        "BRIDGE_CONCURENCY": "32", "BRIDGE_MAX_MESSAGE_SIZE": "9", "BRIDGE_DEV_REGISTRY_PORT": "1",
        "BRIDGE_DATA": "/tmp", "BRIDGE_LOWEST_BOUNDS": "1", "CONCURENCY": "2", "BRIDGE_GROUP": "g",
    }  # fmt: skip
    monkeypatch.setattr(config, "_warned", set())  # (none warned of yet in this process)
    with caplog.at_level(logging.WARNING, logger="bridge.config"):
        for _ in range(2):
            settings = Settings.load(environ=environ, toml_path=tmp_path / "none.toml")
    assert settings.concurrency == Settings().concurrency and settings.group == "g"
    assert sorted(r.getMessage() for r in caplog.records) == [
        "BRIDGE_CONCURENCY is not a setting, and is ignored: did you mean BRIDGE_CONCURRENCY?",
        "BRIDGE_MAX_MESSAGE_SIZE is not a setting, and is ignored: did you mean BRIDGE_MAX_MESSAGE_BYTES?",
    ]
