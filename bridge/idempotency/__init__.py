"""Idempotency keys: where a key is claimed before its job runs and marked done after.

A key's life, as the worker drives it:

    claim(key, job_id, lease_s) ──► Claimed(token) ──► handler ──► complete(...)  key done for window_s
                                 │                           └──► release(...)   failed: a retry may claim
                                 ├─► Done(job_id)   a duplicate: acknowledged without running
                                 └─► Busy(wait_s)   another worker holds it: the job waits in a delay tier

A claim is a lease: a worker that dies holding a key loses it when the lease ends, and the
worker renews the leases it holds while their handlers run. `transaction()` is the inbox: the
handler's own writes and the key's completion commit together in the store's database.

Stores are chosen by URL: `sqlite:///path` (the default, one host), `postgresql://...` and
`redis://...` (many hosts), `memory://` (tests in one process). Every store keeps the same
contract (tests/test_idempotency.py runs it on each).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from bridge.errors import ConfigError, StoreError, safe_url

DEFAULT_WINDOW_S = 24 * 3600.0
DEFAULT_LEASE_S = 60.0
MAX_KEY_CHARS = 200  # longer idempotency keys are stored by their digest (`_storable`)
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # how the store holds such a key, and `bridge keys` lists it
SCHEMES = ("sqlite", "postgresql", "postgres", "redis", "rediss", "memory")


@dataclass(frozen=True, slots=True)
class Claimed:
    """The key is this worker's until `complete` or `release` (or its lease ends)."""

    token: str


@dataclass(frozen=True, slots=True)
class Done:
    """A job with this key already succeeded within the window."""

    job_id: str


@dataclass(frozen=True, slots=True)
class Busy:
    """Another worker holds the key; its lease ends in `wait_s` unless renewed."""

    wait_s: float


Claim = Claimed | Done | Busy
# The states a key's record can be in: a job holds it (its lease), or one succeeded (the
# window); for dedupe on enqueue, a publish is out (its hold), or it was confirmed (the window).
RUNNING, DONE, ENQUEUING, ENQUEUED = "running", "done", "enqueuing", "enqueued"
STATES = (RUNNING, DONE, ENQUEUING, ENQUEUED)
IN_FLIGHT = (RUNNING, ENQUEUING)  # a job or a publish under way
SETTLED = (DONE, ENQUEUED)  # what `drop` deletes unless told otherwise


@dataclass(frozen=True, slots=True)
class Enqueued:
    """A job enqueued under the key: its publish `confirmed` within the window, or not yet."""

    job_id: str
    confirmed: bool


@dataclass(frozen=True, slots=True)
class Record:
    """What a store holds for a key, as `bridge keys show` tells it."""

    state: str  # RUNNING, DONE, ENQUEUING or ENQUEUED
    job_id: str  # the job that holds, completed or enqueued it ("" where the store keeps none)
    expires_ms: int  # epoch ms when it stops counting: the lease's, the hold's or the window's end
    done_ms: int | None = None  # epoch ms of the success, for DONE


