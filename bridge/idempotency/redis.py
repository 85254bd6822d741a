"""The Redis store (redis-py): idempotency keys shared by workers on many hosts.

A key's value says its state: `running|<token>`, `done|<job id>|<epoch ms>`, or for dedupe on
enqueue `enqueuing|<job id>` then `enqueued|<job id>`; its expiry is the lease, the publish's
hold or the window, so Redis forgets old keys by itself. Checks of the holder's
token run in Lua scripts, atomically on the server. The commands that jobs ask for in one tick
of the event loop go to Redis in one pipeline (not a transaction: each stands alone), one
pipeline at a time: while one is out, the next gathers what jobs ask for meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, ResponseError

from bridge.errors import LeaseLost, Permanent, StoreError, safe_url
from bridge.idempotency import DONE, RUNNING, SETTLED, Busy, Claim, Claimed, Done, Enqueued, Record, new_token
from bridge.idempotency.batch import TickBatch
from bridge.idempotency.given_up import GivenUp

# If the key holds ARGV[1] (or, with ARGV[4] '1', is absent), run the commands packed in
# ARGV[5..] (each as a count, then its words), then set the key to ARGV[2] for ARGV[3] ms (or
# delete it when ARGV[2] is empty). A command that fails stops it there, and it returns that
# command's number and error: the ones before it stay applied (Redis does not roll back).
_SWAP = """
local held = redis.call('GET', KEYS[1])
if held ~= ARGV[1] and not (held == false and ARGV[4] == '1') then return 0 end
local i, number = 5, 0
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  number = number + 1
  local reply = redis.pcall(unpack(ARGV, i + 1, i + n))
  if type(reply) == 'table' and reply.err then return {number, reply.err} end
  i = i + n + 1
end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""
# Take the key with ARGV[1] for ARGV[2] ms unless it is there; else say who has it and for how
# long: a duplicate of a job that is done hears so in the claim's own round trip.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return {held, redis.call('PTTL', KEYS[1])}
"""
# Delete the key if its state (its value up to the first |) is one of ARGV.
_DROP = """
local held = redis.call('GET', KEYS[1])
if not held then return 0 end
local state = held:match('^[^|]*')
for _, wanted in ipairs(ARGV) do
  if state == wanted then return redis.call('DEL', KEYS[1]) end
