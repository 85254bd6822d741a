"""The PostgreSQL store (psycopg 3): idempotency keys shared by workers on many hosts.

A pool of autocommit connections. The claims, renewals and completions that jobs ask for in
one tick of the event loop go to PostgreSQL together, in one round trip (pipeline mode), and
commit together; while one batch is out, the next one gathers. That shares psycopg's CPU time
per round trip, which here costs more than the round trip itself. The inbox hands the handler
a connection inside a transaction, in which the key completes too.

Leases and windows start and end by the server's clock, not each host's: a host whose clock
ran ahead would otherwise take a live lease, and its purge delete live rows. The store reads
the server's clock when it connects and once a minute after, and carries it forward between
readings on this host's clock since boot, so no statement on the hot path waits for it.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, nullcontext, suppress
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from bridge.errors import StoreError, safe_url
from bridge.idempotency import SETTLED, Claim, Enqueued, Record
from bridge.idempotency.batch import TickBatch
from bridge.idempotency.given_up import GivenUp
from bridge.idempotency.sql import (
    ENDED,
    KEY_AT,
    PG_RECORDS,
    PG_RECORDS_OF_STATE,
    SCHEMA,
    Query,
    Rows,
    SqlStore,
    now_ms,
)

CONNECT_TIMEOUT_S = 10.0
# How long one attempt to connect may take, unless the URL says (`connect_timeout`). psycopg's
# default is 130 s, and a connect whose packets a network drops (a host gone, a partition)
# waits that long on the kernel's retries: the pool made no other attempt meanwhile, so claims
# failed for up to two minutes after the network was back. A connect here takes milliseconds.
CONNECT_ATTEMPT_S = 5
# How long a batch of claims and completions may take before its connection is given up: a
# network that drops packets gives no error, and TCP would wait for hours. In an inbox
# transaction, from the end of the handler's block: the key's completion and the commit (or
# the rollback) together. The handler's own statements take what they take.
CALL_TIMEOUT_S = 15.0
# How long the pool goes on trying to make a connection (at once, then 1, 3 and 5 s on) before
# it gives up, and starts over at once (_start_over). psycopg_pool's own 5 minutes let the
# waits between attempts double to a minute and more: after an outage of a minute, the first
# claim waited up to a minute more for the pool's next attempt, on a server up all along. A
# claim that waits for a connection cannot hasten it: it asks the pool to grow, which it does
# not while another attempt waits out its back-off.
RECONNECT_S = 5.0
# The purge's, which reads the whole table (0.4 s for 2 million rows): one that hung on a silent
# network held its connection for good, and each hour's next purge might too.
PURGE_TIMEOUT_S = 600.0
# How soon the server ends the session of a client gone silent (its host, or the network
# between them, down): a client that gave up on a call (CALL_TIMEOUT_S) left its transaction
# open there, an inbox's or a batch's, holding its row locks (its keys', and the handler's own,
# which the job's retry then waits for) until the server's TCP found it gone: by Linux's
# defaults, two hours after its last word (keepalives), or 15 minutes after an answer the
# client never acknowledged (retransmissions). With these, about 30 s on a Linux server.
# tcp_user_timeout (PostgreSQL 12 on) also ends the session of a live client whose receive
# window stays shut that long: a handler that stops reading a streamed result (cursor.stream(),
# COPY) inside its inbox for 30 s. Session settings, sent once per connection; through a
# pooler (PgBouncer), the server's client is the pooler, and silence is the pooler's to notice.
SERVER_TCP = {"tcp_keepalives_idle": 15, "tcp_keepalives_interval": 5, "tcp_keepalives_count": 3}
SERVER_TCP_USER_TIMEOUT_MS = 30_000
SERVER_CLOCK = "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint"
READ_CLOCK_EVERY_S = 60.0
# The purge passes over rows that another transaction holds (a batch re-claiming an expired
# key): waiting for none, it can never be one half of a deadlock. What it passes over goes
# at the next purge.
PURGE_SKIPPING_LOCKED = """
DELETE FROM bridge_idempotency WHERE name IN (
    SELECT name FROM bridge_idempotency WHERE expires_at < ? FOR UPDATE SKIP LOCKED)"""


class PostgresStore(SqlStore):
    """Idempotency keys in a PostgreSQL table (`postgresql://user:pass@host:port/db`)."""

    purge_sql = PURGE_SKIPPING_LOCKED
    records_sql = (PG_RECORDS, PG_RECORDS_OF_STATE)

    def __init__(self, url: str, *, pool_size: int = 16) -> None:
        """`pool_size`: the inbox transactions that may be open at once (a worker's concurrency).
        The pool holds two connections more, for the batches and the purge: inbox handlers that
        hold every connection must not keep their own leases from being renewed."""
        self.url = url
        self._connect = connect_options(url)
        self._pool = self._new_pool(max(1, pool_size) + 2)
        self._ready = False
        self._opening = asyncio.Lock()
        self._statements = TickBatch(self._pipeline, asyncio.Lock())
        self._clock = _ServerClock()
        self._given_up = GivenUp(self)

    def _now_ms(self) -> int:
        return self._clock.now_ms()

    def _new_pool(self, size: int) -> AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]]:
        return AsyncConnectionPool(
            self.url, min_size=1, max_size=size, open=False, kwargs=self._connect,
            timeout=CONNECT_TIMEOUT_S, configure=_notice_silence,
            reconnect_timeout=RECONNECT_S, reconnect_failed=_start_over,
        )  # fmt: skip

    async def make_room(self, transactions: int) -> None:
        size = transactions + 2  # (as in __init__)
        if size <= self._pool.max_size:
            return
        async with self._opening:  # (not while the pool opens)
            if self._ready:
                await self._pool.resize(self._pool.min_size, size)
            else:
                self._pool = self._new_pool(size)

    async def claim(self, key: str, job_id: str, lease_s: float, token: str | None = None) -> Claim:
        await self._open()  # (the first claim's lease needs the server's clock read)
        return await super().claim(key, job_id, lease_s, token)

    async def remember(self, key: str, job_id: str, hold_s: float) -> Enqueued | None:
        await self._open()  # (as for a claim)
        return await super().remember(key, job_id, hold_s)

    async def inspect(self, key: str) -> Record | None:
        await self._open()  # (as for a claim: whether the record counts is the server's clock's)
        return await super().inspect(key)

    async def records(self, prefix: str, state: str | None, limit: int) -> list[tuple[str, Record]]:
        await self._open()  # (as for a claim)
        return await super().records(prefix, state, limit)

    async def drop(self, key: str, states: Sequence[str] = SETTLED) -> bool:
        await self._open()  # (as for a claim)
        return await super().drop(key, states)

    async def _open(self) -> None:
        if self._ready:
            return
        async with self._opening:  # the first jobs all arrive here at once
            if not self._ready:
                await self._create()
                self._ready = True

    async def _create(self) -> None:
        """Create the table on a connection of its own, then fill the pool.

        The pool retries a failed connection until its timeout and then says only that it
        timed out; this first connection fails at once with the server's reason (a wrong
        password, a missing database).
        """
        with _mapped(self.url):
            conn = await psycopg.AsyncConnection.connect(self.url, **self._connect)
            async with conn:
                await _notice_silence(conn)  # (as the pool's do: a refusal, with its reason)
                with _answered_within(conn):
                    # UniqueViolation: another process created the table at the same moment.
                    with suppress(psycopg.errors.UniqueViolation):
                        await conn.execute(SCHEMA)
                    await self._clock.read(conn)
            try:
                await self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
            except BaseException:  # (a pool, once closed, cannot open again: the next try needs a new one)
                failed, self._pool = self._pool, self._new_pool(self._pool.max_size)
                if not failed.closed:  # psycopg_pool closes one that timed out, not one cancelled
                    await failed.close()
                raise

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
        """A connection of the pool's, as `pool.connection()` lends it, but not one the server
        closed while it sat idle: that would fail the job it went to. Those are given back for
        the pool to replace. (The pool's own `check` option waits 1 s, then 2, 4 ... after
        each, and after a restart each idle connection is one.)"""
        while True:
            conn = await self._pool.getconn()
            try:
                if not await _closed_while_idle(conn):
                    break
            except BaseException:  # (cancelled while asking)
                await self._pool.putconn(conn)
                raise
            await self._pool.putconn(conn)
        try:
            async with conn:
                yield conn
        finally:
            await self._pool.putconn(conn)

    async def _query(self, sql: str, params: Sequence[Any]) -> Rows:
        rows: Rows = await self._statements.call((sql, params))
        return rows

    async def purge(self) -> None:
        """In a transaction of its own, not a batch's: it touches many rows, and takes a while."""
        await self._open()
        with _mapped(self.url):
            async with self._connection() as conn:
                with _answered_within(conn, PURGE_TIMEOUT_S):
                    await _fetch(conn, self.purge_sql, (self._now_ms(),))

    async def _pipeline(self, statements: list[tuple[str, Sequence[Any]]]) -> list[Rows | StoreError]:
        """Run `statements` in one transaction and one round trip: each one's rows.

        If that transaction fails on a statement of its own while the database is reachable,
        each statement runs again in a transaction of its own, so that one that cannot succeed
        (a key too long for the index) fails alone rather than every job of its batch. A batch
        that lost to another transaction (SQLSTATE class 40: a deadlock, a serialization
        failure) fails as a whole, and its jobs try again later.
        """
        await self._open()
        with _mapped(self.url):
            async with self._connection() as conn:
                try:
                    with _answered_within(conn):
                        if self._clock.stale():
                            await self._clock.read(conn)
                        return list(await _together(conn, statements))
                except psycopg.Error as exc:
                    # psycopg 3.2.1 (not 3.3.9) takes a statement it prepared in a failed
                    # pipeline for prepared, and every later use of it on this connection
                    # fails ("prepared statement _pg3_0 does not exist"): the pool replaces it.
                    broken = conn.broken
                    await conn.close()
                    if broken or len(statements) == 1 or (exc.sqlstate or "").startswith("40"):
                        raise
            async with self._connection() as conn:
                return [await _alone(conn, sql, params, self.url) for sql, params in statements]

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[tuple[Any, Query]]:
        await self._open()
        try:
            with _mapped(self.url):  # the store's own failures: the connection, the commit
                async with self._connection() as conn:
                    # The BEGIN, then from the block's end, or bridge's first statement after it,
                    # to the commit or rollback (a silent network held the job, and a connection,
                    # for hours). The handler's own statements take what they take.
                    with _answered_within(conn) as ending, _refused_at_commit(conn):
                        async with conn.transaction():
                            ending.cancel()
                            if ending.passed:  # (BEGIN's answer came in the pass that shut its socket)
                                raise TimeoutError(f"no answer within {ending.timeout_s:g} s")

                            async def query(sql: str, params: Sequence[Any]) -> Rows:
                                ending.start()
                                with _mapped(self.url), ending:
                                    return await _fetch(conn, sql, params)

                            try:
                                yield conn, query
                            except Exception as exc:  # (rolled back on the way out)
                                raise _Raised(exc) from exc
                            finally:
                                ending.start()
        except _Raised as raised:
            # What the handler's block raised, as it raised it: its own UniqueViolation, say,
            # which its `except` or the job's give_up_on name, not a StoreError (an outage).
            raise raised.error from raised.error.__cause__

    def _unfit(self, handle: Any) -> str | None:
        if handle.closed and not handle.broken:
            return "the block closed its connection (`db.close()`), and the transaction with it"
        status = handle.info.transaction_status
        if status == TransactionStatus.INERROR:
            return ABORTED
        return ENDED if status == TransactionStatus.IDLE else None  # (UNKNOWN: lost, an outage)

    async def close(self) -> None:
        await self._stop_background()
        await self._pool.close()


