"""The Bridge API as a user calls it: what it refuses, and handlers of every shape."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, date, datetime, tzinfo
from typing import Any

import pytest

import bridge.app
import bridge.transports
from bridge import Bridge, JobContext, codec, testing
from bridge.app import DEFAULT_QUEUE
from bridge.errors import ConfigError, PublishError
from bridge.transports import Delivery, Transport
from bridge.worker import Stats, Worker
from tests.brokerio import dead_letters
from tests.conftest import SCHEMAS, run


def memory_app() -> Bridge:
    return Bridge(broker="memory://", registry=str(SCHEMAS))


class NoOffset(tzinfo):
    """A timezone that knows no offset (a tzinfo may say None): the datetime is naive."""

    def utcoffset(self, moment: datetime | None) -> None:
        return None

    def dst(self, moment: datetime | None) -> None:
        return None

    def tzname(self, moment: datetime | None) -> None:
        return None


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"delay": "90"}, "delay= must be seconds (a number) or a timedelta, not '90'"),
        ({"delay": -1e20}, "delay= must be seconds up to 100 years, not -1e+20"),
        ({"ttl": float("-inf")}, "ttl= must be seconds up to 100 years, not -inf"),
        ({"delay": 10**400}, "delay= must be seconds up to 100 years, not a larger number"),
        ({"at": datetime(2030, 1, 1, tzinfo=NoOffset())}, "at= needs a timezone-aware datetime, e.g."),
        ({"at": "2026-12-01T09:00:00Z"}, "at= needs a timezone-aware datetime, not '2026-12-01T09:00:00Z'"),
        ({"expires_at": date(2030, 1, 1)}, "expires_at= needs a timezone-aware datetime, not datetime.date"),
        ({"key": 123}, "key= must be a string (UTF-8 text), not 123"),
        ({"queue": ""}, "queue= must name a queue, or be left out for the job type's own"),
        ({"idempotency_key": "\udcff"}, "idempotency_key= must be a string (UTF-8 text), not '\\udcff'"),
        ({"headers": {"tenant": 7}}, "headers['tenant']= must be a string (UTF-8 text), not 7"),
        ({"headers": [("tenant", "a")]}, "headers= must be a mapping of strings to strings"),
        ({"headers": {1: "a"}}, "headers= must be a mapping of strings to strings; a key is 1"),
        ({"headers": {"tenant": None}}, "headers['tenant']= must be a string (UTF-8 text), not None"),
        ({"max_attempts": 0}, "max_attempts= must be a whole number from 1 to 2,147,483,647, not 0"),
        ({"max_attempts": 2**40}, "max_attempts= must be a whole number from 1 to 2,147,483,647"),
        # (certain to be dead-lettered `expired` without a run)
        ({"delay": 7200, "ttl": 3600}, "the job would expire (ttl=) no later than it may start (delay=)"),
        ({"ttl": 0}, "the job would expire (ttl=) before it could start: give a ttl of 1 ms or more"),
        ({"delay": -60, "ttl": -5}, "the job would expire (ttl=) before it could start: give a ttl of 1 ms"),
        ({"ttl": 0.0004}, "the job would expire (ttl=) before it could start: give a ttl of 1 ms or more"),
        (
            {"expires_at": datetime(2020, 1, 1, tzinfo=UTC)},
            "the job would expire (expires_at=) before it could start: give an expires_at after now",
        ),
    ],
)
def test_an_enqueue_argument_no_envelope_can_carry_is_named(options: dict[str, Any], says: str) -> None:
    # Given an argument of the wrong type or range, Then the enqueue raises a ConfigError naming
    # it. (Tracebacks came from deep in the Avro writer or the clock arithmetic; max_attempts=0
    # fell back to the type's own, and 2**40 was written where an Avro int goes.)
    app = memory_app()

    async def enqueue() -> None:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, **options)

    with pytest.raises(ConfigError) as refused:
        run(enqueue())
    assert str(refused.value).startswith(says)


@pytest.mark.parametrize("text", ["\udcff", "ok \ud800"])
def test_a_payload_string_utf8_cannot_carry_is_named(text: str) -> None:
    # Given a payload whose string holds a lone surrogate (from a file name, say, or JSON's
    # "\ud800"), Then the enqueue raises a SchemaError naming the field. (UnicodeEncodeError
    # came out of the Avro writer.)
    from bridge.errors import SchemaError

    with pytest.raises(SchemaError) as refused:
        memory_app().enqueue("test.Echo", {"n": 1, "text": text})
    assert str(refused.value) == "payload does not match test.Echo: test.Echo.text: not UTF-8 text"


def plain(func: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator that hides what it wraps (no functools.wraps)."""

    def wrapper(*args: Any) -> Any:
        return func(*args)

    return wrapper


