"""RabbitMQ-specific behaviour: a dropped connection, a deleted queue, returned and refused publishes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest

from bridge import Bridge, JobContext, Permanent, Retry, codec
from bridge.dlq import Letter, Selection
from bridge.errors import PublishError, TransportError
from bridge.names import tier_queue
from bridge.policy import fixed
from bridge.registry import ENVELOPE
from bridge.transports import dlq_name, rabbitmq
from bridge.transports.rabbitmq import QUORUM
from bridge.worker import Stats
from tests import names
from tests.brokerio import (
    close_rabbitmq_connections,
    dead_letters,
    delete_queue,
    delete_rabbitmq_queue,
    envelopes_in,
    queue_arguments,
    rabbitmq_api,
    rabbitmq_disk_alarm,
    rabbitmq_max_message_size,
    rabbitmq_settings,
    rabbitmqctl,
    tier_held_in,
)
from tests.conftest import SCHEMAS, failing_first, own_app, publish_envelope, run, signalling
from tests.processes import (
    assert_dead_lettered_for_coming_back,
    ledger_counts,
    publish,
    restart_until_drained,
    wait_until,
)
from tests.proxy import FlakyProxy


def test_consumer_reconnects_after_the_broker_drops_its_connections(
    brokers: dict[str, str], queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given 300 jobs, When RabbitMQ closes every client connection part-way through,
    # Then the consumer reconnects, and every job still runs (some perhaps twice: at least once).
    # The client libraries log the server's reason, and no traceback or ERROR besides; bridge
    # says when each connection is back. (aiormq logged the traceback of the ConnectionClosed it
    # raised for each connection, and aio-pika an ERROR for each channel that could not reopen
    # itself on one. Nothing said the connections were back.)
    ids = run(publish(brokers["rabbitmq"], queue, 300))
    app = Bridge(broker=brokers["rabbitmq"], registry=str(SCHEMAS), concurrency=8)
    done: set[str] = set()
    dropped = asyncio.Event()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        if len(done) >= 100 and not dropped.is_set():
            dropped.set()
            await asyncio.to_thread(rabbitmqctl, "close_all_connections", "test: dropped connection")
        await asyncio.sleep(0.002)
        done.add(ctx.job_id)

    async def scenario() -> None:
        async with app:
            await app.consume(burst=True)

    with caplog.at_level(logging.INFO):
        run(scenario(), timeout=120)
    assert dropped.is_set()
    assert set(ids) <= done
    back = [
        r.getMessage() for r in caplog.records if r.getMessage().endswith("connection to RabbitMQ is back")
    ]
    assert sorted(back) == [f"the {role} connection to RabbitMQ is back" for role in ("consume", "publish")]
    clients = [r for r in caplog.records if r.name.startswith(("aio_pika", "aiormq"))]
    assert not [r.getMessage() for r in clients if r.exc_info], "a traceback for the drop"
    errors = [r.getMessage() for r in clients if r.levelno >= logging.ERROR]
    assert errors and all(line.startswith("Unexpected connection close from remote") for line in errors)
    assert all("test: dropped connection" in line for line in errors)


def test_a_handler_running_when_its_connection_closes_runs_to_its_end_and_its_job_runs_again(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a consumer subscribed to a queue, and a job that arrives then (delivered to the
    # subscription, not taken one by one as at start),
    # When RabbitMQ closes the consuming connection while the job's handler runs (as a node that
    # shuts down does), and the handler goes on for a second,
    # Then the handler runs to its end, and the job runs again once the consumer is back: its
    # acknowledgement was lost with the connection. (aiormq runs each delivery in a task that it
    # cancels when the connection closes: handlers were ended midway, at their next await.)
    app = own_app(brokers["rabbitmq"])
    consuming = f"bridge consume {socket.gethostname()}:{os.getpid()}"
    closed: list[int] = []
    runs: list[str] = []
    stop = asyncio.Event()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        if payload["n"] == 0:  # (taken at start: it has the job that matters sent while subscribed)
            await app.enqueue_async("test.Echo", {"n": 1}, queue=queue)
            return
        runs.append("started")
        try:
            if not closed:
                closed.append(await asyncio.to_thread(close_rabbitmq_connections, consuming))
                await asyncio.sleep(1.0)  # the handler's work after the close
        except asyncio.CancelledError:
            runs.append("cancelled")
            raise
        runs.append("ended")
        if runs.count("ended") == 2:
            stop.set()

    async def scenario() -> None:
        async with app:
            await app.apply_topology([queue])
            await app.enqueue_async("test.Echo", {"n": 0}, queue=queue)
            await app.consume(stop=stop)

    run(scenario(), timeout=60)
    assert closed == [1]
    assert runs == ["started", "ended", "started", "ended"]


@pytest.mark.parametrize("waiting_for", ["its run_at", "a slot"])
def test_a_job_waiting_to_start_when_its_connection_closes_runs_once_when_it_comes_back(
    brokers: dict[str, str], queue: str, waiting_for: str
) -> None:
    # Given a job whose handler has RabbitMQ close the consuming connection, and another job
    # that the worker holds meanwhile: until its run_at, 4 s ahead (sooner than the shortest
    # delay tier, 5 s), or until a slot is free (concurrency 1, the first handler going on 1 s),
    # When consumed in a burst run, Then the held job does not start on the delivery that went
    # back with the connection, but once, when it comes back. (It ran then, its ack was lost,
    # and it ran again.)
    prefix = names.prefix()
    app = Bridge(broker=brokers["rabbitmq"], registry=str(SCHEMAS), prefix=prefix, delay_tiers="5s")
    consuming = f"bridge consume {socket.gethostname()}:{os.getpid()}"
    closed: list[int] = []
    runs: list[int] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append(payload["n"])
        if payload["n"] == 0 and not closed:
            closed.append(await asyncio.to_thread(close_rabbitmq_connections, consuming))
            if waiting_for == "a slot":
                await asyncio.sleep(1.0)  # the handler's work after the close

    async def scenario() -> None:
        async with app:
            await app.apply_topology([queue])
            if waiting_for == "its run_at":
                await app.enqueue_async("test.Echo", {"n": 1}, queue=queue, delay=4.0)
                await app.enqueue_async("test.Echo", {"n": 0}, queue=queue)
                await app.consume(burst=True)
            else:
                await app.enqueue_async("test.Echo", {"n": 0}, queue=queue)
                await app.enqueue_async("test.Echo", {"n": 1}, queue=queue)
                await app.consume(burst=True, concurrency=1)

    run(scenario(), timeout=60)
    assert closed == [1]
    assert runs.count(1) == 1, runs


@pytest.mark.parametrize("unreachable", ["dropped", "refused"])
def test_a_consumer_waits_out_rabbitmq_unreachable_and_says_so_once_per_kind(
    brokers: dict[str, str],
    queue: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    unreachable: str,
) -> None:
    # Given 300 jobs and a consumer connected to RabbitMQ through a proxy,
    # When the proxy cuts its connection after 100 runs and, for 3 s, drops new ones as it
    # takes them or refuses them (listening to nothing, as a stopped node's host),
    # Then the consumer reconnects once RabbitMQ is reachable and every job runs, and aio-pika's
    # reconnect attempts (a "closed" and a "failed" line a second) are logged once of each kind
    # for each of the app's two connections (publishing and consuming, each named in its URL);
    # the client libraries log no error and no traceback for the drop. (aio-pika logged an
    # ERROR for each channel that could not reopen itself on the dropped connection; aiormq
    # the reset's traceback, and an ERROR for each refused connect, two a second.) A kind is
    # the line with its numbers masked: the proxy's dropped connection reads as a reset or,
    # under load, as a close before the client wrote, and those are two kinds, each logged once.
    monkeypatch.setattr(rabbitmq.reconnects, "_kinds", {})  # no window from a test before
    ids = run(publish(brokers["rabbitmq"], queue, 300))
    done: set[str] = set()
    cut = asyncio.Event()

    async def scenario() -> None:
        async with FlakyProxy(brokers["rabbitmq"]) as proxy:
            app = Bridge(broker=proxy.url, registry=str(SCHEMAS), concurrency=8)

            @app.job("test.Echo", queue=queue)
            async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
                if len(done) >= 100 and not cut.is_set():  # (another job may finish first: >=)
                    cut.set()
                    if unreachable == "refused":
                        await proxy.refuse(3.0)
                    else:
                        proxy.cut(3.0)
                await asyncio.sleep(0.002)
                done.add(ctx.job_id)

            async with app:
                await app.consume(burst=True)

    with caplog.at_level(logging.INFO, logger="aio_pika.robust_connection"):
        run(scenario(), timeout=120)
    assert cut.is_set()
    assert set(ids) <= done
    lines = [r.getMessage() for r in caplog.records if r.name == "aio_pika.robust_connection"]
    kinds = Counter(re.sub(r"\d+", "#", line) for line in lines)
    assert all(count == 1 for count in kinds.values()), lines
    for role in ("publish", "consume"):
        closed = [line for line in lines if "closed. Reconnecting after" in line and role in line]
        failed = [line for line in lines if line.startswith("Connection attempt to") and role in line]
        assert len(closed) == 1 and failed, lines
    clients = [r for r in caplog.records if r.name.startswith(("aio_pika", "aiormq"))]
    assert not [r.getMessage() for r in clients if r.levelno >= logging.ERROR]
    assert not [r.getMessage() for r in clients if r.exc_info], "a traceback for the drop"
    stopped = [r.getMessage() for r in clients if r.getMessage().startswith("Cancelling cause reader")]
    assert all(line.startswith("Cancelling cause reader exited abnormally: Server") for line in stopped)


@pytest.mark.parametrize("first", [True, False], ids=["its first to the queue", "after one"])
def test_an_enqueue_while_rabbitmq_is_unreachable_waits_for_it(
    brokers: dict[str, str], queue: str, first: bool
) -> None:
    # Given an app connected to RabbitMQ through a proxy, that has enqueued to a queue or not,
    # When the proxy cuts the connection and an enqueue to that queue starts,
    # Then the enqueue waits, and goes through once RabbitMQ is reachable again (within 30 s).
    # (Its first look at the queue opened a channel on the lost connection, and failed at once;
    # after one, the publish found its channel closed, and failed at once.)
    async def scenario() -> tuple[list[str], list[dict[str, Any]]]:
        async with FlakyProxy(brokers["rabbitmq"]) as proxy:
            app = own_app(proxy.url)
            async with app:
                await topology_made_elsewhere(app, [queue])
                ids = [] if first else [await app.enqueue_async("test.Echo", {"n": 0}, queue=queue)]
                connection = (await app.transport())._connection  # type: ignore[attr-defined]
                proxy.cut(None)
                while connection.connected.is_set():  # (until the client sees the loss)
                    await asyncio.sleep(0.01)
                enqueue = asyncio.create_task(app.enqueue_async("test.Echo", {"n": 1}, queue=queue))
                done, _ = await asyncio.wait([enqueue], timeout=0.5)
                assert not done, f"the enqueue ended while RabbitMQ was unreachable: {enqueue}"
                proxy.heal()
                ids.append(await enqueue)
            return ids, await asyncio.to_thread(envelopes_in, app, queue)

    ids, found = run(scenario())
    assert [envelope["id"] for envelope in found] == ids


def test_an_enqueue_out_when_the_network_stalls_waits_for_rabbitmq_and_goes_through(
    brokers: dict[str, str], queue: str
) -> None:
    # Given an app connected to RabbitMQ through a proxy, with 1 s heartbeats,
    # When the network stalls (nothing passes, nothing closes) with an enqueue out, until the
    # client finds the connection stuck and closes it (about 6 s), and then heals,
    # Then the enqueue goes through once RabbitMQ is reachable again. (aiormq cancels what waits
    # on a connection it finds stuck: the enqueue raised CancelledError, which no one had asked
    # for; a worker's retry went unpublished, its delivery unacknowledged for 30 minutes.)
    async def scenario() -> tuple[str, list[dict[str, Any]]]:
        async with FlakyProxy(brokers["rabbitmq"]) as proxy:
            app = own_app(proxy.url + "?heartbeat=1")
            async with app:
                await topology_made_elsewhere(app, [queue])
                await app.enqueue_async("test.Echo", {"n": 0}, queue=queue)
                connection = (await app.transport())._connection  # type: ignore[attr-defined]
                proxy.stall()
                enqueue = asyncio.create_task(app.enqueue_async("test.Echo", {"n": 1}, queue=queue))
                while connection.connected.is_set():  # (until the client finds it stuck)
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                assert not enqueue.done(), f"the enqueue ended while RabbitMQ was unreachable: {enqueue}"
                proxy.heal()
                job_id = await enqueue
            return job_id, await asyncio.to_thread(envelopes_in, app, queue)

    job_id, found = run(scenario(), timeout=60)
    assert job_id in [envelope["id"] for envelope in found]


async def until_consumed(url: str, queue: str) -> None:
    """Return once `queue` has a consumer (within 10 s)."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for _ in range(200):
            declared = await channel.declare_queue(queue, passive=True)
            if declared.declaration_result.consumer_count:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{queue} has no consumer after 10 s")


