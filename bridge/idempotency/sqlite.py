"""The SQLite store: the default, for the worker processes of one host.

WAL mode lets readers and one writer work at once, across processes; every statement is its
own short transaction. Statements run on the event loop's thread: they take tens of
microseconds, and a thread hop would cost more. The one long transaction is the inbox, which
holds this process's connection (other jobs' claims wait their turn) and SQLite's write lock
(other processes wait up to BUSY_TIMEOUT_S): keep inbox transactions short.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from bridge.errors import StoreError
from bridge.idempotency.sql import SCHEMA, Query, Rows, SqlStore

BUSY_TIMEOUT_S = 10.0


class SqliteStore(SqlStore):
    """Idempotency keys in a SQLite file (`sqlite:///path`)."""

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
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
            self._db.execute(SCHEMA)
        self._lock = asyncio.Lock()

    async def _query(self, sql: str, params: Sequence[Any]) -> Rows:
        async with self._lock:
            return self._run(sql, params)

    def _run(self, sql: str, params: Sequence[Any]) -> Rows:
        with _mapped(self.path):
            return self._db.execute(sql, params).fetchall()

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[tuple[Any, Query]]:
        async def query(sql: str, params: Sequence[Any]) -> Rows:
            return self._run(sql, params)

        async with self._lock:
            self._run("BEGIN IMMEDIATE", ())
            try:
                yield self._db, query
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._run("COMMIT", ())

    async def close(self) -> None:
        self._db.close()


@contextmanager
def _mapped(path: Path) -> Iterator[None]:
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"idempotency store {path}: {exc}") from exc
