"""The contract every transport keeps: memory, then the real Kafka and RabbitMQ."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from bridge import Bridge, JobContext, codec
from bridge.errors import PublishError, TransportError
from bridge.registry import ENVELOPE
from bridge.transports import dlq_name
from bridge.transports.base import Outgoing
from bridge.transports.kafka import commit as kafka_commit
from tests import names
from tests.brokerio import dead_letters, delete_queue, tier_held_in
from tests.conftest import run


async def apply_topology(app: Bridge) -> None:
    async with app:
        await app.apply_topology()


async def consume(app: Bridge) -> None:
    async with app:
        await app.consume(burst=True)


def test_enqueued_job_runs_once_with_its_payload(make_app: Callable[..., Bridge], queue: str) -> None:
    # Given an async handler, When five jobs are enqueued and consumed in burst mode,
    # Then each runs exactly once with its decoded payload and its own id.
    app = make_app()
    seen: list[tuple[str, dict[str, Any], JobContext]] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        seen.append((ctx.job_id, payload, ctx))

    async def scenario() -> list[str]:
        await app.apply_topology()
        ids = [await app.enqueue_async("test.Echo", {"n": n, "text": f"#{n}"}) for n in range(5)]
        await app.consume(burst=True)
        await app.aclose()
        return ids

    ids = run(scenario())
    assert sorted(job_id for job_id, _, _ in seen) == sorted(ids)
    assert sorted(p["n"] for _, p, _ in seen) == [0, 1, 2, 3, 4]
    assert all(p == {"n": p["n"], "text": f"#{p['n']}", "sleep_ms": 0} for _, p, _ in seen)
    assert all(ctx.attempt == 1 and ctx.queue == queue and ctx.type == "test.Echo" for _, _, ctx in seen)


def test_sync_handler_runs_off_the_event_loop(make_app: Callable[..., Bridge], queue: str) -> None:
    # Given a plain `def` handler enqueued through the sync API,
    # When consumed, Then it runs in a worker thread, not on the loop's thread.
    app = make_app()
    threads: list[str] = []

    @app.job("test.Echo", queue=queue)
    def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        threads.append(threading.current_thread().name)

    run(apply_topology(app))
    job_ids = [app.enqueue("test.Echo", {"n": n}) for n in range(3)]
    app.close()
    run(consume(app))
    assert len(job_ids) == len(set(job_ids)) == 3
    assert len(threads) == 3 and all(name.startswith("bridge-job") for name in threads)


@pytest.mark.parametrize("broker", ["kafka", "rabbitmq"], indirect=True)  # (memory holds such a job itself)
def test_a_job_waiting_for_its_run_at_at_a_stop_goes_back_unstarted_and_runs_once_later(
    make_app: Callable[..., Bridge], queue: str
) -> None:
    # Given job 1 due 12 s ahead, sooner than the shortest tier (30 s), so that the worker it
    # is delivered to waits for its run_at, and job 2 behind it with the same key (on Kafka,
    # in the same partition), When job 2 has run and consume stops with 60 s of grace, Then
    # the stop ends at once and job 1 has not started, And a second consume runs job 1 once,
    # at its time, and job 2 not again. (Job 1 ran in the grace period, at its time; left
    # unsettled instead, it would have held back job 2's Kafka commit, and job 2 run again.)
    app = make_app(prefix=names.prefix(), delay_tiers="30s", grace_s=60)
    runs: list[tuple[int, float]] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append((payload["n"], time.time()))

    async def scenario() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        async with app:
            await app.apply_topology([queue])
            due = time.time() + 12
            await app.enqueue_async("test.Echo", {"n": 1}, queue=queue, key="k", delay=12.0)
            await app.enqueue_async("test.Echo", {"n": 2}, queue=queue, key="k")
            stop = asyncio.Event()
            consuming = asyncio.create_task(app.consume([queue], stop=stop))
            while not runs:
                assert time.time() < due - 2, "job 2 did not run well before job 1's time"
                await asyncio.sleep(0.05)
            stopping = loop.time()
            stop.set()
            await consuming
            stopped_in_s = loop.time() - stopping
            assert [n for n, _ in runs] == [2]
            await app.consume([queue], burst=True)
            return due, stopped_in_s

    due, stopped_in_s = run(scenario(), timeout=60)
    assert stopped_in_s < 5.0
    assert [n for n, _ in runs] == [2, 1]
    assert runs[1][1] >= due - 0.1  # (the enqueue stamped its run_at after `due` was taken)


def test_concurrency_bound_holds(make_app: Callable[..., Bridge], queue: str) -> None:
    # Given concurrency 4 and 16 jobs of 150 ms each,
    # When consumed, Then never more than 4 run at once, and 4 do run together.
    app = make_app(concurrency=4)
    running = 0
    peak = 0

    @app.job("test.Echo", queue=queue)
    async def slow(payload: dict[str, Any], ctx: JobContext) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(payload["sleep_ms"] / 1000)
        running -= 1

    async def scenario() -> None:
        await app.apply_topology()
        await asyncio.gather(*(app.enqueue_async("test.Echo", {"n": n, "sleep_ms": 150}) for n in range(16)))
        await app.consume(burst=True)
        await app.aclose()

    run(scenario())
    assert peak == 4


def test_unknown_type_is_dead_lettered_and_jobs_behind_it_run(
    make_app: Callable[..., Bridge], queue: str
) -> None:
    # Given a job whose type has a schema but no handler here, followed by three good jobs
    # on the same queue (one Kafka partition, so they really are behind it),
    # When consumed, Then it lands in <queue>.dlq as unknown_type and the three still run.
    app = make_app(partitions=1)
    ran: list[int] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])

    async def scenario() -> str:
        await app.apply_topology()
        stray = await app.enqueue_async("test.Unhandled", {"n": 99}, queue=queue)
        for n in range(3):
            await app.enqueue_async("test.Echo", {"n": n})
        await app.consume(burst=True)
        await app.aclose()
        return stray

    stray = run(scenario())
    assert sorted(ran) == [0, 1, 2]
    [letter] = dead_letters(app, queue)
    assert letter.reason == "unknown_type"
    assert letter.envelope is not None and letter.envelope.id == stray
    assert letter.queue == queue and "test.Unhandled" in letter.detail


def test_payloads_of_another_or_an_unknown_schema_are_dead_lettered_with_the_reason(
    make_app: Callable[..., Bridge], queue: str
) -> None:
    # Given a test.Echo envelope whose payload is a test.Numbers, one whose payload names a
    # schema fingerprint known nowhere, and a good job,
    # When consumed, Then the first is dead-lettered as schema_mismatch naming both schemas, the
    # second as unknown_schema, and the good job runs.
    app = make_app()
    ran: list[int] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])

    def with_payload(payload: bytes) -> Outgoing:
        envelope = app.build_envelope("test.Echo", {"n": -1}, queue=queue)
        envelope.payload = payload
        return Outgoing(queue, codec.encode(app.registry.schema(ENVELOPE), envelope.to_avro()), None)

    numbers = codec.encode_validated(app.registry.schema("test.Numbers"), {"values": [1, 2]})
    unknown = b"\xc3\x01" + b"\x5a" * 8 + numbers[10:]

    async def scenario() -> None:
        await app.apply_topology()
        transport = await app.transport()
        await transport.publish(with_payload(numbers))
        await transport.publish(with_payload(unknown))
        await app.enqueue_async("test.Echo", {"n": 1})
        await app.consume(burst=True)
        await app.aclose()

    run(scenario())
    assert ran == [1]
    letters = {letter.reason: letter for letter in dead_letters(app, queue)}
    assert set(letters) == {"schema_mismatch", "unknown_schema"}
    assert "test.Numbers" in letters["schema_mismatch"].detail
    assert "test.Echo" in letters["schema_mismatch"].detail
    assert "5a5a5a5a5a5a5a5a" in letters["unknown_schema"].detail
    assert all(letter.envelope is not None for letter in letters.values())


def test_failing_handler_is_dead_lettered_with_its_error(make_app: Callable[..., Bridge], queue: str) -> None:
    # Given a handler that raises and a policy of one attempt,
    # When consumed, Then the job is dead-lettered with the exception in its error history.
    app = make_app()

    @app.job("test.Echo", queue=queue, max_attempts=1)
    async def broken(payload: dict[str, Any], ctx: JobContext) -> None:
        raise ValueError(f"bad n {payload['n']}")

    async def scenario() -> str:
        await app.apply_topology()
        job_id = await app.enqueue_async("test.Echo", {"n": 7})
        await app.consume(burst=True)
        await app.aclose()
        return job_id

    job_id = run(scenario())
    [letter] = dead_letters(app, queue)
    assert letter.reason == "exhausted" and letter.envelope is not None
    assert letter.envelope.id == job_id
    [error] = letter.envelope.errors
    assert (error.attempt, error.type, error.message) == (1, "ValueError", "bad n 7")
    assert error.traceback is not None and "broken" in error.traceback


@pytest.mark.parametrize("deleted", ["before consume", "while the job runs"])
def test_a_missing_dead_letter_queue_stops_the_consumer_and_loses_nothing(
    make_app: Callable[..., Bridge], queue: str, broker: str, deleted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job that must be dead-lettered (it fails, one attempt allowed), and its queue's
    # dead-letter queue deleted before consume starts or while the job runs (when the Kafka
    # consumer still believes the topic exists),
    # When consumed, Then consume stops with an error naming the dead-letter queue and the fix,
    # And once the topology is applied again, the next run dead-letters the job: it was kept.
    # (RabbitMQ held the delivery unacknowledged for good, a prefetch slot lost per job; Kafka
    # held back its partition's commits for good, or, with the topic deleted while the consumer
    # ran, tried its transaction three times, 10 s each, and gave an error naming no topic.)
    if broker.startswith("memory"):
        pytest.skip("the in-memory broker creates queues on first use")
    # On Kafka, a transaction with a record for a deleted topic fails when it times out: sooner, here.
    monkeypatch.setattr(kafka_commit, "TRANSACTION_TIMEOUT_S", 2.0)
    app = make_app()
    started, go_on = threading.Event(), threading.Event()

    @app.job("test.Echo", queue=queue, max_attempts=1)
    def broken(payload: dict[str, Any], ctx: JobContext) -> None:
        started.set()
        go_on.wait(30)
        raise ValueError("bad")

    async def setup() -> str:
        async with app:
            await app.apply_topology()
            return await app.enqueue_async("test.Echo", {"n": 1})

    async def consume_deleting_midway() -> None:
        async with app:
            consuming = asyncio.create_task(app.consume(burst=True))
            await asyncio.to_thread(started.wait, 30)
            await asyncio.to_thread(delete_queue, app, dlq_name(queue))
            go_on.set()
            await consuming

    job_id = run(setup())
    if deleted == "before consume":
        delete_queue(app, dlq_name(queue))
        go_on.set()
    with pytest.raises(TransportError, match=f"{re.escape(dlq_name(queue))}.*`bridge topology apply`"):
        run(consume(app) if deleted == "before consume" else consume_deleting_midway())
    run(apply_topology(app))
    run(consume(app))
    [letter] = dead_letters(app, queue)
    assert letter.reason == "exhausted"
    assert letter.envelope is not None and letter.envelope.id == job_id


def test_a_consume_whose_delay_tier_is_missing_stops_at_once_naming_it(
    make_app: Callable[..., Bridge], queue: str, broker: str
) -> None:
    # Given a job on its queue, and one of its app's delay tiers deleted,
    # When consumed, Then consume stops before running anything, with an error naming the tier
    # and the fix, And once the topology is applied again, the job runs: it was kept.
    # (On RabbitMQ the consumer ran until a job needed the tier, and a burst consume never
    # returned: its drain check could not count the tier's messages.)
    if broker.startswith("memory"):
        pytest.skip("the in-memory broker creates queues on first use")
    app = make_app(prefix=names.prefix(), delay_tiers="1s,5s")
    ran: list[str] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(ctx.job_id)

    async def setup() -> str:
        async with app:
            await app.apply_topology()
            return await app.enqueue_async("test.Echo", {"n": 1})

    job_id = run(setup())
    tier = tier_held_in(app, 5.0)
    delete_queue(app, tier)
    with pytest.raises(
        TransportError, match=f"{re.escape(tier)} does not exist: run `bridge topology apply`"
    ):
        run(consume(app))
    assert ran == []
    run(apply_topology(app))
    run(consume(app))
    assert ran == [job_id]


def test_publish_to_a_missing_queue_is_refused(
    make_app: Callable[..., Bridge], queue: str, broker: str
) -> None:
    # Given a queue whose topology was never applied,
    # When a job is enqueued to it, Then the publish fails with a message naming the fix.
    if broker.startswith("memory"):
        pytest.skip("the in-memory broker creates queues on first use")
    app = make_app()

    async def scenario() -> None:
        try:
            await app.enqueue_async("test.Echo", {"n": 1}, queue=queue)
        finally:
            await app.aclose()

    with pytest.raises((PublishError, TransportError), match="topology apply"):
        run(scenario())