class Store(Protocol):
    """Where idempotency keys are claimed, completed, released and remembered."""

    url: str

    async def claim(self, key: str, job_id: str, lease_s: float, token: str | None = None) -> Claim:
        """Take `key` for `job_id` for `lease_s` seconds, unless it is done or held: held by
        `token` (a claim of the same job whose answer was lost) counts as taken, renewed.
        Without a token, a new one."""
        ...

    async def extend(self, key: str, token: str, lease_s: float) -> bool:
        """Renew a held claim for `lease_s` more seconds; whether it was still ours."""
        ...

    async def complete(self, key: str, token: str, job_id: str, window_s: float) -> bool:
        """Mark `key` done by `job_id` for `window_s` seconds; whether the claim was still ours."""
        ...

    async def release(self, key: str, token: str) -> None:
        """Give a claim back (the job failed) so that another attempt may take it."""
        ...

    def transaction(
        self, key: str, token: str, job_id: str, window_s: float
    ) -> AbstractAsyncContextManager[Any]:
        """The inbox: a transaction of the store's database in which the key completes too.

        Yields the database's own handle; on a clean exit the key is marked done in the same
        transaction, which then commits. Raises LeaseLost (and rolls back) if the claim ended.
        """
        ...

    async def remember(self, key: str, job_id: str, hold_s: float) -> Enqueued | None:
        """Record that `job_id` is being enqueued under `key`, for `hold_s` unless `confirmed`
        (or `forget`); the earlier job if there is one."""
        ...

    async def confirm(self, key: str, job_id: str, window_s: float) -> bool:
        """`job_id`'s publish under `key` was confirmed: it counts for `window_s` from now.
        False if its hold had ended (another enqueue may have published the job again)."""
        ...

    async def forget(self, key: str, job_id: str) -> None:
        """Undo `remember` (the publish failed), so that the next enqueue publishes."""
        ...

    async def inspect(self, key: str) -> Record | None:
        """What the store holds for `key` now; None when nothing counts (never seen, or ended)."""
        ...

    async def records(self, prefix: str, state: str | None, limit: int) -> list[tuple[str, Record]]:
        """The first `limit` keys starting with `prefix` whose records count now (of `state` if
        given), by name, and what each holds: `bridge keys list`."""
        ...

    async def drop(self, key: str, states: Sequence[str] = SETTLED) -> bool:
        """Delete `key`'s record if it is in one of `states` (of STATES), so that its next job
        runs (or its next enqueue publishes); whether one went. By default not while a job or a
        publish is under way: its copy would run beside it."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


# What PostgreSQL and Redis answer to a client whose URL they refuse (a wrong password, user or
# database): no wait cures it. (Matched in their messages: libpq has no SQLSTATE for a refused
# connection. A server starting up, or one with every connection taken, is not among them.)
REFUSALS = (
    "password authentication failed", "no pg_hba.conf entry", "does not exist", "permission denied",
    "WRONGPASS", "NOAUTH", "invalid password", "invalid username-password", "DB index is out of range",
)  # fmt: skip


def refuses_for_good(error: StoreError) -> bool:
    """Whether `error` is the store refusing this client's settings, not a store away."""
    return any(refusal in str(error) for refusal in REFUSALS)


def new_token() -> str:
    """A claim's token: 96 random bits (os.urandom; uuid4 cost a tenth of a keyed Kafka job)."""
    return os.urandom(12).hex()


def run_key(job_type: str, key: str, *, stored: bool = False) -> str:
    """The store key of an idempotency key at run time: keys are per job type. With `stored`,
    `key` is as the store holds it already (a digest that `bridge keys list` showed)."""
    return f"run:{job_type}:{key if stored else _storable(key)}"


def enqueue_key(job_type: str, key: str, *, stored: bool = False) -> str:
    """The store key that dedupes enqueues of `key` (kept apart from the run-time key)."""
    return f"enqueue:{job_type}:{key if stored else _storable(key)}"


def _storable(key: str) -> str:
    """`key` as every store can hold it: a long key, or one with a NUL, by its SHA-256.

    An idempotency key is any string, and may come from a producer in another language. A
    PostgreSQL index entry holds about 2,700 bytes and its text no NUL at all: a key it refused
    would fail every claim, and its job would wait for the store as if the store were down.
    A key that looks like such a digest is hashed too: as it is, it would share the record of
    the long key it is the digest of, and one of their jobs would be skipped as the other's copy.
    """
    if (
        len(key) <= MAX_KEY_CHARS
        and "\x00" not in key
        and not (key.startswith("sha256:") and DIGEST.fullmatch(key))
    ):
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def default_url() -> str:
    """`sqlite:///` in bridge's data folder (BRIDGE_DATA, else XDG_DATA_HOME/bridge)."""
    from bridge.dev._common import data_root

    return f"sqlite://{data_root() / 'idempotency.db'}"  # (an absolute path: its own / is the third)


def open_store(url: str, *, pool_size: int = 16) -> Store:
    """The store for `url`; its vendor module is imported only here."""
    scheme = url.partition("://")[0]
    if scheme == "sqlite":
        from bridge.idempotency.sqlite import SqliteStore

        return SqliteStore(url)
    if scheme in ("postgresql", "postgres"):
        _require("psycopg", "postgres")
        from bridge.idempotency.postgres import PostgresStore

        return PostgresStore(url, pool_size=pool_size)
    if scheme in ("redis", "rediss"):
        _require("redis", "redis")
        from bridge.idempotency.redis import RedisStore

        return RedisStore(url)
    if scheme == "memory":
        from bridge.idempotency.memory import MemoryStore

        return MemoryStore()
    raise ConfigError(
        f"idempotency store {safe_url(url)!r}: use sqlite:///path, postgresql://..., redis://... or memory://"
    )