def logged(func: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator that says what it wraps (functools.wraps)."""

    @functools.wraps(func)
    def wrapper(*args: Any) -> Any:
        return func(*args)

    return wrapper


class Charger:
    """A handler object whose __call__ is async."""

    def __init__(self) -> None:
        self.ran: list[int] = []

    async def __call__(self, payload: dict[str, Any], ctx: JobContext) -> None:
        self.ran.append(payload["n"])


async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
    RAN.append(payload["n"])


RAN: list[int] = []


@pytest.mark.parametrize(
    ("handler", "runs"),
    [(Charger(), True), (logged(echo), True), (plain(echo), False)],
    ids=["an object with an async __call__", "behind functools.wraps", "behind a plain decorator"],
)
def test_async_handlers_of_every_shape_run_or_fail_saying_why(handler: Any, runs: bool) -> None:
    # Given an object with an async __call__, or an async function behind functools.wraps, or
    # behind a decorator that hides it, When it gets a job, Then the first two run their body,
    # and the third is dead-lettered with a TypeError saying what to do. (All three ran in a
    # thread as plain functions: their coroutines were dropped unawaited, and the jobs counted
    # as succeeded without running.)
    app = memory_app()
    app.job("test.Echo", queue="q", max_attempts=1)(handler)
    RAN.clear()

    async def scenario() -> None:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1})
            await app.consume(burst=True)

    run(scenario())
    ran = handler.ran if isinstance(handler, Charger) else RAN
    assert ran == ([1] if runs else [])
    letters = dead_letters(app, "q")
    assert [letter.detail.partition(" instead")[0] for letter in letters] == (
        [] if runs else ["TypeError: the test.Echo handler returned coroutine"]
    )


def test_retry_on_may_name_one_exception_class() -> None:
    # (A single class raised TypeError: 'type' object is not iterable, at import.)
    app = memory_app()
    attempts: list[int] = []

    @app.job("test.Echo", queue="q", retry_on=ConnectionError, backoff=lambda attempt: 0.0)
    async def flaky(payload: dict[str, Any], ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("reset")

    async def scenario() -> None:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1})
            await app.consume(burst=True)

    run(scenario())
    assert attempts == [1, 2]


def test_consume_takes_one_queue_by_name_and_refuses_no_concurrency() -> None:
    # (A name was taken as its letters, each a queue: nothing ran. concurrency=0 raised
    # ThreadPoolExecutor's ValueError.)
    app = memory_app()
    ran: list[int] = []

    @app.job("test.Echo", queue="jobs")
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])

    async def scenario() -> None:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1})
            await app.consume("jobs", burst=True)
            whole = "concurrency= must be a whole number from 1 to 65,535"
            with pytest.raises(ConfigError, match=f"{whole}, not 0"):
                await app.consume(concurrency=0, burst=True)
            with pytest.raises(ConfigError, match="from 1 to 65,535, not 100000"):  # (as the settings)
                await app.consume(concurrency=100_000, burst=True)

    run(scenario())
    assert ran == [1]


def test_a_memory_consume_that_ends_gives_back_only_what_it_held() -> None:
    # Given two consumes of one in-memory app side by side, one of a slow queue, one of a fast
    # one, When the fast one drains and ends while the slow job runs, Then the slow job runs
    # once, as on a broker. (The ending consume gave back every delivery not yet settled,
    # the other consume's too, and the slow job ran twice.)
    app = memory_app()
    runs: list[int] = []

    @app.job("test.Echo", queue="slow")
    async def slow(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append(payload["n"])
        await asyncio.sleep(0.3)

    @app.job("test.Unhandled", queue="fast")
    async def fast(payload: dict[str, Any], ctx: JobContext) -> None:
        pass

    async def scenario() -> None:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1})
            await app.enqueue_async("test.Unhandled", {"n": 2})
            await asyncio.gather(app.consume(["slow"], burst=True), app.consume(["fast"], burst=True))

    run(scenario())
    assert runs == [1]


def test_a_with_block_closes_the_sync_api_at_its_end() -> None:
    # Given an app used from sync code in a `with` block, When the block ends,
    # Then the sync API's loop thread has ended (its transport and store closed on it).
    # (`with app:` raised TypeError: there was only `async with`, for async code.)
    with memory_app() as app:
        assert app.enqueue("test.Echo", {"n": 1})
        thread = app._portal._thread  # type: ignore[union-attr]
        assert thread.is_alive()
    assert not thread.is_alive()


@pytest.mark.parametrize("does", ["enqueue", "close"])
def test_the_sync_api_works_in_a_forked_child_of_a_process_that_used_it(does: str) -> None:
    # Given an app whose sync API the parent used, When a forked child (a gunicorn worker, a
    # multiprocessing one) enqueues, or closes the app, Then that returns. (The child had the
    # parent's event-loop thread object but not the thread: it waited for it for good.)
    app = memory_app()
    app.enqueue("test.Echo", {"n": 1})
    child = os.fork()
    if child == 0 and does == "close":
        app.close()
        os._exit(0)
    if child == 0:  # (the child: its exit code says whether the enqueue returned a job id)
        os._exit(0 if app.enqueue("test.Echo", {"n": 2}) else 1)
    deadline = time.monotonic() + 20
    while (ended := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if ended[0] == 0:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    app.close()
    assert ended[0] == child and os.waitstatus_to_exitcode(ended[1]) == 0


@pytest.mark.parametrize("broker", ["kafka", "rabbitmq"], indirect=True)
def test_first_enqueues_at_once_connect_one_transport(
    broker: str, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a fresh app, When 20 enqueues start at once, Then one transport is connected and
    # closed. (Each first call connected its own, and all but one were never closed.)
    made: list[Transport] = []

    def counted(settings: Any) -> Transport:
        made.append(open_transport(settings))
        return made[-1]

    open_transport = bridge.transports.open_transport
    monkeypatch.setattr(bridge.app, "open_transport", counted)
    app = Bridge(broker=broker, registry=str(SCHEMAS))

    async def scenario() -> None:
        async with app:
            await app.apply_topology([queue])
        made.clear()  # (the topology's own, closed)
        async with app:
            enqueues: list[Coroutine[Any, Any, str]] = [
                app.enqueue_async("test.Echo", {"n": n}, queue=queue) for n in range(20)
            ]
            await asyncio.gather(*enqueues)

    run(scenario())
    assert len(made) == 1


def test_an_app_used_in_asyncio_run_again_and_again_keeps_no_kafka_client_of_a_closed_loop(
    brokers: dict[str, str], queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an app used as `asyncio.run(app.enqueue_async(...))` five times, never closed,
    # Then no Kafka client of the loops that closed is left polling (each kept its thread, and
    # librdkafka's threads and connections, for good), and one warning says what to write.
    app = Bridge(broker=brokers["kafka"], registry=str(SCHEMAS))
    run(_applied(app, queue))
    before = set(threading.enumerate())
    with caplog.at_level(logging.WARNING, logger="bridge.app"):
        for n in range(5):
            asyncio.run(app.enqueue_async("test.Echo", {"n": n}, queue=queue))
    deadline = time.monotonic() + 5
    while any(t.name == "bridge-kafka" and t.is_alive() for t in set(threading.enumerate()) - before):
        assert time.monotonic() < deadline, "a Kafka client of a closed event loop is still polling"
        time.sleep(0.05)
    assert len(app._transports) == 1  # the last loop's, let go of at the next use
    [warning] = [
        r.getMessage() for r in caplog.records if "closed without `async with app`" in r.getMessage()
    ]
    assert "Use `async with app:` inside asyncio.run()" in warning


async def _applied(app: Bridge, queue: str) -> None:
    async with app:
        await app.apply_topology([queue])


async def _one_job_until(app: Bridge, stop: asyncio.Event, loops: list[asyncio.AbstractEventLoop]) -> None:
    """Enqueue a job to `app`'s queue q and consume it until `stop`, the loop in `loops` (for
    a plain handler to set `stop` with)."""
    loops.append(asyncio.get_running_loop())
    async with app:
        await app.enqueue_async("test.Echo", {"n": 1})
        await app.consume(["q"], stop=stop)


def test_a_stop_says_when_plain_handlers_run_on_past_the_grace_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a plain (def) handler without a key that runs until released and a 0.1 s grace
    # period, When its consumer stops as it runs, Then consume returns, saying that a handler
    # runs on and that the process exits when it ends. (It said nothing, and the process hung
    # at exit.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS), grace_s=0.1)
    release, ended, stop = threading.Event(), threading.Event(), asyncio.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    @app.job("test.Echo", queue="q")
    def slow(payload: dict[str, Any], ctx: JobContext) -> None:
        loops[0].call_soon_threadsafe(stop.set)  # (the consumer stops as it runs)
        release.wait(30)
        ended.set()

    try:
        with caplog.at_level(logging.WARNING, logger="bridge.worker"):
            run(_one_job_until(app, stop, loops), timeout=10)
        assert not ended.is_set()
        assert "1 handlers run on in threads past the grace period" in caplog.text
        assert "the process exits when they end" in caplog.text
    finally:
        release.set()
    assert ended.wait(5)


def test_a_run_whose_settle_failed_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a job that fails and is retried, whose first settle fails (the broker went away),
    # When its consumer stops then, Then that run's retry is not counted: its delivery was
    # left unsettled, to run again. (It was counted, and counted again when the job ran again.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS))
    stop, tried = asyncio.Event(), asyncio.Event()

    @app.job("test.Echo", queue="q", max_attempts=3)
    async def failing(payload: dict[str, Any], ctx: JobContext) -> None:
        raise ConnectionError("down")

    async def scenario() -> Stats:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1})
            transport = testing.memory_transport(app)

            async def broker_away(delivery: Delivery, publish: Any = ()) -> bool:
                tried.set()
                stop.set()
                raise PublishError("the broker went away", retriable=True)

            monkeypatch.setattr(transport, "settle", broker_away)
            return await app.consume(["q"], stop=stop)

    stats = run(scenario(), timeout=10)
    assert tried.is_set()
    assert (stats.retried, stats.processed, stats.dead_lettered) == (0, 0, 0)


def test_a_plain_handler_cut_off_by_a_stop_keeps_its_time_limit_after_the_loop_closes() -> None:
    # Given a plain (def) handler without a key, with a 1 s time limit, that would run 20 s,
    # and a 0.1 s grace period, When its consumer stops as it runs and the event loop closes,
    # Then the handler is still interrupted at its limit. (The limit was a timer of the loop:
    # once the loop closed it never fired, and the process waited for the handler to end.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS), grace_s=0.1)
    stop, ended = asyncio.Event(), threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []
    ended_by: list[str] = []

    @app.job("test.Echo", queue="q", timeout_s=1)
    def slow(payload: dict[str, Any], ctx: JobContext) -> None:
        loops[0].call_soon_threadsafe(stop.set)  # (the consumer stops as it runs)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                time.sleep(0.01)  # (an interruption lands between two sleeps)
            ended_by.append("its end")
        except BaseException as exc:
            ended_by.append(type(exc).__name__)
            raise
        finally:
            ended.set()

    started = time.monotonic()
    run(_one_job_until(app, stop, loops), timeout=10)
    assert ended.wait(10) and ended_by == ["TimeUp"]
    assert time.monotonic() - started < 5


def test_a_plain_handler_cut_off_in_the_cleanup_after_its_limit_is_not_interrupted_again() -> None:
    # Given a plain (def) handler past its 0.5 s limit, which takes the interruption and cleans
    # up for 1 s, When its consumer stops during that cleanup (0.1 s of grace), Then the cleanup
    # runs to its end. (The stop's timer, which keeps a cut-off handler's limit once the loop has
    # closed, interrupted the cleanup too: its limit had passed.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS), grace_s=0.1)
    stop, ended = asyncio.Event(), threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []
    said: list[str] = []

    @app.job("test.Echo", queue="q", timeout_s=0.5)
    def slow(payload: dict[str, Any], ctx: JobContext) -> None:
        try:
            while True:
                time.sleep(0.01)
        except BaseException:
            loops[0].call_soon_threadsafe(stop.set)  # (the consumer stops during the cleanup)
            try:
                deadline = time.monotonic() + 1
                while time.monotonic() < deadline:
                    time.sleep(0.01)
                said.append("cleanup done")
            except BaseException as exc:
                said.append(f"cleanup cut by {type(exc).__name__}")
            finally:
                ended.set()
            raise

    run(_one_job_until(app, stop, loops), timeout=10)
    assert ended.wait(10) and said == ["cleanup done"]


def test_a_keyed_plain_handler_that_fails_after_the_grace_period_logs_no_stray_future_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a keyed plain (def) handler that runs past a 0.1 s grace period, then raises,
    # When its consumer stops as it runs, Then the stop waits for it and releases its key, and
    # asyncio logs nothing. (The stop's wait wrapped the thread's future and never read its
    # failure: "Future exception was never retrieved", with a traceback, at ERROR.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS), grace_s=0.1, idempotency="memory://")
    stop = asyncio.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    @app.job("test.Echo", queue="q", max_attempts=1)
    def slow(payload: dict[str, Any], ctx: JobContext) -> None:
        loops[0].call_soon_threadsafe(stop.set)
        time.sleep(0.5)  # (its work, past the grace period)
        raise ValueError("failed late")

    async def scenario() -> list[str]:
        loops.append(asyncio.get_running_loop())
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="k-1")
            await app.consume(["q"], stop=stop)
            return [entry.kind for entry in await app.idempotency_keys("test.Echo").show("k-1")]

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        kinds = run(scenario(), timeout=10)
        gc.collect()
    assert "run" not in kinds  # (released: a later copy of the job runs)
    assert "never retrieved" not in caplog.text


def test_a_plain_handler_cut_off_while_running_and_since_ended_is_not_reported_at_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a plain (def) handler without a key whose delivery's task is cancelled while its
    # thread runs, and whose thread then ends, When the worker later runs and stops, Then it
    # does not say that a handler runs on past the grace period. (It counted the cuts, not the
    # threads still running at the stop.)
    # (One thread: the job's second run starts once the first has ended, its future done.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS), concurrency=1)
    started, release = threading.Event(), threading.Event()
    runs: list[int] = []

    @app.job("test.Echo", queue="q")
    def slow(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append(payload["n"])
        started.set()
        release.wait(30)

    async def scenario() -> None:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1})
            [body] = testing.memory_transport(app).messages("q")
            worker = Worker(app, await app.transport(), app.settings)
            cut = asyncio.create_task(worker.process(Delivery(body, "q")))
            await asyncio.to_thread(started.wait, 10)
            cut.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cut
            release.set()
            await worker.run(["q"], asyncio.Event(), burst=True)

    with caplog.at_level(logging.WARNING, logger="bridge.worker"):
        run(scenario(), timeout=20)
    assert runs == [1, 1]  # (the job ran again, as its redelivery would)
    assert "run on in threads" not in caplog.text


def test_enqueues_gathered_on_a_new_app_are_published_in_the_order_they_were_called() -> None:
    # Given a new app whose schemas are in a directory, When 50 enqueues of one type are gathered,
    # Then its queue holds them in the order they were called. (Each first enqueue of a type asked
    # for its schemas in a thread, and they came back in any order: a slow job meant to head its
    # partition landed anywhere in it.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS))

    async def scenario() -> tuple[list[str], list[str]]:
        async with app:
            ids = await asyncio.gather(*(app.enqueue_async("test.Echo", {"n": n}) for n in range(50)))
            queued = testing.memory_transport(app).messages(DEFAULT_QUEUE)
            return list(ids), [codec.decode(body, app.registry)[1]["id"] for body in queued]

    ids, queued = run(scenario())
    assert queued == ids
