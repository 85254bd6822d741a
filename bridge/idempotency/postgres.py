"""The PostgreSQL store (psycopg 3): idempotency keys shared by workers on many hosts.

A pool of autocommit connections; each claim, renewal or completion is one statement. The
inbox hands the handler a connection inside a transaction, in which the key completes too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from bridge.errors import StoreError
from bridge.idempotency.sql import SCHEMA, Query, Rows, SqlStore

CONNECT_TIMEOUT_S = 10.0


class PostgresStore(SqlStore):
    """Idempotency keys in a PostgreSQL table (`postgresql://user:pass@host:port/db`)."""

    def __init__(self, url: str, *, pool_size: int = 16) -> None:
        self.url = url
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]] = AsyncConnectionPool(
            url, min_size=1, max_size=max(2, pool_size), open=False,
            kwargs={"autocommit": True}, timeout=CONNECT_TIMEOUT_S,
        )  # fmt: skip
        self._ready = False
        self._opening = asyncio.Lock()

    async def _open(self) -> None:
        if self._ready:
            return
        async with self._opening:  # the first jobs all arrive here at once
            if not self._ready:
                await self._create()
                self._ready = True

    async def _create(self) -> None:
        with _mapped(self.url):
            await self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
            async with self._pool.connection() as conn:
                # UniqueViolation: another process created the table at the same moment.
                with suppress(psycopg.errors.UniqueViolation):
                    await conn.execute(SCHEMA)

    async def _query(self, sql: str, params: Sequence[Any]) -> Rows:
        await self._open()
        with _mapped(self.url):
            async with self._pool.connection() as conn:
                return await _fetch(conn, sql, params)

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[tuple[Any, Query]]:
        await self._open()
        with _mapped(self.url):
            async with self._pool.connection() as conn, conn.transaction():

                async def query(sql: str, params: Sequence[Any]) -> Rows:
                    return await _fetch(conn, sql, params)

                yield conn, query

    async def close(self) -> None:
        await self._pool.close()


async def _fetch(conn: psycopg.AsyncConnection[tuple[Any, ...]], sql: str, params: Sequence[Any]) -> Rows:
    cursor = await conn.execute(sql.replace("?", "%s"), params)
    return await cursor.fetchall() if cursor.description else [()] * max(cursor.rowcount, 0)


@contextmanager
def _mapped(url: str) -> Iterator[None]:
    try:
        yield
    except (psycopg.Error, TimeoutError) as exc:
        where = url.rpartition("@")[2]  # never the password
        raise StoreError(f"idempotency store postgresql://{where}: {exc}") from exc
