"""Idempotency keys in the worker, on memory, the real Kafka and RabbitMQ (SQLite store)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge import Bridge, JobContext, Permanent
from bridge.dlq import Selection
from bridge.idempotency import Claimed, run_key
from bridge.worker import Stats
from tests.conftest import run


@pytest.fixture
def keyed_app(make_app: Callable[..., Bridge], tmp_path: Path) -> Callable[..., Bridge]:
    """Apps on the current broker whose keys live in a fresh SQLite store."""

    def make(**settings: Any) -> Bridge:
        return make_app(idempotency=f"sqlite:///{tmp_path / 'keys.db'}", **settings)

    return make


def consume(app: Bridge) -> Stats:
    async def scenario() -> Stats:
        async with app:
            return await app.consume(burst=True)

    return run(scenario(), timeout=90)


def enqueue_all(app: Bridge, jobs: list[tuple[int, str | None]], **options: Any) -> list[str]:
    async def scenario() -> list[str]:
        async with app:
            await app.apply_topology()
            enqueue = app.enqueue_async
            return [await enqueue("test.Echo", {"n": n}, idempotency_key=key, **options) for n, key in jobs]

    return run(scenario())


def test_jobs_sharing_a_key_run_once(keyed_app: Callable[..., Bridge], queue: str) -> None:
    # Given three jobs with key a, two with key b and one without a key,
    # When consumed, Then a and b run once each, the keyless job runs, and 3 are duplicates.
    app = keyed_app()
    runs: Counter[str | None] = Counter()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        runs[ctx.idempotency_key] += 1

    enqueue_all(app, [(0, "a"), (1, "a"), (2, "b"), (3, "a"), (4, "b"), (5, None)])
    stats = consume(app)
    assert runs == {"a": 1, "b": 1, None: 1}
    assert stats.duplicates == 3


def test_a_failed_run_releases_its_key_for_the_retry(keyed_app: Callable[..., Bridge], queue: str) -> None:
    # Given a keyed job whose first attempt fails,
    # When consumed, Then its retry claims the key again and succeeds: two runs, one success.
    app = keyed_app()
    attempts: list[int] = []

    @app.job("test.Echo", queue=queue, backoff=lambda attempt: 0.1)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")

    enqueue_all(app, [(0, "retry-me")])
    stats = consume(app)
    assert attempts == [1, 2]
    assert stats.duplicates == 0 and stats.retried == 1


def test_a_key_held_by_another_worker_sends_the_job_to_wait(
    keyed_app: Callable[..., Bridge], queue: str
) -> None:
    # Given a consumer at work, and a key that another worker claims for 2 s (and then lets go,
    # as if it died),
    # When a job with that key arrives, Then it waits in a delay tier (the partition or queue
    # keeps flowing) and runs once, after the lease has ended.
    app = keyed_app()
    started: dict[int, float] = {}
    lease_ends: list[float] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        started[payload["n"]] = time.time()
        if payload["n"] == 1:  # the consumer is running: now the other worker takes the key
            store = await app.idempotency_store()
            # Before the claim: the store counts the lease from its own clock, in whole ms.
            lease_ends.append(time.time() + 2.0 - 0.001)
            assert isinstance(await store.claim(run_key("test.Echo", "held"), "another-job", 2.0), Claimed)
            await app.enqueue_async("test.Echo", {"n": 0}, idempotency_key="held")

    enqueue_all(app, [(1, None)])
    stats = consume(app)
    assert sorted(started) == [0, 1]
    assert started[0] >= lease_ends[0]
    assert stats.delayed >= 1 and stats.duplicates == 0


def test_dedupe_on_enqueue_publishes_one_job(keyed_app: Callable[..., Bridge], queue: str) -> None:
    # Given three enqueues of one key with dedupe=True,
    # Then all three return the same id, and one job is published and runs.
    app = keyed_app()
    ran: list[str] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(ctx.job_id)

    ids = enqueue_all(app, [(0, "once"), (1, "once"), (2, "once")], dedupe=True)
    stats = consume(app)
    assert len(set(ids)) == 1
    assert ran == ids[:1]
    assert stats.processed == 1


def test_a_replayed_dead_letter_whose_key_is_done_does_not_run(
    keyed_app: Callable[..., Bridge], queue: str
) -> None:
    # Given a job with key k that failed permanently (dead-lettered, its key released), and a
    # later job with key k that succeeded,
    # When the dead letter is replayed, Then it is acknowledged as a duplicate without running.
    app = keyed_app()
    runs: list[int] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append(payload["n"])
        if payload["n"] == 1:
            raise Permanent("the first one cannot work")

    enqueue_all(app, [(1, "k")])
    consume(app)
    enqueue_all(app, [(2, "k")])
    consume(app)

    async def replay() -> int:
        async with app:
            return len((await app.dead_letters(queue).replay(Selection())).replayed)

    assert run(replay()) == 1
    stats = consume(app)
    assert runs == [1, 2]
    assert stats.duplicates == 1