def test_a_stop_while_the_network_stalls_ends_within_its_grace_period_and_raises_nothing(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a worker consuming through a proxy, with 1 s heartbeats, one job running,
    # When the network stalls (nothing passes, nothing closes) and the worker is stopped with a
    # 0.5 s grace period, Then consume returns, raising nothing, before the client finds the
    # connection stuck (about 6 s). (The stop waited for the consumer's cancel to be answered
    # until then, starting prefetched jobs meanwhile, and then raised CancelledError.)
    stop, running = asyncio.Event(), asyncio.Event()

    async def scenario() -> tuple[float, bool]:
        async with FlakyProxy(brokers["rabbitmq"]) as proxy:
            app = Bridge(broker=proxy.url + "?heartbeat=1", registry=str(SCHEMAS), prefix=names.prefix(),
                         delay_tiers="1s", grace_s=0.5)  # fmt: skip

            @app.job("test.Echo", queue=queue)
            async def slow(payload: dict[str, Any], ctx: JobContext) -> None:
                running.set()
                await asyncio.sleep(30)

            async with app:
                await topology_made_elsewhere(app, [queue])
                consuming = asyncio.create_task(app.consume(concurrency=1, stop=stop))
                await until_consumed(brokers["rabbitmq"], queue)  # (its jobs come by its consumer)
                for n in range(3):
                    await app.enqueue_async("test.Echo", {"n": n}, queue=queue)
                await asyncio.wait_for(running.wait(), 30)
                proxy.stall()
                began = time.monotonic()
                stop.set()
                await consuming
                took = time.monotonic() - began
                connection = (await app.transport())._connection  # type: ignore[attr-defined]
                still_up = connection.connected.is_set()  # (not yet found stuck)
                proxy.heal()
            return took, still_up

    took, still_up = run(scenario(), timeout=60)
    assert took < 5 and still_up, took


def test_closing_an_app_lets_its_enqueues_be_confirmed_and_ends_one_waiting_for_rabbitmq_saying_so(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an app connected to RabbitMQ through a proxy,
    # When 200 enqueues start and the app closes at once, Then each is confirmed, and in the queue;
    # When the proxy cuts the connection, an enqueue starts and the app closes,
    # Then the enqueue fails once CLOSE_FLUSH_S passed (1 s here), not retriable, saying that the
    # transport closed and that the job may still be published.
    # (Closing the channel under them failed some that were published; the one waiting for
    # the connection waited for PUBLISH_TIMEOUT_S, and then blamed RabbitMQ.)
    monkeypatch.setattr(rabbitmq, "CLOSE_FLUSH_S", 1.0)

    async def scenario() -> tuple[list[str | BaseException], float, BaseException | str]:
        async with FlakyProxy(brokers["rabbitmq"]) as proxy:
            app = own_app(proxy.url)
            async with app:
                await topology_made_elsewhere(app, [queue])
                await app.enqueue_async("test.Echo", {"n": 0}, queue=queue)  # (the queue seen and bound)
                enqueues = [app.enqueue_async("test.Echo", {"n": n}, queue=queue) for n in range(1, 201)]
                burst = asyncio.gather(*enqueues, return_exceptions=True)
                await asyncio.sleep(0)  # (each one out, waiting for its confirm)
            ids = await burst
            async with app:
                await app.enqueue_async("test.Echo", {"n": 201}, queue=queue)
                connection = (await app.transport())._connection  # type: ignore[attr-defined]
                proxy.cut(None)
                while connection.connected.is_set():  # (until the client sees the loss)
                    await asyncio.sleep(0.01)
                waiting = asyncio.create_task(app.enqueue_async("test.Echo", {"n": 202}, queue=queue))
                await asyncio.sleep(0.2)
                started = time.monotonic()
            [ended] = await asyncio.gather(waiting, return_exceptions=True)
            return ids, time.monotonic() - started, ended

    ids, closed_s, ended = run(scenario(), timeout=60)
    assert [job_id for job_id in ids if not isinstance(job_id, str)] == []
    assert set(ids) <= {envelope["id"] for envelope in envelopes_in(own_app(brokers["rabbitmq"]), queue)}
    assert isinstance(ended, PublishError) and not ended.retriable, ended
    assert f"transport closed before RabbitMQ confirmed the publish to {queue}" in str(ended), ended
    assert "it may still be published" in str(ended), ended
    assert 1.0 <= closed_s < 5.0


async def topology_made_elsewhere(app: Bridge, queues: list[str]) -> None:
    """`queues` made by another process with `app`'s settings: `app` has seen none of them."""
    settings = {"prefix": app.settings.prefix, "delay_tiers": "1s"}  # (as `own_app`)
    other = Bridge(broker=app.settings.broker, registry=str(SCHEMAS), **settings)
    async with other:
        await other.apply_topology(queues)


@pytest.mark.parametrize("delay", [None, 5.0])
def test_an_enqueue_to_a_delay_tier_as_the_jobs_queue_is_refused(
    brokers: dict[str, str], delay: float | None
) -> None:
    # Given an app whose delay tiers exist, When a job is enqueued to one of them as its queue,
    # now or delayed, Then the enqueue fails at once, saying the queue is a delay tier. (Delayed,
    # it was published and confirmed, and dropped when due: it came back to the jobs exchange
    # under the tier's name, which no queue is bound by.)
    app = own_app(brokers["rabbitmq"])
    tier = tier_queue(app.settings.prefix, 1.0)

    async def scenario() -> None:
        async with app:
            await app.apply_topology([names.queue()])
            await app.enqueue_async("test.Echo", {"n": 1}, queue=tier, delay=delay)

    with pytest.raises(PublishError) as refused:
        run(scenario())
    assert str(refused.value) == (
        f"RabbitMQ queue {tier} is a delay tier, not a queue: enqueue the job to its own queue"
    )


def test_a_consumer_whose_queue_is_deleted_stops_with_an_error(brokers: dict[str, str], queue: str) -> None:
    # Given a consumer (not --burst) that has run a job, When its queue is deleted under it,
    # Then consume raises one clear error naming the queue, instead of waiting for good.
    run(publish(brokers["rabbitmq"], queue, 1))
    app = Bridge(broker=brokers["rabbitmq"], registry=str(SCHEMAS))
    ran = signalling(app, queue)

    async def scenario() -> None:
        async with app:
            consuming = asyncio.create_task(app.consume())
            await asyncio.wait_for(ran.wait(), 30)
            async with await aio_pika.connect(brokers["rabbitmq"]) as connection:
                await (await connection.channel()).queue_delete(queue)
            await asyncio.wait_for(consuming, 30)

    with pytest.raises(TransportError, match=f"ended the consumer of {queue}; was it deleted"):
        run(scenario())


def test_a_consumer_whose_queue_is_deleted_as_it_subscribes_stops_with_an_error(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer subscribing to its queue,
    # When the queue is deleted so soon that the client reads RabbitMQ's cancel of the new
    # consumer before the subscribe's reply reaches bridge,
    # Then consume raises one clear error naming the queue. (It missed the cancel, not knowing
    # the consumer's tag yet, and waited for good: once in three CI runs, run beside others.)
    basic_consume = aiormq.Channel.basic_consume
    deletes: list[asyncio.Task[None]] = []

    async def deleted_at_once(channel: aiormq.Channel, name: str, *args: Any, **kwargs: Any) -> Any:
        consume_ok = await basic_consume(channel, name, *args, **kwargs)
        if name == queue:
            # (Shielded: the broker's cancel stops the consumer, which cuts its subscribe short,
            # and with it this deletion's own connection midway: its close then hung at the
            # loop's end, once in CI.)
            deletes.append(asyncio.ensure_future(delete_rabbitmq_queue(brokers["rabbitmq"], queue)))
            await asyncio.shield(deletes[-1])
            # (aiormq drops the tag, then calls the cancel callbacks, in one step of its reader)
            while consume_ok.consumer_tag in channel.consumers:
                await asyncio.sleep(0.01)
        return consume_ok

    monkeypatch.setattr(aiormq.Channel, "basic_consume", deleted_at_once)
    app = Bridge(broker=brokers["rabbitmq"], registry=str(SCHEMAS))
    signalling(app, queue)

    async def scenario() -> None:
        try:
            async with app:
                await app.apply_topology([queue])
                await asyncio.wait_for(app.consume(), 30)
        finally:
            await asyncio.gather(*deletes)

    with pytest.raises(TransportError, match=f"ended the consumer of {queue}; was it deleted"):
        run(scenario())


def test_a_consumer_whose_queue_is_deleted_while_rabbitmq_is_unreachable_stops_with_an_error(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a consumer (through a proxy) that has run a job,
    # When the proxy cuts it off, its queue is deleted, and the proxy heals,
    # Then consume raises one clear error naming the queue once the connection is back. (The
    # robust channel declared the queue again at every reconnect, which failed for good: the
    # worker consumed none of its queues, saying nothing but aio-pika's tries, every 30 s.)
    run(publish(brokers["rabbitmq"], queue, 1))

    async def scenario() -> None:
        async with FlakyProxy(brokers["rabbitmq"]) as proxy:
            app = Bridge(broker=proxy.url, registry=str(SCHEMAS))
            ran = signalling(app, queue)
            async with app:
                consuming = asyncio.create_task(app.consume())
                await asyncio.wait_for(ran.wait(), 30)
                connection = (await app.transport())._connection  # type: ignore[attr-defined]
                proxy.cut(None)
                while connection.connected.is_set():  # (until the client sees the loss)
                    await asyncio.sleep(0.01)
                await delete_rabbitmq_queue(brokers["rabbitmq"], queue)
                proxy.heal()
                await asyncio.wait_for(consuming, 30)

    with pytest.raises(TransportError, match=f"ended the consumer of {queue}; was it deleted"):
        run(scenario(), timeout=60)


def test_a_returned_publish_fails_itself_not_another_in_flight(brokers: dict[str, str], queue: str) -> None:
    # Given 200 publishes in flight to an existing queue, and one among them to a queue
    # deleted since the app first published to it (RabbitMQ returns it, as it is mandatory),
    # When all are awaited, Then exactly that one fails, saying what to do, and the other 200
    # were confirmed and are in their queue. (aiormq matches a return to its publish by
    # message id: ids shared between publishes would fail another one and confirm the lost one.)
    url = brokers["rabbitmq"]
    app = Bridge(broker=url, registry=str(SCHEMAS))
    missing = f"{queue}-missing"

    async def scenario() -> list[Any]:
        async with app:
            await app.apply_topology([queue, missing])
            await app.enqueue_async("test.Echo", {"n": -2}, queue=missing)
            await delete_rabbitmq_queue(url, missing)
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


def _unacked(queue: str) -> int | None:
    """Messages of `queue` not acknowledged yet, ready or delivered; None before RabbitMQ's HTTP
    API has a figure (its figures lag by up to its statistics interval, 5 s)."""
    messages = rabbitmq_api(f"queues/%2F/{queue}").get("messages")
    return messages if isinstance(messages, int) else None


async def _ready_count(url: str, queue: str) -> int:
    """Messages in `queue` ready for delivery (not counting those delivered and unacknowledged)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await connection.close()


def test_a_dead_letter_rabbitmq_keeps_refusing_stops_the_consumer_and_loses_nothing(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job that must be dead-lettered, and its dead-letter queue full (a max-length
    # policy with reject-publish: RabbitMQ nacks every publish to it),
    # When consumed, Then settling tries the dead letter again for SETTLE_PATIENCE_S (0.5 s
    # here), then consume stops with an error naming the queue and the refusal,
    # And once the queue takes publishes again, the next run dead-letters the job: it was kept.
    # (The nack was reported as "no queue is bound ...: run `bridge topology apply`".)
    monkeypatch.setattr(rabbitmq, "SETTLE_PATIENCE_S", 0.5)
    url = brokers["rabbitmq"]
    [job_id] = run(publish(url, queue, 1))
    app = failing_app(url, queue)
    with full(url, dlq_name(queue)):
        refused = f"refused the publish to {re.escape(dlq_name(queue))}: .* refused for 0.5 s"
        with pytest.raises(TransportError, match=refused):
            run(consume(app))
    run(purge(url, dlq_name(queue)))
    run(consume(app))
    [letter] = dead_letters(app, queue)
    assert letter.envelope is not None and letter.envelope.id == job_id


def test_a_dead_letter_refused_until_its_queue_drains_goes_out_then(
    brokers: dict[str, str], queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a job that must be dead-lettered, and its dead-letter queue full,
    # When the queue is purged while settling waits to try the refused dead letter again,
    # Then the dead letter goes out, and consume carries on and drains the queue.
    url = brokers["rabbitmq"]
    [job_id] = run(publish(url, queue, 1))
    app = failing_app(url, queue)

    async def scenario() -> int:
        async with app:
            consuming = asyncio.create_task(app.consume(burst=True))
            return await _purged_once_refused(consuming, caplog, url, dlq_name(queue))

    with caplog.at_level(logging.WARNING, logger="bridge.rabbitmq"), full(url, dlq_name(queue)):
        assert run(scenario()) == 1
    [letter] = dead_letters(app, queue)
    assert letter.envelope is not None and letter.envelope.id == job_id


def test_a_dead_letter_blocked_in_an_alarm_longer_than_refusals_are_tried_is_still_tried_again(
    brokers: dict[str, str], queue: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given refused publishes tried again for 2 s, a job that must be dead-lettered, its
    # dead-letter queue full, and RabbitMQ in a disk alarm for 2.5 s after the job ran,
    # When the dead letter, blocked until then, is refused, and the queue is purged,
    # Then the dead letter goes out: the 2 s count from the refusal, not from the publish.
    # (The alarm had used them up: the first refusal stopped the consumer.)
    monkeypatch.setattr(rabbitmq, "SETTLE_PATIENCE_S", 2.0)
    url = brokers["rabbitmq"]
    [job_id] = run(publish(url, queue, 1))
    app = Bridge(broker=url, registry=str(SCHEMAS))
    ran = asyncio.Event()

    @app.job("test.Echo", queue=queue, max_attempts=1)
    async def broken(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.set()
        raise ValueError("bad")

    async def scenario() -> int:
        async with app:
            with rabbitmq_disk_alarm():
                consuming = asyncio.create_task(app.consume(burst=True))
                await asyncio.wait_for(ran.wait(), 30)
                await asyncio.sleep(2.5)
            return await _purged_once_refused(consuming, caplog, url, dlq_name(queue))

    with caplog.at_level(logging.WARNING, logger="bridge.rabbitmq"), full(url, dlq_name(queue)):
        assert run(scenario(), timeout=60) == 1
    [letter] = dead_letters(app, queue)
    assert letter.envelope is not None and letter.envelope.id == job_id


async def _purged_once_refused(
    consuming: asyncio.Task[Stats], caplog: pytest.LogCaptureFixture, url: str, dlq: str
) -> int:
    """Purge `dlq` once the log says a publish was refused; the jobs `consuming` dead-lettered."""
    deadline = asyncio.get_running_loop().time() + 30
    while not any("refused the publish" in r.getMessage() for r in caplog.records):
        if consuming.done():
            await consuming  # it ended before any refusal: its error, if any, says why
            raise AssertionError("consume ended, and no dead letter was refused")
        assert asyncio.get_running_loop().time() < deadline, "the dead letter was never refused"
        await asyncio.sleep(0.02)
    await purge(url, dlq)
    return (await consuming).dead_lettered


def test_topology_apply_binds_a_queue_made_elsewhere_as_it_is_and_retries_come_back_to_it(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a classic queue made by another service (bridge makes quorum queues, and RabbitMQ
    # refuses a declaration of an existing queue with other arguments: PRECONDITION_FAILED),
    # When `topology apply` runs, Then it keeps the queue as it is and binds it; and a job on it
    # that keeps failing goes round a delay tier back to it, then to its dead-letter queue,
    # while the next job runs.
    url = brokers["rabbitmq"]
    app = own_app(url)
    ran = failing_first(app, queue, lambda: ValueError("no"), max_attempts=2, backoff=fixed(1))

    async def scenario() -> tuple[list[str], Stats]:
        async with app:
            async with await aio_pika.connect(url) as connection:
                await (await connection.channel()).declare_queue(queue, durable=True)  # a classic queue
            plan = await app.apply_topology()
            await app.enqueue_async("test.Echo", {"n": 1})
            await app.enqueue_async("test.Echo", {"n": 2})
            return plan, await app.consume(burst=True)

    plan, stats = run(scenario(), timeout=60)
    assert f"rabbitmq: queue {queue} exists, kept as it is, bound by {queue!r}" in plan
    assert sorted(ran) == [1, 1, 2] and stats.retried == 1 and stats.dead_lettered == 1
    [letter] = dead_letters(app, queue)
    assert letter.reason == "exhausted"


@pytest.mark.parametrize("delay_s", [1.5, 0.2], ids=["through a tier", "straight back"])
def test_a_retry_to_a_queue_made_and_left_unbound_elsewhere_reaches_it(
    brokers: dict[str, str], queue: str, delay_s: float
) -> None:
    # Given a queue another service made without binding it to bridge's jobs exchange, and a
    # job on a bridge queue whose envelope names it (retries and delays go to the envelope's queue),
    # When the job fails with a retry, one a tier long or one shorter than any tier,
    # Then the retry is in that queue: bridge bound it by its name when it first looked at it.
    # (Through a tier, the retry stayed in the tier until something bound the queue:
    # RabbitMQ's at-least-once dead-lettering keeps what it cannot route. Straight back, it
    # was returned, and the worker stopped.)
    url = brokers["rabbitmq"]
    app = own_app(url)
    failing_first(app, queue, lambda: Retry(delay_s=delay_s))
    elsewhere = f"{queue}.elsewhere"

    job_id, _ = run(consume_a_job_naming_a_queue_made_elsewhere(app, queue, elsewhere))
    retries: list[dict[str, Any]] = []

    def arrived() -> bool:
        retries.extend(envelopes_in(app, elsewhere))  # (taken off the queue)
        return bool(retries)

    wait_until(arrived, 10, f"the retry in {elsewhere}")
    [retry] = retries
    assert (retry["id"], retry["attempt"]) == (job_id, 2)


async def declare_unbound(url: str, queue: str) -> None:
    """Make classic queue `queue` as another service would: bound to nothing of bridge's."""
    async with await aio_pika.connect(url) as connection:
        await (await connection.channel()).declare_queue(queue, durable=True)


async def consume_a_job_naming_a_queue_made_elsewhere(
    app: Bridge, queue: str, elsewhere: str
) -> tuple[str, Stats]:
    """Apply `app`'s topology, make `elsewhere` unbound, put a job on `queue` whose envelope
    names `elsewhere`, and consume in burst: the job's id, and the stats."""
    async with app:
        await app.apply_topology()
        await declare_unbound(app.settings.broker or "", elsewhere)
        envelope = app.build_envelope("test.Echo", {"n": 1}, queue=elsewhere)
        await publish_envelope(app, queue, envelope)
        return envelope.id, await app.consume(burst=True)


@pytest.mark.parametrize("delay", [1.5, None], ids=["through a tier", "straight"])
def test_an_enqueue_to_a_queue_made_and_left_unbound_elsewhere_reaches_it(
    brokers: dict[str, str], queue: str, delay: float | None
) -> None:
    # Given a queue another service made without binding it to bridge's jobs exchange,
    # When a producer that has not seen it before enqueues a job to it, delayed through a tier or not,
    # Then the job is in that queue: the producer bound it by its name before its first publish.
    # (Through a tier, the job would stay in the tier; straight, it would be returned.)
    url = brokers["rabbitmq"]
    app = own_app(url)
    producer = Bridge(broker=url, registry=str(SCHEMAS), prefix=app.settings.prefix, delay_tiers="1s")
    elsewhere = f"{queue}.elsewhere"

    async def enqueue() -> str:
        async with app:
            await app.apply_topology([queue])  # (the exchange and the tier)
        await declare_unbound(url, elsewhere)
        async with producer:
            return await producer.enqueue_async("test.Echo", {"n": 1}, queue=elsewhere, delay=delay)

    job_id = run(enqueue())
    found: list[str] = []

    def arrived() -> bool:
        found.extend(envelope["id"] for envelope in envelopes_in(app, elsewhere))  # (taken off the queue)
        return bool(found)

    wait_until(arrived, 10, f"the job in {elsewhere}")
    assert found == [job_id]


def test_a_dry_run_replay_binds_nothing_and_the_replay_binds_the_queue_it_puts_a_job_on(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a dead letter of a job whose envelope names a queue another service made and left
    # unbound,
    # When its replay is dry run, Then the queue is still unbound: a dry run changes nothing;
    # When it is replayed, Then the job is in that queue, bound by its name at the first publish.
    url = brokers["rabbitmq"]
    app = own_app(url)
    failing_first(app, queue, lambda: Permanent("no"))
    elsewhere = f"{queue}.elsewhere"

    def bound() -> bool:
        bindings = rabbitmq_api(f"queues/%2F/{elsewhere}/bindings")
        return f"{app.settings.prefix}.jobs" in {binding["source"] for binding in bindings}

    async def replay(dry_run: bool) -> list[str]:
        async with app:
            return (await app.dead_letters(queue).replay(Selection(), dry_run=dry_run)).replayed

    job_id, stats = run(consume_a_job_naming_a_queue_made_elsewhere(app, queue, elsewhere))
    assert stats.dead_lettered == 1
    assert run(replay(dry_run=True)) == [job_id]
    assert not bound()
    assert run(replay(dry_run=False)) == [job_id]
    assert bound()
    [replayed] = envelopes_in(app, elsewhere)
    assert replayed["id"] == job_id


def as_user(user: str, app: Bridge) -> Bridge:
    """An app under `app`'s prefix and tiers that connects as RabbitMQ user `user` (whose
    password is its name)."""
    url = app.settings.require_broker().replace("guest:guest@", f"{user}:{user}@")
    return Bridge(broker=url, registry=str(SCHEMAS), prefix=app.settings.prefix, delay_tiers="1s")


def test_a_producer_that_may_not_bind_a_queue_still_enqueues_to_it_and_is_told_once(
    brokers: dict[str, str], queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a queue `topology apply` made, and a RabbitMQ user that may publish but not read
    # (binding a queue needs read permission on the exchange),
    # When that user enqueues two jobs to the queue, one delayed through a tier and one not,
    # Then both are in the queue, and the log says once for each exchange (the jobs and the due
    # one) that the queue could not be bound there, and what binds it.
    url = brokers["rabbitmq"]
    app = own_app(url)
    user = f"u-{uuid.uuid4().hex[:8]}"
    producer = as_user(user, app)

    async def enqueue() -> list[str]:
        async with app:
            await app.apply_topology([queue])
        async with producer:
            return [
                await producer.enqueue_async("test.Echo", {"n": 1}, queue=queue, delay=1.5),
                await producer.enqueue_async("test.Echo", {"n": 2}, queue=queue),
            ]

    rabbitmqctl("add_user", user, user)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", "^$")
        with caplog.at_level(logging.WARNING, logger="bridge.rabbitmq"):  # (a CLI's level)
            ids = run(enqueue())
    finally:
        rabbitmqctl("delete_user", user)
    found: list[str] = []

    def arrived() -> bool:
        found.extend(envelope["id"] for envelope in envelopes_in(app, queue))  # (taken off the queue)
        return len(found) == 2

    wait_until(arrived, 10, f"both jobs in {queue}")
    assert sorted(found) == sorted(ids)
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("could not bind")]
    prefix = app.settings.prefix  # (told once for each exchange: the jobs one, and the due one)
    assert [line.split(" (")[0] for line in told] == [
        f"could not bind queue {queue} to {prefix}.jobs",
        f"could not bind queue {queue} to {prefix}.delay.due",
    ]
    assert all(f"`bridge topology apply --queues {queue}` binds it" in line for line in told)


def test_a_producer_that_may_not_configure_enqueues_and_a_look_leaves_no_exchange_behind(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a queue `topology apply` made, and a RabbitMQ user that may write and read but not
    # configure, When that user enqueues a job, Then it is in the queue. (Connecting declared
    # the jobs exchange, which needs configure permission: the user could not enqueue at all,
    # told that RabbitMQ could not be reached.) And When a dlq list runs under a prefix whose
    # exchange does not exist, Then it leaves none behind (a mistyped prefix made one).
    url = brokers["rabbitmq"]
    app = own_app(url)
    user = f"u-{uuid.uuid4().hex[:8]}"
    producer = as_user(user, app)
    looker = Bridge(broker=url, registry=str(SCHEMAS), prefix=names.prefix())

    async def enqueue() -> str:
        async with app:
            await app.apply_topology([queue])
        async with producer:
            return await producer.enqueue_async("test.Echo", {"n": 1}, queue=queue)

    async def look() -> bool:
        async with looker:
            assert await looker.dead_letters(queue).find() == []
        async with await aio_pika.connect(url) as connection:
            try:
                await (await connection.channel()).declare_exchange(
                    f"{looker.settings.prefix}.jobs", passive=True
                )
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return False
            return True

    rabbitmqctl("add_user", user, user)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, "^$", ".*", ".*")
        job_id = run(enqueue())
    finally:
        rabbitmqctl("delete_user", user)
    assert [envelope["id"] for envelope in envelopes_in(app, queue)] == [job_id]
    assert run(look()) is False


def failing_app(url: str, queue: str) -> Bridge:
    """An app whose test.Echo jobs on `queue` fail on their one attempt: each is dead-lettered."""
    app = Bridge(broker=url, registry=str(SCHEMAS))

    @app.job("test.Echo", queue=queue, max_attempts=1)
    async def broken(payload: dict[str, Any], ctx: JobContext) -> None:
        raise ValueError("bad")

    return app


async def consume(app: Bridge) -> None:
    async with app:
        await app.consume(burst=True)


@contextmanager
def full(url: str, queue: str) -> Iterator[None]:
    """`queue` held at a length of 1 with reject-publish, and filled until RabbitMQ refuses a publish."""
    policy = f"test-full-{queue}"
    limit = json.dumps({"max-length": 1, "overflow": "reject-publish"})
    rabbitmqctl("set_policy", policy, f"^{re.escape(queue)}$", limit, "--apply-to", "queues")
    try:
        run(_fill(url, queue))
        yield
    finally:
        rabbitmqctl("clear_policy", policy)


async def _fill(url: str, queue: str) -> None:
    """Publish to `queue` until RabbitMQ refuses (a quorum queue may take one more than its limit)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for _ in range(100):  # a policy takes effect a moment after it is set
            try:
                await channel.default_exchange.publish(aio_pika.Message(b"filler"), routing_key=queue)
            except aio_pika.exceptions.DeliveryError:
                return
        raise AssertionError(f"RabbitMQ never refused a publish to {queue}: did the policy apply?")
    finally:
        await connection.close()


async def purge(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await (await channel.declare_queue(queue, passive=True)).purge()
    finally:
        await connection.close()


def test_a_job_that_kills_its_worker_is_dead_lettered_once_it_came_back_delivery_limit_times(
    brokers: dict[str, str], queue: str, tmp_path: Path
) -> None:
    # Given a job whose every run kills its `bridge consume` with SIGKILL (nothing is settled,
    # so the quorum queue takes it back and counts it), and a delivery_limit of 2,
    # When consumers are started one after another until one drains the queue,
    # Then the job ran twice, and its third delivery dead-lettered it as `delivery_limit`
    # without running it: it neither comes back for ever (RabbitMQ 3) nor is dropped after 20
    # returns (RabbitMQ 4's default limit).
    url, ledger = brokers["rabbitmq"], tmp_path / "ledger"
    [job] = run(publish(url, queue, 1))
    env = {"LEDGER_KILL": "0", "BRIDGE_DELIVERY_LIMIT": "2"}
    codes, log = restart_until_drained(url, queue, ledger, "g", env)
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0], log
    assert ledger_counts(ledger, "start") == {job: 2}
    assert_dead_lettered_for_coming_back(url, queue, job, 2)


def test_a_job_held_beside_a_killer_is_not_counted_with_it(
    brokers: dict[str, str], queue: str, tmp_path: Path
) -> None:
    # Given two 1 s jobs, the second of which kills its `bridge consume` at once on every run,
    # and a delivery_limit of 2,
    # When consumers are started one after another until one drains the queue,
    # Then the killer is dead-lettered and the other job ran to success. (RabbitMQ counts a
    # return for every message a dead worker held. Taken again with a prefetch, the slow job was
    # held beside the killer at each crash, counted with it, and dead-lettered with it.)
    url, ledger = brokers["rabbitmq"], tmp_path / "ledger"
    innocent, killer = run(publish(url, queue, 2, sleep_ms=1000))
    env = {"LEDGER_KILL": "1", "BRIDGE_DELIVERY_LIMIT": "2"}
    codes, log = restart_until_drained(url, queue, ledger, "g", env)
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0], log
    assert ledger_counts(ledger, "done") == {innocent: 1}
    assert [letter.envelope.id for letter in dead_letters(own_app(url), queue) if letter.envelope] == [killer]


def test_messages_that_come_back_to_a_busy_consumer_run_one_at_a_time_after_the_rest(
    brokers: dict[str, str], queue: str
) -> None:
    # Given seven 0.3 s jobs, the first three held by another consumer's channel,
    # When a consumer running four jobs at a time is busy with the other four, and that channel
    # closes (its three messages come back, counted, as when a worker dies),
    # Then all seven succeed, and each of the three ran after the four, with nothing beside it:
    # any of them may be the job that killed the worker that held them.
    url = brokers["rabbitmq"]
    app = Bridge(broker=url, registry=str(SCHEMAS))
    runs: dict[int, tuple[float, float]] = {}
    began_n: list[int] = []
    busy = asyncio.Event()  # set once the consumer runs four: it is subscribed, and its slots full

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        began = time.monotonic()
        began_n.append(payload["n"])
        if len(began_n) == 4:
            busy.set()
        await asyncio.sleep(0.3)
        runs[payload["n"]] = (began, time.monotonic())

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            for n in range(7):
                await app.enqueue_async("test.Echo", {"n": n})
            async with holding(url, queue, 3):
                consuming = asyncio.create_task(app.consume(burst=True, concurrency=4))
                await busy.wait()
            await consuming

    run(scenario())
    assert sorted(runs) == list(range(7))
    came_back = [runs[n] for n in range(3)]
    assert min(began for began, _ in came_back) >= max(ended for _, ended in (runs[n] for n in range(3, 7)))
    for began, ended in came_back:
        assert [n for n, (b, e) in runs.items() if b < ended and e > began and (b, e) != (began, ended)] == []


def test_a_connection_cut_while_a_job_that_came_back_runs_alone_loses_nothing(
    brokers: dict[str, str], queue: str
) -> None:
    # Given twenty jobs, the first five of which came back (another consumer's channel held
    # them and closed),
    # When RabbitMQ closes every client connection while the first of them runs alone,
    # Then the consumer reconnects, takes the rest of what came back, subscribes again and
    # drains the queue: every job done, the one that was running twice (its ack was lost).
    url = brokers["rabbitmq"]
    app = Bridge(broker=url, registry=str(SCHEMAS), concurrency=4)
    runs: Counter[int] = Counter()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        if payload["n"] == 0 and not runs[0]:
            await asyncio.to_thread(rabbitmqctl, "close_all_connections", "test: cut while alone")
        runs[payload["n"]] += 1

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            for n in range(20):
                await app.enqueue_async("test.Echo", {"n": n})
            async with holding(url, queue, 5):
                pass
            while await ready(url, queue) < 20:  # what came back is at the head of the queue
                await asyncio.sleep(0.05)
            await app.consume(burst=True)

    run(scenario(), timeout=120)
    assert runs == {0: 2, **{n: 1 for n in range(1, 20)}}
    assert dead_letters(own_app(url), queue) == []


@asynccontextmanager
async def holding(url: str, queue: str, count: int) -> AsyncIterator[None]:
    """The first `count` messages of `queue` held by a connection of its own, which closes at
    the end without settling them: they come back counted, as a dead worker's would."""
    taken: list[object] = []
    all_taken = asyncio.Event()

    async def take(message: object) -> None:
        taken.append(message)
        if len(taken) == count:
            all_taken.set()

    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=count)
        await (await channel.declare_queue(queue, passive=True)).consume(take)
        await all_taken.wait()
        yield


async def ready(url: str, queue: str) -> int:
    """How many messages `queue` holds ready for a consumer."""
    async with await aio_pika.connect(url) as connection:
        declared = await (await connection.channel()).declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def ready_in(url: str, queue: str) -> int:
    """How many messages are ready in `queue`, asked on a connection of its own (aio-pika's
    robust channel answers a repeated passive declaration from its cache)."""
    async with await aio_pika.connect(url) as connection:
        declared = await (await connection.channel()).declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


def test_delayed_jobs_whose_queue_is_gone_become_letters_and_hold_back_no_other_queue(
    brokers: dict[str, str], queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given 40 jobs in a delay tier for a queue that was deleted (more than the 32 RabbitMQ's
    # dead-letter worker holds for a tier at once), put there as another producer would,
    # When a job for another queue is delayed behind them,
    # Then it runs within 5 s of its time, And the 40 are letters of `<prefix>.delay`, reason
    # unroutable, which the next consume's start warns of, And once their queue is made again,
    # a replay puts each back there once. (They stayed in the tier, at-least-once, and with 32
    # held nothing else left it: the other queue's job waited minutes, for good in the runs here.)
    url = brokers["rabbitmq"]
    app = own_app(url)
    gone = names.queue()
    ran = signalling(app, queue)
    ids: list[str] = []

    async def scenario() -> float:
        async with app:
            await app.apply_topology([queue, gone])
            await delete_rabbitmq_queue(url, gone)
            async with await aio_pika.connect(url) as connection:
                channel = await connection.channel()
                tier = await channel.get_exchange(tier_queue(app.settings.prefix, 1.0))
                for i in range(40):
                    envelope = app.build_envelope("test.Echo", {"n": i}, queue=gone)
                    ids.append(envelope.id)
                    body = codec.encode(app.registry.schema(ENVELOPE), envelope.to_avro())
                    await tier.publish(aio_pika.Message(body, delivery_mode=2), routing_key=gone)
            due = time.monotonic() + 1.0
            await app.enqueue_async("test.Echo", {"n": 1}, queue=queue, delay=1)
            stop = asyncio.Event()
            consuming = asyncio.create_task(app.consume([queue], stop=stop))
            try:
                await asyncio.wait_for(ran.wait(), 6)
                return time.monotonic() - due
            finally:
                stop.set()
                await consuming

    async def letters_of_delay() -> list[Letter]:
        # (Those RabbitMQ sent there just before the other job may still be on their way.)
        while await ready_in(url, f"{app.settings.prefix}.delay.dlq") < len(ids):
            await asyncio.sleep(0.05)
        async with app:
            await app.consume([queue], burst=True)
            return await app.dead_letters(f"{app.settings.prefix}.delay").find()

    assert run(scenario()) < 5
    letters = run(letters_of_delay())
    assert sorted(letter.id for letter in letters) == sorted(ids)
    assert {letter.letter.reason for letter in letters} == {"unroutable"}
    assert letters[0].letter.detail == f"a delayed job that no queue {gone!r} took when it was due"
    kept = re.compile(
        rf"\d+ delayed jobs wait in {re.escape(app.settings.prefix)}\.delay\.dlq: their queue was gone"
    )
    assert [r for r in caplog.records if kept.match(r.getMessage())], caplog.text

    async def replay() -> None:
        async with app:
            await app.apply_topology([queue, gone])
            await app.dead_letters(f"{app.settings.prefix}.delay").replay(Selection())

    run(replay())
    assert sorted(envelope["id"] for envelope in envelopes_in(app, gone)) == sorted(ids)


async def older_topology(url: str, prefix: str, queue: str, *, tier: bool = True) -> None:
    """The topology bridge made before `.wait` queues: the jobs exchange, `queue` bound to it,
    and (with `tier`) the 1 s tier's queue by the tier's name, dead-lettering to the jobs
    exchange; no due exchange. (Without `tier`: a queue another service made and bound.)"""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        direct, fanout = aio_pika.ExchangeType.DIRECT, aio_pika.ExchangeType.FANOUT
        jobs = await channel.declare_exchange(f"{prefix}.jobs", direct, durable=True)
        await (await channel.declare_queue(queue, durable=True, arguments=QUORUM)).bind(jobs, queue)
        if tier:
            name = tier_queue(prefix, 1.0)
            exchange = await channel.declare_exchange(name, fanout, durable=True)
            arguments = {
                **QUORUM, "x-message-ttl": 1000, "x-dead-letter-exchange": f"{prefix}.jobs",
                "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
            }  # fmt: skip
            await (await channel.declare_queue(name, durable=True, arguments=arguments)).bind(exchange)


def taken_within(app: Bridge, queue: str, count: int, within_s: float) -> list[dict[str, Any]]:
    """The job envelopes taken off `queue` until `count` have come (fail after `within_s`)."""
    taken: list[dict[str, Any]] = []
    deadline = time.monotonic() + within_s
    while len(taken) < count:
        assert time.monotonic() < deadline, f"{len(taken)} of {count} jobs in {queue} after {within_s} s"
        taken += envelopes_in(app, queue)
    return taken


def test_a_queue_no_topology_apply_named_is_bound_for_delays_by_a_producer_once_the_topology_is_new(
    brokers: dict[str, str], queue: str
) -> None:
    # Given an older bridge's topology, and a producer that enqueued a delayed job to its queue
    # then (finding no due exchange), When another app applies the topology for another queue
    # only, and the producer at once delays a second job to the first queue,
    # Then both reach their queue, and none goes to the delayed jobs' dead-letter queue. (The
    # producer took its queue for bound after its first try, and the second job went to
    # `<prefix>.delay.dlq`; then, for 30 s, it tried that binding again only that often.)
    url = brokers["rabbitmq"]
    producer = own_app(url)
    prefix = producer.settings.prefix
    other = Bridge(broker=url, registry=str(SCHEMAS), prefix=prefix, delay_tiers="1s")

    async def scenario() -> list[str]:
        await older_topology(url, prefix, queue)
        async with producer:
            ids = [await producer.enqueue_async("test.Echo", {"n": 1}, queue=queue, delay=1)]
            async with other:
                await other.apply_topology([names.queue()])
            ids.append(await producer.enqueue_async("test.Echo", {"n": 2}, queue=queue, delay=1))
        return ids

    ids = run(scenario())
    assert sorted(envelope["id"] for envelope in taken_within(producer, queue, len(ids), 10)) == sorted(ids)


def test_a_queue_no_topology_apply_named_is_bound_for_delays_by_its_worker(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a queue another service made and bound to the jobs exchange only, and a topology
    # applied for another queue, When a bridge worker consumes it, and another producer puts a
    # job for it in a delay tier, Then the worker runs the job. (Nothing bound the queue to
    # the due exchange: the job went to `<prefix>.delay.dlq`.)
    url = brokers["rabbitmq"]
    app = own_app(url)
    ran = signalling(app, queue)

    async def scenario() -> None:
        await older_topology(url, app.settings.prefix, queue, tier=False)
        async with app:
            await app.apply_topology([names.queue()])
            stop = asyncio.Event()
            consuming = asyncio.create_task(app.consume([queue], stop=stop))
            try:
                await until_consumed(url, queue)
                async with await aio_pika.connect(url) as connection:
                    channel = await connection.channel()
                    tier = await channel.get_exchange(tier_queue(app.settings.prefix, 1.0))
                    envelope = app.build_envelope("test.Echo", {"n": 1}, queue=queue)
                    body = codec.encode(app.registry.schema(ENVELOPE), envelope.to_avro())
                    await tier.publish(aio_pika.Message(body, delivery_mode=2), routing_key=queue)
                await asyncio.wait_for(ran.wait(), 10)
            finally:
                stop.set()
                await consuming

    run(scenario())


def test_topology_apply_unbinds_an_older_bridges_tier_queue_whose_jobs_still_arrive(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a topology as bridge made it before `.wait` queues (a tier's queue by the tier's
    # name, dead-lettering straight to the jobs exchange, and no due exchange), and a job
    # delayed into it then,
    # When the topology is applied and a second job is delayed,
    # Then the plan says the older queue was unbound, it is bound to no exchange but the
    # default, And both jobs run.
    url = brokers["rabbitmq"]
    app = own_app(url)
    prefix = app.settings.prefix
    tier = tier_queue(prefix, 1.0)
    ran: list[str] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(ctx.job_id)

    async def scenario() -> tuple[list[str], list[str]]:
        await older_topology(url, prefix, queue)
        async with app:
            first = await app.enqueue_async("test.Echo", {"n": 1}, delay=1)
            plan = await app.apply_topology()
            second = await app.enqueue_async("test.Echo", {"n": 2}, delay=1)
            stop = asyncio.Event()
            consuming = asyncio.create_task(app.consume(stop=stop))
            try:
                while len(ran) < 2:
                    await asyncio.sleep(0.05)
            finally:
                stop.set()
                await consuming
            return plan, [first, second]

    plan, ids = run(scenario(), timeout=30)
    assert sorted(ran) == sorted(ids)
    assert any(line.startswith(f"rabbitmq: queue {tier} (an older bridge's tier) unbound") for line in plan)
    bindings = rabbitmq_api(f"queues/%2F/{tier}/bindings")
    assert [binding["source"] for binding in bindings] == [""]  # (the default exchange's, by its name)


def test_a_delay_tier_deleted_during_a_burst_consume_stops_it_with_an_error_naming_it(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a job whose handler deletes one of its app's delay tiers,
    # When it is consumed in burst mode,
    # Then the job succeeds, and consume stops with an error naming the tier and the fix.
    # (Its drain check counts the tiers' messages with passive declares, which RabbitMQ
    # answered for the missing queue by closing the channel: the count never came, and the
    # consume never returned.)
    url = brokers["rabbitmq"]
    app = own_app(url)
    tier = tier_held_in(app, 1.0)
    ran: list[str] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        await asyncio.to_thread(delete_queue, app, tier)
        ran.append(ctx.job_id)

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            await app.enqueue_async("test.Echo", {"n": 1})
            await app.consume(burst=True)

    with pytest.raises(TransportError, match=f"no queue '{re.escape(tier)}'.*`bridge topology apply`"):
        run(scenario(), timeout=30)
    assert len(ran) == 1 and app.stats is not None and app.stats.processed == 1


def test_a_consume_whose_delay_path_was_deleted_says_so_at_start(
    brokers: dict[str, str], queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a topology whose due exchange and `<prefix>.delay.dlq` queue were deleted by hand
    # (the tiers' `.wait` queues are there: no older topology), When a worker consumes, Then it
    # warns at start, naming both and what to run. (Nothing was said: RabbitMQ kept each due
    # job in its tier, and with 32 kept, every delayed job behind them waited, for every queue.)
    url = brokers["rabbitmq"]
    app = own_app(url)
    signalling(app, queue)
    prefix = app.settings.prefix

    async def scenario() -> None:
        async with app:
            await app.apply_topology([queue])
            await delete_exchange(url, f"{prefix}.delay.due")
            await delete_rabbitmq_queue(url, f"{prefix}.delay.dlq")
            await app.consume([queue], burst=True)

    with caplog.at_level(logging.WARNING, logger="bridge.rabbitmq"):
        run(scenario(), timeout=30)
    said = [r.getMessage() for r in caplog.records if "RabbitMQ has no" in r.getMessage()]
    assert said == [
        f"RabbitMQ has no exchange {prefix}.delay.due nor queue {prefix}.delay.dlq: delayed jobs and"
        " retries that come due wait in their tier, and hold back the tier's other jobs, until"
        " `bridge topology apply` makes it again"
    ]


async def delete_exchange(url: str, name: str) -> None:
    """Delete exchange `name` behind the app's back."""
    async with await aio_pika.connect(url) as connection:
        await (await connection.channel()).exchange_delete(name)


def test_a_delay_tiers_exchange_deleted_during_a_consume_stops_it_with_an_error_naming_it(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a job whose first attempt deletes its app's delay tier exchange, then fails,
    # When it is consumed in burst mode, Then the retry's publish is refused, and consume stops
    # with an error naming the exchange and the fix; the job, unacknowledged, is still there.
    # (The publish error counted as a broker gone away: the delivery was left unacknowledged
    # for good, holding a prefetch slot, and the burst run ended as if all were done.)
    url = brokers["rabbitmq"]
    app = own_app(url)
    tier = tier_queue(app.settings.prefix, 1.0)

    @app.job("test.Echo", queue=queue, backoff=fixed(1))
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        await delete_exchange(url, tier)
        raise ConnectionError("the processor hung up")

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            await app.enqueue_async("test.Echo", {"n": 1})
            await app.consume(burst=True)

    with pytest.raises(TransportError, match=f"no exchange {re.escape(tier)}.*`bridge topology apply`"):
        run(scenario(), timeout=30)
    assert run(ready(url, queue)) == 1


@pytest.mark.parametrize("keyed", [False, True], ids=["no keys", "keyed"])
def test_a_delivery_held_past_rabbitmqs_consumer_timeout_runs_again_and_the_log_says_what_to_raise(
    brokers: dict[str, str], queue: str, caplog: pytest.LogCaptureFixture, tmp_path: Path, keyed: bool
) -> None:
    # Given RabbitMQ's consumer_timeout at 2 s (looked at every 0.2 s) and two jobs, the first
    # of which to start runs until RabbitMQ has closed the channel under it,
    # When they are consumed,
    # Then RabbitMQ closes the channel under the long job, whose acknowledgement is lost: it
    # comes back and runs again (at least once), or, with an idempotency key, is acknowledged
    # as a duplicate; the other job runs once; nothing is dead-lettered; and the log names the
    # queue, the timeout and what to raise.
    url = brokers["rabbitmq"]
    app = Bridge(broker=url, registry=str(SCHEMAS), idempotency=f"sqlite:///{tmp_path / 'keys.db'}")
    runs: Counter[str] = Counter()

    def closed() -> bool:  # (the transport logs it as the channel closes)
        return any("consumer_timeout" in record.getMessage() for record in caplog.records)

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        runs[ctx.job_id] += 1
        if sum(runs.values()) == 1:
            while not closed():
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.05)

    async def scenario() -> Stats:
        async with app:
            await app.apply_topology()
            for n in range(2):
                await app.enqueue_async("test.Echo", {"n": n}, idempotency_key=f"{n}" if keyed else None)
            return await app.consume(burst=True)

    timeout = rabbitmq_settings(consumer_timeout=2000, channel_tick_interval=200)
    with timeout, caplog.at_level(logging.ERROR, logger="bridge.rabbitmq"):
        stats = run(scenario(), timeout=60)
    assert sorted(runs.values()) == ([1, 1] if keyed else [1, 2])
    assert stats.duplicates == (1 if keyed else 0)
    assert dead_letters(app, queue) == []
    [line] = {r.getMessage() for r in caplog.records if "consumer_timeout" in r.getMessage()}
    assert f"closed the channel consuming {queue}" in line and "consumer_timeout (2000 ms)" in line, line
    assert "Raise consumer_timeout in rabbitmq.conf" in line, line


@pytest.mark.parametrize("outcome", ["dead letter", "retry"])
def test_a_job_whose_delivery_went_back_while_it_ran_leaves_its_outcome_to_the_next_run(
    brokers: dict[str, str], queue: str, caplog: pytest.LogCaptureFixture, outcome: str
) -> None:
    # Given RabbitMQ's consumer_timeout at 2 s and a job (2 attempts) whose first run fails
    # only after RabbitMQ closed the channel under it (so its delivery went back),
    # When it is consumed, Then that run publishes nothing: the delivery's next run decides,
    # and the job ends in one dead letter, after one run (Permanent) or after its second
    # attempt (a retry). (The first run's dead letter or retry went out too: two letters for
    # one job, or two retry chains, each running every later attempt.)
    app = own_app(brokers["rabbitmq"])
    runs: list[int] = []

    def closed() -> bool:  # (the transport logs it as the channel closes)
        return any("consumer_timeout" in record.getMessage() for record in caplog.records)

    @app.job("test.Echo", queue=queue, max_attempts=2, backoff=fixed(0))
    async def fail(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append(ctx.attempt)
        if len(runs) == 1:
            while not closed():
                await asyncio.sleep(0.05)
        raise Permanent("no") if outcome == "dead letter" else RuntimeError("no")

    async def scenario() -> Stats:
        async with app:
            await app.apply_topology()
            await app.enqueue_async("test.Echo", {"n": 1})
            return await app.consume(burst=True)

    timeout = rabbitmq_settings(consumer_timeout=2000, channel_tick_interval=200)
    with timeout, caplog.at_level(logging.WARNING, logger="bridge"):
        stats = run(scenario(), timeout=60)
    assert runs == ([1, 1] if outcome == "dead letter" else [1, 1, 2]), runs
    assert len(dead_letters(app, queue)) == 1 and stats.dead_lettered == 1
    assert "went back to the broker while its job ran" in caplog.text


def test_an_enqueue_that_rabbitmq_blocks_fails_in_bounded_time_and_the_next_goes_through(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an app that has published, and RabbitMQ in a disk alarm (it blocks publishers),
    # When a job is enqueued, Then the enqueue fails once PUBLISH_TIMEOUT_S passed (1 s here),
    # with an error saying what to look at, as a Kafka publish fails after message.timeout.ms;
    # And once the alarm is over, the next enqueue goes through. (It waited for good.)
    monkeypatch.setattr(rabbitmq, "PUBLISH_TIMEOUT_S", 1.0)
    app = own_app(brokers["rabbitmq"])

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        """Never runs: the test only enqueues."""

    async def scenario() -> tuple[float, PublishError, str]:
        async with app:
            await app.apply_topology()
            await app.enqueue_async("test.Echo", {"n": 1})
            with rabbitmq_disk_alarm():
                started = time.monotonic()
                with pytest.raises(PublishError) as refused:
                    await app.enqueue_async("test.Echo", {"n": 2})
                waited_s = time.monotonic() - started
            return waited_s, refused.value, await app.enqueue_async("test.Echo", {"n": 3})

    waited_s, error, job_id = run(scenario(), timeout=60)
    assert 1.0 <= waited_s < 5.0
    assert f"did not confirm the publish to {queue} within 1 s" in str(error)
    assert "memory or disk alarm" in str(error) and error.retriable
    assert job_id in {envelope["id"] for envelope in envelopes_in(app, queue)}


def test_an_enqueue_over_rabbitmqs_max_message_size_fails_at_once_and_one_beside_it_goes_through(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given RabbitMQ taking messages up to 4,096 bytes (its max_message_size), and an app taking
    # jobs up to 1 MiB (max_message_bytes),
    # When a job of about 8 KB and a small one are enqueued together on the one publish channel,
    # Then the large one fails, not retriable, naming both settings; the small one, which the
    # channel RabbitMQ closed over the large one took with it, goes again and through.
    # (Retried like a lost connection, the large one failed only at PUBLISH_TIMEOUT_S.)
    monkeypatch.setattr(rabbitmq, "PUBLISH_TIMEOUT_S", 5.0)
    app = own_app(brokers["rabbitmq"])

    async def scenario() -> tuple[str | BaseException, str | BaseException]:
        async with app:
            await app.apply_topology([queue])
            large = app.enqueue_async("test.Echo", {"n": 1, "text": "x" * 8000}, queue=queue)
            small = app.enqueue_async("test.Echo", {"n": 2}, queue=queue)
            return await asyncio.gather(large, small, return_exceptions=True)

    with rabbitmq_max_message_size(4096):
        large, small = run(scenario(), timeout=60)
    assert isinstance(large, PublishError) and not large.retriable, large
    refused = rf"refused a job of 8,\d{{3}} bytes for {queue}: over its max_message_size \(4,096 bytes\)"
    assert re.search(refused, str(large)), large
    assert "or lower max_message_bytes" in str(large), large
    assert [envelope["id"] for envelope in envelopes_in(app, queue)] == [small]


def test_after_rabbitmq_refused_one_job_over_its_max_message_size_larger_ones_are_refused_before_they_go(
    brokers: dict[str, str], queue: str
) -> None:
    # Given RabbitMQ taking messages up to 4,096 bytes, and an app that has had a job of about
    # 8 KB refused,
    # When 100 small jobs, another large one, and 100 more small ones are enqueued together,
    # Then the large one fails as the first did, and each small one is in the queue once.
    # (RabbitMQ closed the publish channel over each large one: the small ones sent before it
    # on the channel arrived, but their confirms were lost, so they went again, and arrived twice.)
    app = own_app(brokers["rabbitmq"])

    async def scenario() -> tuple[PublishError, BaseException | str, list[str | BaseException]]:
        async with app:
            await app.apply_topology([queue])
            with pytest.raises(PublishError) as first:
                await app.enqueue_async("test.Echo", {"n": 0, "text": "x" * 8000}, queue=queue)
            small = [app.enqueue_async("test.Echo", {"n": n}, queue=queue) for n in range(1, 201)]
            large = app.enqueue_async("test.Echo", {"n": 201, "text": "x" * 8000}, queue=queue)
            ended = await asyncio.gather(*small[:100], large, *small[100:], return_exceptions=True)
            return first.value, ended.pop(100), ended

    with rabbitmq_max_message_size(4096):
        first, large, small = run(scenario(), timeout=60)
    assert "over its max_message_size (4,096 bytes)" in str(first), first
    assert isinstance(large, PublishError) and not large.retriable, large
    sized = re.compile(r"a job of [\d,]+ bytes")
    assert sized.sub("", str(large)) == sized.sub("", str(first)), (large, first)
    assert Counter(envelope["id"] for envelope in envelopes_in(app, queue)) == Counter(small)


def test_an_enqueue_to_a_missing_delay_tier_fails_alone_and_those_beside_it_go_through(
    brokers: dict[str, str], queue: str
) -> None:
    # Given an app whose delay tier's exchange was deleted behind its back,
    # When a delayed job is enqueued among 200 that are not,
    # Then the delayed one fails, naming the missing exchange, and the 200 are in the queue.
    # (RabbitMQ closed the publish channel over the delayed one, and each publish out on it
    # failed for good, told that the jobs exchange was missing.)
    url = brokers["rabbitmq"]
    app = own_app(url)
    tier = tier_queue(app.settings.prefix, 1.0)

    async def scenario() -> tuple[BaseException | str, list[str | BaseException]]:
        async with app:
            await app.apply_topology([queue])
            await app.enqueue_async("test.Echo", {"n": 0}, queue=queue)
            await delete_exchange(url, tier)
            plain = [app.enqueue_async("test.Echo", {"n": n}, queue=queue) for n in range(1, 201)]
            delayed = app.enqueue_async("test.Echo", {"n": 201}, queue=queue, delay=1.5)
            delayed_one, *others = await asyncio.gather(delayed, *plain, return_exceptions=True)
            return delayed_one, others

    delayed, others = run(scenario(), timeout=60)
    assert isinstance(delayed, PublishError) and not delayed.retriable, delayed
    assert f"no exchange {tier}" in str(delayed), delayed
    assert [job_id for job_id in others if not isinstance(job_id, str)] == []
    assert set(others) <= {envelope["id"] for envelope in envelopes_in(app, queue)}


def test_a_worker_whose_retry_is_over_rabbitmqs_max_message_size_stops_and_keeps_the_job(
    brokers: dict[str, str], queue: str
) -> None:
    # Given RabbitMQ taking messages up to 4,096 bytes, and a job of about 3 KB whose handler
    # fails with a 2 KB error,
    # When it is consumed, and its retry (the job and the error: over 4,096 bytes) is refused,
    # Then the worker stops, saying what to change, and the job stays in its queue, to run once
    # that is fixed. (Retried like a lost connection, the worker went on without it.)
    app = own_app(brokers["rabbitmq"])
    failing_first(app, queue, lambda: RuntimeError("e" * 2000))

    ids: list[str] = []

    async def scenario() -> None:
        async with app:
            await app.apply_topology([queue])
            ids.append(await app.enqueue_async("test.Echo", {"n": 1, "text": "x" * 3000}, queue=queue))
            await app.consume(burst=True)

    with rabbitmq_max_message_size(4096), pytest.raises(TransportError) as stopped:
        run(scenario(), timeout=60)
    assert not stopped.value.retriable
    assert f"a delivery from {queue} could not be settled" in str(stopped.value)
    assert "over its max_message_size (4,096 bytes)" in str(stopped.value), stopped.value
    assert [envelope["id"] for envelope in envelopes_in(app, queue)] == ids


@pytest.mark.parametrize("patience_s", [10.0, 0.0], ids=["goes out", "given back"])
def test_a_retry_whose_connection_is_lost_goes_out_once_it_is_back_or_its_job_runs_again(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch, patience_s: float
) -> None:
    # Given settling that tries a failed publish again for `patience_s`, and five jobs, of
    # which job 1, on its first run, has RabbitMQ close the app's publishing connection (its
    # consuming one stays) and then fails,
    # When they are consumed, and its retry's first step (a look at whether its queue exists:
    # another app enqueued them, so this one has not seen it) fails at once on the lost connection,
    # Then with 10 s, its retry goes out once the connection is back, and runs as attempt 2;
    # with none, its delivery is given back at once, and runs again as attempt 1. The others
    # run once, and nothing is dead-lettered.
    # (Left unacknowledged, it came back only at RabbitMQ's consumer_timeout.)
    monkeypatch.setattr(rabbitmq, "SETTLE_PATIENCE_S", patience_s)
    # (aio-pika waits this long after each connect before trying again: with none, the
    # connection does not come back within the test; with some, within patience.)
    monkeypatch.setattr(rabbitmq, "RECONNECT_INTERVAL_S", 5.0 if patience_s else 120.0)
    url = brokers["rabbitmq"]
    app = own_app(url)
    attempts: dict[int, list[int]] = {n: [] for n in range(5)}
    publishing = f"bridge publish {socket.gethostname()}:{os.getpid()}"
    closed: list[int] = []  # (asserted here: an error in the handler would only fail the job)

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        attempts[payload["n"]].append(ctx.attempt)
        if payload["n"] == 1 and attempts[1] == [1]:
            closed.append(await asyncio.to_thread(close_rabbitmq_connections, publishing))
            raise ValueError("its retry finds no connection to go out on")

    producer = Bridge(broker=url, registry=str(SCHEMAS), prefix=app.settings.prefix, delay_tiers="1s")

    async def scenario() -> Stats:
        async with producer:
            await producer.apply_topology([queue])
            for n in range(5):
                await producer.enqueue_async("test.Echo", {"n": n}, queue=queue)
        async with app:
            return await app.consume(burst=True, concurrency=2)

    stats = run(scenario(), timeout=60)
    assert closed == [1]
    again = 2 if patience_s else 1
    assert attempts == {0: [1], 1: [1, again], 2: [1], 3: [1], 4: [1]}
    assert stats.dead_lettered == 0
    assert dead_letters(app, queue) == []


def test_a_worker_whose_user_may_not_publish_to_a_delay_tier_stops_saying_so_and_keeps_the_job(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a RabbitMQ user that may publish anywhere but to the delay tiers, and a job that fails,
    # When it is consumed with that user,
    # Then consume stops with an error naming the tier and the permission to grant (RabbitMQ
    # refuses every retry there alike: going on would run job after job to no end),
    # And the job is kept: it is in its queue again. (It was taken for a passing fault.)
    url = brokers["rabbitmq"]
    app = own_app(url)
    user = f"u-{uuid.uuid4().hex[:8]}"
    tiers = re.escape(f"{app.settings.prefix}.delay.")
    app_as_user = as_user(user, app)
    failing_first(app_as_user, queue, lambda: ValueError("again, later"))

    async def enqueue() -> str:
        async with app:
            await app.apply_topology([queue])
            return await app.enqueue_async("test.Echo", {"n": 1}, queue=queue)

    job_id = run(enqueue())
    rabbitmqctl("add_user", user, user)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, ".*", f"^(?!{tiers}).*", ".*")
        refused = f"refused this user a publish to exchange {tiers}1s: grant it write permission there"
        with pytest.raises(TransportError, match=refused):
            run(consume(app_as_user), timeout=60)
    finally:
        rabbitmqctl("delete_user", user)
    assert [envelope["id"] for envelope in envelopes_in(app, queue)] == [job_id]


def test_a_worker_in_a_disk_alarm_acknowledges_what_needs_no_publish_and_stops_when_asked(
    brokers: dict[str, str], queue: str
) -> None:
    # Given four jobs, of which job 1 fails, and RabbitMQ in a disk alarm (it stops reading
    # from a connection once it publishes): job 1's retry waits for the alarm to end,
    # When the others have run, 0.5 s after job 1, and consume is stopped (0.5 s of grace),
    # Then consume ends within seconds, and so does the app's close, in the alarm still;
    # And once the alarm is over, only job 1 is back in the queue: the other three were
    # acknowledged during the alarm. (Acks shared job 1's blocked connection: they waited,
    # and so did the stop, for the alarm's end.)
    url = brokers["rabbitmq"]
    ids = run(publish(url, queue, 4))
    app = Bridge(broker=url, registry=str(SCHEMAS), concurrency=4, grace_s=0.5)
    ran: list[int] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])
        if payload["n"] == 1:
            raise ValueError("its retry waits for the alarm")
        await asyncio.sleep(0.5)  # (job 1's retry went out, and its connection is blocked)

    async def scenario() -> tuple[float, float]:
        stop = asyncio.Event()
        async with app:
            consuming = asyncio.create_task(app.consume(stop=stop))
            deadline = asyncio.get_running_loop().time() + 20
            while len(ran) < 4 or _unacked(queue) != 1:
                assert not consuming.done(), consuming.result()
                assert asyncio.get_running_loop().time() < deadline, f"ran {ran}; acks never went out"
                await asyncio.sleep(0.05)
            started = time.monotonic()
            stop.set()
            await consuming
            stopped = time.monotonic()
        return stopped - started, time.monotonic() - stopped

    with rabbitmq_disk_alarm():
        stopped_in_s, closed_in_s = run(scenario(), timeout=30)
    assert stopped_in_s < 3.0  # (0.5 s of grace)
    assert closed_in_s < 6.0  # (no answer to the close: 1 s for the channel, 2 s for the connection)
    assert [e["id"] for e in envelopes_in(app, queue)] == [ids[1]]


def test_a_replay_whose_publish_connection_is_lost_takes_each_letter_once(
    brokers: dict[str, str], queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given three dead letters,
    # When they are replayed, and RabbitMQ closes the app's publish connection as the first
    # replay is about to be published,
    # Then each job is back in its queue once, and the dead-letter queue is empty.
    # (The letters were taken on the publish connection: the first letter went back to the
    # dead-letter queue with the connection, once its replay had gone out after the reconnect,
    # and the replay ended with aiormq's ChannelInvalidStateError.)
    app = own_app(brokers["rabbitmq"])

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        raise Permanent("dead-lettered, to be replayed")

    publishing = f"bridge publish {socket.gethostname()}:{os.getpid()}"
    closed: list[int] = []

    async def scenario() -> list[str]:
        async with app:
            await app.apply_topology()
            ids = [await app.enqueue_async("test.Echo", {"n": n}) for n in range(3)]
            assert (await app.consume(burst=True)).dead_lettered == 3
            transport = await app.transport()
            publish = transport.publish

            async def publish_after_a_cut(message: Any) -> None:
                if not closed:
                    closed.append(await asyncio.to_thread(close_rabbitmq_connections, publishing))
                await publish(message)

            monkeypatch.setattr(transport, "publish", publish_after_a_cut)
            assert sorted((await app.dead_letters(queue).replay(Selection())).replayed) == sorted(ids)
            return ids

    ids = run(scenario(), timeout=60)
    assert closed == [1]
    assert sorted(envelope["id"] for envelope in envelopes_in(app, queue)) == sorted(ids)
    assert dead_letters(app, queue) == []


def test_dead_letters_stay_however_often_they_are_listed(brokers: dict[str, str], queue: str) -> None:
    # Given a job dead-lettered into a queue that `topology apply` made,
    # When its dead letters are listed 25 times (a list takes them and gives them back; RabbitMQ
    # 4 drops a message given back to a quorum queue the 21st time, unless the queue says otherwise),
    # Then the 25th list still shows it, RabbitMQ holds a delivery limit for the job queue and
    # the dead-letter queue that no message reaches, and a second `topology apply` does not name
    # them as queues RabbitMQ 4 would drop from.
    app = failing_app(brokers["rabbitmq"], queue)

    async def scenario() -> tuple[list[int], list[str]]:
        async with app:
            await app.apply_topology()
            await app.enqueue_async("test.Echo", {"n": 1})
            await app.consume(burst=True)
            listed = [len(await app.dead_letters(queue).find()) for _ in range(25)]
            return listed, await app.apply_topology()

    listed, plan = run(scenario())
    assert listed == [1] * 25
    assert not [line for line in plan if "without a delivery limit" in line]
    for name in (queue, dlq_name(queue)):
        assert queue_arguments(name)["x-delivery-limit"] == 2**31 - 1


def test_topology_apply_names_the_queues_rabbitmq_4_drops_from_and_the_policy_that_keeps_them(
    brokers: dict[str, str], queue: str
) -> None:
    # Given a job queue and dead-letter queue made as quorum queues without a delivery limit (by
    # an older bridge, or another service), on RabbitMQ 4 (whose default limit then applies),
    # When `topology apply` runs, Then its plan names both, with the policy that lifts the limit;
    # and with that policy set, a dead letter listed 25 times stays. The same for the queue of
    # delayed jobs whose queue was gone, `<prefix>.delay.dlq`, made by hand. (It was not named.)
    url = brokers["rabbitmq"]
    if int(rabbitmq_api("overview")["rabbitmq_version"].partition(".")[0]) < 4:
        pytest.skip("RabbitMQ 3 has no default delivery limit (`make pytest-rabbitmq4` runs this)")
    app = failing_app(url, queue)
    app.configure(prefix=names.prefix())
    unrouted = f"{app.settings.prefix}.delay.dlq"

    async def scenario() -> tuple[list[str], list[int]]:
        async with app:
            async with await aio_pika.connect(url) as connection:
                for name in (queue, dlq_name(queue), unrouted):
                    await (await connection.channel()).declare_queue(name, durable=True, arguments=QUORUM)
            plan = await app.apply_topology()
            [hint] = [line for line in plan if f"set_policy {dlq_name(queue)}-keep" in line]
            rabbitmqctl(*shlex.split(hint[hint.index("rabbitmqctl ") :])[1:])  # as printed
            try:
                await app.enqueue_async("test.Echo", {"n": 1})
                await app.consume(burst=True)
                return plan, [len(await app.dead_letters(queue).find()) for _ in range(25)]
            finally:
                rabbitmqctl("clear_policy", f"{dlq_name(queue)}-keep")

    plan, listed = run(scenario())
    for name in (queue, dlq_name(queue), unrouted):
        assert (
            f"rabbitmq: queue {name} was made without a delivery limit, so RabbitMQ 4 drops a message"
            " that comes back to it unsettled a 21st time (each `bridge dlq list` of a dead-letter queue"
            f" counts); unless a policy already lifts it: rabbitmqctl set_policy {name}-keep"
            f" '^{re.escape(name)}$'"
        ) in "\n".join(plan)
    assert listed == [1] * 25
