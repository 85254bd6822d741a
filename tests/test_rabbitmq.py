"""RabbitMQ-specific behaviour: a dropped connection, a deleted queue, returned publishes."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import aio_pika
import pytest

from bridge import Bridge, JobContext
from bridge.errors import PublishError, TransportError
from tests.brokerio import envelopes_in
from tests.conftest import SCHEMAS, run
from tests.processes import publish


def test_consumer_reconnects_after_the_broker_drops_its_connections(
    brokers: dict[str, str], queue: str
) -> None:
    # Given 300 jobs, When RabbitMQ closes every client connection part-way through,
    # Then the consumer reconnects, and every job still runs (some perhaps twice: at least once).
    ids = run(publish(brokers["rabbitmq"], queue, 300))
    app = Bridge(broker=brokers["rabbitmq"], registry=str(SCHEMAS), concurrency=8)
    done: set[str] = set()
    dropped = asyncio.Event()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        if len(done) >= 100 and not dropped.is_set():
            dropped.set()
            command = ["rabbitmqctl", "-q", "close_all_connections", "test: dropped connection"]
            await asyncio.to_thread(subprocess.run, command, check=True, capture_output=True)
        await asyncio.sleep(0.002)
        done.add(ctx.job_id)

    async def scenario() -> None:
        async with app:
            await app.consume(burst=True)

    run(scenario(), timeout=120)
    assert dropped.is_set()
    assert set(ids) <= done


def test_a_consumer_whose_queue_is_deleted_stops_with_an_error(brokers: dict[str, str], queue: str) -> None:
    # Given a consumer (not --burst) that has run a job, When its queue is deleted under it,
    # Then consume raises one clear error naming the queue, instead of waiting for good.
    run(publish(brokers["rabbitmq"], queue, 1))
    app = Bridge(broker=brokers["rabbitmq"], registry=str(SCHEMAS))
    ran = asyncio.Event()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.set()

    async def scenario() -> None:
        async with app:
            consuming = asyncio.create_task(app.consume())
            await asyncio.wait_for(ran.wait(), 30)
            async with await aio_pika.connect(brokers["rabbitmq"]) as connection:
                await (await connection.channel()).queue_delete(queue)
            await asyncio.wait_for(consuming, 30)

    with pytest.raises(TransportError, match=f"ended the consumer of {queue}; was it deleted"):
        run(scenario())


def test_a_returned_publish_fails_itself_not_another_in_flight(brokers: dict[str, str], queue: str) -> None:
    # Given 200 publishes in flight to an existing queue, and one among them to a queue that
    # does not exist (RabbitMQ returns it, as it is mandatory),
    # When all are awaited, Then exactly that one fails, saying what to do, and the other 200
    # were confirmed and are in their queue. (aiormq matches a return to its publish by
    # message id: ids shared between publishes would fail another one and confirm the lost one.)
    app = Bridge(broker=brokers["rabbitmq"], registry=str(SCHEMAS))
    missing = f"{queue}-missing"

    async def scenario() -> list[Any]:
        async with app:
            await app.apply_topology([queue])
            publishes = [app.enqueue_async("test.Echo", {"n": n}, queue=queue) for n in range(200)]
            publishes.insert(100, app.enqueue_async("test.Echo", {"n": -1}, queue=missing))
            return await asyncio.gather(*publishes, return_exceptions=True)

    results = run(scenario())
    failed = [n for n, result in enumerate(results) if isinstance(result, BaseException)]
    assert failed == [100]
    assert isinstance(results[100], PublishError) and "topology apply" in str(results[100])
    assert sorted(results[:100] + results[101:]) == sorted(e["id"] for e in envelopes_in(app, queue))


def test_deliveries_held_for_a_slot_when_consume_stops_go_back_unrun(
    brokers: dict[str, str], queue: str
) -> None:
    # Given one slot, a prefetch of three, and three jobs whose handler never ends,
    # When consume stops once all three were delivered (one running, two held for its slot),
    # Then only the first ever started (it is cancelled when its 0.5 s of grace end), and all
    # three are back in the queue, to run again.
    url = brokers["rabbitmq"]
    ids = run(publish(url, queue, 3))
    app = Bridge(broker=url, registry=str(SCHEMAS), concurrency=1, prefetch=3, grace_s=0.5)
    started: list[str] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        started.append(ctx.job_id)
        await asyncio.Event().wait()

    async def scenario() -> None:
        stop = asyncio.Event()
        async with app:
            consuming = asyncio.create_task(app.consume(stop=stop))
            deadline = asyncio.get_running_loop().time() + 30
            while await _ready_count(url, queue) or not started:  # until all three are delivered
                assert asyncio.get_running_loop().time() < deadline, "the jobs were never delivered"
                await asyncio.sleep(0.05)
            stop.set()
            await consuming

    run(scenario())
    assert len(started) == 1
    assert sorted(e["id"] for e in envelopes_in(app, queue)) == sorted(ids)


async def _ready_count(url: str, queue: str) -> int:
    """Messages in `queue` ready for delivery (not counting those delivered and unacknowledged)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await connection.close()