end
return 0
"""
_SCRIPTS = (_SWAP, _CLAIM, _DROP)
# How EVALSHA names them:
_SWAP_SHA1, _CLAIM_SHA1, _DROP_SHA1 = (hashlib.sha1(script.encode()).hexdigest() for script in _SCRIPTS)


# Set (for good) by a store's first commands: `bridge keys` looks for it, to tell a database no
# worker has used (a wrong db number) from one whose keys all ended.
MARKER = "bridge:idempotency"
MARKER_VALUE = "this database holds bridge's idempotency keys"
MAX_CONNECTIONS = 64
CONNECTION_WAIT_S = 10.0
CALL_TIMEOUT_S = 15.0
SCAN_READ = 1000  # keys found by `records` read per pipeline

log = logging.getLogger("bridge.idempotency")


class Commands:
    """The inbox on Redis: commands recorded by the handler, applied with the key's completion.

    `call("RPUSH", "effects", "42")` records a command; when the transaction ends they run in
    one Lua script, after checking the claim is still held, and the key becomes done. Redis
    does not roll back a script: a command that fails leaves the earlier ones applied.
    """

    def __init__(self) -> None:
        self.words: list[str | bytes | int | float] = []

    def call(self, *command: str | bytes | int | float) -> None:
        if not command:
            raise TypeError('db.call() needs a command: db.call("RPUSH", "charges", "42")')
        self.words += [len(command), *command]

    def name(self, number: int) -> str:
        """The name of the `number`th command recorded (from 1)."""
        at = 0
        for _ in range(number - 1):
            at += int(self.words[at]) + 1
        word = self.words[at + 1]
        return word.decode(errors="replace") if isinstance(word, bytes) else str(word)


class CommandFailed(Exception):
    """The first command an inbox recorded failed, so none was applied: a failure of the job,
    retried as any other."""


# Errors of a Redis that cannot take writes now, not of the command (their first word): an
# outage of the store, which the job waits out at the same attempt. Redis answers so only
# before a script's first write, so nothing was applied. (BUSYGROUP, say, is the command's.)
UNAVAILABLE = ("OOM", "READONLY", "MASTERDOWN", "NOREPLICAS", "MISCONF")


class RedisStore:
    """Idempotency keys in Redis (`redis://host:port/db`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        # A command waits for a free connection rather than failing: redis-py's default pool
        # raises "Too many connections" past 100, fewer than a consumer's --concurrency may be.
        # A reply that never comes (a network that drops packets) fails after CALL_TIMEOUT_S.
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=CONNECTION_WAIT_S,
            socket_timeout=CALL_TIMEOUT_S, socket_connect_timeout=CALL_TIMEOUT_S,
        )  # fmt: skip
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self._commands = TickBatch(self._pipeline, asyncio.Lock())
        self._given_up = GivenUp(self)
        self._eviction_checked = self._marked = False

    async def _call(self, command: Callable[[Pipeline], object]) -> Any:
        """Have `command` add one command to the next pipeline; return its reply.

        The commands that jobs ask for while the loop is busy, or while the last pipeline is
        out, go to Redis in one pipeline: one round trip for them all, and much less of
        redis-py's CPU time per command. (With that and the script sent by SHA1, a keyed Kafka
        job takes 150 µs of the loop's time, against 230 with a pipeline per loop tick.)
        """
        return await self._commands.call(command)

    async def _pipeline(self, commands: list[Callable[[Pipeline], object]]) -> list[Any]:
        """Send `commands` in one pipeline: each one's reply, or its error.

        The script goes by its SHA1 alone (EVALSHA). redis-py would ask Redis whether it has
        the script before every pipeline that runs one, a round trip of its own; here it is
        loaded only when Redis says it does not know it (a restart, SCRIPT FLUSH), and the
        commands that said so are sent again.
        """
        if not self._eviction_checked:
            await self._warn_if_evicting()
        if not self._marked:
            with self._mapped():
                await self._redis.set(MARKER, MARKER_VALUE)
            self._marked = True
        replies = await self._send(commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            with self._mapped():
                for script in _SCRIPTS:
                    await self._redis.script_load(script)
            for i, reply in zip(missing, await self._send([commands[i] for i in missing]), strict=True):
                replies[i] = reply
        return [self._error(reply) if isinstance(reply, Exception) else reply for reply in replies]

    async def _warn_if_evicting(self) -> None:
        """Say so, once, when this Redis may evict keys (as Sidekiq and BullMQ do).

        Every key of a job bridge writes expires, so a `volatile-*` policy takes them first: a done key
        evicted lets a duplicate run again, and a lease evicted lets a second worker run the
        job beside the first. With `noeviction`, a full Redis refuses writes instead, and
        keyed jobs wait for it as for an outage.
        """
        try:
            memory = await self._redis.info("memory")
        except ResponseError as exc:  # INFO not allowed here (some hosted Redis): no warning
            log.info("idempotency store %s: could not read its eviction policy: %s", safe_url(self.url), exc)
        except Exception:  # no answer (or no connection made): the pipeline after it says so as a
            return  # StoreError; look again next time
        else:
            policy, limit = memory.get("maxmemory_policy"), int(memory.get("maxmemory", 0))
            if limit and policy not in (None, "noeviction"):  # (a server like Redis may not say)
                log.warning(
                    "idempotency store %s: Redis evicts keys when it holds maxmemory (%d bytes), by"
                    " maxmemory-policy %s: an evicted key lets its job run again, or run twice at"
                    " once; set maxmemory-policy noeviction",
                    safe_url(self.url), limit, policy,
                )  # fmt: skip
        self._eviction_checked = True

    async def _send(self, commands: list[Callable[[Pipeline], object]]) -> list[Any]:
        with self._mapped():
            async with self._redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    command(pipe)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
                return replies

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        """Any failure of a call to Redis as a StoreError, for every caller of its batch."""
        try:
            yield
        except Exception as exc:  # RedisError, or a bug: either way a store error
            raise self._error(exc) from exc

    def _error(self, exc: Exception) -> StoreError:
        return StoreError(f"idempotency store {safe_url(self.url)}: {exc}")

    async def claim(self, key: str, job_id: str, lease_s: float, token: str | None = None) -> Claim:
        token = token or new_token()
        args = (f"running|{token}", _ms(lease_s))
        try:
            reply = await self._call(lambda pipe: pipe.evalsha(_CLAIM_SHA1, 1, key, *args))
        except asyncio.CancelledError:  # (its pipeline may be out: see GivenUp)
            self._given_up.release(key, token)
            raise
        if reply == 1:
            return Claimed(token)
        value, ttl_ms = reply
        if not _text(value).startswith("done|"):  # held: look once more, as SqlStore.claim does
            value, ttl_ms = await asyncio.gather(
                self._call(lambda p: p.get(key)), self._call(lambda p: p.pttl(key))
            )
            if value is None:  # it expired or was released just now: look again soon
                return Busy(0.0)
        state, _, rest = _text(value).partition("|")
        if state == "done":  # done|<job id>|<epoch ms>, and another producer's job id may hold a |
            return Done(rest.rpartition("|")[0])
        return Busy(max(0.0, ttl_ms / 1000))

    async def _swap(
        self, key: str, expected: str, new: str, px: int, words: Sequence[Any] = (), *, or_absent: bool
    ) -> Any:
        """_SWAP's reply: 1 if it swapped, 0 if `key` did not hold `expected`, or else the number
        and error of the first of the commands in `words` that failed."""
        args = [expected, new, px, "1" if or_absent else "0", *words]
        return await self._call(lambda pipe: pipe.evalsha(_SWAP_SHA1, 1, key, *args))

    async def _swap_if(self, key: str, expected: str, new: str, px: int, *, or_absent: bool = False) -> bool:
        """Whether `key` held `expected` (or, `or_absent`, nothing) and now holds `new`."""
        return bool(await self._swap(key, expected, new, px, or_absent=or_absent))

    async def extend(self, key: str, token: str, lease_s: float) -> bool:
        return await self._swap_if(key, f"running|{token}", f"running|{token}", _ms(lease_s))

    async def complete(self, key: str, token: str, job_id: str, window_s: float) -> bool:
        # (A claim that lapsed unrenewed, say while Redis was out of reach, and that nobody took
        # since, is still this job's to complete, as on the SQL stores: its effect happened.)
        return await self._swap_if(key, f"running|{token}", _done(job_id), _ms(window_s), or_absent=True)

    async def release(self, key: str, token: str) -> None:
        await self._swap_if(key, f"running|{token}", "", 0)

    @asynccontextmanager
    async def transaction(
        self, key: str, token: str, job_id: str, window_s: float
    ) -> AsyncIterator[Commands]:
        commands = Commands()
        yield commands
        reply = await self._swap(
            key, f"running|{token}", _done(job_id), _ms(window_s), commands.words, or_absent=True
        )
        if not reply:
            raise LeaseLost(f"the claim on {key!r} ended before the job completed; nothing was applied")
        if reply != 1:  # [number, error] of the command that failed
            self._failed(commands, int(reply[0]), _text(reply[1], errors="replace"))

    def _failed(self, commands: Commands, number: int, error: str) -> None:
        """Raise what the `number`th of the inbox's `commands` failing with `error` means."""
        failed = f"ctx.transaction(): db.call #{number} ({commands.name(number)}) failed: {error}"
        if error.split(" ", 1)[0] in UNAVAILABLE:
            raise self._error(ResponseError(error))
        if number > 1:  # (Retried, or even waiting for the store, the job applied them again each time.)
            raise Permanent(
                f"{failed}. The {number - 1} before it stay applied (Redis does not roll back a"
                " script), and the key is not done: the job is not retried, since a run again"
                " would apply them again, and so would a replay"
            )
        raise CommandFailed(f"{failed}; none was applied, and the key is not done")

    async def remember(self, key: str, job_id: str, hold_s: float) -> Enqueued | None:
        try:
            if await self._call(lambda pipe: pipe.set(key, f"enqueuing|{job_id}", nx=True, px=_ms(hold_s))):
                return None
        except asyncio.CancelledError:  # (its pipeline may be out: see GivenUp)
            self._given_up.forget(key, job_id)
            raise
        value = await self._call(lambda pipe: pipe.get(key))
        if value is None:  # it expired or was forgotten just now: the caller asks again
            return Enqueued("", confirmed=False)
        state, _, earlier = _text(value).partition("|")
        return Enqueued(earlier, state == "enqueued")

    async def confirm(self, key: str, job_id: str, window_s: float) -> bool:
        # (A hold that lapsed, and that no other enqueue took since, is still this job's, as on
        # the SQL stores: the job was published.)
        return await self._swap_if(
            key, f"enqueuing|{job_id}", f"enqueued|{job_id}", _ms(window_s), or_absent=True
        )

    async def forget(self, key: str, job_id: str) -> None:
        await self._swap_if(key, f"enqueuing|{job_id}", "", 0)

    async def inspect(self, key: str) -> Record | None:
        value, ttl_ms = await asyncio.gather(
            self._call(lambda pipe: pipe.get(key)), self._call(lambda pipe: pipe.pttl(key))
        )
        return _record(value, ttl_ms)

    async def records(self, prefix: str, state: str | None, limit: int) -> list[tuple[str, Record]]:
        # SCAN goes through the whole database a thousand keys at a time, between other clients'
        # commands; then the keys found are read, a thousand to a pipeline.
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"  # (the prefix's own globs escaped)
        with self._mapped():
            names = sorted({_text(name) async for name in self._redis.scan_iter(match=pattern, count=1000)})
        found: list[tuple[str, Record]] = []
        for start in range(0, len(names), SCAN_READ):
            chunk = names[start : start + SCAN_READ]
            with self._mapped():
                async with self._redis.pipeline(transaction=False) as pipe:
                    for name in chunk:
                        pipe.get(name)
                        pipe.pttl(name)
                    replies = await pipe.execute()
            for name, value, ttl_ms in zip(chunk, replies[::2], replies[1::2], strict=True):
                record = _record(value, ttl_ms)
                if record is not None and state in (None, record.state):
                    found.append((name, record))
                    if len(found) == limit:
                        return found
        return found

    async def drop(self, key: str, states: Sequence[str] = SETTLED) -> bool:
        return bool(await self._call(lambda pipe: pipe.evalsha(_DROP_SHA1, 1, key, *states)))

    async def close(self) -> None:
        await self._given_up.wait()
        await self._redis.aclose()
        await self._pool.disconnect()  # a pool given to Redis() is not closed with it


def unused(url: str) -> str | None:
    """Why the Redis database at `url` holds no worker's keys (`bridge keys`): no store has used
    it (a wrong db number, say), where it would answer "no record" for every key. A database
    that cannot be read is the store's to report, in its own words."""

    async def look() -> int:
        client = aioredis.Redis.from_url(
            url, socket_timeout=CALL_TIMEOUT_S, socket_connect_timeout=CALL_TIMEOUT_S
        )
        try:
            return int(await client.exists(MARKER))
        finally:
            await client.aclose()

    try:
        marked = asyncio.run(look())
    except Exception:  # (redis-py's errors, OSError, ...: the store's first call says why)
        return None
    return None if marked else f"{safe_url(url)} holds no key of bridge's: no worker has used this database"


def _record(value: bytes | str | None, ttl_ms: int) -> Record | None:
    """A key's record from its value and its PTTL; None if it is gone (-2: it expired between)."""
    if value is None or ttl_ms < 0:
        return None
    state, _, rest = _text(value).partition("|")
    expires_ms = time.time_ns() // 1_000_000 + ttl_ms
    if state == DONE:  # done|<job id>|<epoch ms>
        job_id, _, done_ms = rest.rpartition("|")
        return Record(state, job_id, expires_ms, int(done_ms))
    # running|<token> names no job; enqueuing|<job id> and enqueued|<job id> do
    return Record(state, "" if state == RUNNING else rest, expires_ms)


def _done(job_id: str) -> str:
    return f"done|{job_id}|{time.time_ns() // 1_000_000}"


def _text(value: bytes | str, errors: str = "strict") -> str:
    return value.decode(errors=errors) if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
