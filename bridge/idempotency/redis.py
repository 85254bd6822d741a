"""The Redis store (redis-py): idempotency keys shared by workers on many hosts.

A key's value says its state: `running|<token>`, `done|<job id>|<epoch ms>` or `enqueued|<job id>`; its
expiry is the lease or the window, so Redis forgets old keys by itself. Checks of the holder's
token run in Lua scripts, atomically on the server.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bridge.errors import LeaseLost, StoreError
from bridge.idempotency import Busy, Claim, Claimed, Done

# If the key holds ARGV[1], run the commands packed in ARGV[4..] (each as a count, then its
# words), then set the key to ARGV[2] for ARGV[3] ms (or delete it when ARGV[2] is empty).
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local i = 4
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""


MAX_CONNECTIONS = 64
CONNECTION_WAIT_S = 10.0


class Commands:
    """The inbox on Redis: commands recorded by the handler, applied with the key's completion.

    `call("RPUSH", "effects", "42")` records a command; when the transaction ends they run in
    one Lua script, after checking the claim is still held, and the key becomes done. Redis
    does not roll back a script: a command that fails leaves the earlier ones applied.
    """

    def __init__(self) -> None:
        self.words: list[str | bytes | int | float] = []

    def call(self, *command: str | bytes | int | float) -> None:
        self.words += [len(command), *command]


class RedisStore:
    """Idempotency keys in Redis (`redis://host:port/db`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        # A command waits for a free connection rather than failing: redis-py's default pool
        # raises "Too many connections" past 100, fewer than a consumer's --concurrency may be.
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=CONNECTION_WAIT_S
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self._swap = self._redis.register_script(_SWAP)

    async def claim(self, key: str, job_id: str, lease_s: float) -> Claim:
        token = uuid.uuid4().hex
        with _mapped(self.url):
            if await self._redis.set(key, f"running|{token}", nx=True, px=_ms(lease_s)):
                return Claimed(token)
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                value, ttl_ms = await pipe.execute()
        if value is None:  # it expired or was released just now: look again soon
            return Busy(0.0)
        state, holder, *_ = _text(value).split("|")
        return Done(holder) if state == "done" else Busy(max(0.0, ttl_ms / 1000))

    async def _swap_if(self, key: str, expected: str, new: str, px: int, words: Sequence[Any] = ()) -> bool:
        with _mapped(self.url):
            return bool(await self._swap(keys=[key], args=[expected, new, px, *words]))

    async def extend(self, key: str, token: str, lease_s: float) -> bool:
        return await self._swap_if(key, f"running|{token}", f"running|{token}", _ms(lease_s))

    async def complete(self, key: str, token: str, job_id: str, window_s: float) -> bool:
        return await self._swap_if(key, f"running|{token}", _done(job_id), _ms(window_s))

    async def release(self, key: str, token: str) -> None:
        await self._swap_if(key, f"running|{token}", "", 0)

    @asynccontextmanager
    async def transaction(
        self, key: str, token: str, job_id: str, window_s: float
    ) -> AsyncIterator[Commands]:
        commands = Commands()
        yield commands
        if not await self._swap_if(key, f"running|{token}", _done(job_id), _ms(window_s), commands.words):
            raise LeaseLost(f"the claim on {key!r} ended before the job completed; nothing was applied")

    async def remember(self, key: str, job_id: str, window_s: float) -> str | None:
        with _mapped(self.url):
            if await self._redis.set(key, f"enqueued|{job_id}", nx=True, px=_ms(window_s)):
                return None
            value = await self._redis.get(key)
        return _text(value).partition("|")[2] if value is not None else None

    async def forget(self, key: str, job_id: str) -> None:
        await self._swap_if(key, f"enqueued|{job_id}", "", 0)

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.disconnect()  # a pool given to Redis() is not closed with it


def _done(job_id: str) -> str:
    return f"done|{job_id}|{time.time_ns() // 1_000_000}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


@contextmanager
def _mapped(url: str) -> Iterator[None]:
    try:
        yield
    except RedisError as exc:
        raise StoreError(f"idempotency store {url}: {exc}") from exc
