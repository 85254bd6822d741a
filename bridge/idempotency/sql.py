"""The claim protocol in SQL, shared by the SQLite and PostgreSQL stores.

One table, `bridge_idempotency`; a row per key, with the job that holds or completed it and
`done_at` (epoch ms). `expires_at` is when the row stops counting: a lease's end while a job
runs, the window's end once it is done. A dedupe enqueue's row is `enqueuing` while its
publish is out, then `enqueued` for the window. An expired row is as good as absent, so claims
and enqueues overwrite it, and `purge` deletes old ones from time to time.

Writes say whether they took effect by the rows they changed, not with RETURNING (which made
each statement twice as slow on SQLite): a store's `_query` gives one empty row per changed
row for a statement that returns no columns, so `if await self._query(CLAIM, ...)` reads
"if the claim took effect".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

from bridge.errors import LeaseLost, Permanent, StoreError
from bridge.idempotency import SETTLED, Busy, Claim, Claimed, Done, Enqueued, Record, new_token
from bridge.idempotency.given_up import GivenUp

SCHEMA = """
CREATE TABLE IF NOT EXISTS bridge_idempotency (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    job_id TEXT NOT NULL,
    token TEXT,
    expires_at BIGINT NOT NULL,
    done_at BIGINT
)"""
CLAIM = """
INSERT INTO bridge_idempotency (name, state, job_id, token, expires_at) VALUES (?, 'running', ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET state = 'running', job_id = excluded.job_id, token = excluded.token,
    expires_at = excluded.expires_at, done_at = NULL
WHERE bridge_idempotency.expires_at <= ?
    OR (bridge_idempotency.token = excluded.token AND bridge_idempotency.state = 'running')"""
LOOK = "SELECT state, job_id, expires_at FROM bridge_idempotency WHERE name = ?"
EXTEND = """
UPDATE bridge_idempotency SET expires_at = ?
WHERE name = ? AND token = ? AND state = 'running'"""
COMPLETE = """
UPDATE bridge_idempotency SET state = 'done', job_id = ?, token = NULL, expires_at = ?, done_at = ?
WHERE name = ? AND token = ? AND state = 'running'"""
# A completion whose claim lapsed and was purged (any worker's purge deletes expired rows), or
# taken by another claim that lapsed too: nobody holds the key, and the job's effect happened,
# so it is done (as on Redis, whose lapsed keys are gone). Tried only when COMPLETE changed
# nothing, so the usual completion costs one statement.
COMPLETE_ABSENT = """
INSERT INTO bridge_idempotency (name, state, job_id, token, expires_at, done_at)
VALUES (?, 'done', ?, NULL, ?, ?)
ON CONFLICT (name) DO UPDATE SET state = 'done', job_id = excluded.job_id, token = NULL,
    expires_at = excluded.expires_at, done_at = excluded.done_at
WHERE bridge_idempotency.expires_at <= excluded.done_at"""
RELEASE = "DELETE FROM bridge_idempotency WHERE name = ? AND token = ? AND state = 'running'"
REMEMBER = """
INSERT INTO bridge_idempotency (name, state, job_id, token, expires_at) VALUES (?, 'enqueuing', ?, NULL, ?)
ON CONFLICT (name) DO UPDATE SET state = 'enqueuing', job_id = excluded.job_id, token = NULL,
    expires_at = excluded.expires_at, done_at = NULL
WHERE bridge_idempotency.expires_at <= ?"""
CONFIRM = """
UPDATE bridge_idempotency SET state = 'enqueued', expires_at = ?
WHERE name = ? AND job_id = ? AND state = 'enqueuing'"""
FORGET = "DELETE FROM bridge_idempotency WHERE name = ? AND job_id = ? AND state = 'enqueuing'"
# For `bridge keys show|list|forget`: a key's record, while it counts; deleting it if its state
# is one of four given (some repeated when fewer). An expired row is left to the purge.
INSPECT = """
SELECT state, job_id, expires_at, done_at FROM bridge_idempotency WHERE name = ? AND expires_at > ?"""
_RECORDS = """
SELECT name, state, job_id, expires_at, done_at FROM bridge_idempotency
WHERE substr(name, 1, ?) = ? AND expires_at > ?"""  # (it reads the whole table: an operator's command)
RECORDS = _RECORDS + " ORDER BY name LIMIT ?"
RECORDS_OF_STATE = _RECORDS + " AND state = ? ORDER BY name LIMIT ?"
# PostgreSQL orders text by the column's collation, which may not go by code point, as SQLite
# and Python do (en_US puts "ab" before "aC"): the first `limit` would be another set of keys.
PG_RECORDS, PG_RECORDS_OF_STATE = (
    sql.replace("ORDER BY name", 'ORDER BY name COLLATE "C"') for sql in (RECORDS, RECORDS_OF_STATE)
)
DROP = "DELETE FROM bridge_idempotency WHERE name = ? AND expires_at > ? AND state IN (?, ?, ?, ?)"
PURGE_EVERY_S = 3600.0
# Where each statement that touches one key's row has that key among its parameters. A store
# that runs several such statements in one transaction takes their rows in key order, so two
# processes' transactions never wait for each other's rows in a circle (a deadlock).
KEY_AT = {
    CLAIM: 0, LOOK: 0, EXTEND: 1, COMPLETE: 3, COMPLETE_ABSENT: 0, RELEASE: 0,
    REMEMBER: 0, CONFIRM: 1, FORGET: 0,
    INSPECT: 0, DROP: 0, RECORDS: 1, RECORDS_OF_STATE: 1, PG_RECORDS: 1, PG_RECORDS_OF_STATE: 1,
}  # fmt: skip

log = logging.getLogger("bridge.idempotency")
Rows = list[tuple[Any, ...]]
Query = Callable[[str, Sequence[Any]], Awaitable[Rows]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class SqlStore:
    """The store contract over a SQL table; a subclass supplies `_query`, `_begin` and `purge`."""

    url: str
    purge_sql: str  # deletes the rows that expired before its last parameter
    # A claim's statement: CLAIM, or one that also answers as LOOK does when it took nothing
    # (SQLite's store runs the look in the claim's transaction). A duplicate of a job that is
    # done then costs one batch, as a new job does, instead of two. PostgreSQL keeps CLAIM: one
    # statement doing both (a data-modifying WITH) measured no cheaper, maybe dearer, for new
    # keys, which most claims are.
    claim_sql = CLAIM
    records_sql = (RECORDS, RECORDS_OF_STATE)  # `records`: all states, one state
    _next_purge = 0.0  # time.monotonic() of the next purge: at the first completion, then hourly
    _purging: asyncio.Task[None] | None = None
    _given_up: GivenUp  # the subclass's __init__ makes it

    async def _query(self, sql: str, params: Sequence[Any]) -> Rows:
        """Run one statement in its own transaction and return its rows."""
        raise NotImplementedError

    async def _read(self, sql: str, params: Sequence[Any]) -> Rows:
        """Run a statement that only reads (`bridge keys show|list`) and return its rows."""
        return await self._query(sql, params)

    def _begin(self) -> AbstractAsyncContextManager[tuple[Any, Query]]:
        """A transaction: the database's own handle, and `_query` inside that transaction."""
        raise NotImplementedError

    def _unfit(self, handle: Any) -> str | None:
        """Why the transaction of `handle`, at the end of an inbox block that raised nothing,
        cannot commit with the key, if it cannot: the block ended it, or broke it."""
        raise NotImplementedError

    async def make_room(self, transactions: int) -> None:
        """Room for `transactions` inbox transactions at once, from now on (a store with a pool
        of connections grows it)."""

    def _now_ms(self) -> int:
        """The store's clock in epoch ms, by which leases and windows start and end: the host's.
        The PostgreSQL store, shared by many hosts, keeps the server's instead."""
        return now_ms()

    async def claim(self, key: str, job_id: str, lease_s: float, token: str | None = None) -> Claim:
        token, now = token or new_token(), self._now_ms()
        try:
            rows = await self._query(
                self.claim_sql, (key, _id(job_id), token, now + int(lease_s * 1000), now)
            )
        except asyncio.CancelledError:  # (its batch may be out, or wait for SQLite's write lock)
            self._given_up.release(key, token)
            raise
        if rows and not rows[0]:  # (a changed row: the claim took the key)
            return Claimed(token)
        if not rows or rows[0][0] != "done":
            # Held (or CLAIM alone): look, a batch later. A copy that arrives with the job it
            # repeats was often claimed in the same batch, and is found done by then; one that
            # is still held waits in a delay tier until the holder's lease ends.
            rows = await self._query(LOOK, (key,))
        if not rows:  # it expired or was released just now: look again soon
            return Busy(0.0)
        state, holder, expires_at = rows[0]
        if state == "done":
            return Done(holder)
        return Busy(max(0.0, (expires_at - now) / 1000))

    async def extend(self, key: str, token: str, lease_s: float) -> bool:
        return bool(await self._query(EXTEND, (self._now_ms() + int(lease_s * 1000), key, token)))

    async def complete(self, key: str, token: str, job_id: str, window_s: float) -> bool:
        done = await _complete(self._query, _completion(key, token, job_id, window_s, self._now_ms()))
        if time.monotonic() >= self._next_purge:
            self._start_purge()
        return done

    async def release(self, key: str, token: str) -> None:
        await self._query(RELEASE, (key, token))

    @asynccontextmanager
    async def transaction(self, key: str, token: str, job_id: str, window_s: float) -> AsyncIterator[Any]:
        async with self._begin() as (handle, query):
            yield handle
            # (Completed outside the transaction, the key was done without the block's writes:
            # a job acknowledged without its effect, when they were rolled back.)
            if (unfit := self._unfit(handle)) is not None:
                raise BlockEnded(f"ctx.transaction() left the key not done: {unfit}")
            if not await _complete(query, _completion(key, token, job_id, window_s, self._now_ms())):
                raise LeaseLost(f"the claim on {key!r} ended before the job completed; rolled back")

    async def remember(self, key: str, job_id: str, hold_s: float) -> Enqueued | None:
        try:
            if await self._query(*self._remembering(key, job_id, hold_s)):
                return None
        except asyncio.CancelledError:  # (its batch may be out: see GivenUp)
            self._given_up.forget(key, job_id)
            raise
        rows = await self._query(LOOK, (key,))
        if not rows:  # it expired or was forgotten just now: the caller asks again
            return Enqueued("", confirmed=False)
        state, earlier, _ = rows[0]
        return Enqueued(str(earlier), state == "enqueued")

    async def confirm(self, key: str, job_id: str, window_s: float) -> bool:
        return bool(await self._query(*self._confirming(key, job_id, window_s)))

    def _remembering(self, key: str, job_id: str, hold_s: float) -> tuple[str, Sequence[Any]]:
        """The statement of `remember`: hold `key` for `job_id`'s publish, unless it counts."""
        now = self._now_ms()
        return REMEMBER, (key, _id(job_id), now + int(hold_s * 1000), now)

    def _confirming(self, key: str, job_id: str, window_s: float) -> tuple[str, Sequence[Any]]:
        """The statement of `confirm`: `job_id`'s hold of `key` counts for the window."""
        return CONFIRM, (self._now_ms() + int(window_s * 1000), key, _id(job_id))

    async def forget(self, key: str, job_id: str) -> None:
        await self._query(FORGET, (key, _id(job_id)))

    async def inspect(self, key: str) -> Record | None:
        rows = await self._read(INSPECT, (key, self._now_ms()))
        if not rows:
            return None
        state, job_id, expires_at, done_at = rows[0]
        return Record(state, job_id, expires_at, done_at)

    async def records(self, prefix: str, state: str | None, limit: int) -> list[tuple[str, Record]]:
        which = (len(prefix), prefix, self._now_ms())
        if state is None:
            rows = await self._read(self.records_sql[0], (*which, limit))
        else:
            rows = await self._read(self.records_sql[1], (*which, state, limit))
        return [(name, Record(*record)) for name, *record in rows]

    async def drop(self, key: str, states: Sequence[str] = SETTLED) -> bool:
        if not states:
            return False
        four = (list(states) * 4)[:4]
        return bool(await self._query(DROP, (key, self._now_ms(), *four)))

    async def purge(self) -> None:
        """Delete the rows that stopped counting: their lease or their window ended."""
        raise NotImplementedError

    def _start_purge(self) -> None:
        """Purge in the background, every PURGE_EVERY_S. It reads the whole table, which takes
        a while when the table is large (0.4 s for 2 million PostgreSQL rows): no job waits for it.
        """
        self._next_purge = time.monotonic() + PURGE_EVERY_S
        self._purging = asyncio.create_task(self._purge_or_log())

    async def _purge_or_log(self) -> None:
        try:
            await self.purge()
        except StoreError as exc:  # the keys it missed go at the next purge
            log.warning("could not purge old keys: %s; trying again in %.0f s", exc, PURGE_EVERY_S)

    async def _stop_background(self) -> None:
        """For `close`: the releases of cancelled claims get a moment (GivenUp.wait); a purge
        still running is cancelled, and the next one deletes the rest."""
        await self._given_up.wait()
        if self._purging is not None:
            self._purging.cancel()
            with suppress(asyncio.CancelledError):
                await self._purging


class BlockEnded(Permanent):
    """An inbox block that ended or broke its transaction, and raised nothing: a mistake of
    the handler's, which each retry would repeat (or, its writes committed, repeat them)."""


# Why `_unfit`: the block committed or rolled back itself (SQLite also commits by itself in
# `executescript()` and at the end of `with db:`, and rolls back by itself after some errors,
# which the block may have caught).
ENDED = (
    "the block ended the transaction itself (a commit or rollback of its own, `with db:` or"
    " `executescript()` on SQLite, or the database's rollback after an error the block caught),"
    " so its writes could not commit with the job's key: if they committed, a replay repeats"
    " them. Leave the commit to bridge, and let errors out of the block"
)


async def _complete(query: Query, params: tuple[Any, ...]) -> bool:
    """Mark the key done (COMPLETE's `params`, from `_completion`) if the claim's token still
    holds it, or if nobody does (its row lapsed and was purged); whether it is done by this job."""
    if await query(COMPLETE, params):
        return True
    job, expires_at, done_at, key = params[:4]
    return bool(await query(COMPLETE_ABSENT, (key, job, expires_at, done_at)))


def _completion(key: str, token: str, job_id: str, window_s: float, now: int) -> tuple[Any, ...]:
    return (_id(job_id), now + int(window_s * 1000), now, key, token)


def _id(job_id: str) -> str:
    """A job id as stored: PostgreSQL's text holds no NUL, which a producer in another language
    may have put in the id (bridge's own are UUIDs); it is stored as U+FFFD instead."""
    return job_id.replace("\x00", "\ufffd")
