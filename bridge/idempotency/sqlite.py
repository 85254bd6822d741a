"""The SQLite store: the default, for the worker processes of one host.

WAL mode lets readers and one writer work at once, across processes. Statements run on the
event loop's thread: they take microseconds, and a thread hop would cost more. (Tried on
2026-11-30: with a thread of its own, the loop's time per keyed Kafka job rose from about 50 to
70-95 µs, as the thread and the loop handed the GIL back and forth around every statement and
every batch, even with a batch's claims in one INSERT. Without a thread, that one INSERT saved
nothing either, 15 to 16 µs per key both ways at ten keys a batch: the time goes to SQLite's
B-tree, not to Python.) A commit costs more than the statements, so the claims and completions
that jobs ask for while the loop is busy are written in one transaction (group commit), a few
milliseconds at most. The one long transaction is the inbox, which holds this process's
connection (other jobs' statements wait their turn) and SQLite's write lock (other processes
wait up to BUSY_TIMEOUT_S): keep inbox transactions short. They wait on their event loop, which
runs on meanwhile, not in SQLite's busy handler, which would stop it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, closing, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from bridge.errors import StoreError
from bridge.idempotency import Enqueued
from bridge.idempotency.batch import TickBatch
from bridge.idempotency.given_up import GivenUp
from bridge.idempotency.sql import CLAIM, ENDED, LOOK, SCHEMA, BlockEnded, Query, Rows, SqlStore, log, now_ms

BUSY_TIMEOUT_S = 10.0
SQLITE_HEADER = b"SQLite format 3\x00"  # how every SQLite database file begins
BUSY_RETRY_S = (0.001, 0.05)  # how long to wait before trying again for the write lock: from, to
WAL_CHECKPOINT_PAGES = 4000  # SQLite's default is 1000
# The open inbox transaction's mark, carried by the task that opened it and by the tasks it
# starts (an `asyncio.gather` of enqueues with dedupe, say), whose statements join it.
_INBOX: ContextVar[object | None] = ContextVar("bridge_sqlite_inbox", default=None)
# The purge goes through the table a range of rowids at a time, each range a statement of its
# own among the jobs' statements: one statement for the whole table would stop the event loop,
# and hold the write lock, for as long as it runs (0.1 s to read a million rows, 0.5 s to
# delete 10,000 of them). Rowids follow the order rows were added, so old rows, which have
# mostly expired, come together: 1,000 of them are deleted in about 40 ms.
PURGE_ROWS = 1000
PURGE_RANGE = "DELETE FROM bridge_idempotency WHERE rowid >= ? AND rowid < ? AND expires_at < ?"
ROWIDS = "SELECT min(rowid), max(rowid) FROM bridge_idempotency"
# CLAIM, and LOOK in the same transaction if the claim took nothing (see SqlStore.claim_sql).
CLAIM_OR_LOOK = CLAIM + "\n-- or else LOOK"


class SqliteStore(SqlStore):
    """Idempotency keys in a SQLite file (`sqlite:///path`)."""

    purge_sql = PURGE_RANGE
    claim_sql = CLAIM_OR_LOOK

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = Path(url.removeprefix("sqlite://"))
        with _mapped(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The connection may move between event loops' threads (sync and async API), never
            # between two threads at once: the lock below serialises its use.
            self._db = sqlite3.connect(
                self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False
            )
            _use_wal(self._db)
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
            # Keys are random, so every claim and completion dirties pages all over the table;
            # copying the WAL back less often (at 16 MB instead of 4) writes each hot page once
            # per checkpoint instead of several times: a third less time per keyed job here.
            # (Checkpoints in a thread of their own took their fsync off the loop, but under a
            # steady stream of commits the WAL was never reset: 230 MB after 60,000 keys.)
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            self._db.execute(SCHEMA)
            # From now on the write lock is waited for on the event loop (`_write_lock`).
            self._db.execute("PRAGMA busy_timeout=0")
        self._lock = asyncio.Lock()  # the connection: a group commit's, or an inbox transaction's
        self._statements = TickBatch(self._commit, self._lock, send_now=self._commit_now)
        self._inbox: object | None = None  # the open inbox transaction's mark (_INBOX)
        # The jobs whose dedupe holds it took: their key, hold, and window once confirmed
        self._inbox_holds: dict[str, tuple[str, float, float | None]] = {}
        self._given_up = GivenUp(self)

    def _in_inbox(self) -> bool:
        """Whether the caller is inside the open inbox transaction: its handler, or a task it
        started there."""
        return self._inbox is not None and _INBOX.get() is self._inbox

    async def _query(self, sql: str, params: Sequence[Any]) -> Rows:
        if self._in_inbox():
            # The handler itself, inside its inbox (an enqueue with dedupe, say), or a task it
            # started there: its statement joins that transaction. (It waited for the
            # connection the handler held, for good; a task it started, until then did too.)
            return self._run(sql, params)
        rows: Rows = await self._statements.call((sql, params))
        return rows

    async def _read(self, sql: str, params: Sequence[Any]) -> Rows:
        # Not in a group commit: its write transaction would hold SQLite's write lock, and every
        # worker's commits, while `bridge keys list` reads the table (a second or so for a few
        # million keys). A read of its own takes no lock in WAL mode. The event loop waits for
        # it meanwhile: for an operator's command, not for a worker's jobs.
        if self._in_inbox():  # (a handler's, in its inbox)
            return self._run(sql, params)
        async with self._lock:
            return self._run(sql, params)

    async def remember(self, key: str, job_id: str, hold_s: float) -> Enqueued | None:
        earlier = await super().remember(key, job_id, hold_s)
        if not self._in_inbox():
            return earlier
        if earlier is None:
            self._inbox_holds[job_id] = (key, hold_s, None)
        elif earlier.job_id and not earlier.confirmed and earlier.job_id not in self._inbox_holds:
            # An enqueue with dedupe inside a ctx.transaction(), of a key another enqueue is
            # publishing right now: that one's confirmation waits for this transaction's write
            # lock, so waiting for it here would wait until its hold ended, then publish again.
            # (One the block itself is publishing, in another task, confirms in the block.)
            raise StoreError(
                f"idempotency key {key!r} is being enqueued by job {earlier.job_id}, which cannot "
                "record it while this ctx.transaction() is open: try again after the block"
            )
        return earlier

    async def confirm(self, key: str, job_id: str, window_s: float) -> bool:
        confirmed = await super().confirm(key, job_id, window_s)
        if confirmed and self._in_inbox() and job_id in self._inbox_holds:
            self._inbox_holds[job_id] = (key, self._inbox_holds[job_id][1], window_s)
        return confirmed

    async def forget(self, key: str, job_id: str) -> None:
        await super().forget(key, job_id)
        if self._in_inbox():
            self._inbox_holds.pop(job_id, None)

    async def _hold_again(self) -> None:
        """Record again the dedupe enqueues of an inbox block that just rolled back: the broker
        took their publishes (or may yet), whatever became of the block, and without their keys
        the job's retry would publish them again. Before any other statement of this process:
        a publish still out confirms its hold once the block is over."""
        statements = [
            statement
            for job_id, (key, hold_s, window_s) in self._inbox_holds.items()
            for statement in (
                self._remembering(key, job_id, hold_s),
                *([self._confirming(key, job_id, window_s)] if window_s is not None else []),
            )
        ]
        self._inbox_holds = {}
        if not statements:
            return
        try:
            await self._write_lock()
            self._in_transaction(statements)
        except StoreError as exc:  # (the block's own error goes on; the retry may publish again)
            log.warning("ctx.transaction() rolled back, and the keys of its enqueues with dedupe could "
                        "not be recorded again: an enqueue of one may publish it again: %s", exc)  # fmt: skip

    async def _commit(self, statements: list[tuple[str, Sequence[Any]]]) -> list[Rows | StoreError]:
        await self._write_lock()
        return self._in_transaction(statements)

    def _commit_now(self, statements: list[tuple[str, Sequence[Any]]]) -> list[Rows | StoreError] | None:
        """`_commit` if the write lock is free now; None if another process holds it."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if _busy(exc):
                return None
            raise StoreError(f"idempotency store {self.path}: {exc}") from exc
        return self._in_transaction(statements)

    async def _write_lock(self) -> None:
        """BEGIN IMMEDIATE, waiting on the event loop while another process writes, up to
        BUSY_TIMEOUT_S. (SQLite's busy handler waits inside the call: the loop stood still, and
        every job of this process with it, as long as another process's inbox was open.)"""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        wait_s, most_s = BUSY_RETRY_S
        while True:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.Error as exc:
                if not _busy(exc) or time.monotonic() + wait_s > deadline:
                    raise StoreError(f"idempotency store {self.path}: {exc}") from exc
            await asyncio.sleep(wait_s)
            wait_s = min(2 * wait_s, most_s)

    def _in_transaction(self, statements: list[tuple[str, Sequence[Any]]]) -> list[Rows | StoreError]:
        """Run `statements` in the transaction just begun, and commit: each one's rows, or its error."""
        results: list[Rows | StoreError] = []
        try:
            for sql, params in statements:
                try:
                    results.append(self._run(sql, params))
                except StoreError as exc:  # that statement failed; the others still count
                    results.append(exc)
            self._run("COMMIT", ())
        except BaseException:  # whatever it was, the connection must not stay in the transaction
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return results

    def _run(self, sql: str, params: Sequence[Any]) -> Rows:
        try:  # (not `with _mapped(...)`: twice per keyed job, a context manager was a tenth of it)
            cursor = self._db.execute(sql, params)
            if sql is CLAIM_OR_LOOK and cursor.rowcount <= 0:
                return self._db.execute(LOOK, params[:1]).fetchall()
            return cursor.fetchall() if cursor.description else [()] * max(cursor.rowcount, 0)
        except sqlite3.Error as exc:
            raise StoreError(f"idempotency store {self.path}: {exc}") from exc

    async def purge(self) -> None:
        now = now_ms()
        [(first, last)] = await self._query(ROWIDS, ())
        if first is None:
            return  # no rows
        for start in range(first, last + 1, PURGE_ROWS):
            await self._query(self.purge_sql, (start, start + PURGE_ROWS, now))

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[tuple[Any, Query]]:
        async def query(sql: str, params: Sequence[Any]) -> Rows:
            return self._run(sql, params)

        async with self._lock:
            await self._write_lock()
            self._inbox = object()
            self._inbox_holds = {}
            _INBOX.set(self._inbox)
            try:
                yield self._db, query
            except BaseException as exc:
                self._inbox = None
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                elif not isinstance(exc, BlockEnded):  # (ROLLBACK's own error would hide this one)
                    _warn_ended()
                # (also when the block ended the transaction: a rollback of its own took them,
                # and after a commit of its own, recording them again changes nothing)
                await self._hold_again()
                raise
            self._inbox = None
            try:  # (a cursor the handler left unread makes COMMIT fail: nothing of it commits)
                self._run("COMMIT", ())
            except BaseException:  # the connection must not stay in the transaction, holding the lock
                if self._db.in_transaction:  # (SQLite may have rolled back already)
                    self._db.execute("ROLLBACK")
                await self._hold_again()
                raise

    def _unfit(self, handle: Any) -> str | None:
        return None if self._db.in_transaction else ENDED

    async def close(self) -> None:
        await self._stop_background()
        self._db.close()


