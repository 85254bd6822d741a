"""The idempotency store contract, on SQLite, the real PostgreSQL and the real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import psycopg
import pytest

from bridge import Bridge
from bridge.errors import LeaseLost, StoreError
from bridge.idempotency import (
    DONE,
    ENQUEUED,
    ENQUEUING,
    RUNNING,
    Busy,
    Claim,
    Claimed,
    Done,
    Enqueued,
    Record,
    Store,
    new_token,
    open_store,
    postgres,
    sql,
)
from bridge.idempotency import redis as redis_store
from bridge.idempotency.sql import BlockEnded, SqlStore
from tests.apps.effects import write_effect
from tests.conftest import run
from tests.effects import effects, new_table
from tests.proxy import FlakyProxy, loopback_qdisc, silenced


def with_store(url: str, scenario: Callable[[Store], Awaitable[None]]) -> None:
    async def main() -> None:
        store = open_store(url)
        try:
            await scenario(store)
        finally:
            await store.close()

    run(main())


@contextlib.asynccontextmanager
async def behind_proxy(url: str) -> AsyncIterator[tuple[FlakyProxy, Store]]:
    """A store reached through a FlakyProxy in front of `url`'s server, and the proxy."""
    async with FlakyProxy(url) as proxy:
        store = open_store(proxy.url)
        try:
            yield proxy, store
        finally:
            await store.close()


def new_key() -> str:
    return f"test:{uuid.uuid4().hex}"


def claimed(claim: Claim) -> Claimed:
    assert isinstance(claim, Claimed), claim
    return claim


async def wait_for_claim(
    store: Store, key: str, job_id: str, timeout_s: float = 10, *, lease_s: float = 30
) -> float:
    """Claim `key` (for `lease_s`) as soon as it frees; how long that took."""
    start = time.monotonic()
    while not isinstance(await store.claim(key, job_id, lease_s), Claimed):
        assert time.monotonic() - start < timeout_s, f"{key} never freed"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def lost_to_another(store: Store) -> tuple[str, str]:
    """A new key that job-1 claimed for 0.3 s and job-2 took once that ended: (key, job-1's token)."""
    key = new_key()
    token = claimed(await store.claim(key, "job-1", 0.3)).token
    await wait_for_claim(store, key, "job-2")
    return key, token


def test_a_claimed_key_is_busy_for_others_until_released(store_url: str) -> None:
    # Given a key claimed by job 1 for 30 s,
    # When job 2 claims it, Then it is busy for about 30 s more;
    # When job 1 releases it (its run failed), Then job 2 can claim it.
    async def scenario(store: Store) -> None:
        key = new_key()
        first = claimed(await store.claim(key, "job-1", 30))
        busy = await store.claim(key, "job-2", 30)
        assert isinstance(busy, Busy) and 25 < busy.wait_s <= 30
        await store.release(key, first.token)
        claimed(await store.claim(key, "job-2", 30))

    with_store(store_url, scenario)


def test_a_claim_tried_again_with_its_token_takes_the_key_it_already_holds(store_url: str) -> None:
    # Given a key claimed by job 1 with token T (a claim that landed, its answer lost),
    # When job 1 claims it again with T, Then it is taken, and its lease renewed; with another
    # token, or none, it is busy; once done, the same token finds it done. (A new token per try
    # found the job's own lost claim held by another, and the job waited out a whole lease.)
    async def scenario(store: Store) -> None:
        key, token = new_key(), new_token()
        assert claimed(await store.claim(key, "job-1", 0.5, token)).token == token
        assert claimed(await store.claim(key, "job-1", 30, token)).token == token
        await asyncio.sleep(0.7)  # (past the first lease: the second one holds)
        assert isinstance(await store.claim(key, "job-2", 30, new_token()), Busy)
        assert isinstance(await store.claim(key, "job-2", 30), Busy)
        assert await store.complete(key, token, "job-1", 30)
        assert await store.claim(key, "job-1", 30, token) == Done("job-1")

    with_store(store_url, scenario)


def test_a_completed_key_is_done_for_its_window(store_url: str) -> None:
    # Given a key claimed and completed by job 1 with a 1.5 s window,
    # Then a claim finds it done by job 1, until the window ends and the key is free again.
    # (The window leaves a loaded machine time for the first look; the second waits it out.)
    async def scenario(store: Store) -> None:
        key = new_key()
        first = claimed(await store.claim(key, "job-1", 30))
        completing = time.time()  # the window starts after this, when complete() stamps it
        assert await store.complete(key, first.token, "job-1", 1.5)
        assert await store.claim(key, "job-2", 30) == Done("job-1")
        await wait_for_claim(store, key, "job-3")
        # Timed from before complete(), however slow the store's round trips, on the wall clock,
        # the stamps' own: they are whole milliseconds, so the key may free up to 1 ms before
        # 1.5 s on a finer clock.
        assert time.time() - completing >= 1.5 - 0.001

    with_store(store_url, scenario)


def test_hundreds_of_claims_at_once_all_take_effect(store_url: str) -> None:
    # Given 300 keys (more than a client library's default pool of connections),
    # When all are claimed at once and then all completed at once (a consumer at a high
    # --concurrency), Then every claim and completion took effect, none failed for want of
    # a connection.
    async def scenario(store: Store) -> None:
        keys = [new_key() for _ in range(300)]
        claims = await asyncio.gather(*(store.claim(key, f"job-{n}", 30) for n, key in enumerate(keys)))
        tokens = [claimed(claim).token for claim in claims]
        completions = zip(keys, tokens, strict=True)
        assert all(
            await asyncio.gather(*(store.complete(key, token, "job", 60) for key, token in completions))
        )

    with_store(store_url, scenario)


