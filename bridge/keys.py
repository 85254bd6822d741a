"""An operator's look at idempotency keys: `bridge keys show`, `list` and `forget`.

An idempotency key of a job type has up to two records in the store: the run's (a job holds
the key while it runs, then the key is done for the window) and, for dedupe on enqueue, the
enqueue's. Forgetting a key deletes both, so that its next job runs and its next enqueue
publishes: to run a job again after fixing what its handler did, say. A record of a job or a
publish under way is kept unless forced: forgetting it would let a copy run beside it.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge.envelope import iso_ms
from bridge.errors import ConfigError, KeyInFlight
from bridge.idempotency import (
    DIGEST,
    DONE,
    ENQUEUED,
    ENQUEUING,
    IN_FLIGHT,
    RUNNING,
    SETTLED,
    STATES,
    Record,
    enqueue_key,
    run_key,
)

if TYPE_CHECKING:
    from bridge.app import Bridge
    from bridge.idempotency import Store


KINDS = {"run": (RUNNING, DONE), "enqueue": (ENQUEUING, ENQUEUED)}  # a record's kind: its states
DEFAULT_LIMIT = 100
EVERY = 2**62  # a limit no store reaches
DROPS_AT_ONCE = 1000
JOB_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # an Avro full name


@dataclass(frozen=True)
class Entry:
    """One record of a key: the key, its `kind` ("run" or "enqueue") and what the store holds.

    A key longer than MAX_KEY_CHARS, or with a NUL, is kept (and listed) by its digest."""

    key: str
    kind: str
    record: Record

    def describe(self) -> str:
        """The record in a line, for people."""
        record, until = self.record, iso_ms(self.record.expires_ms, timespec="seconds")
        job = f"job {record.job_id}" if record.job_id else "a worker"
        if record.state == RUNNING:
            return f"running: {job} holds it; its lease ends {until} unless renewed"
        if record.state == DONE:
            at = f" at {iso_ms(record.done_ms, timespec='seconds')}" if record.done_ms is not None else ""
            return f"done by {job}{at}; a job with this key is skipped until {until}"
        if record.state == ENQUEUING:
            return f"enqueuing: {job} is being published; its hold ends {until}"
        if record.state == ENQUEUED:
            return f"enqueued as {job}; an enqueue with dedupe publishes nothing until {until}"
        return f"{record.state}: {job}, until {until}"  # (a state from a later bridge)


class Keys:
    """The idempotency keys of `job_type` in an app's store (`app.idempotency_keys(type)`)."""

    def __init__(self, app: Bridge, job_type: str) -> None:
        check_job_type(job_type)
        self.app = app
        self.job_type = job_type

    def _names(self, key: str, *, stored: bool = False) -> dict[str, str]:
        """The store's names of `key`'s records (with `stored`, of `key` as the store holds it)."""
        return {
            "run": run_key(self.job_type, key, stored=stored),
            "enqueue": enqueue_key(self.job_type, key, stored=stored),
        }

    async def _held(self, store: Store, key: str) -> list[tuple[str, Entry]]:
        """`key`'s records that count now, each with its name in the store. A key written as a
        digest has two sets: its own, and those of the key that `find` lists as that digest (a
        long one, or one with a NUL)."""
        held = []
        for stored in (False, True) if DIGEST.fullmatch(key) else (False,):
            for kind, name in self._names(key, stored=stored).items():
                if (record := await store.inspect(name)) is not None:
                    held.append((name, Entry(key, kind, record)))
        return held

    async def find(self, state: str | None = None, limit: int = DEFAULT_LIMIT) -> list[Entry]:
        """The records of this job type's keys that count now, of `state` if given: the first
        `limit` in the store's order of names, sorted by key. (The store reads them all for it.)"""
        store = await self.app.idempotency_store()
        limit = min(limit, EVERY)  # (SQLite takes no larger number)
        entries: list[Entry] = []
        for kind, states in KINDS.items():
            if state is None or state in states:
                prefix = self._names("")[kind]
                found = await store.records(prefix, state, limit)
                entries += [Entry(name.removeprefix(prefix), kind, record) for name, record in found]
        return sorted(entries, key=lambda entry: (entry.key, entry.kind))[:limit]

    async def show(self, key: str) -> list[Entry]:
        """`key`'s records that count now; none if no job or enqueue used it within its window."""
        return [entry for _, entry in await self._held(await self.app.idempotency_store(), key)]

    async def forget(self, key: str, *, force: bool = False) -> list[Entry]:
        """Delete `key`'s records, so that its next job runs and its next enqueue publishes;
        the records deleted. Raises KeyInFlight, deleting nothing, when a job or a publish of
        it is under way, unless `force`."""
        store = await self.app.idempotency_store()
        held = await self._held(store, key)
        busy = [entry for _, entry in held if entry.record.state in IN_FLIGHT]
        if busy and not force:
            raise KeyInFlight(
                f"idempotency key {key!r} of {self.job_type}: {busy[0].describe()}. Forgetting it "
                "now would let another job with it run beside that one: wait for it to end, or "
                "force it (--force)"
            )
        return [entry for name, entry in held if await store.drop(name, STATES if force else SETTLED)]

    async def forget_all(
        self, state: str | None = None, *, force: bool = False
    ) -> tuple[list[Entry], list[Entry], list[Entry]]:
        """Delete the records of every key of this job type that counts now (of `state` if
        given), each only if it is still in the state it was listed in. Returns those deleted;
        those left because a job or a publish of theirs is under way (unless `force`); and those
        that changed after they were listed (a job took the key, or it ended), also left."""
        store = await self.app.idempotency_store()
        entries = await self.find(state, limit=EVERY)
        chosen, left = entries, []
        if not force:
            chosen = [entry for entry in entries if entry.record.state not in IN_FLIGHT]
            left = [entry for entry in entries if entry.record.state in IN_FLIGHT]
        forgotten: list[Entry] = []
        changed: list[Entry] = []
        for start in range(0, len(chosen), DROPS_AT_ONCE):  # (a store batches the drops of a tick)
            batch = chosen[start : start + DROPS_AT_ONCE]
            dropped = await asyncio.gather(*(self._drop_as_listed(store, entry) for entry in batch))
            for entry, gone in zip(batch, dropped, strict=True):
                (forgotten if gone else changed).append(entry)
        return forgotten, left, changed

    async def _drop_as_listed(self, store: Store, entry: Entry) -> bool:
        name = self._names("")[entry.kind] + entry.key  # (the key as stored: a long one's digest)
        return await store.drop(name, (entry.record.state,))


def check_job_type(name: str) -> None:
    """Raise ConfigError unless `name` is a record's full name: a store names a key's record
    `run:<type>:<key>`, so `billing.ChargeCard:tenant` reached billing.ChargeCard's keys."""
    if not JOB_TYPE.fullmatch(name):
        raise ConfigError(f"job type {name!r}: give a record's full name, e.g. billing.ChargeCard")