def _warn_ended() -> None:
    """The handler ended bridge's inbox transaction itself (`db.commit()`, a sqlite3 habit)."""
    log.warning(
        "ctx.transaction() on SQLite: the handler ended the transaction itself (commit() or "
        "rollback()), so its writes did not commit with its key, and stay even if the key could "
        "not be recorded; leave the commit to bridge"
    )


def _busy(exc: sqlite3.Error) -> bool:
    """Whether another connection holds the lock (SQLITE_BUSY, or one of its extended codes)."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY


def _use_wal(db: sqlite3.Connection) -> None:
    """Put the database in WAL mode, waiting (up to BUSY_TIMEOUT_S) for other processes.

    Workers that open a new database at the same moment all try to switch it; the switch needs
    the database alone, and SQLite answers "database is locked" at once, not after its busy
    timeout, when another connection holds it. Once one has switched, the others find it done.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def path_problem(path: Path) -> str | None:
    """Why `path` cannot hold a SQLite database, found without creating anything: at the first
    keyed job, a worker would take it for a store that does not answer, and wait for good."""
    try:
        if path.exists():
            if path.is_dir():
                return f"{path} is a directory"
            if not path.is_file():
                return f"{path} is not a regular file"
            with path.open("rb") as file:
                header = file.read(len(SQLITE_HEADER))
            if header and header != SQLITE_HEADER[: len(header)]:
                return f"{path} is not a SQLite database"
            if not os.access(path, os.R_OK | os.W_OK):
                return f"{path} cannot be written to"
            folder = path.parent  # (where its -wal and -shm files go)
        else:
            folder = next(parent for parent in path.parents if parent.exists())
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if not folder.is_dir():
        return f"{folder} is not a directory"
    # (Nothing is written here: `bridge enqueue` checks its settings too. A folder nothing
    # could be made in kept a worker's keyed jobs waiting for the store for good.)
    return None if os.access(folder, os.W_OK | os.X_OK) else f"{folder} cannot be written to"


def unused(path: Path) -> str | None:
    """Why the SQLite file at `path` holds no worker's keys (`bridge keys`), read without
    changing it: opened as a store, a file that is not there would be made, and another
    database given the table (and switched to WAL), both to answer "no record" for every key."""
    if not path.exists():
        return f"no idempotency store at {path}: no worker has used it"
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            found = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'bridge_idempotency'").fetchone()
    except sqlite3.Error as exc:
        return f"{path} is no idempotency store ({exc})"
    return None if found else f"{path} is no idempotency store: it has no table bridge_idempotency"


@contextmanager
def _mapped(path: Path) -> Iterator[None]:
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"idempotency store {path}: {exc}") from exc