def test_a_done_key_names_its_job_whatever_characters_the_id_holds(store_url: str) -> None:
    # Given a key completed by a job whose id, from another producer, holds separators,
    # Then a later claim names that job in full.
    async def scenario(store: Store) -> None:
        key = new_key()
        odd = "order|42|retry 2 ✓"
        first = claimed(await store.claim(key, odd, 30))
        assert await store.complete(key, first.token, odd, 30)
        assert await store.claim(key, "job-2", 30) == Done(odd)

    with_store(store_url, scenario)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_claim_that_finds_its_key_done_says_so_in_one_request(
    kind: str, tmp_path: Path, brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a key done by job 1 and a key held by job 2,
    # When job 3, in another worker, claims each,
    # Then the done key's answer takes one request to the store, as a claim that takes its key
    # does (one commit on SQLite, one round trip on Redis): a duplicate costs no more. The held
    # key is looked at once more, a request later (it may be done by then). (PostgreSQL takes
    # two requests for a duplicate: see SqlStore.claim_sql.)
    store_url = f"sqlite:///{tmp_path / 'keys.db'}" if kind == "sqlite" else brokers["redis"]

    async def scenario(first_worker: Store) -> None:
        done, held = new_key(), new_key()
        first = claimed(await first_worker.claim(done, "job-1", 30))
        assert await first_worker.complete(done, first.token, "job-1", 60)
        claimed(await first_worker.claim(held, "job-2", 30))
        # (Another store: the first one purges old keys after its first completion.)
        store = open_store(store_url)
        requests = 0
        name = "_call" if store_url.startswith("redis") else "_query"  # each request to the store
        send = getattr(store, name)

        async def counted(*args: object) -> object:
            nonlocal requests
            requests += 1
            return await send(*args)

        monkeypatch.setattr(store, name, counted)
        try:
            assert await store.claim(done, "job-3", 30) == Done("job-1")
            assert requests == 1
            busy = await store.claim(held, "job-3", 30)
            # The held key: its claim, then a look (on Redis GET and PTTL, in one pipeline).
            assert requests == (3 if kind == "sqlite" else 4)
        finally:
            await store.close()
        assert isinstance(busy, Busy) and 25 < busy.wait_s <= 30

    with_store(store_url, scenario)


def test_a_claim_given_up_before_its_batch_went_out_holds_nothing(store_url: str) -> None:
    # Given a claim asked for, When its caller is cancelled before its batch goes out (a stop
    # while the loop was busy), Then the key is free for the next claim. (The cancelled claim
    # was sent all the same, and held the key, for no one, until its lease ended.)
    async def scenario(store: Store) -> None:
        claimed(await store.claim(new_key(), "job-0", 30))  # (the store is open)
        key = new_key()
        given_up = asyncio.create_task(store.claim(key, "job-1", 30))
        await asyncio.sleep(0)  # (one loop pass: it asked, and its batch goes out on the next)
        given_up.cancel()
        claimed(await store.claim(key, "job-2", 30))
        assert given_up.cancelled()

    with_store(store_url, scenario)


def test_only_the_holder_can_extend_complete_or_release(store_url: str) -> None:
    # Given a key claimed by job 1,
    # When someone without its token extends, completes or releases it,
    # Then nothing changes: the key stays held.
    async def scenario(store: Store) -> None:
        key = new_key()
        claimed(await store.claim(key, "job-1", 30))
        assert not await store.extend(key, "not-the-token", 30)
        assert not await store.complete(key, "not-the-token", "job-2", 30)
        await store.release(key, "not-the-token")
        assert isinstance(await store.claim(key, "job-2", 30), Busy)

    with_store(store_url, scenario)


@pytest.mark.parametrize("purged", [False, True])
def test_a_holder_whose_lease_lapsed_untaken_still_completes_its_key(store_url: str, purged: bool) -> None:
    # Given a key claimed for 0.3 s and not renewed (the store was out of reach, say, while
    # the completion waited for it), and maybe purged since (any worker's purge deletes lapsed
    # rows), When the holder completes it and nobody took it meanwhile, Then the key is done, by
    # that job. (On Redis, and on SQL once purged, the lapsed key was gone, the completion found
    # nothing, and a copy of the job inside the window ran again.)
    async def scenario(store: Store) -> None:
        key = new_key()
        first = claimed(await store.claim(key, "job-1", 0.3))
        await asyncio.sleep(0.5)  # (the lease's end, which this test is about)
        if purged and isinstance(store, SqlStore):
            await store.purge()
            assert stored_names(store_url, [key]) == set()  # (else this case tests the other)
        assert await store.complete(key, first.token, "job-1", 30)
        assert await store.claim(key, "job-2", 30) == Done("job-1")

    with_store(store_url, scenario)


def test_a_holder_whose_key_another_took_and_let_lapse_too_still_completes_it(store_url: str) -> None:
    # Given a key claimed by job 1 for 0.3 s, unrenewed, then claimed by a copy, job 2, whose
    # worker died (its 0.3 s lease ran out too), When job 1 completes it, Then the key is done,
    # by job 1: nobody holds it, and job 1's effect happened. (SQLite and PostgreSQL kept job
    # 2's lapsed row, the completion changed nothing, and a third copy ran again; memory and
    # Redis, where a lapsed claim is gone, did as here.)
    async def scenario(store: Store) -> None:
        key = new_key()
        first = claimed(await store.claim(key, "job-1", 0.3))
        await wait_for_claim(store, key, "job-2", lease_s=0.3)
        await asyncio.sleep(0.5)  # (job 2's lease's end)
        assert await store.complete(key, first.token, "job-1", 30)
        assert await store.claim(key, "job-3", 30) == Done("job-1")

    with_store(store_url, scenario)


def test_a_lease_ends_unless_renewed_and_the_late_holder_cannot_complete(store_url: str) -> None:
    # Given a key claimed for 1 s and renewed 0.3 s later for 1 s from then,
    # Then another job can claim it only after the renewed lease ends (not when the first would
    # have), and the first holder can no longer complete or renew it. (Timed from before the
    # renewal, however slow the store's round trips; stamps are whole ms, as in the window test.)
    async def scenario(store: Store) -> None:
        key = new_key()
        first = claimed(await store.claim(key, "job-1", 1.0))
        await asyncio.sleep(0.3)
        renewing = time.monotonic()
        assert await store.extend(key, first.token, 1.0)
        await wait_for_claim(store, key, "job-2")
        assert time.monotonic() - renewing >= 1.0 - 0.05  # (unrenewed, it would be free at 0.7 s)
        assert not await store.complete(key, first.token, "job-1", 30)
        assert not await store.extend(key, first.token, 30)

    with_store(store_url, scenario)


def test_an_enqueue_key_is_held_while_publishing_then_remembered_for_its_window(store_url: str) -> None:
    # Given job a being enqueued under a key (its publish out),
    # Then enqueuing b under it finds a unconfirmed; b's forget or confirm changes nothing;
    # once a's publish is confirmed, c finds a confirmed, and a's forget no longer frees it.
    # A hold that ends frees its key, and so does the forget of a publish that failed.
    async def scenario(store: Store) -> None:
        key, lapsed, failed = new_key(), new_key(), new_key()
        assert await store.remember(key, "a", 30) is None
        assert await store.remember(key, "b", 30) == Enqueued("a", confirmed=False)
        await store.forget(key, "b")
        assert not await store.confirm(key, "b", 30)
        assert await store.remember(key, "c", 30) == Enqueued("a", confirmed=False)
        assert await store.confirm(key, "a", 30)
        assert await store.remember(key, "c", 30) == Enqueued("a", confirmed=True)
        await store.forget(key, "a")
        assert await store.remember(key, "c", 30) == Enqueued("a", confirmed=True)

        assert await store.remember(lapsed, "d", 0.2) is None
        await asyncio.sleep(0.3)
        assert await store.remember(lapsed, "e", 30) is None
        assert not await store.confirm(lapsed, "d", 30)  # (its hold ended: e's now)
        assert await store.remember(failed, "f", 30) is None
        await store.forget(failed, "f")
        assert await store.remember(failed, "g", 30) is None

    with_store(store_url, scenario)


def test_a_publish_confirmed_after_its_hold_ended_untaken_is_remembered(store_url: str) -> None:
    # Given a dedupe enqueue's hold that ends while its publish is out (a slow broker), and no
    # other enqueue of the key meanwhile, When the publish is confirmed, Then the store records
    # it, on every store alike (the memory store too), and the next enqueue finds it. (The SQL
    # stores did; Redis and the memory store refused, so the next enqueue published it again.)
    async def scenario(store: Store) -> None:
        key = new_key()
        assert await store.remember(key, "h", 0.2) is None
        await asyncio.sleep(0.3)
        assert await store.confirm(key, "h", 30)
        assert await store.remember(key, "i", 30) == Enqueued("h", confirmed=True)

    with_store(store_url, scenario)
    with_store("memory://", scenario)


def test_a_key_s_record_is_shown_as_it_stands_and_forgotten_only_once_settled(store_url: str) -> None:
    # Given a key held by job 1, Then inspect says it runs (by job 1 where the store keeps the
    # holder: not Redis), until its lease ends, and drop leaves it, unless forced;
    # When job 1 completes it, Then inspect says done by job 1, with when, until the window
    # ends; drop deletes it, and the next claim takes the key: the job would run again. A drop
    # of a record in none of the states given leaves it.
    # Likewise for an enqueue's hold and, once confirmed, its record. A record that ended
    # (a lapsed lease) is shown as none, and there is nothing to drop.
    async def scenario(store: Store) -> None:
        key, enqueued, lapsed = new_key(), new_key(), new_key()
        first = claimed(await store.claim(key, "job-1", 30))
        before_ms = time.time_ns() // 1_000_000
        held = await store.inspect(key)
        assert held is not None and held.state == RUNNING and held.job_id in ("job-1", "")
        assert before_ms + 25_000 < held.expires_ms <= before_ms + 31_000, held
        assert not await store.drop(key)
        # (On Redis the end is now plus the key's TTL, read to the ms: it may move by one.)
        assert await store.inspect(key) == Record(held.state, held.job_id, mock.ANY)
        assert await store.complete(key, first.token, "job-1", 3600)
        after_ms = time.time_ns() // 1_000_000
        done = await store.inspect(key)
        assert done is not None and (done.state, done.job_id) == (DONE, "job-1"), done
        assert done.done_ms is not None and before_ms - 1000 <= done.done_ms <= after_ms + 1000, done
        assert 3590 * 1000 < done.expires_ms - done.done_ms <= 3601 * 1000, done
        assert await store.drop(key)
        assert await store.inspect(key) is None and not await store.drop(key)
        claimed(await store.claim(key, "job-2", 30))
        assert not await store.drop(key, (DONE,))  # (not in the state it was seen in)
        assert await store.drop(key, (RUNNING,))  # (forced: job 2's claim goes)
        assert await store.inspect(key) is None

        assert await store.remember(enqueued, "job-3", 30) is None
        assert await store.inspect(enqueued) == Record(ENQUEUING, "job-3", mock.ANY)
        assert not await store.drop(enqueued)
        assert await store.confirm(enqueued, "job-3", 3600)
        assert await store.inspect(enqueued) == Record(ENQUEUED, "job-3", mock.ANY)
        assert await store.drop(enqueued)
        assert await store.remember(enqueued, "job-4", 30) is None  # (it would publish again)

        claimed(await store.claim(lapsed, "job-5", 0.2))
        await asyncio.sleep(0.3)
        assert await store.inspect(lapsed) is None
        assert not await store.drop(lapsed, (RUNNING, DONE, ENQUEUING, ENQUEUED))

    with_store(store_url, scenario)
    with_store("memory://", scenario)


def test_the_records_of_keys_with_a_prefix_are_found_by_name_and_state(store_url: str) -> None:
    # Given, under one prefix, keys b and c done, a held and d lapsed, and a key beside the prefix
    # that would match it were its "?" taken for any character (Redis's SCAN matches globs),
    # Then the records found are a, b and c by name; of state done, b and c; at most 2, a and b.
    async def scenario(store: Store) -> None:
        prefix = f"{new_key()}:?"
        a, b, c, d = (f"{prefix}{name}" for name in "abcd")
        for key in (b, c):
            assert await store.complete(
                key, claimed(await store.claim(key, f"job-{key[-1]}", 30)).token, "done-by", 60
            )
        claimed(await store.claim(a, "job-a", 30))
        claimed(await store.claim(d, "job-d", 0.2))
        claimed(await store.claim(f"{prefix[:-1]}Xa", "job-beside", 30))
        await asyncio.sleep(0.3)
        found = await store.records(prefix, None, 10)
        assert [(name, record.state) for name, record in found] == [(a, RUNNING), (b, DONE), (c, DONE)]
        assert [record.job_id for _, record in found[1:]] == ["done-by", "done-by"]
        assert [name for name, _ in await store.records(prefix, DONE, 10)] == [b, c]
        assert [name for name, _ in await store.records(prefix, None, 2)] == [a, b]
        assert await store.records(prefix, ENQUEUED, 10) == []

    with_store(store_url, scenario)
    with_store("memory://", scenario)


def test_postgres_finds_the_first_records_by_code_point_whatever_the_table_s_collation(
    brokers: dict[str, str],
) -> None:
    # Given a PostgreSQL table of keys whose names sort by ICU's root collation (as a database
    # made with en_US would), in a schema of its own, with keys "ab" and "aC" under one prefix,
    # When the first record is asked for, Then it is "aC", first by code point as on SQLite,
    # Redis and in the listing's own sort (ICU puts "ab" first, and a listing cut at one key
    # showed another set of keys than the other stores).
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(brokers["postgres"], autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(sql.SCHEMA.replace("bridge_idempotency", f"{schema}.bridge_idempotency").replace(
            "name TEXT PRIMARY KEY", 'name TEXT COLLATE "und-x-icu" PRIMARY KEY'
        ))  # fmt: skip

    async def scenario(store: Store) -> None:
        prefix = new_key()
        for name in (f"{prefix}ab", f"{prefix}aC"):
            claimed(await store.claim(name, "job", 30))
        assert [name for name, _ in await store.records(prefix, None, 1)] == [f"{prefix}aC"]
        assert [name for name, _ in await store.records(prefix, RUNNING, 1)] == [f"{prefix}aC"]

    try:
        with_store(f"{brokers['postgres']}?options=-csearch_path%3D{schema}", scenario)
    finally:
        with psycopg.connect(brokers["postgres"], autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_the_inbox_commits_the_write_and_the_key_together(store_url: str) -> None:
    # Given a claimed key,
    # When a write in its transaction succeeds, Then the write exists and the key is done;
    # When a transaction fails, Then its write is gone and the key is still held.
    table = new_table(store_url)

    async def scenario(store: Store) -> None:
        ok, failing = new_key(), new_key()
        token = claimed(await store.claim(ok, "job-1", 30)).token
        async with store.transaction(ok, token, "job-1", 30) as db:
            await write_effect(store_url, db, table, ok, "job-1")
        assert await store.claim(ok, "job-2", 30) == Done("job-1")

        token = claimed(await store.claim(failing, "job-3", 30)).token
        with pytest.raises(RuntimeError):
            async with store.transaction(failing, token, "job-3", 30) as db:
                await write_effect(store_url, db, table, failing, "job-3")
                raise RuntimeError("the handler failed after its write")
        assert isinstance(await store.claim(failing, "job-4", 30), Busy)

    with_store(store_url, scenario)
    assert list(effects(store_url, table).values()) == [1]


async def renewals_in_inbox_transactions(store: Store, jobs: int) -> list[bool]:
    """Claim `jobs` keys, open an inbox transaction for each (each holds a connection while its
    handler runs), and renew their leases meanwhile: whether each renewal took, within 5 s."""
    keys = [new_key() for _ in range(jobs)]
    tokens = [claimed(await store.claim(key, "job", 30)).token for key in keys]
    async with contextlib.AsyncExitStack() as transactions:
        for key, token in zip(keys, tokens, strict=True):
            await transactions.enter_async_context(store.transaction(key, token, "job", 30))
        renewals = (store.extend(k, t, 30) for k, t in zip(keys, tokens, strict=True))
        return await asyncio.wait_for(asyncio.gather(*renewals), 5)


def test_postgres_inbox_transactions_holding_every_slot_leave_room_for_renewals(
    brokers: dict[str, str],
) -> None:
    # Given a PostgreSQL store for a worker of concurrency 2, and two keyed jobs in inbox
    # transactions (each holds a connection while its handler runs),
    # When their leases are renewed meanwhile (every third of the lease, beside the handler),
    # Then the renewals go through at once. (The pool had 2 connections, both held: renewals
    # waited out the pool's 10 s and failed, and the leases of long handlers lapsed.)
    async def main() -> None:
        store = open_store(brokers["postgres"], pool_size=2)
        try:
            assert await renewals_in_inbox_transactions(store, 2) == [True, True]
        finally:
            await store.close()

    run(main(), timeout=30)


@pytest.mark.parametrize("connected", [True, False])
def test_a_postgres_store_opened_before_consume_makes_room_for_its_concurrency(
    brokers: dict[str, str], connected: bool
) -> None:
    # Given an app of concurrency 2 whose PostgreSQL store is open already (a dedupe enqueue
    # opens it; connected, or not yet), When a consume of concurrency 4 asks for it, and four
    # keyed jobs are in inbox transactions, Then their leases' renewals go through at once.
    # (The store kept its pool of 2 + 2 connections, all held: renewals waited out the pool's
    # 10 s and failed.)
    from tests.conftest import SCHEMAS

    app = Bridge(broker="memory://", registry=str(SCHEMAS), idempotency=brokers["postgres"], concurrency=2)

    async def main() -> None:
        async with app:
            opened = await app.idempotency_store()
            if connected:
                claimed(await opened.claim(new_key(), "job", 30))
            store = await app.idempotency_store(concurrency=4)
            assert store is opened
            assert await renewals_in_inbox_transactions(store, 4) == [True] * 4

    run(main(), timeout=30)


def test_a_postgres_store_whose_idle_connections_the_server_closed_goes_on_without_an_error(
    brokers: dict[str, str],
) -> None:
    # Given a PostgreSQL store whose pool holds four connections idle,
    # When the server's end closes them all (as a restart does, or an idle timeout of the
    # server's or a pooler's), Then four inbox transactions at once, and their claims, succeed
    # on new connections. (Each connection closed while idle failed the next job lent it.)
    async def inboxes(store: Store) -> None:
        keys = [new_key() for _ in range(4)]
        tokens = [claimed(await store.claim(key, "job-1", 30)).token for key in keys]
        async with contextlib.AsyncExitStack() as transactions:  # (each holds a connection)
            for key, token in zip(keys, tokens, strict=True):
                await transactions.enter_async_context(store.transaction(key, token, "job-1", 30))
        assert [await store.claim(key, "job-2", 30) for key in keys] == [Done("job-1")] * 4

    async def main() -> None:
        async with behind_proxy(brokers["postgres"]) as (proxy, store):
            await inboxes(store)
            await proxy.reset()
            await inboxes(store)

    run(main(), timeout=30)


@pytest.mark.parametrize(
    ("outage", "down_s", "within_s"),
    [
        # Connects refused, as while the server is stopped. (psycopg_pool tries to connect again
        # 1, 3, 7, 15, 31 ... s after the first failure: the claims failed until 31 s, 14 s
        # after the server was back; after a minute's outage, up to a minute more. A waiting
        # claim cannot hasten it.)
        ("refused", 17.0, 5.0),
        # Every connect's packets dropped, as to a host gone or across a partition: the connect
        # under way when the network heals waits out its timeout (5 s) first. (It waited out
        # psycopg's 130 s default, and the pool tried no other connect meanwhile.)
        ("dropped", 8.0, 8.0),
    ],
)
def test_a_postgres_store_claims_again_within_seconds_of_its_server_coming_back_after_an_outage(
    brokers: dict[str, str], outage: str, down_s: float, within_s: float
) -> None:
    # Given a PostgreSQL store whose pool holds a connection,
    # When its server is out of reach for `down_s` and claims are tried one after another
    # meanwhile, Then each fails with a StoreError, and one goes through within `within_s` of
    # the server being back.
    async def main() -> None:
        async with behind_proxy(brokers["postgres"]) as (proxy, store):
            await store.claim(new_key(), "job-1", 30)
            await (proxy.refuse(down_s) if outage == "refused" else proxy.swallow(down_s))
            back_at = time.monotonic() + down_s
            failed = 0
            while time.monotonic() < back_at + 20:
                try:
                    await store.claim(new_key(), "job-1", 30)
                    break
                except StoreError:
                    failed += 1
            assert failed
            assert time.monotonic() - back_at < within_s, "the first claim after the server was back"

    run(main(), timeout=60)


def test_a_postgres_store_s_connects_wait_as_long_as_the_url_s_connect_timeout_says(
    brokers: dict[str, str],
) -> None:
    # Given a PostgreSQL URL with connect_timeout=2, When the network drops the store's first
    # connect, Then the first claim fails with a StoreError after about 2 s, not bridge's 5.
    async def main() -> None:
        async with FlakyProxy(brokers["postgres"]) as proxy:
            await proxy.swallow(60.0)
            store = open_store(f"{proxy.url}?connect_timeout=2")
            try:
                start = time.monotonic()
                with pytest.raises(StoreError, match="timeout"):
                    await store.claim(new_key(), "job-1", 30)
                assert 1.5 < time.monotonic() - start < 4.0
            finally:
                await store.close()

    run(main(), timeout=30)


@pytest.mark.parametrize("found", ["in the block", "at commit"])
def test_a_postgres_inbox_block_s_own_database_error_comes_out_as_it_was_raised(
    brokers: dict[str, str], found: str
) -> None:
    # Given a claimed key, When the handler's write in its inbox transaction breaks a constraint,
    # checked as it runs (a unique key) or at COMMIT (a deferred foreign key), Then the handler
    # (and its job type's give_up_on) sees psycopg's own error, the transaction is rolled back,
    # and the key is still held. (Each came out as a StoreError, an outage of the store: at
    # first no `except UniqueViolation` or give_up_on matched, and the job retried to
    # exhaustion; at commit, the job waited in a delay tier at the same attempt, for good.)
    url = brokers["postgres"]
    parent, child = (f"t_{uuid.uuid4().hex[:12]}" for _ in range(2))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {parent} (id int PRIMARY KEY)")
        conn.execute(f"INSERT INTO {parent} VALUES (1)")
        conn.execute(f"CREATE TABLE {child} (id int REFERENCES {parent} DEFERRABLE INITIALLY DEFERRED)")
    error = psycopg.errors.UniqueViolation if found == "in the block" else psycopg.errors.ForeignKeyViolation

    async def scenario(store: Store) -> None:
        key = new_key()
        token = claimed(await store.claim(key, "job-1", 30)).token
        with pytest.raises(error):
            async with store.transaction(key, token, "job-1", 30) as db:
                await db.execute(f"INSERT INTO {parent} VALUES (2)")
                await db.execute(f"INSERT INTO {parent if found == 'in the block' else child} VALUES (1)")
                await db.execute(f"INSERT INTO {child} VALUES (3)")
        assert isinstance(await store.claim(key, "job-2", 30), Busy)  # still held, not done

    try:
        with_store(url, scenario)
        with psycopg.connect(url) as conn:
            assert conn.execute(f"SELECT id FROM {parent}").fetchall() == [(1,)]
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {child}, {parent}")


def test_sqlite_claims_made_during_an_inbox_transaction_go_out_once_it_commits(tmp_path: Path) -> None:
    # Given a SQLite store whose one connection holds a job's inbox transaction,
    # When other jobs claim their keys meanwhile, Then none of their claims is answered while
    # the transaction is open (they would be part of it), and all succeed once it commits.
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    table = new_table(url)

    async def scenario(store: Store) -> None:
        key, others = new_key(), [new_key() for _ in range(10)]
        token = claimed(await store.claim(key, "job-1", 30)).token
        go = asyncio.Event()

        async def other_jobs() -> list[Claim]:  # (tasks of their own, not ones the inbox starts)
            await go.wait()
            return await asyncio.gather(*(store.claim(other, "job-2", 30) for other in others))

        claims = asyncio.ensure_future(other_jobs())
        async with store.transaction(key, token, "job-1", 30) as db:
            go.set()
            await asyncio.sleep(0.05)  # the loop goes idle: a batch free to go would go now
            assert not claims.done()
            await write_effect(url, db, table, key, "job-1")
        assert all(isinstance(claim, Claimed) for claim in await asyncio.wait_for(claims, timeout=5))
        assert await store.claim(key, "job-3", 30) == Done("job-1")

    with_store(url, scenario)
    assert list(effects(url, table).values()) == [1]


@contextlib.asynccontextmanager
async def beside_another_process(tmp_path: Path) -> AsyncIterator[tuple[Store, Any]]:
    """A SQLite store, and an inbox transaction to open of another store on its file (as
    another process has), which holds SQLite's write lock while it is open."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    holder, other = open_store(url), open_store(url)
    try:
        key = new_key()
        token = claimed(await holder.claim(key, "job-1", 30)).token
        yield other, holder.transaction(key, token, "job-1", 30)
    finally:
        await holder.close()
        await other.close()


def test_a_sqlite_claim_waiting_for_another_process_s_inbox_leaves_the_event_loop_free(
    tmp_path: Path,
) -> None:
    # Given two SQLite stores on one file (as two processes have), one holding an inbox
    # transaction (and SQLite's write lock), When the other claims a key, Then that claim waits
    # while its event loop turns, and succeeds once the transaction commits. (SQLite's busy
    # handler waited inside the call: the loop stood still for up to 10 s, then the claim failed.)
    async def main() -> None:
        async with beside_another_process(tmp_path) as (other, inbox):
            async with inbox:
                waiting = asyncio.ensure_future(other.claim(new_key(), "job-2", 30))
                started = time.monotonic()
                await asyncio.sleep(0.05)  # the loop goes idle: its batch goes out and waits
                assert time.monotonic() - started < 1  # the loop turned (a busy handler: 10 s)
                assert not waiting.done()
            claimed(await asyncio.wait_for(waiting, timeout=5))

    run(main())


def test_bridge_keys_reads_a_sqlite_store_without_waiting_for_its_write_lock(tmp_path: Path) -> None:
    # Given two SQLite stores on one file, one holding an inbox transaction (and SQLite's write
    # lock, as a worker's group commit does for a moment), When the other lists and inspects keys
    # (`bridge keys list|show`), Then both answer at once: a read takes no lock in WAL mode.
    # Inside an inbox of its own, a read joins it.
    # (They went through a group commit, whose write transaction waited for the lock: a scan of
    # a large table held every worker's commits as long as it ran.)
    async def main() -> None:
        key = new_key()
        async with beside_another_process(tmp_path) as (other, inbox):
            claimed(await other.claim(key, "job-1", 30))
            async with inbox:
                found = await asyncio.wait_for(other.records(key, None, 10), timeout=1)
                assert [(name, record.state) for name, record in found] == [(key, RUNNING)]
                assert await asyncio.wait_for(other.inspect(key), timeout=1) == found[0][1]
            # Inside an inbox of its own (a handler's), a read goes in the handler's transaction
            # rather than waiting for the connection the handler holds, for good.
            token = claimed(await other.claim(inside := new_key(), "job-2", 30)).token
            async with other.transaction(inside, token, "job-2", 30):
                record = await asyncio.wait_for(other.inspect(inside), timeout=1)
                assert record is not None and record.state == RUNNING

    run(main())


def test_a_sqlite_claim_given_up_while_it_waits_for_another_process_holds_nothing(
    tmp_path: Path,
) -> None:
    # Given two SQLite stores on one file, one holding an inbox transaction (and SQLite's write
    # lock), When the other's claim, its batch waiting for that lock, is cancelled (a stop's
    # grace period ending), Then once the transaction commits the key is free: the claim went
    # out with its batch and was released. (It held the key, for nobody, for its whole lease.)
    async def main() -> None:
        key = new_key()
        async with beside_another_process(tmp_path) as (other, inbox):
            async with inbox:
                given_up = asyncio.ensure_future(other.claim(key, "job-2", 30))
                await asyncio.sleep(0.05)  # the loop goes idle: its batch goes out and waits
                given_up.cancel()
                await asyncio.sleep(0.05)
            assert given_up.cancelled()
            claimed(await asyncio.wait_for(other.claim(key, "job-3", 30), timeout=5))

    run(main())


def test_a_sqlite_batch_that_fails_in_an_unexpected_way_leaves_the_store_working(tmp_path: Path) -> None:
    # Given a SQLite store, When a claim fails in a way that is not SQLite's (a lease too long
    # for a 64-bit integer: Python's OverflowError), Then that claim fails, and the next claims
    # succeed: the failed batch's transaction was rolled back, not left open for every later
    # batch to fail on ("cannot start a transaction within a transaction").
    async def scenario(store: Store) -> None:
        with pytest.raises(OverflowError):
            await store.claim(new_key(), "job-1", 1e17)
        claimed(await store.claim(new_key(), "job-2", 30))

    with_store(f"sqlite:///{tmp_path / 'keys.db'}", scenario)


def test_a_sqlite_inbox_whose_commit_fails_rolls_back_and_leaves_the_store_working(tmp_path: Path) -> None:
    # Given a SQLite inbox block that leaves a cursor of its own unread (an INSERT ... RETURNING
    # it never fetched), so that its COMMIT fails, When the block ends, Then it raises a
    # StoreError, its write is gone, the key is not done, and the next claims succeed while
    # another connection can write. (The connection stayed in the transaction, holding SQLite's
    # write lock: every later batch failed, and every other process on the file waited.)
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    kept: list[sqlite3.Cursor] = []

    async def scenario(store: Store) -> None:
        key = new_key()
        claim = claimed(await store.claim(key, "job-1", 30))
        with pytest.raises(StoreError, match="SQL statements in progress"):
            async with store.transaction(key, claim.token, "job-1", 30) as db:
                db.execute("CREATE TABLE charges (n INTEGER)")
                kept.append(db.execute("INSERT INTO charges VALUES (100) RETURNING rowid"))
        kept.clear()
        assert await store.complete(key, claim.token, "job-1", 30)  # (still held, not done)
        claimed(await store.claim(new_key(), "job-2", 30))
        with contextlib.closing(sqlite3.connect(tmp_path / "keys.db", timeout=0.5)) as other:
            other.execute("BEGIN IMMEDIATE")
            assert other.execute("SELECT name FROM sqlite_master WHERE name = 'charges'").fetchall() == []
            other.rollback()

    with_store(url, scenario)


def test_a_sqlite_inbox_enqueue_of_a_key_being_published_fails_rather_than_waits(tmp_path: Path) -> None:
    # Given a key whose dedupe enqueue is being published (its hold unconfirmed), When a
    # handler's SQLite inbox block enqueues it with dedupe too, Then that raises a StoreError at
    # once, and the first publish is confirmed once the block ends. (It polled for the first
    # publish's confirmation, which waits for the block's write lock: after the hold's 60 s it
    # published the job a second time, every keyed job of the process standing still meanwhile.)
    async def scenario(store: Store) -> None:
        key, held = new_key(), new_key()
        assert await store.remember(held, "first", 60) is None
        claim = claimed(await store.claim(key, "job-1", 30))
        with pytest.raises(StoreError, match=f"{held!r} is being enqueued by job first"):
            async with store.transaction(key, claim.token, "job-1", 30):
                await store.remember(held, "second", 60)
        assert await store.confirm(held, "first", 30)

    with_store(f"sqlite:///{tmp_path / 'keys.db'}", scenario)


def test_the_inbox_of_a_lost_lease_writes_nothing(store_url: str) -> None:
    # Given a key whose 0.3 s lease ended and that another job claimed,
    # When the first holder's transaction ends, Then it raises LeaseLost and its write is gone.
    table = new_table(store_url)

    async def scenario(store: Store) -> None:
        key, token = await lost_to_another(store)
        with pytest.raises(LeaseLost):
            async with store.transaction(key, token, "job-1", 30) as db:
                await write_effect(store_url, db, table, key, "job-1")

    with_store(store_url, scenario)
    assert effects(store_url, table) == {}


@pytest.mark.parametrize("lease", ["held", "lost"])
def test_an_sqlite_inbox_whose_handler_commits_itself_leaves_its_key_not_done(
    tmp_path: Path, lease: str
) -> None:
    # Given a SQLite key, held, or whose 0.3 s lease ended and that another job claimed,
    # When the holder's inbox block calls db.commit() itself (a sqlite3 habit),
    # Then the transaction raises BlockEnded (Permanent: the job is dead-lettered, not retried
    # with its writes done), and the key is not marked done by it. (The key completed outside
    # the transaction, with a warning; after a rollback of its own, without the writes.
    # sqlite3's "cannot rollback - no transaction is active" once hid this error.)
    url = f"sqlite:///{tmp_path / 'keys.db'}"

    async def scenario(store: Store) -> None:
        if lease == "held":
            key = new_key()
            token = claimed(await store.claim(key, "job-1", 30)).token
        else:
            key, token = await lost_to_another(store)
        with pytest.raises(BlockEnded, match="left the key not done: the block ended the transaction itself"):
            async with store.transaction(key, token, "job-1", 30) as db:
                db.execute("CREATE TABLE charges (n INTEGER)")
                db.commit()
        assert isinstance(await store.claim(key, "job-3", 30), Busy)

    with_store(url, scenario)


def test_two_workers_claiming_the_same_keys_in_one_go_from_opposite_ends_each_win_once(
    store_url: str,
) -> None:
    # Given two workers' stores and 200 keys,
    # When each claims every key in one go (one loop tick: a store may send them together, in
    # one transaction), the two from opposite ends,
    # Then every key is won by exactly one worker, and no claim failed: two such transactions
    # must not each wait for a row the other holds (PostgreSQL would abort one as a deadlock).
    keys = [new_key() for _ in range(200)]

    async def claim_all(store: Store, keys: list[str], name: str) -> set[str]:
        claims = await asyncio.gather(*(store.claim(key, name, 30) for key in keys))
        return {key for key, claim in zip(keys, claims, strict=True) if isinstance(claim, Claimed)}

    async def scenario(first: Store) -> None:
        second = open_store(store_url)
        try:
            for store in (first, second):
                claimed(await store.claim(new_key(), "warm-up", 30))  # both connected
            won_a, won_b = await asyncio.gather(
                claim_all(first, keys, "a"), claim_all(second, keys[::-1], "b")
            )
        finally:
            await second.close()
        assert not won_a & won_b
        assert won_a | won_b == set(keys)

    with_store(store_url, scenario)


def test_a_key_too_long_for_the_postgres_index_fails_alone(brokers: dict[str, str]) -> None:
    # Given 20 keys and one of 12,000 random characters (more than a PostgreSQL index entry holds),
    # When all are claimed in one go (one loop tick: one batch, one transaction),
    # Then the 20 are claimed and only the long one fails, with the database's reason;
    # and the next batch of claims all succeed (no connection is left in a bad state).
    # The long key sorts second in its batch: psycopg 3.2.1 prepares a statement on its sixth
    # run, and a pipeline that failed between the first run and that one left it believing the
    # claim prepared on that connection, so that each later claim there failed.
    run = uuid.uuid4().hex
    keys = [f"test:{n:02}:{run}" for n in range(20)]
    too_long = f"test:00~{os.urandom(6000).hex()}"  # random: PostgreSQL cannot compress it

    async def scenario(store: Store) -> None:
        claims = await asyncio.gather(
            *(store.claim(key, "job", 30) for key in [*keys, too_long]), return_exceptions=True
        )
        assert all(isinstance(claim, Claimed) for claim in claims[:-1]), claims
        assert isinstance(claims[-1], StoreError) and "index row" in str(claims[-1]), claims[-1]
        later = await asyncio.gather(*(store.claim(new_key(), "job", 30) for _ in range(20)))
        assert all(isinstance(claim, Claimed) for claim in later), later

    with_store(brokers["postgres"], scenario)


def test_a_postgres_batch_run_statement_by_statement_keeps_the_deadline(
    brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a key whose row another transaction holds, and calls given 1 s,
    # When it is claimed in one batch with a key too long for the index (the batch fails on
    # that one, and its statements run again one by one),
    # Then its claim fails as an outage in about that time, and the long key with its reason.
    # (Run one by one, statements had no deadline: the claim waited as long as the row was
    # held, and over a silent network for TCP's retransmission time.)
    monkeypatch.setattr(postgres, "CALL_TIMEOUT_S", 1.0)
    too_long = f"test:00~{os.urandom(6000).hex()}"
    held = f"test:01:{uuid.uuid4().hex}"  # (sorts after the long key: the batch fails first)

    async def scenario(store: Store) -> None:
        claimed(await store.claim(new_key(), "job-0", 30))  # (the table exists)
        async with await psycopg.AsyncConnection.connect(brokers["postgres"]) as holder:
            await holder.execute(
                "INSERT INTO bridge_idempotency (name, state, job_id, expires_at)"
                " VALUES (%s, 'running', 'holder', 0)",
                (held,),
            )  # (and the transaction stays open)
            claims = await asyncio.wait_for(
                asyncio.gather(
                    store.claim(too_long, "job-1", 30), store.claim(held, "job-2", 30), return_exceptions=True
                ),
                timeout=10,
            )
        assert isinstance(claims[0], StoreError) and "index row" in str(claims[0]), claims[0]
        assert isinstance(claims[1], StoreError) and "no answer within 1 s" in str(claims[1]), claims[1]

    with_store(brokers["postgres"], scenario)


def test_creating_the_postgres_table_keeps_the_deadline(
    brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given calls given 1 s, When creating the table does not answer (a statement that sleeps
    # stands in for a silent network), Then the first claim fails as an outage in about that
    # time. (Creating the table had no deadline.)
    monkeypatch.setattr(postgres, "CALL_TIMEOUT_S", 1.0)
    monkeypatch.setattr(postgres, "SCHEMA", "SELECT pg_sleep(20)")

    async def scenario(store: Store) -> None:
        with pytest.raises(StoreError, match="no answer within 1 s"):
            await asyncio.wait_for(store.claim(new_key(), "job-1", 30), timeout=10)

    with_store(brokers["postgres"], scenario)


def test_a_wrong_postgres_password_fails_at_once_with_the_servers_reason(brokers: dict[str, str]) -> None:
    # Given the local PostgreSQL's URL with a wrong password,
    user, _, where = brokers["postgres"].removeprefix("postgresql://").partition("@")
    url = f"postgresql://{user.partition(':')[0]}:not-the-password@{where}"

    async def scenario(store: Store) -> None:
        # When a key is claimed,
        started = time.monotonic()
        with pytest.raises(StoreError) as failed:
            await store.claim(new_key(), "job", 30)
        # Then the claim fails with the server's reason, on one line and without the password,
        # and without waiting out the connection pool's timeout (10 s)
        assert "password authentication failed" in str(failed.value)
        assert "\n" not in str(failed.value) and "not-the-password" not in str(failed.value)
        assert time.monotonic() - started < 5

    with_store(url, scenario)


def test_a_redis_store_error_names_the_server_but_masks_the_password(brokers: dict[str, str]) -> None:
    # Given the local Redis's URL with a user and password (the local Redis wants neither),
    url = brokers["redis"].replace("redis://", "redis://someone:not-the-password@")

    async def scenario(store: Store) -> None:
        # When a key is claimed, Then it fails naming the server with the password masked
        # (error messages end up in logs). (The reason varies: redis-py 5.0 says only "No
        # connection available", later versions pass on Redis's "invalid username-password
        # pair".)
        with pytest.raises(StoreError) as failed:
            await store.claim(new_key(), "job", 30)
        message = str(failed.value)
        shown = brokers["redis"].replace("redis://", "redis://someone:***@")
        assert message.startswith(f"idempotency store {shown}: ")
        assert "not-the-password" not in message

    with_store(url, scenario)


def test_the_redis_store_loads_its_script_again_when_redis_has_lost_it(brokers: dict[str, str]) -> None:
    # Given a key claimed in Redis (a script),
    # When Redis forgets its scripts (as after a restart) before the key is completed (another
    # script), and again before it is claimed once more,
    # Then each takes effect: the store loads its scripts again and resends the command.
    import redis.asyncio as aioredis

    async def forget_scripts() -> None:
        client = aioredis.from_url(brokers["redis"])
        try:
            await client.script_flush()
        finally:
            await client.aclose()

    async def scenario(store: Store) -> None:
        key = new_key()
        first = claimed(await store.claim(key, "job-1", 30))
        await forget_scripts()
        assert await store.complete(key, first.token, "job-1", 30)
        await forget_scripts()
        assert await store.claim(key, "job-2", 30) == Done("job-1")

    with_store(brokers["redis"], scenario)


def test_a_redis_that_may_evict_keys_is_named_once_in_a_warning(
    brokers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    # Given the real Redis set to evict keys when full (maxmemory 1 GB, volatile-lru: every key
    # bridge writes expires, so they would go first), When a store claims and completes keys,
    # Then one warning names the policy and what to set; and with noeviction, none.
    import redis

    async def keyed_jobs(store: Store) -> None:
        for job in ("job-1", "job-2"):
            key = new_key()
            assert await store.complete(key, claimed(await store.claim(key, job, 30)).token, job, 30)

    admin = redis.Redis.from_url(brokers["redis"])
    kept = {name: str(value) for name, value in admin.config_get("maxmemory*").items()}
    try:
        admin.config_set("maxmemory", str(1 << 30))
        admin.config_set("maxmemory-policy", "volatile-lru")
        with caplog.at_level(logging.WARNING, logger="bridge.idempotency"):
            with_store(brokers["redis"], keyed_jobs)
            [warning] = [r.getMessage() for r in caplog.records]
            admin.config_set("maxmemory-policy", "noeviction")
            with_store(brokers["redis"], keyed_jobs)
            assert len(caplog.records) == 1
    finally:
        admin.config_set("maxmemory", kept["maxmemory"])
        admin.config_set("maxmemory-policy", kept["maxmemory-policy"])
        admin.close()
    assert "maxmemory-policy volatile-lru" in warning and "set maxmemory-policy noeviction" in warning


@pytest.fixture(params=["sqlite", "postgres"])
def sql_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store that keeps its keys in a SQL table, which it purges of old rows now and then."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    urls: dict[str, str] = request.getfixturevalue("brokers")
    return urls["postgres"]


def stored_names(url: str, names: list[str]) -> set[str]:
    """Which of `names` have a row in the store's table, read with the vendor's own client."""
    if url.startswith("sqlite"):
        marks = ", ".join("?" * len(names))
        with sqlite3.connect(url.removeprefix("sqlite://")) as db:
            rows = db.execute(f"SELECT name FROM bridge_idempotency WHERE name IN ({marks})", names)
            return {name for (name,) in rows}
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT name FROM bridge_idempotency WHERE name = ANY(%s)", (names,))
        return {name for (name,) in found}


def test_the_purge_deletes_only_the_rows_that_stopped_counting(sql_store_url: str) -> None:
    # Given four keys: two claimed (a lease of 50 ms, and of 30 s), two completed (a window of
    # 50 ms, and of 30 s),
    # When the short ones have ended and the store purges,
    # Then only the rows of the two short ones are gone.
    async def scenario(store: Store) -> None:
        assert isinstance(store, SqlStore)
        lease_ended, lease_on, window_ended, window_on = keys = [new_key() for _ in range(4)]
        claimed(await store.claim(lease_ended, "job-1", 0.05))
        claimed(await store.claim(lease_on, "job-2", 30))
        for key, window_s in ((window_ended, 0.05), (window_on, 30)):
            assert await store.complete(
                key, claimed(await store.claim(key, "job-3", 30)).token, "job-3", window_s
            )
        await asyncio.sleep(0.1)
        await store.purge()
        assert stored_names(sql_store_url, keys) == {lease_on, window_on}

    with_store(sql_store_url, scenario)


def test_the_sqlite_purge_covers_a_table_larger_than_one_range(tmp_path: Path) -> None:
    # Given 2,500 keys (the SQLite purge deletes 1,000 rowids per statement), every other one
    # claimed with a lease that has ended,
    # When the store purges, Then exactly the rows of the ended leases are gone, in every range.
    url = f"sqlite:///{tmp_path / 'keys.db'}"

    async def scenario(store: Store) -> None:
        assert isinstance(store, SqlStore)
        keys = [new_key() for _ in range(2500)]
        ended = set(keys[1::2])
        await asyncio.gather(*(store.claim(key, "job-1", 0.05 if key in ended else 30) for key in keys))
        await asyncio.sleep(0.1)
        await store.purge()
        assert stored_names(url, keys) == set(keys) - ended

    with_store(url, scenario)


def test_the_postgres_purge_passes_over_a_row_another_transaction_holds(brokers: dict[str, str]) -> None:
    # Given two keys whose leases ended, one of whose rows another transaction holds (as a
    # batch re-claiming it would),
    # When the store purges, Then it returns without waiting for that transaction, and deletes
    # the other row: a purge that waited could be one half of a deadlock.
    url = brokers["postgres"]

    async def scenario(store: Store) -> None:
        assert isinstance(store, SqlStore)
        held, gone = keys = [new_key(), new_key()]
        for key in keys:
            claimed(await store.claim(key, "job-1", 0.05))
        await asyncio.sleep(0.1)
        with psycopg.connect(url) as holder:  # a transaction, until the block ends
            holder.execute("SELECT 1 FROM bridge_idempotency WHERE name = %s FOR UPDATE", (held,))
            await asyncio.wait_for(store.purge(), timeout=5)
            assert stored_names(url, keys) == {held}, f"{gone} was not purged"

    with_store(url, scenario)


def test_postgres_leases_keep_the_servers_time_whatever_a_hosts_clock_says(
    brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a key held for 30 s by a worker on a host whose clock is right,
    # When a worker on a host whose clock runs two minutes ahead claims it and purges,
    # Then the key is busy for about 30 s more, as the server's clock says, and the holder's
    # row survives the purge: the holder still completes it. (Each batch reads the server's
    # clock again here, as one does once a minute.) `bridge keys show|list|forget` on that
    # host, each a process whose first statement is the one that counts, see the key as the
    # server's clock has it too. (They took the host's clock: the held key was none.)
    url = brokers["postgres"]
    monkeypatch.setattr(postgres, "READ_CLOCK_EVERY_S", 0.0)

    @contextlib.asynccontextmanager
    async def on_the_host_ahead() -> AsyncIterator[Store]:
        real_time_ns = time.time_ns
        monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + 120 * 10**9)
        ahead = open_store(url)
        try:
            yield ahead
        finally:
            await ahead.close()
            monkeypatch.setattr(time, "time_ns", real_time_ns)

    async def scenario(store: Store) -> None:
        key = new_key()
        token = claimed(await store.claim(key, "job-1", 30)).token
        async with on_the_host_ahead() as ahead:
            busy = await ahead.claim(key, "job-2", 30)
            assert isinstance(busy, Busy) and 25 < busy.wait_s <= 30, busy
            assert isinstance(ahead, SqlStore)
            await ahead.purge()
        async with on_the_host_ahead() as ahead:
            held = await ahead.inspect(key)
            assert held is not None and held.state == RUNNING, held
        async with on_the_host_ahead() as ahead:
            assert [name for name, _ in await ahead.records(key, None, 10)] == [key]
        assert await store.complete(key, token, "job-1", 30)
        async with on_the_host_ahead() as ahead:
            assert await ahead.drop(key)

    with_store(url, scenario)


@pytest.mark.parametrize("name", ["postgres", "redis"])
def test_a_store_behind_a_network_that_drops_everything_fails_in_time_and_recovers(
    brokers: dict[str, str], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a PostgreSQL or Redis store reached through a proxy, its calls given 1 s,
    # When the network passes nothing more, either way, and closes nothing (dropped packets),
    # Then a claim fails with a StoreError (an outage, which keyed jobs wait out) in about
    # that time, and once the network is back claims work again. (A claim waited for good:
    # TCP gives up on a silent peer after hours.)
    monkeypatch.setattr(postgres, "CALL_TIMEOUT_S", 1.0)
    monkeypatch.setattr(redis_store, "CALL_TIMEOUT_S", 1.0)

    async def main() -> None:
        async with behind_proxy(brokers[name]) as (proxy, store):
            claimed(await store.claim(new_key(), "job-1", 30))
            proxy.stall()
            stalled = time.monotonic()
            with pytest.raises(StoreError):
                await asyncio.wait_for(store.claim(new_key(), "job-2", 30), timeout=10)
            assert time.monotonic() - stalled < 3  # (1 s, the call's timeout, and a margin)
            proxy.heal()
            claimed(await asyncio.wait_for(store.claim(new_key(), "job-3", 30), timeout=10))

    run(main(), timeout=30)


@pytest.mark.parametrize("asked", ["claim", "remember"])
@pytest.mark.parametrize("name", ["postgres", "redis"])
def test_a_claim_or_hold_given_up_while_its_batch_is_out_is_undone_once_it_lands(
    brokers: dict[str, str], name: str, asked: str
) -> None:
    # Given a PostgreSQL or Redis store behind a network that holds what it is given (a slow
    # link), When a claim whose batch is out is cancelled (a stop's grace period ending), or a
    # dedupe enqueue's hold (a timeout around the enqueue), and the network then passes the
    # batch on, Then the claim or hold lands and is undone: the key is free for the job's copy,
    # or for the next enqueue. (It held the key, for nobody, until its lease ended; an
    # enqueue's hold made every enqueue of the key wait 60 s for a publish that never came.)
    async def main() -> None:
        async with behind_proxy(brokers[name]) as (proxy, store):
            claimed(await store.claim(new_key(), "job-0", 30))  # (the store is open)
            key = new_key()
            proxy.stall()
            first = store.claim(key, "job-1", 30) if asked == "claim" else store.remember(key, "job-1", 60)
            given_up = asyncio.ensure_future(first)
            await asyncio.sleep(0.05)  # the loop goes idle: its batch goes out, and is held
            given_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await given_up  # (what it does as it is cancelled comes before the copy's claim)
            proxy.heal()
            if asked == "claim":
                claimed(await asyncio.wait_for(store.claim(key, "job-2", 30), timeout=10))
            else:
                assert await asyncio.wait_for(store.remember(key, "job-2", 60), timeout=10) is None

    run(main(), timeout=30)


def test_a_postgres_purge_behind_a_network_that_drops_everything_fails_in_time(
    brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a PostgreSQL store reached through a proxy, its purges given 1 s, When the network
    # passes nothing more, Then a purge fails with a StoreError in about that time, and once
    # the network is back the next purge works. (A purge waited for good, holding its
    # connection: TCP gives up on a silent peer after hours.)
    monkeypatch.setattr(postgres, "PURGE_TIMEOUT_S", 1.0)

    async def main() -> None:
        async with behind_proxy(brokers["postgres"]) as (proxy, store):
            assert isinstance(store, SqlStore)
            claimed(await store.claim(new_key(), "job-1", 30))  # (the store is open)
            proxy.stall()
            stalled = time.monotonic()
            with pytest.raises(StoreError):
                await asyncio.wait_for(store.purge(), timeout=10)
            assert time.monotonic() - stalled < 3  # (1 s, the purge's timeout, and a margin)
            proxy.heal()
            await asyncio.wait_for(store.purge(), timeout=10)

    run(main(), timeout=30)


@pytest.mark.parametrize("block", ["begins", "ends", "completes", "raises"])
def test_a_postgres_inbox_on_a_network_that_drops_everything_ends_in_time_all_or_nothing(
    brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch, block: str
) -> None:
    # Given a PostgreSQL store reached through a proxy, its calls given 1 s, and a claimed key,
    # When the network passes nothing more as the inbox transaction begins, as its block ends
    # after the handler's write (the key's completion goes out next), once the key's completion
    # was answered (the commit goes out next), or as the block raises (the rollback goes next),
    # Then the block raises in about that time: a StoreError, or the handler's own error;
    # and once the network is back, the write and the key's completion exist both or neither:
    # neither, unless the commit went out (the network may deliver it then, as any can).
    # (bridge's own statements in the inbox had no deadline: the job waited for TCP to give up
    # on a silent peer, hours; then the BEGIN still had none.)
    base = brokers["postgres"]
    url = named_sessions(base)
    table, key = new_table(url), new_key()
    complete = sql._complete

    async def main() -> None:
        async with behind_proxy(url) as (proxy, store):

            async def complete_then_stall(*args: Any) -> bool:
                done = await complete(*args)
                proxy.stall()
                return done

            token = claimed(await store.claim(key, "job-1", 30)).token
            # (after the claim: its commit waits on the disk's fsync, which may take 1 s)
            monkeypatch.setattr(postgres, "CALL_TIMEOUT_S", 1.0)
            stalled = time.monotonic()
            if block == "begins":
                proxy.stall()
            error, says = (RuntimeError, "its write") if block == "raises" else (StoreError, "within 1 s")
            with pytest.raises(error, match=says):
                async with store.transaction(key, token, "job-1", 30) as db:
                    await write_effect(url, db, table, key, "job-1")
                    stalled = time.monotonic()
                    if block == "completes":
                        monkeypatch.setattr(sql, "_complete", complete_then_stall)
                    else:
                        proxy.stall()
                    if block == "raises":
                        raise RuntimeError("the handler failed after its write")
            assert time.monotonic() - stalled < 3  # (1 s, the call's timeout, and a margin)
            proxy.heal()
        await wait_out_transactions(url)
        done = await done_or_held(open_store(base), key)
        assert effects(url, table) == ({key: 1} if done else {}), done
        assert not done or block == "completes", "done, though its commit never went out"

    run(main(), timeout=30)


@pytest.mark.parametrize("ended_by", ["its deadline", "a reset"])
def test_a_postgres_inbox_cancelled_on_a_network_that_drops_everything_ends_cancelled(
    brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch, ended_by: str
) -> None:
    # Given an inbox transaction through a proxy whose block has ended after the handler's
    # write and whose network then passes nothing more,
    # When its task is cancelled (a worker stopping), and then its calls' 1 s passes, or the
    # proxy resets the connection (a restarted pooler, say; the calls given 10 s),
    # Then the task ends cancelled, within seconds, and once the network is back nothing is done.
    # (psycopg 3.2 answers a cancellation with a cancel request, then waits for the query
    # with no limit; what ended that wait, the deadline's shut socket or the reset, came out
    # as a StoreError, and a worker took it for the job's failure.)
    base = brokers["postgres"]
    url = named_sessions(base)
    table, key = new_table(url), new_key()

    async def main() -> None:
        async with behind_proxy(url) as (proxy, store):
            token = claimed(await store.claim(key, "job-1", 30)).token
            # (after the claim: its commit waits on the disk's fsync, which may take 1 s)
            monkeypatch.setattr(postgres, "CALL_TIMEOUT_S", 1.0 if ended_by == "its deadline" else 10.0)

            async def job() -> None:
                async with store.transaction(key, token, "job-1", 30) as db:
                    await write_effect(url, db, table, key, "job-1")
                    proxy.stall()
                    loop = asyncio.get_running_loop()
                    loop.call_later(0.2, running.cancel)
                    if ended_by == "a reset":
                        loop.call_later(1.0, proxy.cut, None)

            running = asyncio.create_task(job())
            started = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await running
            assert time.monotonic() - started < 8  # (1 s, or the reset's, and a margin)
            proxy.heal()
        await wait_out_transactions(url)
        assert not await done_or_held(open_store(base), key)
        assert effects(url, table) == {}

    run(main(), timeout=30)


def test_a_postgres_inbox_whose_begin_is_answered_as_its_deadline_passes_fails_before_its_block(
    brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a claimed key, and the BEGIN's deadline going off in the loop pass that brings
    # BEGIN's answer (a loop busy past it: forced here, the timer's callback runs just before
    # the task goes on),
    # When the inbox transaction begins, Then it fails with a StoreError before its block runs.
    # (The block ran on a connection whose socket was shut: the handler's first statement
    # failed with psycopg's own error, which the job took for the handler's.)
    url = named_sessions(brokers["postgres"])
    table, key = new_table(url), new_key()
    ran: list[str] = []

    async def main() -> None:
        store = open_store(url)
        try:
            token = claimed(await store.claim(key, "job-1", 30)).token
            cancel = postgres._Deadline.cancel

            def passed_first(deadline: postgres._Deadline) -> None:
                monkeypatch.setattr(postgres._Deadline, "cancel", cancel)  # (the BEGIN's only)
                deadline._shut_down()
                cancel(deadline)

            monkeypatch.setattr(postgres._Deadline, "cancel", passed_first)
            with pytest.raises(StoreError, match="no answer within 15 s"):
                async with store.transaction(key, token, "job-1", 30) as db:
                    ran.append("the block")
                    await write_effect(url, db, table, key, "job-1")
        finally:
            await store.close()

    run(main(), timeout=30)
    assert ran == []
    assert effects(url, table) == {}


def test_a_postgres_session_whose_client_went_silent_ends_and_lets_go_of_its_rows(
    brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a PostgreSQL store whose calls are given 1 s and whose server is asked to end a
    # silent client's session after about 3 s, and a handler's inbox block that updated a row,
    # When the network drops everything of that block's connection, either way, as it ends,
    # Then the block fails in about 1 s, and the job's retry updates the row within seconds: the
    # server ended the session and rolled back what it held. (It held the row, and the key's
    # batch-mates, for two hours: the server's TCP only looks for a silent client that late.)
    tcp = {"tcp_keepalives_idle": 1, "tcp_keepalives_interval": 1, "tcp_keepalives_count": 2}
    monkeypatch.setattr(postgres, "SERVER_TCP", tcp)
    monkeypatch.setattr(postgres, "SERVER_TCP_USER_TIMEOUT_MS", 3000)
    url, table = brokers["postgres"], f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, runs int NOT NULL)")
        conn.execute(f"INSERT INTO {table} VALUES (1, 0)")

    async def main() -> None:
        store = open_store(url)
        try:
            key = new_key()
            token = claimed(await store.claim(key, "job-1", 30)).token
            # (after the claim: its commit waits on the disk's fsync, which may take 1 s)
            monkeypatch.setattr(postgres, "CALL_TIMEOUT_S", 1.0)
            with contextlib.ExitStack() as network:  # (silent until the retry is done)
                with pytest.raises(StoreError, match="no answer within 1 s"):
                    async with store.transaction(key, token, "job-1", 30) as db:
                        await db.execute(f"UPDATE {table} SET runs = runs + 1 WHERE id = 1")
                        network.enter_context(silenced(local_port(db), db.info.port))
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as retry:
                    await retry.execute("SET statement_timeout = '10s'")
                    started = time.monotonic()
                    await retry.execute(f"UPDATE {table} SET runs = runs + 1 WHERE id = 1")
                    assert time.monotonic() - started < 8, "the silent client's session held the row"
        finally:
            await store.close()

    with loopback_qdisc():
        run(main(), timeout=30)
    with psycopg.connect(url) as conn:
        assert conn.execute(f"SELECT runs FROM {table}").fetchall() == [(1,)]


def test_a_postgres_server_refusing_a_session_setting_is_reported_at_once_with_its_reason(
    brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a server that refuses a setting bridge asks of each session (a stand-in: a setting
    # no server has), When the store's first claim connects, Then it fails at once, naming it.
    # (The pool, which asks it of each connection, said 10 s later that it had timed out.)
    monkeypatch.setattr(postgres, "SERVER_TCP", {"bridge_no_such_setting": 1})

    async def main() -> None:
        store = open_store(brokers["postgres"])
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="bridge_no_such_setting"):
                await store.claim(new_key(), "job-1", 30)
            assert time.monotonic() - started < 5  # (10 s, the pool's wait, and it said only that)
        finally:
            await store.close()

    run(main(), timeout=30)


def named_sessions(url: str) -> str:
    """`url` with an application_name of its own: wait_out_transactions counts its sessions only."""
    return f"{url}{'&' if '?' in url else '?'}application_name=inbox-{uuid.uuid4().hex[:8]}"


def local_port(conn: psycopg.AsyncConnection[Any]) -> int:
    """The client's end of `conn`: its port on this host."""
    sock = socket.socket(fileno=conn.pgconn.socket)
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.detach()  # (the descriptor stays psycopg's)


async def wait_out_transactions(url: str, timeout_s: float = 10) -> None:
    """Until no session of `url`'s application_name is in a transaction (one whose client went
    away ends once its server finds out)."""
    name = url.partition("application_name=")[2]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        start = time.monotonic()
        while (
            await (
                await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                    " AND xact_start IS NOT NULL AND pid <> pg_backend_pid()",
                    (name,),
                )
            ).fetchone()
        ) != (0,):
            assert time.monotonic() - start < timeout_s, f"{name}'s transactions never ended"
            await asyncio.sleep(0.05)


async def done_or_held(store: Store, key: str) -> bool:
    """Whether `key` is done (else it is held still: its claim never completed)."""
    try:
        claim = await store.claim(key, "job-2", 30)
    finally:
        await store.close()
    assert isinstance(claim, Done | Busy), claim
    return isinstance(claim, Done)


def test_a_postgres_pool_that_could_not_fill_at_first_is_tried_again(
    brokers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a PostgreSQL store whose first connection (the one that makes the table) works,
    # and whose pool then cannot connect (the network drops new connections for a while),
    # When the first claim fails, and the network is back, Then the next claim works. (The
    # pool that timed out was closed by psycopg_pool, and every later claim failed at once,
    # "pool has already been opened/closed and cannot be reused", until a restart.)
    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT_S", 1.0)

    async def main() -> None:
        async with behind_proxy(brokers["postgres"]) as (proxy, store):
            assert isinstance(store, postgres.PostgresStore)
            read = store._clock.read

            async def read_then_cut(conn: Any) -> None:
                await read(conn)
                proxy.cut(None)  # (once the table is made: only the pool's connections meet it)

            monkeypatch.setattr(store._clock, "read", read_then_cut)
            with pytest.raises(StoreError):
                await store.claim(new_key(), "job-1", 30)
            monkeypatch.setattr(store._clock, "read", read)
            proxy.heal()
            claimed(await store.claim(new_key(), "job-2", 30))

    run(main(), timeout=30)


def test_the_server_clock_carried_forward_counts_the_time_the_host_slept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a reading of the server's clock just now, When the host sleeps an hour (its clock
    # since boot and its wall clock move on an hour), Then the server's time carried forward
    # moves on an hour too, before any new reading. (It was carried on time.monotonic(), which
    # stands still while a host sleeps: the first claims after a sleep were written with leases
    # that had already ended.) And a wall clock set 5 s ahead makes a reading due at once.
    assert sys.platform != "linux" or postgres.SINCE_BOOT == time.CLOCK_BOOTTIME
    clock = postgres._ServerClock()
    clock._server_ms, clock._read_at, clock._wall_at = 1_700_000_000_000, postgres._since_boot(), time.time()
    assert not clock.stale()
    since_boot, wall = postgres._since_boot, time.time
    monkeypatch.setattr(postgres, "_since_boot", lambda: since_boot() + 3600)
    monkeypatch.setattr(time, "time", lambda: wall() + 3600)
    assert 3_600_000 <= clock.now_ms() - 1_700_000_000_000 < 3_601_000
    monkeypatch.setattr(time, "time", lambda: wall() + 3605)
    assert clock.stale()


def test_a_purge_that_fails_is_logged_and_the_completion_stands(
    sql_store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a store whose purge fails (its statement names a table that is not there),
    # When a key completes (a store's first completion starts a purge),
    # Then the completion took effect and says so, and the purge's failure is a warning.
    async def scenario(store: Store) -> None:
        assert isinstance(store, SqlStore)
        store.purge_sql = store.purge_sql.replace("bridge_idempotency", "no_such_table")
        key = new_key()
        assert await store.complete(key, claimed(await store.claim(key, "job-1", 30)).token, "job-1", 30)
        assert await store.claim(key, "job-2", 30) == Done("job-1")
        assert store._purging is not None
        await asyncio.wait_for(store._purging, timeout=5)

    with caplog.at_level("WARNING", logger="bridge.idempotency"):
        with_store(sql_store_url, scenario)
    [warning] = [r.getMessage() for r in caplog.records if "could not purge" in r.getMessage()]
    assert "no_such_table" in warning


def test_no_completion_waits_for_a_slow_postgres_purge_and_closing_ends_it(brokers: dict[str, str]) -> None:
    # Given a PostgreSQL store whose purge takes a minute (a large table's takes seconds),
    # When a key completes (a store's first completion starts a purge),
    # Then complete() returns at once, and closing the store does not wait for the purge.
    async def scenario(store: Store) -> None:
        assert isinstance(store, SqlStore)
        store.purge_sql = "SELECT pg_sleep(60) WHERE ?::bigint > 0"
        key = new_key()
        token = claimed(await store.claim(key, "job-1", 30)).token
        assert await asyncio.wait_for(store.complete(key, token, "job-1", 30), timeout=5)
        assert store._purging is not None and not store._purging.done()
        await asyncio.wait_for(store.close(), timeout=5)

    with_store(brokers["postgres"], scenario)


def test_two_processes_racing_for_the_same_keys_each_win_once(store_url: str) -> None:
    # Given 2,000 keys, When two processes claim all of them from the same moment (one from
    # each end, so that they must meet),
    # Then every key is claimed by exactly one of them. (Each process's claims take a quarter
    # of a second or more: on a loaded machine one may start late, yet while the other claims.)
    keys = [new_key() for _ in range(2000)]
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2, timeout=60)  # both connected to the store, then both go
    results: Results = context.Queue()
    racers = [
        context.Process(target=claim_all, args=(store_url, order, start, name, results))
        for name, order in (("a", keys), ("b", keys[::-1]))
    ]
    for racer in racers:
        racer.start()
    (_, won_a, began_a, ended_a), (_, won_b, began_b, ended_b) = sorted(
        results.get(timeout=60) for _ in racers
    )
    for racer in racers:
        racer.join(timeout=10)
    assert began_a < ended_b and began_b < ended_a, "the two processes did not claim at the same time"
    assert not set(won_a) & set(won_b)
    assert set(won_a) | set(won_b) == set(keys)


def test_processes_opening_a_new_sqlite_store_at_once_all_open_it(tmp_path: Path) -> None:
    # Given four worker processes,
    # When they open the same new SQLite store at the same moment, 30 times over (a new file
    # each time, as workers starting together on a fresh host),
    # Then every open succeeds. (Switching a new database to WAL needs it alone, and SQLite
    # refused the others at once, "database is locked", in about one round in eight.)
    paths = [tmp_path / f"keys-{n}.db" for n in range(30)]
    context = multiprocessing.get_context("spawn")
    together = context.Barrier(4, timeout=60)
    failures: multiprocessing.Queue[list[str]] = context.Queue()
    openers = [context.Process(target=open_each, args=(paths, together, failures)) for _ in range(4)]
    for opener in openers:
        opener.start()
    reported = [failures.get(timeout=120) for _ in openers]
    for opener in openers:
        opener.join(timeout=10)
    assert reported == [[]] * 4


if TYPE_CHECKING:
    from multiprocessing.synchronize import Barrier

    Results = multiprocessing.Queue[tuple[str, list[str], int, int]]


def claim_all(url: str, keys: list[str], start: Barrier, name: str, results: Results) -> None:
    """Claim every key (in a separate process); put the keys it won, and when it began and
    ended (monotonic ns, one clock for every process of the host), in `results`.

    (A store may legitimately let one process win every key, SQLite when the other waits for
    its write lock throughout, so what shows that they raced is that their claims overlapped.)
    """

    async def main() -> tuple[str, list[str], int, int]:
        store = open_store(url)
        try:
            await store.claim(new_key(), name, 30)  # connected, and the first statement made
            start.wait()
            began = time.monotonic_ns()
            # Leases that outlast the race: on a loaded machine, 3,000 claims to PostgreSQL took
            # 17 s with the lowest psycopg, and a lease of 30 s, once over, frees the key rightly.
            outcomes = [await store.claim(key, name, 3600) for key in keys]
            ended = time.monotonic_ns()
            won = [key for key, outcome in zip(keys, outcomes, strict=True) if isinstance(outcome, Claimed)]
            return name, won, began, ended
        finally:
            await store.close()

    results.put(asyncio.run(main()))


def open_each(paths: list[Path], together: Barrier, failures: multiprocessing.Queue[list[str]]) -> None:
    """Open a SQLite store at each path, at the same moment as the other processes; put what failed."""
    failed = []
    for path in paths:
        together.wait()
        try:
            store = open_store(f"sqlite:///{path}")
        except StoreError as exc:
            failed.append(str(exc))
        else:
            asyncio.run(store.close())
    failures.put(failed)