def check_url(url: str) -> list[str]:
    """Problems with a store URL, for settings validation."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        return [
            f"idempotency {safe_url(url)!r}: use sqlite:///path, postgresql://..., redis://... or memory://"
        ]
    if scheme == "sqlite" and not rest.startswith("/"):
        return [f"idempotency {url!r}: a sqlite URL needs an absolute path, sqlite:///var/lib/bridge/keys.db"]
    if scheme == "sqlite" and "?" in rest:  # (the file was made with the options in its name)
        return [f"idempotency {url!r}: a sqlite URL takes a path and no options (?...)"]
    if scheme == "sqlite":
        from bridge.idempotency.sqlite import path_problem

        problem = path_problem(Path(rest))
        return [f"idempotency {url!r}: {problem}; give a database file's path"] if problem else []
    problem = _unparsable(scheme, url)
    return [f"idempotency {safe_url(url)!r}: {problem}"] if problem else []


REDIS_TIMEOUTS = ("socket_timeout", "socket_connect_timeout")


def _unparsable(scheme: str, url: str) -> str | None:
    """What the store's client finds wrong with `url` without connecting (an option's value,
    a port that is no number), or that the client is not installed: else it would be found
    only at the first keyed job, which would wait for the store for good."""
    ports: list[str] = []
    timeouts: dict[str, Any] = {}
    try:
        if scheme in ("redis", "rediss"):
            from redis.asyncio import ConnectionPool

            parts = urlsplit(url)
            try:
                port = parts.port
            except ValueError:  # (no number, or out of range)
                return "its port must be a number from 1 to 65535"
            ports = [] if port is None else [str(port)]  # (redis-py takes port 0 for none: 6379)
            if not re.fullmatch(r"/?\d*", unquote(parts.path)):  # (redis-py took /abc for 0)
                return "its path must be a database number (redis://host:6379/0), or none"
            pool = ConnectionPool.from_url(url)
            pool.make_connection()  # type: ignore[no-untyped-call]  # (no I/O; TypeError: an option it lacks)
            options = pool.connection_kwargs
            timeouts = {name: options[name] for name in REDIS_TIMEOUTS if name in options}
        elif scheme in ("postgresql", "postgres"):
            from psycopg.conninfo import conninfo_to_dict

            options = conninfo_to_dict(url)
            ports = str(options.get("port", "")).split(",")  # (one per host)
            if "connect_timeout" in options:
                timeouts["connect_timeout"] = options["connect_timeout"]
            for name, allowed in LIBPQ_CHOICES.items():  # (libpq checks them only as it connects)
                if name in options and options[name] not in allowed:
                    return f"its {name} must be one of {', '.join(allowed)}, not {options[name]!r}"
    except ImportError:  # (found only at the first keyed job, it sent each round the tiers for good)
        return _needs("redis", "redis") if scheme.startswith("redis") else _needs("psycopg", "postgres")
    except Exception as exc:  # ValueError from redis or urlsplit, ProgrammingError from psycopg
        # (libpq's messages end in a newline)
        return (
            str(exc).strip()
            if not isinstance(exc, TypeError)
            else f"an option redis-py does not take ({exc})"
        )
    if any(port and not (port.isdigit() and 1 <= int(port) <= 65535) for port in ports):
        # (libpq checks a port only as it connects: every claim failed, as in an outage)
        return "its port must be a number from 1 to 65535"
    for name, value in timeouts.items():
        # (0 or less: libpq waited for a connection without end, and redis-py's every read
        # timed out at once, an outage that never ended: keyed jobs waited for good)
        if value is not None and not _seconds(value):
            return f"its {name} must be a number of seconds above 0, not {value!r}"
    return None


# Options libpq takes only from a list, and checks only as it connects (libpq 17's).
LIBPQ_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
}


def _seconds(value: Any) -> bool:
    """Whether `value` is a finite number above 0 (psycopg refused 1e9999 as it connected)."""
    try:
        return 0 < float(value) < math.inf
    except (TypeError, ValueError):
        return False


def _require(module: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(_needs(module, extra)) from None


def _needs(module: str, extra: str) -> str:
    return f"the {extra} idempotency store needs {module}: pip install 'bridge-jobs[{extra}]'"


__all__ = [
    "DEFAULT_LEASE_S",
    "DEFAULT_WINDOW_S",
    "Busy",
    "Claim",
    "Claimed",
    "Done",
    "Record",
    "Store",
    "default_url",
    "enqueue_key",
    "new_token",
    "open_store",
    "run_key",
]