async def _start_over(pool: AsyncConnectionPool[Any]) -> None:
    """The pool gave up making a connection (RECONNECT_S): it starts again at once. (Left so,
    it made none until a claim found it empty, and a claim waiting already waited out its whole
    timeout, the server up or not.) `check()` grows the pool unless a connection is on its way."""
    await pool.check()


async def _closed_while_idle(conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> bool:
    """Whether the server closed `conn` while it sat in the pool, as a restart does, or an
    idle timeout of the server's or a pooler's. Asked only of one whose socket has something
    to read: the server's last words and the end, or else a notice or a parameter's new value.
    (libpq, reading the last words, does not yet see the end.)"""
    try:
        poll = select.poll()
        poll.register(conn.pgconn.socket, select.POLLIN)  # (OperationalError if it has none)
        if not poll.poll(0):
            return False
        with _answered_within(conn):
            await conn.execute("SELECT 1")
    except (psycopg.Error, TimeoutError):
        await conn.close()  # (the pool replaces a closed one)
        return True
    return False


@contextmanager
def _answered_within(
    conn: psycopg.AsyncConnection[tuple[Any, ...]], timeout_s: float | None = None, *, start: bool = True
) -> Iterator[_Deadline]:
    """Shuts the connection's socket down if the block still runs `timeout_s` (CALL_TIMEOUT_S)
    from now (or, with `start` False, from when the block calls `start()` on what it is given),
    and raises TimeoutError then.

    Not a cancellation: psycopg answers one by sending the server a cancel request, on a new
    connection over the same silent network, and waits up to 10 s more. A socket shut down
    (not closed: psycopg is waiting on it) makes the call fail at once, and the pool replaces
    the connection.
    """
    deadline = _Deadline(conn, CALL_TIMEOUT_S if timeout_s is None else timeout_s)
    if start:
        deadline.start()
    try:
        with deadline:
            yield deadline
    finally:
        deadline.cancel()
        if deadline.passed:  # (its answer may have come in the very pass its socket was shut:
            conn.pgconn.finish()  # closed, the pool discards it instead of lending it out)


class _Deadline:
    """A timer that shuts `conn`'s socket down `timeout_s` after `start()` (see `_answered_within`).

    A `with` block of it raises TimeoutError for a psycopg error once the timer went off.
    """

    def __init__(self, conn: psycopg.AsyncConnection[tuple[Any, ...]], timeout_s: float) -> None:
        self.conn, self.timeout_s = conn, timeout_s
        self.passed = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start the timer, unless it runs already."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout_s, self._shut_down)

    def cancel(self) -> None:
        """Stop the timer; `start()` starts it afresh."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __enter__(self) -> _Deadline:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        if not isinstance(exc, psycopg.Error):
            return
        if isinstance(exc.__context__, asyncio.CancelledError):
            # psycopg 3.2 answers a cancellation by asking the server to cancel, then waits for
            # its answer with no time limit: what ends that wait (the shut socket, a connection
            # reset) raises an error that must not stand for the cancellation the task is in.
            raise asyncio.CancelledError(f"cancelled, then: {exc}") from exc
        if self.passed:
            raise TimeoutError(f"no answer within {self.timeout_s:g} s") from exc

    def _shut_down(self) -> None:
        self.passed = True
        with suppress(OSError, psycopg.Error):
            sock = socket.socket(fileno=self.conn.pgconn.socket)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.detach()  # (the descriptor stays psycopg's to close)


# A clock that nobody steps and that counts the time a suspended host slept: Linux's
# CLOCK_BOOTTIME; macOS's CLOCK_MONOTONIC counts it too. time.monotonic() stands still while
# the host sleeps: the server's time carried forward on it lagged by the sleep, and the first
# claims after a sleep were written with leases that had already ended.
SINCE_BOOT = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _since_boot() -> float:
    return time.clock_gettime(SINCE_BOOT)


class _ServerClock:
    """The database server's clock in epoch ms, read now and then and carried forward between
    readings on this host's clock since boot (which NTP slews but nobody steps)."""

    def __init__(self) -> None:
        self._server_ms: int | None = None  # the last reading
        self._read_at = 0.0  # _since_boot() of that reading: halfway through its round trip
        self._wall_at = 0.0  # and time.time() then

    def now_ms(self) -> int:
        if self._server_ms is None:  # (only before the store connected: nothing is timed yet)
            return now_ms()
        return self._server_ms + int((_since_boot() - self._read_at) * 1000)

    def stale(self) -> bool:
        """Due for a reading: a minute on, or the wall clock moved on by another time than the
        clock since boot (it was set, or that clock does not count a sleep after all)."""
        elapsed = _since_boot() - self._read_at
        return elapsed >= READ_CLOCK_EVERY_S or abs(time.time() - self._wall_at - elapsed) > 1.0

    async def read(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        sent = _since_boot()
        [(server_ms,)] = await _fetch(conn, SERVER_CLOCK, ())
        received = _since_boot()
        self._server_ms, self._read_at = int(server_ms), (sent + received) / 2
        self._wall_at = time.time() - (received - self._read_at)


async def _notice_silence(conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
    """Ask the server to end this session soon after its client went silent (SERVER_TCP)."""
    settings = {name: str(value) for name, value in SERVER_TCP.items()}
    if conn.info.server_version >= 120000:
        settings["tcp_user_timeout"] = str(SERVER_TCP_USER_TIMEOUT_MS)
    query = "SELECT " + ", ".join("set_config(%s, %s, false)" for _ in settings)
    with _answered_within(conn):
        await conn.execute(query, [part for setting in settings.items() for part in setting])


async def _together(
    conn: psycopg.AsyncConnection[tuple[Any, ...]], statements: list[tuple[str, Sequence[Any]]]
) -> list[Rows]:
    """`statements` in one round trip (pipeline mode) and one transaction, in key order (KEY_AT).

    Every batch takes its rows in the same order, so two processes' batches never each wait
    for a row the other holds. Without pipeline mode (libpq older than 14), one round trip per
    statement.
    """
    order = sorted(range(len(statements)), key=lambda i: statements[i][1][KEY_AT[statements[i][0]]])
    cursors: dict[int, psycopg.AsyncCursor[tuple[Any, ...]]] = {}
    async with conn.pipeline() if psycopg.AsyncPipeline.is_supported() else nullcontext():
        for i in order:
            sql, params = statements[i]
            cursors[i] = await conn.execute(_dialect(sql), params)
    return [await _rows(cursors[i]) for i in range(len(statements))]


async def _alone(
    conn: psycopg.AsyncConnection[tuple[Any, ...]], sql: str, params: Sequence[Any], url: str
) -> Rows | StoreError:
    """One statement in its own transaction: its rows, or its error."""
    try:
        with _mapped(url), _answered_within(conn):
            return await _fetch(conn, sql, params)
    except StoreError as exc:
        return exc


async def _fetch(conn: psycopg.AsyncConnection[tuple[Any, ...]], sql: str, params: Sequence[Any]) -> Rows:
    return await _rows(await conn.execute(_dialect(sql), params))


def _dialect(sql: str) -> str:
    return sql.replace("?", "%s")  # the shared statements are written with SQLite's placeholders


async def _rows(cursor: psycopg.AsyncCursor[tuple[Any, ...]]) -> Rows:
    return await cursor.fetchall() if cursor.description else [()] * max(cursor.rowcount, 0)


ABORTED = (
    "a statement in the block failed and the block went on, so PostgreSQL aborted the"
    " transaction: none of its writes commit. Catch such errors inside a savepoint (`async with"
    " db.transaction():` in the block), or let them out of it"
)
# SQLSTATEs of a server that could not finish the work, not of the work itself: connection,
# insufficient resources, a shutdown or restart (57P; not 57014, a `statement_timeout` of the
# work's own), system and internal errors.
OUTAGE_STATES = ("08", "53", "57P", "58", "XX")


@contextmanager
def _refused_at_commit(conn: psycopg.AsyncConnection[Any]) -> Iterator[None]:
    """What the server refused of the block's own work at COMMIT, as it refused it: a deferred
    constraint, say, which the block's `except` or its job type's `give_up_on` may name. (As a
    StoreError it was an outage of the store: the job waited in a delay tier, spending no
    attempt, for good.) A connection or a server that failed is the store's."""
    try:
        yield
    except psycopg.Error as exc:
        # (A cancellation met at COMMIT stays one: psycopg 3.2 may raise the server's answer
        # to the COMMIT instead, with the CancelledError as its context.)
        if conn.broken or isinstance(exc.__context__, asyncio.CancelledError):
            raise
        if exc.sqlstate is None and isinstance(exc, psycopg.OperationalError):
            raise  # (the connection, as the client saw it)
        if exc.sqlstate is not None and exc.sqlstate.startswith(OUTAGE_STATES):
            raise
        raise _Raised(exc) from exc


class _Raised(Exception):
    """Carries what an inbox block raised past `_mapped`."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


@contextmanager
def _mapped(url: str) -> Iterator[None]:
    try:
        yield
    except (psycopg.Error, TimeoutError) as exc:
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # one line
        raise StoreError(f"idempotency store {safe_url(url)}: {reason}") from exc


def connect_options(url: str) -> dict[str, Any]:
    """What every connection to `url` is opened with: autocommit, and CONNECT_ATTEMPT_S for a
    connect unless the URL gives its own `connect_timeout`."""
    options: dict[str, Any] = {"autocommit": True, "connect_timeout": CONNECT_ATTEMPT_S}
    if "connect_timeout" in _conninfo(url):
        del options["connect_timeout"]  # (the user's, in the URL)
    return options


def unused(url: str) -> str | None:
    """Why the PostgreSQL database at `url` holds no worker's keys (`bridge keys`): it has no
    table of bridge's (opened as a store, it would be given one, and answer "no record" for
    every key). A database that cannot be read is the store's to report, in its own words."""
    try:
        with psycopg.connect(url, **connect_options(url)) as conn:
            (table,) = conn.execute("SELECT to_regclass('bridge_idempotency')").fetchone() or (None,)
    except psycopg.Error:
        return None
    return None if table else f"{safe_url(url)} has no table bridge_idempotency: no worker has used it"


def _conninfo(url: str) -> dict[str, Any]:
    """`url`'s connection parameters; none if it does not parse (the first connect says why)."""
    try:
        return conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return {}
