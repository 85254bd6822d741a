"""Idempotency keys in the worker, on memory, the real Kafka and RabbitMQ (SQLite store)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock
from unittest.mock import AsyncMock

import psycopg
import pytest
import redis.asyncio as aioredis

import bridge.app
from bridge import Bridge, JobContext, Permanent, testing
from bridge.cli import _configure_logging
from bridge.dlq import Selection
from bridge.errors import ConfigError, PublishError, PublishUnconfirmed, StoreError
from bridge.idempotency import Claimed, Store, enqueue_key, open_store, run_key
from bridge.idempotency.lease import Lease
from bridge.idempotency.memory import MemoryStore
from bridge.idempotency.outage import Outage
from bridge.keys import Entry, Keys
from bridge.policy import fixed
from bridge.transports import Outgoing
from bridge.worker import Stats
from tests.brokerio import dead_letters
from tests.conftest import REPO, SCHEMAS, publish_envelope, run
from tests.processes import assert_one_line_error
from tests.processes import bridge as bridge_command
from tests.proxy import FlakyProxy


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
    # Given a consumer at work, and a key that another worker claims for 2 s and renews until
    # the job below has gone to wait (then it lets go, as if it died),
    # When a job with that key arrives, Then it waits in a delay tier (the partition or queue
    # keeps flowing) and runs once, after the lease has ended.
    app = keyed_app()
    started: dict[int, float] = {}
    lease_ends: list[float] = []
    holding: list[asyncio.Task[None]] = []

    async def renew(store: Store, key: str, token: str) -> None:
        """The other worker renews its claim until job 0 has gone to wait, however long it takes."""
        while app.stats is not None and not app.stats.delayed:
            await asyncio.sleep(0.25)
            lease_ends.append(time.time() + 2.0 - 0.001)
            assert await store.extend(key, token, 2.0)

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        started[payload["n"]] = time.time()
        if payload["n"] == 1:  # the consumer is running: now the other worker takes the key
            store, key = await app.idempotency_store(), run_key("test.Echo", "held")
            # Before the claim (and each renewal): the store counts a lease from its own clock, in ms.
            lease_ends.append(time.time() + 2.0 - 0.001)
            claim = await store.claim(key, "another-job", 2.0)
            assert isinstance(claim, Claimed)
            await app.enqueue_async("test.Echo", {"n": 0}, idempotency_key="held")
            holding.append(asyncio.create_task(renew(store, key, claim.token)))

    enqueue_all(app, [(1, None)])
    stats = consume(app)
    [renewing] = holding
    assert not renewing.cancelled(), "the other worker was still renewing: job 0 never went to wait"
    assert renewing.exception() is None
    assert sorted(started) == [0, 1]
    assert started[0] >= lease_ends[-1]
    assert stats.delayed >= 1 and stats.duplicates == 0


@pytest.mark.parametrize("broker", ["kafka", "rabbitmq"], indirect=True)
def test_a_keyed_plain_handler_that_outlives_the_grace_period_keeps_its_key_until_it_ends(
    keyed_app: Callable[..., Bridge], queue: str
) -> None:
    # Given a plain (def) handler of a keyed job that runs until released, a 1 s lease and a
    # 0.2 s grace period, When its consumer is stopped as the handler starts and another
    # consumer of the group starts at once, Then the job runs once: the first consumer waits for
    # the thread (nothing can stop it), renewing the key, then records it done; the job, which
    # went back unacknowledged, finds the key held at the second past the lease's end, then is a
    # duplicate. (The key went with the cancelled task, unrenewed: it lapsed after 1 s, and the
    # second consumer ran the job beside the first.)
    group = f"g-{uuid.uuid4().hex[:12]}"
    first, second = keyed_app(group=group, grace_s=0.2), keyed_app(group=group)
    started, release = threading.Event(), threading.Event()
    runs: list[str] = []
    for app in (first, second):

        @app.job("test.Echo", queue=queue, idempotency_lease_s=1)
        def slow(payload: dict[str, Any], ctx: JobContext) -> None:
            runs.append("start")
            started.set()
            release.wait(60)
            runs.append("end")

    enqueue_all(first, [(1, "invoice-7")])

    def delayed(app: Bridge) -> int:
        return app.stats.delayed if app.stats else 0

    async def scenario() -> Stats:
        try:
            async with first, second:
                stops = asyncio.Event(), asyncio.Event()
                stopping = asyncio.create_task(first.consume(stop=stops[0]))
                await asyncio.to_thread(started.wait, 30)
                stops[0].set()
                lapsed_at = time.monotonic() + 1.5  # an unrenewed 1 s lease has ended by then
                # (not a burst run: it would end at once while the first still holds the job)
                taking_over = asyncio.create_task(second.consume(stop=stops[1]))
                # The handler runs on until the second has found the key held after that (once the
                # group gave it the job: on Kafka, a rebalance of a few seconds), or ran the job.
                while time.monotonic() < lapsed_at:
                    await asyncio.sleep(0.1)
                held_before = delayed(second)
                while delayed(second) == held_before and runs.count("start") == 1:
                    await asyncio.sleep(0.1)
                release.set()
                while not (second.stats and second.stats.duplicates) and runs.count("start") == 1:
                    await asyncio.sleep(0.1)
                stops[1].set()
                await stopping
                return await taking_over
        finally:
            release.set()  # (the handler's thread must not outlive the test)

    stats = run(scenario(), timeout=90)
    assert runs == ["start", "end"]
    assert stats.duplicates == 1


def test_a_success_whose_key_is_being_recorded_when_the_grace_period_ends_runs_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a keyed job that succeeds while its consumer stops, and a store that refuses its
    # completion until 1 s after the 0.3 s grace period ended (a database failover, say),
    # When the consumer stops and then consumes again, Then the job ran once: the stop waited
    # to record the key, and the job, back in its queue, is a duplicate. (The recording was cut
    # off with the grace period: the key lapsed with its 1 s lease, and the job ran again.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS), grace_s=0.3, idempotency="memory://")
    effects: list[int] = []
    stop, down = asyncio.Event(), [True]

    @app.job("test.Echo", queue="q", idempotency_lease_s=1)
    async def charge(payload: dict[str, Any], ctx: JobContext) -> None:
        stop.set()  # (the consumer stops as the job runs)
        await asyncio.sleep(0.1)
        effects.append(payload["n"])
        asyncio.get_running_loop().call_later(1.3, down.clear)

    async def scenario() -> Stats:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="charge-1")
            store = await app.idempotency_store()
            complete = store.complete

            async def refused(*args: Any) -> bool:
                if down:
                    raise StoreError("connection refused")
                return await complete(*args)

            monkeypatch.setattr(store, "complete", refused)
            await app.consume(["q"], stop=stop)
            assert not down  # (the stop waited for the store)
            return await app.consume(["q"], burst=True)

    stats = run(scenario(), timeout=30)
    assert effects == [1]
    assert stats.duplicates == 1


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


def test_bridge_keys_forget_lets_a_key_s_job_run_again(
    keyed_app: Callable[..., Bridge], queue: str, tmp_path: Path
) -> None:
    # Given a job of key k that ran, enqueued with dedupe,
    # When `bridge keys show` is asked, Then it says k is done by that job and its enqueue
    # recorded (`bridge keys list` finds it done), and a copy is skipped as a duplicate;
    # When `bridge keys forget` deletes k, Then the next enqueue with dedupe publishes a new
    # job, and it runs.
    app = keyed_app()
    ran: list[str] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(ctx.job_id)

    store = {"BRIDGE_IDEMPOTENCY": f"sqlite:///{tmp_path / 'keys.db'}"}
    [first] = enqueue_all(app, [(0, "k")], dedupe=True)
    consume(app)
    shown = bridge_command("keys", "show", "test.Echo", "k", **store)
    assert shown.returncode == 0, shown.stderr
    run_line, enqueue_line = shown.stdout.splitlines()
    assert run_line.startswith(f"run      done by job {first} at "), shown.stdout
    assert enqueue_line.startswith(f"enqueue  enqueued as job {first}; "), shown.stdout
    as_json = bridge_command("keys", "show", "test.Echo", "k", "--json", **store)
    run_record, enqueue_record = map(json.loads, as_json.stdout.splitlines())
    assert run_record == {
        "key": "k", "kind": "run", "state": "done", "job_id": first, "expires_ms": mock.ANY,
        "done_ms": mock.ANY,
    }  # fmt: skip
    assert run_record["expires_ms"] - run_record["done_ms"] == 24 * 3600 * 1000  # (the default window)
    assert enqueue_record["kind"] == "enqueue" and enqueue_record["job_id"] == first
    listed = bridge_command("keys", "list", "test.Echo", "--state", "done", **store)
    assert listed.stdout == f"k  {run_line}\n" and listed.stderr == "1 idempotency record of test.Echo\n"
    # (A mistyped type that the registry does not know, and the store has nothing of, is named:
    # "no record of idempotency key 'k' ...: its next job runs" was untrue.)
    for command in (["show", "test.echo", "k"], ["list", "test.echo"], ["forget", "test.echo", "k"]):
        mistyped = bridge_command("keys", *command, "--registry", str(SCHEMAS), **store)
        assert_one_line_error(mistyped, "no job type test.echo in the app or the registry, and no key of it "
                              "in the store: did you mean test.Echo?")  # fmt: skip
    known = bridge_command("keys", "show", "test.Echo", "k", "--registry", str(SCHEMAS), **store)
    assert known.stdout.splitlines() == [run_line, enqueue_line], known.stderr
    # (A type whose schema this registry lacks, another service's say, is taken as it is when
    # the store holds keys of it, whether or not of the key or state asked for.)
    elsewhere = ["--registry", str(REPO / "schemas")]
    for command in (["show", "test.Echo", "other"], ["list", "test.Echo", "--state", "running"]):
        taken = bridge_command("keys", *command, *elsewhere, **store)
        assert taken.returncode == 0, taken.stderr
    enqueue_all(app, [(1, "k")])  # (a copy, without dedupe)
    assert consume(app).duplicates == 1

    forgot = bridge_command("keys", "forget", "test.Echo", "k", **store)
    assert forgot.returncode == 0, forgot.stderr
    forgotten = [line.split()[:2] for line in forgot.stdout.splitlines()]
    assert forgotten == [["forgot", "run"], ["forgot", "enqueue"]], forgot.stdout
    [again] = enqueue_all(app, [(2, "k")], dedupe=True)
    consume(app)
    assert again != first and ran == [first, again]


def test_bridge_keys_forget_leaves_a_key_held_by_a_running_job_unless_forced(tmp_path: Path) -> None:
    # Given key k held by a running job, When `bridge keys forget` is asked, Then it refuses in
    # one line that names the job and --force, and the key stays held; with --force it goes.
    # The memory store, which no worker shares, a SQLite file not there and another SQLite
    # database are refused in one line.
    url = f"sqlite:///{tmp_path / 'keys.db'}"

    async def hold() -> None:
        store = open_store(url)
        assert isinstance(await store.claim(run_key("test.Echo", "k"), "job-1", 60), Claimed)
        forged = "job-2\nbridge: a line of its own\x1b[31m"  # (another producer's job id)
        assert isinstance(await store.claim(run_key("test.Echo", "odd"), forged, 60), Claimed)
        await store.close()

    run(hold())
    refused = bridge_command("keys", "forget", "test.Echo", "k", BRIDGE_IDEMPOTENCY=url)
    assert_one_line_error(refused, "'k' of test.Echo: running: job job-1 holds it", "--force")
    odd = bridge_command("keys", "forget", "test.Echo", "odd", BRIDGE_IDEMPOTENCY=url)
    assert_one_line_error(odd, "running: job job-2\\nbridge: a line of its own\\x1b[31m holds it")
    held = bridge_command("keys", "show", "test.Echo", "k", BRIDGE_IDEMPOTENCY=url)
    assert held.stdout.startswith("run      running: job job-1 holds it"), held
    forced = bridge_command("keys", "forget", "test.Echo", "k", "--force", BRIDGE_IDEMPOTENCY=url)
    assert forced.stdout.startswith("forgot run      running: job job-1 holds it"), forced
    shown = bridge_command("keys", "show", "test.Echo", "k", BRIDGE_IDEMPOTENCY=url)
    assert shown.stdout.startswith("no record of idempotency key 'k' of test.Echo"), shown
    # (A store of the command's own process, or one no worker made: it would say "no record"
    # of every key, as if the key were free.)
    in_memory = bridge_command("keys", "show", "test.Echo", "k", BRIDGE_BROKER="memory://")
    assert_one_line_error(in_memory, "the memory:// idempotency store lives in one process")
    elsewhere = tmp_path / "other" / "keys.db"
    absent = bridge_command("keys", "forget", "test.Echo", "k", BRIDGE_IDEMPOTENCY=f"sqlite:///{elsewhere}")
    assert_one_line_error(absent, "no idempotency store at ", "other/keys.db: no worker has used it")
    assert not elsewhere.parent.exists()
    another = tmp_path / "another.db"  # (an application's own database, given by mistake)
    with contextlib.closing(sqlite3.connect(another)) as db:
        db.execute("CREATE TABLE orders (id INTEGER)")
    refused = bridge_command("keys", "list", "test.Echo", BRIDGE_IDEMPOTENCY=f"sqlite:///{another}")
    assert_one_line_error(refused, "another.db is no idempotency store: it has no table bridge_idempotency")
    with contextlib.closing(sqlite3.connect(another)) as db:  # (left as it was: no table added, no WAL)
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("orders",)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_a_lease_shorter_than_the_stores_can_count_is_refused_at_start() -> None:
    # (0.4 ms: the SQL stores keep whole ms, so two claims of one key in one ms both won, and
    # renewals every third of it spun the loop)
    app = Bridge(broker="memory://", registry=str(SCHEMAS))

    @app.job("test.Echo", queue="q", idempotency_lease_s=0.0004)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None: ...

    with pytest.raises(ConfigError, match=r"idempotency_lease_s must be from 1 ms to 100 years, not 0\.0004"):
        run(app.consume(["q"], burst=True))


def test_bridge_keys_forget_all_forgets_every_settled_key_of_the_job_type(tmp_path: Path) -> None:
    # Given 1,200 keys of test.Echo done (more than one round of drops), one held by a running
    # job and one enqueued, and a done key of another job type,
    # When `bridge keys forget test.Echo --all --state done --yes` runs, Then the done ones go
    # and the others stay; When `--all --yes` runs, Then the enqueued one goes and the held one
    # stays, said in the summary; with --force it goes too; the other type's key stays throughout.
    # Without --yes, and with neither KEY nor --all, it says what to add in one line.
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    done = [f"k{n:04}" for n in range(1200)]

    async def given() -> None:
        store = open_store(url)
        for job_type, key in [*(("test.Echo", key) for key in done), ("test.Other", "k0000")]:
            claim = await store.claim(run_key(job_type, key), "job", 60)
            assert isinstance(claim, Claimed) and await store.complete(
                run_key(job_type, key), claim.token, "job", 60
            )
        assert isinstance(await store.claim(run_key("test.Echo", "held"), "job-held", 60), Claimed)
        assert await store.remember(enqueue_key("test.Echo", "sent"), "job-sent", 60) is None
        assert await store.confirm(enqueue_key("test.Echo", "sent"), "job-sent", 60)
        await store.close()

    def forget(*flags: str) -> list[str]:
        forgot = bridge_command("keys", "forget", "test.Echo", *flags, BRIDGE_IDEMPOTENCY=url)
        assert forgot.returncode == 0, forgot.stderr
        return [line.split()[1] for line in forgot.stdout.splitlines()] + [forgot.stderr.strip()]

    def left() -> list[str]:
        # (a limit past any number SQLite takes: all of them)
        listed = bridge_command("keys", "list", "test.Echo", "--limit", "9" * 20, BRIDGE_IDEMPOTENCY=url)
        return [line.split()[0] for line in listed.stdout.splitlines()]

    run(given())
    assert forget("--all", "--state", "done", "--yes") == [
        *done,
        "forgot 1200 idempotency records of test.Echo",
    ]
    assert left() == ["held", "sent"]
    assert forget("--all", "--yes") == [
        "sent", "forgot 1 idempotency record of test.Echo; left 1 whose job or publish is under way"
        " (--force forgets them too)",
    ]  # fmt: skip
    assert forget("--all", "--yes", "--force") == ["held", "forgot 1 idempotency record of test.Echo"]
    assert left() == []
    other = bridge_command("keys", "list", "test.Other", BRIDGE_IDEMPOTENCY=url)
    assert other.stdout.startswith("k0000  run      done by job job"), other
    unconfirmed = bridge_command("keys", "forget", "test.Echo", "--all", BRIDGE_IDEMPOTENCY=url)
    assert_one_line_error(
        unconfirmed, "forget --all lets a copy of every job of test.Echo run again: add --yes"
    )
    neither = bridge_command("keys", "forget", "test.Echo", BRIDGE_IDEMPOTENCY=url)
    assert_one_line_error(neither, "give one idempotency KEY to forget, or --all")
    one_key = bridge_command("keys", "forget", "test.Echo", "k0000", "--yes", BRIDGE_IDEMPOTENCY=url)
    assert_one_line_error(one_key, "--yes goes with --all")


def test_bridge_keys_refuses_a_postgres_database_no_worker_has_used(brokers: dict[str, str]) -> None:
    # Given a PostgreSQL database (here a schema of its own) without bridge's table,
    # When `bridge keys list` is pointed at it, Then it says so in one line and makes no table;
    # once a worker's store has used it, the keys are listed. (It made the table, and answered
    # "no record" for every key, as if the keys were free.)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(brokers["postgres"], autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{brokers['postgres']}?options=-csearch_path%3D{schema}"

    async def used() -> None:
        store = open_store(url)
        assert isinstance(await store.claim(run_key("test.Echo", "k"), "job-1", 60), Claimed)
        await store.close()

    try:
        refused = bridge_command("keys", "list", "test.Echo", BRIDGE_IDEMPOTENCY=url)
        assert_one_line_error(refused, "has no table bridge_idempotency: no worker has used it")
        with psycopg.connect(brokers["postgres"]) as conn:
            made = conn.execute(f"SELECT to_regclass('{schema}.bridge_idempotency')").fetchone()
        assert made == (None,)
        run(used())
        listed = bridge_command("keys", "list", "test.Echo", BRIDGE_IDEMPOTENCY=url)
        assert listed.stdout.startswith("k  run      running: job job-1 holds it"), listed
    finally:
        with psycopg.connect(brokers["postgres"], autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_forget_all_leaves_a_key_that_changed_after_it_was_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a key listed as done that a job has claimed since (its window ended, say),
    # When forget_all drops what it listed, even forced, Then that key's claim stays, counted
    # as changed; a key still as listed goes.
    app = Bridge(broker="memory://", registry=str(SCHEMAS))
    keys = app.idempotency_keys("test.Echo")

    async def scenario() -> None:
        store = await app.idempotency_store()
        claim = await store.claim(run_key("test.Echo", "still"), "job-1", 60)
        assert isinstance(claim, Claimed)
        assert await store.complete(run_key("test.Echo", "still"), claim.token, "job-1", 60)
        [listed] = await keys.find()
        assert isinstance(await store.claim(run_key("test.Echo", "taken"), "job-2", 60), Claimed)
        taken = Entry("taken", "run", replace(listed.record, job_id="job-0"))  # (as listed: done)
        monkeypatch.setattr(keys, "find", AsyncMock(return_value=[listed, taken]))
        forgotten, left, changed = await keys.forget_all(force=True)
        assert (forgotten, left, changed) == ([listed], [], [taken])
        unpatched = Keys.find(keys)  # (the store's listing, not the stale one)
        assert [entry.key for entry in await unpatched] == ["taken"]

    run(scenario())


@pytest.mark.parametrize("first_publish", ["fails", "is confirmed"])
def test_a_dedupe_enqueue_racing_the_first_publish_of_its_key_waits_for_its_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_publish: str
) -> None:
    # Given an enqueue with dedupe=True whose publish is out (held here),
    # When a second enqueue of the same key comes meanwhile, Then it returns only once that
    # publish is settled: with the first job's id if the broker confirmed it, or having
    # published its own if it failed; either way the job of the id returned is the one that
    # runs. (It returned the first id at once, and was never told that publish failed: no job.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS), idempotency=f"sqlite:///{tmp_path / 'keys.db'}")
    ran: list[str] = []

    @app.job("test.Echo", queue="q")
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(ctx.job_id)

    async def scenario() -> str:
        async with app:
            transport = await app.transport()
            publish, release, publishes = transport.publish, asyncio.Event(), 0

            async def first_held(message: Outgoing) -> None:
                nonlocal publishes
                publishes += 1
                if publishes == 1:
                    await release.wait()
                    if first_publish == "fails":
                        raise PublishError("the broker went away")
                await publish(message)

            monkeypatch.setattr(transport, "publish", first_held)

            async def enqueue() -> str:
                return await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="k", dedupe=True)

            first = asyncio.create_task(enqueue())
            while publishes == 0:
                await asyncio.sleep(0.01)
            second = asyncio.create_task(enqueue())
            await asyncio.sleep(0.3)  # (what the second does while the first publish is out)
            assert not second.done()
            release.set()
            if first_publish == "fails":
                with pytest.raises(PublishError):
                    await first
                returned = await second
            else:
                returned = await second
                assert await first == returned
            await app.consume(burst=True)
            return returned

    returned = run(scenario(), timeout=30)
    assert ran == [returned]


def test_a_dedupe_enqueue_given_up_after_its_publish_still_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an enqueue with dedupe whose job was published and whose key's confirmation waits
    # for a slow store, When its caller gives up (a timeout around the enqueue), Then the
    # confirmation still lands, and the next enqueue of the key publishes nothing. (It was
    # cancelled with the caller: the key stayed unconfirmed, and once its hold ended, here
    # after 0.5 s, the next enqueue published the job again.)
    monkeypatch.setattr(bridge.app, "PUBLISH_HOLD_S", 0.5)
    app = sqlite_app(tmp_path)

    async def scenario() -> None:
        async with app:
            store = await app.idempotency_store()
            confirm, asked, release = store.confirm, asyncio.Event(), asyncio.Event()

            async def slow_confirm(*args: Any) -> bool:
                asked.set()
                await release.wait()
                return await confirm(*args)

            monkeypatch.setattr(store, "confirm", slow_confirm)
            first = asyncio.create_task(
                app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="k", dedupe=True, queue="q")
            )
            await asyncio.wait_for(asked.wait(), 10)
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            release.set()
            await app.enqueue_async("test.Echo", {"n": 2}, idempotency_key="k", dedupe=True, queue="q")
            assert len(testing.memory_transport(app).messages("q")) == 1

    run(scenario(), timeout=20)


@pytest.mark.parametrize("outcome", ["caller cancelled", "unconfirmed"])
def test_a_dedupe_enqueue_whose_publish_may_have_landed_keeps_its_key_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    # Given an enqueue with dedupe whose job the broker has, When its caller gives up before
    # the broker confirmed it, or the broker does not confirm it in time (it may still take
    # it), Then the next enqueue of the key publishes nothing: it returns the first job's id
    # once that publish is confirmed, or waits while the first one's hold lasts. (The hold was
    # removed, and the next enqueue published the job a second time, and returned its id.)
    app = sqlite_app(tmp_path)

    async def scenario() -> None:
        async with app:
            transport = await app.transport()
            publish, published, release = transport.publish, asyncio.Event(), asyncio.Event()

            async def slow_confirm(message: Outgoing) -> None:
                await publish(message)  # (the broker has it)
                published.set()
                if outcome == "unconfirmed":
                    raise PublishUnconfirmed("not confirmed in time: it may still be published")
                await release.wait()

            monkeypatch.setattr(transport, "publish", slow_confirm)

            async def enqueue() -> str:
                return await app.enqueue_async(
                    "test.Echo", {"n": 1}, idempotency_key="k", dedupe=True, queue="q"
                )

            first = asyncio.create_task(enqueue())
            await asyncio.wait_for(published.wait(), 10)
            monkeypatch.setattr(transport, "publish", publish)
            if outcome == "caller cancelled":
                first.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await first
                release.set()
                [job] = testing.waiting(app, "q")
                assert await enqueue() == job.id
            else:
                with pytest.raises(PublishUnconfirmed):
                    await first
                second = asyncio.create_task(enqueue())
                await asyncio.sleep(0.3)  # (what the second does while the first's hold lasts)
                assert not second.done()
                second.cancel()
            assert len(testing.waiting(app, "q")) == 1

    run(scenario(), timeout=20)


def test_a_dedupe_enqueue_whose_publish_failed_says_so_when_its_store_fails_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an enqueue with dedupe whose publish fails, and whose store then fails to end the
    # key's hold, Then the enqueue raises the PublishError (the hold ends by itself). (The
    # StoreError of that cleanup came out instead, and hid why nothing was published.)
    app = sqlite_app(tmp_path)

    async def scenario() -> None:
        async with app:
            store, transport = await app.idempotency_store(), await app.transport()

            async def refused(message: Outgoing) -> None:
                raise PublishError("the broker went away")

            async def store_down(key: str, job_id: str) -> None:
                raise StoreError("the store went away too")

            monkeypatch.setattr(transport, "publish", refused)
            monkeypatch.setattr(store, "forget", store_down)
            with pytest.raises(PublishError, match="the broker went away"):
                await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="k", dedupe=True)

    run(scenario(), timeout=20)


def test_keys_and_job_ids_of_any_length_or_content_run_once_in_every_store(
    brokers: dict[str, str], store_url: str, queue: str
) -> None:
    # Given, each published twice, a job whose key is 12,000 random characters (more than a
    # PostgreSQL index entry holds), one whose key has a NUL character and one (as a producer in
    # another language might send it) whose job id has one (PostgreSQL text holds no NUL),
    # When consumed with keys in each store, Then each runs once and the second of each is a
    # duplicate: none waits for its store as if it were down, or goes round the delay tiers.
    # (And an enqueue with dedupe=True of the first two keys publishes once.) A key written as
    # the first one's digest, as `bridge keys list` shows it, is a key of its own, And `bridge
    # keys show` of that digest shows its own records and the first key's.
    app = Bridge(broker=brokers["rabbitmq"], registry=str(SCHEMAS), idempotency=store_url)
    runs: Counter[str | None] = Counter()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        runs[ctx.idempotency_key] += 1

    long_key, nul_key, nul_id_key = os.urandom(6000).hex(), f"a\x00{queue}", f"id-{queue}"
    digest = f"sha256:{hashlib.sha256(long_key.encode()).hexdigest()}"

    async def enqueue() -> None:
        async with app:
            await app.apply_topology()
            for key in (long_key, nul_key, digest):
                ids = [await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key=key, dedupe=True)
                       for _ in range(2)]  # fmt: skip
                assert ids[0] == ids[1]
                await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key=key)
            for _ in range(2):
                envelope = app.build_envelope("test.Echo", {"n": 1}, queue=queue, idempotency_key=nul_id_key)
                envelope.id = f"job\x00{envelope.id}"
                await publish_envelope(app, queue, envelope)

    async def shown(key: str) -> list[Entry]:
        async with app:
            return await app.idempotency_keys("test.Echo").show(key)

    run(enqueue())
    stats = consume(app)
    assert runs == {long_key: 1, nul_key: 1, digest: 1, nul_id_key: 1}
    assert (stats.duplicates, stats.delayed, stats.dead_lettered) == (4, 0, 0)
    of_long = {(entry.kind, entry.record.job_id) for entry in run(shown(long_key))}
    of_digest = {(entry.kind, entry.record.job_id) for entry in run(shown(digest))}
    assert len(of_long) == 2 and len(of_digest) == 4 and of_long < of_digest  # (its own, and the long key's)


def test_a_store_holds_a_key_as_it_is_unless_it_is_long_or_has_a_nul() -> None:
    # A key up to 200 characters is stored as it is, so that people can find it in the store;
    # longer ones and those with a NUL by a digest, distinct for distinct keys.
    assert run_key("test.Echo", "welcome:42") == "run:test.Echo:welcome:42"
    assert run_key("test.Echo", "é" * 200) == f"run:test.Echo:{'é' * 200}"
    odd = ["x" * 201, "x" * 200 + "y", "a\x00b", "a\x00c"]
    names = [run_key("test.Echo", key) for key in odd]
    assert len(set(names)) == len(odd) and all(len(name) < 100 for name in names)
    assert enqueue_key("test.Echo", odd[0]) != names[0]
    # A key written as a digest is hashed too (it would share a long key's record), unless it is
    # said to be one the store holds as it is; a mere look-alike is stored as it is.
    digest = names[0].removeprefix("run:test.Echo:")
    assert run_key("test.Echo", digest) not in names and run_key("test.Echo", digest, stored=True) == names[0]
    assert run_key("test.Echo", "sha256:beef") == "run:test.Echo:sha256:beef"


def test_a_dedupe_enqueue_of_a_job_type_with_an_impossible_window_says_what_to_fix(tmp_path: Path) -> None:
    # Given a job type whose idempotency window is infinite (a worker reports it at start),
    # When a producer enqueues one with dedupe=True, Then a ConfigError says what to fix.
    app = Bridge(broker="memory://", registry=str(SCHEMAS), idempotency=f"sqlite:///{tmp_path / 'keys.db'}")

    @app.job("test.Echo", queue="q", idempotency_ttl_s=float("inf"))
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None: ...

    async def enqueue() -> str:
        async with app:
            return await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="k", dedupe=True)

    with pytest.raises(ConfigError) as caught:
        run(enqueue())
    expected = "test.Echo: idempotency_ttl_s must be from 1 ms to 100 years, not inf"
    assert str(caught.value) == expected


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


def consume_behind(
    make_app: Callable[..., Bridge],
    redis_url: str,
    queue: str,
    jobs: int,
    down_s: float | None,
    heal_when: Callable[[], bool] = lambda: True,
) -> tuple[Stats, Counter[int]]:
    """Enqueue `jobs` keyed jobs and consume them, their Redis store behind a FlakyProxy cut for
    `down_s`, or (None) until `heal_when()` says so."""
    runs: Counter[int] = Counter()

    async def scenario() -> Stats:
        async with FlakyProxy(redis_url) as proxy:
            proxy.cut(down_s)
            app = make_app(idempotency=proxy.url, delay_tiers=(1.0, 5.0))

            @app.job("test.Echo", queue=queue)
            async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
                runs[payload["n"]] += 1

            async def heal() -> None:
                while not heal_when():
                    await asyncio.sleep(0.05)
                proxy.heal()

            async with app:
                await app.apply_topology()
                for n in range(jobs):
                    await app.enqueue_async("test.Echo", {"n": n}, idempotency_key=f"{queue}-{n}")
                healing = asyncio.create_task(heal()) if down_s is None else None
                try:
                    return await app.consume(burst=True)
                finally:
                    if healing is not None:
                        healing.cancel()

    return run(scenario(), timeout=90), runs


def test_keyed_jobs_wait_in_place_while_their_store_does_not_answer(
    make_app: Callable[..., Bridge], brokers: dict[str, str], queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given ten keyed jobs whose Redis store drops every connection until 1.2 s after the jobs
    # first find it so (not from the worker's look at the store as it starts: on Kafka the
    # group's join can take that long),
    # When consumed, Then each runs once when the store answers, none goes through a delay
    # tier, and the log says so once per back-off round (0.5 s, then 1 s), not once per job.

    def jobs_waited_long_enough() -> bool:
        first = next((r for r in caplog.records if "keyed jobs wait" in r.getMessage()), None)
        return first is not None and time.time() - first.created >= 1.2

    with caplog.at_level(logging.WARNING, logger="bridge.idempotency"):
        stats, runs = consume_behind(
            make_app, brokers["redis"], queue, jobs=10, down_s=None, heal_when=jobs_waited_long_enough
        )
    assert runs == dict.fromkeys(range(10), 1)
    assert stats.delayed == 0 and stats.processed == 10
    rounds = [r.getMessage() for r in caplog.records if "keyed jobs wait" in r.getMessage()]
    assert rounds[0].endswith("try again in 0.5 s") and 2 <= len(rounds) <= 3, rounds
    assert sum("answers again" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
@pytest.mark.parametrize("store", ["postgres", "redis"])
def test_a_job_whose_store_fails_its_inbox_waits_for_the_store_and_spends_no_attempt(
    make_app: Callable[..., Bridge],
    brokers: dict[str, str],
    queue: str,
    store: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a keyed job allowed one attempt, whose store goes away for 3 s just before its
    # handler opens ctx.transaction() (a PostgreSQL pool that waits 1 s for a connection),
    # When consumed, Then the job waits in a delay tier, at attempt 1 still, and its transaction
    # commits once the store is back; nothing is dead-lettered. (The store's error was taken
    # for the job's failure: its one attempt spent, a 3 s outage dead-lettered it.)
    monkeypatch.setattr("bridge.idempotency.postgres.CONNECT_TIMEOUT_S", 1.0)
    attempts: list[int] = []
    committed: list[int] = []

    async def scenario() -> Stats:
        async with FlakyProxy(brokers[store]) as proxy:
            app = make_app(idempotency=proxy.url, delay_tiers=(1.0, 5.0))

            @app.job("test.Echo", queue=queue, max_attempts=1)
            async def write(payload: dict[str, Any], ctx: JobContext) -> None:
                attempts.append(ctx.attempt)
                if len(attempts) == 1:
                    proxy.cut(3.0)
                async with ctx.transaction() as db:
                    if store == "postgres":
                        await db.execute("SELECT 1")
                    else:
                        db.call("PING")
                committed.append(ctx.attempt)

            async with app:
                await app.apply_topology()
                await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key=f"{queue}-1")
                return await app.consume(burst=True)

    with caplog.at_level(logging.ERROR, logger="bridge.worker"):
        stats = run(scenario(), timeout=90)
    assert attempts == [1, 1] and committed == [1]
    assert dead_letters(make_app(), queue) == []
    assert stats.delayed == 1 and stats.processed == 2  # (the job, and its return from the tier)
    assert "the store failed its ctx.transaction()" in caplog.text


def test_a_keyed_job_whose_claim_landed_but_whose_answer_was_lost_runs_on_the_next_try(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a keyed job (a 30 s lease) whose first claim lands in the store but whose answer is
    # lost (a timeout), When consumed, Then the claim's next try takes the key the first one
    # holds, and the job runs at once, through no delay tier. (Each try had a new token: the
    # job found its own lost claim held by another, and went round the tiers for 30 s.)
    app = sqlite_app(tmp_path, delay_tiers="1s")
    ran: list[str] = []

    @app.job("test.Echo", queue="q", idempotency_lease_s=30)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(ctx.job_id)

    async def scenario() -> Stats:
        async with app:
            store = await app.idempotency_store()
            claim, lost = store.claim, list[Any]()

            async def answer_lost_once(*args: Any) -> Any:
                answer = await claim(*args)
                if not lost:
                    lost.append(answer)
                    raise StoreError("timeout reading the answer")
                return answer

            monkeypatch.setattr(store, "claim", answer_lost_once)
            job_id = await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="k", queue="q")
            stats = await app.consume(["q"], burst=True)
            assert ran == [job_id] and len(lost) == 1
            return stats

    stats = run(scenario(), timeout=20)
    assert stats.delayed == 0 and stats.processed == 1


def test_keyed_jobs_that_waited_too_long_for_their_store_go_through_the_delay_tiers(
    make_app: Callable[..., Bridge],
    brokers: dict[str, str],
    queue: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given five keyed jobs that wait in place for their store for 1 s at most, trying it every
    # 0.5 s, and a Redis store that drops every connection until each of them has given up,
    # When consumed, Then each goes through a delay tier (again, should it come back before the
    # last one gave up), and then runs once. (The store was down for 3 s: on a loaded machine,
    # Kafka's careful start began the last jobs after that, and they ran at once.)
    monkeypatch.setattr(Outage, "give_up_s", 1.0)
    monkeypatch.setattr(Outage, "max_s", 0.5)

    def waited() -> set[str]:
        """The jobs that went to a delay tier because their key could not be claimed."""
        said = [r.getMessage() for r in caplog.records if "its key could not be claimed" in r.getMessage()]
        return {line.split()[1] for line in said}

    with caplog.at_level(logging.ERROR, logger="bridge.worker"):
        stats, runs = consume_behind(
            make_app, brokers["redis"], queue, jobs=5, down_s=None, heal_when=lambda: len(waited()) == 5
        )
    assert runs == dict.fromkeys(range(5), 1)
    assert len(waited()) == 5 and stats.delayed >= 5


def test_a_keyed_job_whose_claim_waited_out_a_store_outage_past_its_expiry_is_not_run(
    queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a keyed job that expires in a minute, and a store that refuses its first claim
    # while two minutes pass, When consumed, Then the job does not run: it is dead-lettered
    # expired, and its key is free. (Expiry was checked before the claim only: a job that waited
    # out an outage in place, up to five minutes, ran after its time.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS), idempotency="memory://")
    now = [1_800_000_000_000]
    app.clock = lambda: now[0]
    ran: list[int] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])

    async def scenario() -> Any:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="k", ttl=60)
            store = await app.idempotency_store()
            claim, refusals = store.claim, iter([StoreError("connection refused")])

            async def refused(*args: Any) -> Any:
                if (refusal := next(refusals, None)) is not None:
                    now[0] += 120_000
                    raise refusal
                return await claim(*args)

            monkeypatch.setattr(store, "claim", refused)
            await app.consume([queue], burst=True)
            return await claim(run_key("test.Echo", "k"), "another", 30)

    assert isinstance(run(scenario(), timeout=30), Claimed)
    assert ran == []
    [letter] = testing.dead_letters(app, queue)
    assert letter.reason == "expired", letter.detail


def test_the_waits_for_a_store_double_up_to_a_limit_and_end_with_its_error() -> None:
    # Given a store call that always fails, and waits of 10 ms doubling up to 40 ms,
    # When it is called, Then it is tried again after at least 10, 20, 40, 40 ... ms, and
    # once it has waited 200 ms the store's error is raised.
    outage = Outage()
    outage.first_s, outage.max_s, outage.give_up_s = 0.01, 0.04, 0.2
    tries = [time.monotonic()]  # the first try, which failed

    async def attempt() -> None:
        tries.append(time.monotonic())
        raise StoreError("the store is down")

    with pytest.raises(StoreError, match="the store is down"):
        run(outage.retry(StoreError("the store is down"), attempt))
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    waits = [0.01, 0.02] + [0.04] * (len(gaps) - 2)
    assert all(gap >= wait - 0.001 for gap, wait in zip(gaps, waits, strict=True)), gaps
    assert 0.2 <= tries[-1] - tries[0] < 1.0


def test_a_store_outage_after_one_that_every_job_gave_up_on_starts_with_short_waits() -> None:
    # Given an outage whose waits reached their 40 ms limit and that every waiting job gave up
    # on (the store answered later jobs at their first try), When the store fails again later,
    # Then the next wait is the first one, 10 ms, again. (It went on at 40 ms, the old outage's.)
    outage = Outage()
    outage.first_s, outage.max_s, outage.give_up_s = 0.01, 0.04, 0.2

    async def down() -> None:
        raise StoreError("the store is down")

    async def scenario() -> None:
        with pytest.raises(StoreError):
            await outage.retry(StoreError("the store is down"), down)
        assert outage.wait_s == 0.04
        await asyncio.sleep(0.1)  # (longer than the longest wait: the outage is over)
        waited: list[float] = []

        async def back() -> None:
            waited.append(outage.wait_s)  # the wait this try came after

        await outage.retry(StoreError("down again"), back)
        assert waited == [0.01]

    run(scenario())


@pytest.mark.parametrize("level", ["info", "debug"])
def test_bridge_consume_reports_a_postgres_outage_in_its_own_lines_unless_debugging(
    level: str,
    brokers: dict[str, str],
    queue: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given `bridge consume`'s logging at `level`, and 20 keyed jobs whose PostgreSQL store is
    # cut off for 1 s after the fifth run (its pool's connections closed, new ones refused),
    # When consumed, Then each job runs once, bridge logs the outage, and psycopg's pool's own
    # warnings about its reconnects show only at debug level.
    pool_log = logging.getLogger("psycopg.pool")
    monkeypatch.setattr(pool_log, "level", pool_log.level)  # put back after the test
    _configure_logging(level, daemon=True)
    runs: Counter[int] = Counter()

    async def scenario() -> None:
        async with FlakyProxy(brokers["postgres"]) as proxy:
            app = Bridge(broker="memory://", registry=str(SCHEMAS), idempotency=proxy.url, concurrency=4)

            @app.job("test.Echo", queue=queue)
            async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
                runs[payload["n"]] += 1
                if runs.total() == 5:
                    proxy.cut(1.0)

            async with app:
                for n in range(20):
                    await app.enqueue_async("test.Echo", {"n": n}, idempotency_key=f"{queue}-{n}")
                await app.consume(burst=True)

    with caplog.at_level(logging.WARNING):
        run(scenario())
    assert runs == dict.fromkeys(range(20), 1)
    assert any("keyed jobs wait" in record.getMessage() for record in caplog.records)
    pool_warnings = [record.getMessage() for record in caplog.records if record.name == "psycopg.pool"]
    assert bool(pool_warnings) == (level == "debug"), pool_warnings


class SlowRenewals(MemoryStore):
    """The memory store, each renewal taking `wait_s`; the first one raises if `fail_first`.

    `seen` is set once `watch(store)` holds at the start of a renewal.
    """

    def __init__(
        self, wait_s: float, watch: Callable[[SlowRenewals], bool], *, fail_first: bool = False
    ) -> None:
        super().__init__()
        self.wait_s = wait_s
        self.watch = watch
        self.fail_first = fail_first
        self.renewals = 0  # extend() calls so far
        self.renewing = 0  # extend() calls under way
        self.most = 0  # the most under way at once
        self.seen = asyncio.Event()

    async def extend(self, key: str, token: str, lease_s: float) -> bool:
        self.renewals += 1
        self.renewing += 1
        self.most = max(self.most, self.renewing)
        if self.watch(self):
            self.seen.set()
        try:
            if self.fail_first and self.renewals == 1:
                raise RuntimeError("a bug in the store")
            await asyncio.sleep(self.wait_s)
        finally:
            self.renewing -= 1
        return await super().extend(key, token, lease_s)


@pytest.mark.parametrize("end", ["completed", "inbox", "lost"])
def test_a_renewal_that_finds_the_claim_gone_warns_only_if_it_was_lost(
    end: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a job's lease, and a renewal of it under way (a renewal round takes the leases of
    # the jobs running when it starts; this store takes 0.1 s to renew),
    # When the job ends meanwhile, its key completed after it returned or in its inbox
    # transaction, Then the renewal, which then finds the claim gone, logs nothing: the key is
    # done, as it should be. When instead another worker took the key after the lease ended,
    # Then the renewal warns that the claim was lost.
    async def scenario() -> None:
        store = SlowRenewals(0.1, lambda store: True)
        claim = await store.claim("k", "job-1", 0.05 if end == "lost" else 30)
        assert isinstance(claim, Claimed)
        lease = Lease(store, "k", claim.token, "job-1", 30, 60, Outage())
        if end == "lost":
            await asyncio.sleep(0.06)
            assert isinstance(await store.claim("k", "job-2", 30), Claimed)
        renewal = asyncio.create_task(lease.renew())
        await store.seen.wait()
        if end == "completed":
            await lease.finish(succeeded=True)
        elif end == "inbox":
            async with lease.transaction():
                pass
        await renewal

    with caplog.at_level(logging.WARNING, logger="bridge.idempotency"):
        run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "lost its claim" in r.getMessage()]
    lost = ["job job-1 lost its claim on 'k': another worker may run it"]
    assert warnings == (lost if end == "lost" else [])


def consume_renewing(store: SlowRenewals, jobs: int, lease_s: float) -> tuple[Stats, Counter[int]]:
    """`jobs` keyed jobs on the in-memory broker with `store`, all at once; each handler waits
    (3 s at most) until the store has seen what it watches for."""
    app = Bridge(broker="memory://", registry=str(SCHEMAS), concurrency=jobs)
    runs: Counter[int] = Counter()

    async def the_store(concurrency: int | None = None) -> Store:
        return store

    app.idempotency_store = the_store  # type: ignore[method-assign]

    @app.job("test.Echo", queue="renewals", idempotency_lease_s=lease_s)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        runs[payload["n"]] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(store.seen.wait(), 3.0)

    async def scenario() -> Stats:
        async with app:
            for n in range(jobs):
                await app.enqueue_async("test.Echo", {"n": n}, idempotency_key=f"k{n}")
            return await app.consume(burst=True)

    return run(scenario(), timeout=30), runs


def test_the_leases_of_running_jobs_are_renewed_side_by_side() -> None:
    # Given four keyed jobs running at once, leases of 0.9 s (renewed every 0.3 s) and a
    # store that takes 0.2 s to renew one,
    # When their leases are renewed, Then all four renewals are under way at once (one after
    # the other, a round would take 0.8 s, and the last lease would be renewed late), and
    # every job runs once.
    store = SlowRenewals(0.2, lambda store: store.most == 4)
    stats, runs = consume_renewing(store, jobs=4, lease_s=0.9)
    assert store.most == 4
    assert runs == dict.fromkeys(range(4), 1) and stats.processed == 4 and not stats.duplicates


def test_a_renewal_that_fails_unexpectedly_is_logged_and_the_renewals_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a keyed job with a lease of 0.6 s (renewed every 0.2 s), whose store raises an
    # error that no store should (RuntimeError) at the first renewal,
    # When the job runs, Then the error is logged with the job's key, and the lease is
    # renewed again at the next round (before, the first error ended every later renewal).
    store = SlowRenewals(0.0, lambda store: store.renewals >= 2, fail_first=True)
    with caplog.at_level(logging.ERROR, logger="bridge.worker"):
        stats, runs = consume_renewing(store, jobs=1, lease_s=0.6)
    assert store.renewals >= 2
    assert runs == {0: 1} and stats.processed == 1
    failures = [r for r in caplog.records if "could not renew" in r.getMessage()]
    assert len(failures) == 1 and "'run:test.Echo:k0'" in failures[0].getMessage()
    assert failures[0].exc_info is not None and "a bug in the store" in str(failures[0].exc_info[1])


def test_a_consume_with_more_concurrency_than_the_settings_opens_its_store_with_room_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given an app whose settings say concurrency 16, consuming keyed jobs with concurrency=64,
    # Then its store is opened with room for 64 inbox transactions. (It had the settings' 16:
    # PostgreSQL's pool held 18 connections, and once inbox handlers held them, the batches of
    # claims, renewals and completions waited 10 s for one and failed.)
    import bridge.app

    opened: list[int] = []

    def recording(url: str, *, pool_size: int = 16) -> Store:
        opened.append(pool_size)
        return MemoryStore()

    monkeypatch.setattr(bridge.app, "open_store", recording)
    app = Bridge(broker="memory://", registry=str(SCHEMAS), idempotency="postgresql://db/keys")

    @app.job("test.Echo", queue="q")
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None: ...

    async def scenario() -> None:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="once")
            await app.consume(["q"], concurrency=64, burst=True)

    run(scenario())
    assert opened == [64]


def test_a_dedupe_enqueue_inside_a_sqlite_inbox_transaction_joins_it(tmp_path: Path) -> None:
    # Given a keyed handler that, inside its inbox transaction on SQLite, enqueues a follow-up
    # job with dedupe twice (write, and enqueue the next step once), then another twice at once,
    # When it runs, Then each follow-up is published once and runs. (The enqueue waited for the
    # store's connection, which the handler held: the handler, and every keyed job of the
    # process with it, waited for good.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS), idempotency=f"sqlite:///{tmp_path / 'keys.db'}")
    ran: list[int] = []

    @app.job("test.Echo", queue="q")
    async def step(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])
        if payload["n"] == 1:
            async with ctx.transaction():
                for _ in range(2):  # (the second finds the first, in the same transaction)
                    await app.enqueue_async("test.Echo", {"n": 2}, idempotency_key="next", dedupe=True)
                # (the second waits for the first's publish, which the block itself confirms)
                also: dict[str, Any] = {"idempotency_key": "also", "dedupe": True}
                await asyncio.gather(*(app.enqueue_async("test.Echo", {"n": 3}, **also) for _ in range(2)))

    async def scenario() -> Stats:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="first")
            return await app.consume(["q"], burst=True)

    stats = run(scenario(), timeout=20)
    assert ran == [1, 2, 3] and stats.processed == 3


def sqlite_app(tmp_path: Path, **settings: Any) -> Bridge:
    """An in-memory app whose keys live in a fresh SQLite store (whose inbox holds its connection)."""
    return Bridge(
        broker="memory://", registry=str(SCHEMAS), idempotency=f"sqlite:///{tmp_path / 'keys.db'}", **settings
    )


def test_a_dedupe_enqueue_inside_a_sqlite_inbox_that_rolls_back_still_counts(tmp_path: Path) -> None:
    # Given a keyed handler whose SQLite inbox block enqueues a follow-up with dedupe, then
    # another while the block is still publishing it (a task of its own), and then fails the
    # first time, When it runs and is retried, Then each follow-up is published once: the broker
    # took them, whatever became of the block. (Their keys were recorded in the block's
    # transaction and rolled back with it, so the retry's enqueues published them again.)
    app = sqlite_app(tmp_path)
    ran: list[int] = []

    @app.job("test.Echo", queue="q", max_attempts=2, backoff=fixed(0))
    async def step(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])
        if payload["n"] != 1:
            return
        async with ctx.transaction():
            await app.enqueue_async("test.Echo", {"n": 2}, idempotency_key="next", dedupe=True)
            also = asyncio.ensure_future(
                app.enqueue_async("test.Echo", {"n": 3}, idempotency_key="also", dedupe=True)
            )
            if ctx.attempt == 1:
                await asyncio.sleep(0)  # (its hold taken, its publish out)
                raise RuntimeError("after the enqueues")
            await also

    async def scenario() -> Stats:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="first")
            return await app.consume(["q"], burst=True)

    stats = run(scenario(), timeout=20)
    assert sorted(ran) == [1, 1, 2, 3] and stats.duplicates == 0, (ran, stats)


def test_tasks_a_sqlite_inbox_starts_join_its_transaction(tmp_path: Path) -> None:
    # Given a keyed job whose SQLite inbox block enqueues two follow-ups with dedupe through
    # asyncio.gather (tasks of their own), and another keyed job, When they are consumed, Then
    # all four jobs run, and the follow-ups' keys commit with the first job's. (The tasks waited
    # for the connection the inbox held, the inbox for them: every keyed job stood still.)
    app = sqlite_app(tmp_path)
    ran: list[int] = []

    @app.job("test.Echo", queue="q")
    async def step(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])
        if payload["n"] == 1:
            async with ctx.transaction():
                await asyncio.gather(*(
                    app.enqueue_async("test.Echo", {"n": n}, idempotency_key=f"next-{n}", dedupe=True)
                    for n in (2, 3)
                ))  # fmt: skip

    async def scenario() -> Stats:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="first")
            await app.enqueue_async("test.Echo", {"n": 9}, idempotency_key="other")
            return await app.consume(["q"], burst=True)

    stats = run(scenario(), timeout=10)
    assert sorted(ran) == [1, 2, 3, 9] and stats.processed == 4


@pytest.mark.parametrize(
    ("store", "broken"),
    [
        ("sqlite", "rollback"),
        ("sqlite", "caught"),  # (SQLite's own rollback, of `INSERT OR ROLLBACK`)
        ("postgres", "caught"),
        ("postgres", "rollback"),
        ("redis", "second"),
        ("redis", "first"),
        ("redis", "busygroup"),  # (no outage of Redis, though it begins as BUSY does)
    ],
)
def test_an_inbox_block_that_breaks_its_transaction_is_not_acknowledged_as_done(
    tmp_path: Path, brokers: dict[str, str], store: str, broken: str
) -> None:
    # Given a keyed handler (3 attempts) whose inbox block writes an effect and then, raising
    # nothing, breaks its transaction: it rolls back itself; on PostgreSQL it catches its own
    # statement's error (which aborts the transaction); on Redis its second (or first) command
    # fails (WRONGTYPE),
    # When it runs, Then the key is not done and the job is dead-lettered, naming the mistake:
    # at once, but for a first Redis command that failed (nothing applied: a failure like any
    # other, retried); the effect is there no more than once, only where Redis applied it.
    # (The key was done without the rolled-back writes: acknowledged without its effect. The
    # aborted PostgreSQL transaction, and the failing Redis script, counted as outages of the
    # store: the job went round the delay tiers without end, Redis applying the effect each time.)
    url = {"sqlite": f"sqlite:///{tmp_path / 'keys.db'}", "postgres": brokers["postgres"]}.get(
        store, brokers["redis"]
    )
    app = Bridge(broker="memory://", registry=str(SCHEMAS), idempotency=url, delay_tiers="100ms")
    name = f"t_{uuid.uuid4().hex[:12]}"
    if store == "postgres":
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {name} (n int PRIMARY KEY)")
            conn.execute(f"INSERT INTO {name} VALUES (0)")
    runs: list[int] = []

    @app.job("test.Echo", queue="q", max_attempts=3, backoff=fixed(0))
    async def write(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append(ctx.attempt)
        async with ctx.transaction() as db:
            if store == "sqlite":
                db.execute(f"CREATE TABLE IF NOT EXISTS {name} (n INTEGER PRIMARY KEY)")
                db.execute(f"INSERT INTO {name} VALUES (1)")
                if broken == "rollback":
                    db.rollback()
                else:
                    with contextlib.suppress(sqlite3.IntegrityError):
                        db.execute(f"INSERT OR ROLLBACK INTO {name} VALUES (1)")
            elif store == "postgres":
                await db.execute(f"INSERT INTO {name} VALUES (1)")
                if broken == "rollback":
                    await db.execute("ROLLBACK")
                else:
                    with contextlib.suppress(psycopg.errors.UniqueViolation):
                        await db.execute(f"INSERT INTO {name} VALUES (0)")
            elif broken == "busygroup":
                db.call("XGROUP", "CREATE", f"{name}-stream", "workers", "$", "MKSTREAM")
            else:
                if broken == "second":
                    db.call("RPUSH", name, "1")
                db.call("RPUSH", f"{name}-string", "1")

    async def scenario() -> tuple[Stats, list[str], Any]:
        if store == "redis":
            client = aioredis.Redis.from_url(url)
            await client.set(f"{name}-string", "not a list", ex=60)
            await client.xgroup_create(f"{name}-stream", "workers", "$", mkstream=True)
            await client.expire(f"{name}-stream", 60)
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key=name)
            stats = await app.consume(["q"], burst=True)
            [letter] = await app.dead_letters("q").find()
            shown = await app.idempotency_keys("test.Echo").show(name)
        effect: Any = None
        if store == "redis":
            effect = await client.lrange(name, 0, -1)
            await client.delete(name, f"{name}-string", f"{name}-stream")
            await client.aclose()
        return stats, [letter.letter.detail, *(entry.describe() for entry in shown)], effect

    stats, [detail, *keys], effect = run(scenario(), timeout=30)
    retried = store == "redis" and broken in ("first", "busygroup")
    assert runs == ([1, 2, 3] if retried else [1]) and stats.dead_lettered == 1 and stats.delayed == 0
    assert keys == []  # (not done: released as a failed job's is)
    expected = {
        "sqlite": "ctx.transaction() left the key not done: the block ended the transaction itself",
        "postgres": "ctx.transaction() left the key not done: the block ended the transaction itself"
        if broken == "rollback"
        else "ctx.transaction() left the key not done: a statement in the block failed and the block went on",
        "redis": {
            "second": "ctx.transaction(): db.call #2 (RPUSH) failed: WRONGTYPE",
            "first": "ctx.transaction(): db.call #1 (RPUSH) failed: WRONGTYPE",
            "busygroup": "ctx.transaction(): db.call #1 (XGROUP) failed: BUSYGROUP",
        }.get(broken, ""),
    }[store]
    assert expected in detail, detail
    if store == "sqlite":
        with contextlib.closing(sqlite3.connect(tmp_path / "keys.db")) as db:
            tables = db.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (name,)).fetchone()
            assert tables == (0,)
    elif store == "postgres":
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute(f"SELECT n FROM {name}").fetchall() == [(0,)]
            conn.execute(f"DROP TABLE {name}")
    else:
        assert effect == ([b"1"] if broken == "second" else [])


def test_a_dedupe_enqueue_inside_a_sqlite_inbox_that_rolled_back_itself_still_counts(tmp_path: Path) -> None:
    # Given a keyed handler whose SQLite inbox block enqueues a follow-up with dedupe, then
    # rolls back itself (the job is dead-lettered for it), When the follow-up is enqueued again
    # with dedupe, Then nothing is published: the first one's id comes back. (The rollback took
    # its key, and it was recorded again only when the block raised.)
    app = sqlite_app(tmp_path)
    follow_ups: list[str] = []

    @app.job("test.Echo", queue="q", max_attempts=2, backoff=fixed(0))
    async def step(payload: dict[str, Any], ctx: JobContext) -> None:
        if payload["n"] == 1:
            async with ctx.transaction() as db:
                follow_ups.append(
                    await app.enqueue_async("test.Echo", {"n": 2}, idempotency_key="next", dedupe=True)
                )
                db.rollback()

    async def scenario() -> tuple[Stats, str]:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="first")
            stats = await app.consume(["q"], burst=True)
            return stats, await app.enqueue_async("test.Echo", {"n": 2}, idempotency_key="next", dedupe=True)

    stats, again = run(scenario(), timeout=20)
    assert stats.dead_lettered == 1 and stats.processed == 2 and again == follow_ups[0]


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_a_misused_transaction_is_dead_lettered_at_once_rather_than_waiting_for_good(
    tmp_path: Path, store: str
) -> None:
    # Given a keyed handler that opens ctx.transaction() inside its own, the same handler in a
    # job without a key, which opens one too, and a plain `def` handler that asks for one, When
    # they run, Then each ctx.transaction() that
    # cannot be raises Permanent at once, naming the mistake, and both jobs are dead-lettered
    # without a retry (each would repeat it), while another keyed job runs. (On SQLite the
    # inner one waited for the connection the outer one held: every keyed job of the process
    # stood still. Without a key it raised ConfigError, which was retried; in a thread, the
    # `with` that a plain handler would write failed with a TypeError, also retried.)
    app = (
        sqlite_app(tmp_path)
        if store == "sqlite"
        else Bridge(broker="memory://", registry=str(SCHEMAS), idempotency="memory://")
    )
    ran: list[int] = []
    raised: list[str] = []

    @app.job("test.Echo", queue="q", max_attempts=3, backoff=fixed(0))
    async def misused(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])
        if payload["n"] in (1, 2):
            async with contextlib.AsyncExitStack() as outer:
                if ctx.idempotency_key:
                    await outer.enter_async_context(ctx.transaction())
                try:
                    async with ctx.transaction():
                        pass
                except Permanent as exc:
                    raised.append(str(exc))
                    raise

    @app.job("test.Numbers", queue="q", max_attempts=3, backoff=fixed(0))
    def plain(payload: dict[str, Any], ctx: JobContext) -> None:
        try:
            ctx.transaction()
        except Permanent as exc:
            raised.append(str(exc))
            raise

    async def scenario() -> Stats:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="first")
            await app.enqueue_async("test.Echo", {"n": 2})
            await app.enqueue_async("test.Numbers", {"values": []}, idempotency_key="plain")
            await app.enqueue_async("test.Echo", {"n": 9}, idempotency_key="other")
            return await app.consume(["q"], burst=True)

    stats = run(scenario(), timeout=10)
    assert sorted(ran) == [1, 2, 9] and stats.dead_lettered == 3 and stats.retried == 0
    assert sorted(raised) == [
        "ctx.transaction() inside ctx.transaction(): the first one is still open",
        "ctx.transaction() needs an `async def` handler (test.Numbers)",
        "ctx.transaction() needs an idempotency key on the job (test.Echo)",
    ]


def test_a_job_that_raises_after_its_inbox_committed_is_not_retried_and_the_log_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a keyed job whose handler raises after its SQLite inbox committed (which recorded
    # its key as done), When it runs, Then it is neither retried nor dead-lettered, and an error
    # says why. (A retry was logged and published, then dropped as a duplicate of itself.)
    app = sqlite_app(tmp_path)
    attempts: list[int] = []

    @app.job("test.Echo", queue="q", backoff=fixed(0))
    async def notify(payload: dict[str, Any], ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        async with ctx.transaction():
            pass
        raise RuntimeError("the notification after the write failed")

    async def scenario() -> Stats:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="k")
            return await app.consume(["q"], burst=True)

    with caplog.at_level(logging.INFO, logger="bridge.worker"):
        stats = run(scenario(), timeout=10)
    assert attempts == [1]
    assert (stats.retried, stats.dead_lettered, stats.duplicates) == (0, 0, 0)
    assert "raised after its ctx.transaction() committed" in caplog.text
    assert "RuntimeError('the notification after the write failed')" in caplog.text


def test_a_keyed_job_cut_off_by_a_stop_gives_its_key_back_so_it_runs_again_at_once(
    tmp_path: Path,
) -> None:
    # Given a keyed async job with a 60 s lease that runs past a 0.1 s grace period, When its
    # consumer stops and consumes again, Then the job, back in its queue, runs again at once:
    # the stop gave its key back. (The key stayed held for the rest of its lease, and the job
    # went round the delay tiers for a minute.)
    app = sqlite_app(tmp_path, grace_s=0.1)
    started: list[int] = []
    stop = asyncio.Event()

    @app.job("test.Echo", queue="q", idempotency_lease_s=60)
    async def slow(payload: dict[str, Any], ctx: JobContext) -> None:
        started.append(payload["n"])
        if len(started) == 1:
            stop.set()
            await asyncio.sleep(30)

    async def scenario() -> Stats:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="k")
            await app.consume(["q"], stop=stop)
            return await app.consume(["q"], burst=True)

    stats = run(scenario(), timeout=20)
    assert started == [1, 1]
    assert (stats.processed, stats.delayed) == (1, 0), stats


def test_a_completion_that_landed_but_whose_answer_was_lost_raises_no_false_alarm(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a store whose first completion is recorded but whose answer is lost (a PostgreSQL
    # batch past its deadline, a Redis socket timeout), When a keyed job succeeds, Then the
    # completion tried again finds the key done by this job and says nothing of a lost claim.
    # (It warned that another worker may have run the job too.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS), idempotency="memory://")

    @app.job("test.Echo", queue="q")
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None: ...

    async def scenario() -> Stats:
        async with app:
            await app.enqueue_async("test.Echo", {"n": 1}, idempotency_key="k")
            store = await app.idempotency_store()
            complete, lost = store.complete, [True]

            async def answer_lost(*args: Any) -> bool:
                done = await complete(*args)
                if lost:
                    lost.clear()
                    raise StoreError("batch unanswered for 15 s")
                return done

            monkeypatch.setattr(store, "complete", answer_lost)
            return await app.consume(["q"], burst=True)

    with caplog.at_level(logging.WARNING):
        stats = run(scenario(), timeout=10)
    assert stats.processed == 1
    assert "the idempotency store answers again" in caplog.text  # (it was tried again)
    assert "another worker may have run it" not in caplog.text


def test_bridge_keys_refuses_a_redis_database_no_worker_has_used(brokers: dict[str, str]) -> None:
    # Given a Redis database no store has used (a wrong db number), When `bridge keys list` is
    # pointed at it, Then it says so in one line; once a worker's store has used it, the keys
    # are listed. (It answered "no record" for every key, as if the keys were free.)
    url = brokers["redis"].rpartition("/")[0] + "/15"  # (a database no other test uses)

    async def flush() -> None:
        client = aioredis.Redis.from_url(url)
        await client.flushdb()
        await client.aclose()

    async def used() -> None:
        store = open_store(url)
        assert isinstance(await store.claim(run_key("test.Echo", "k"), "job-1", 60), Claimed)
        await store.close()

    run(flush())
    try:
        refused = bridge_command("keys", "list", "test.Echo", BRIDGE_IDEMPOTENCY=url)
        assert_one_line_error(refused, "/15 holds no key of bridge's: no worker has used this database")
        run(used())
        listed = bridge_command("keys", "list", "test.Echo", BRIDGE_IDEMPOTENCY=url)
        assert listed.stdout.startswith("k  run      running: a worker holds it"), listed  # (by its token)
    finally:
        run(flush())
