"""Dead-letter queues: list, show, replay and purge, the same on every broker.

A letter is known by its job id, or, for bytes that never decoded here, by `raw-` and a hash
of them. Replay puts the job back on its queue with its attempts reset, its delay and expiry
cleared and its replay count raised; a job replayed `max_replays` times is refused, so a
poison job cannot cycle between queue and dead-letter queue for ever. A delayed job that RabbitMQ
kept as it is, not in a letter, when its queue was gone (`<prefix>.delay.dlq`) goes back as it
was, its expiry dropped if passed and its replay count raised.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Collection
from contextlib import suppress
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from bridge import codec
from bridge.config import LARGEST_LETTER_BYTES
from bridge.envelope import LONGEST_S, MAX_INT, UNROUTABLE, DeadLetter, Envelope, now_ms
from bridge.errors import BridgeError, ConfigError, DecodeError, RegistryUnavailable, UnknownSchema
from bridge.names import is_dead_letters, job_queue_of, name_problem
from bridge.registry import DEAD_LETTER, ENVELOPE, own_schema
from bridge.transports.base import Outgoing, SweepStopped, dlq_name, tier_names

if TYPE_CHECKING:
    from bridge.app import Bridge

UNREADABLE = "unreadable"  # a letter this process cannot decode, though a worker wrote it

DEFAULT_MAX_REPLAYS = 3


@dataclass(frozen=True)
class Letter:
    """One dead letter and the id it is known by."""

    id: str
    letter: DeadLetter
    as_it_is: bool = False  # a delayed job that no queue took when due, put back as it was (`read`)


@dataclass(frozen=True)
class Selection:
    """Which letters a command acts on: by id (None: all), type, reason and time (epoch ms)."""

    ids: Collection[str] | None = None
    type: str | None = None
    reason: str | None = None
    since_ms: int | None = None

    def __contains__(self, item: Letter) -> bool:
        envelope = item.letter.envelope
        return (
            (self.ids is None or item.id in self.ids)
            and (self.type is None or (envelope is not None and envelope.type == self.type))
            and (self.reason is None or item.letter.reason == self.reason)
            and (self.since_ms is None or item.letter.at >= self.since_ms)
        )


# Told of each letter as a replay acts on it: what ("replayed", "refused" or "copy"), its id,
# and why (for "refused"). A job is told replayed once it is back on its queue, so a replay
# stopped halfway has told of every job it put back, and of no other.
Told = Callable[[str, str, str], None]


@dataclass
class ReplayReport:
    """What a replay did, or with `dry_run` would do."""

    replayed: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (id, why)
    # Letters of a job replayed earlier in the same run, at the same attempt and replay count
    # (a dead letter written twice, its ack lost): removed, not replayed, so the job runs once.
    copies: list[str] = field(default_factory=list)
    told: Told | None = field(default=None, repr=False, compare=False)

    def add(self, what: str, letter_id: str, why: str = "") -> None:
        if what == "refused":
            self.refused.append((letter_id, why))
        else:
            (self.replayed if what == "replayed" else self.copies).append(letter_id)
        if self.told is not None:
            self.told(what, letter_id, why)


class DeadLetters:
    """The dead-letter queue of `queue` in `app`."""

    def __init__(self, app: Bridge, queue: str) -> None:
        if is_dead_letters(queue):
            raise ConfigError(
                f"{queue} is a dead-letter queue: the dlq commands take the job queue's name: "
                f"{job_queue_of(queue)}"
            )
        if problem := name_problem(queue):
            raise ConfigError(problem)
        self.app = app
        self.queue = queue
        self.name = dlq_name(queue)
        self._registry_down = False  # (see `_job_in`)
        self._in_a_tier = bool(tier_names(app.settings.prefix).fullmatch(queue))  # (Kafka's `<tier>.dlq`)

    async def find(self, selection: Selection = Selection(), limit: int | None = None) -> list[Letter]:
        """The letters matching `selection`, oldest first, at most `limit`."""
        transport = await self.app.transport()
        letters = [self.read(body) for body in await transport.browse(self.name)]
        # Oldest first across partitions too (a Kafka topic is ordered per partition only).
        matching = sorted((letter for letter in letters if letter in selection), key=lambda i: i.letter.at)
        return matching[:limit] if limit is not None else matching

    async def show(self, letter_id: str) -> Letter:
        """The letter `letter_id`, or BridgeError naming the queue."""
        found = await self.find(Selection(ids={letter_id}), limit=1)
        if not found:
            raise BridgeError(f"no dead letter {letter_id} in {self.name}")
        return found[0]

    async def replay(
        self,
        selection: Selection,
        *,
        dry_run: bool = False,
        rate: float | None = None,
        max_replays: int = DEFAULT_MAX_REPLAYS,
        report: ReplayReport | None = None,
        stop: asyncio.Event | None = None,
    ) -> ReplayReport:
        """Put the selected jobs back on their queues (at most `rate` per second).

        Fills `report` (a new one if None) as it goes. Once `stop` is set, the job in hand is
        put back, or not, and no other: a pause for `rate` ends there, and nothing goes back."""
        if rate is not None and not 0 < rate < math.inf:
            raise ConfigError(f"rate must be a number of replays per second above 0, not {rate!r}")
        if type(max_replays) is not int or not 1 <= max_replays <= MAX_INT:  # (not True either)
            # (a job replayed 2**31 - 1 times would be replayed with a count no reader takes)
            raise ConfigError(
                f"max_replays must be a whole number from 1 to {MAX_INT:,}, not {max_replays!r}"
            )
        report = report if report is not None else ReplayReport()
        replayed: set[tuple[str, int, int]] = set()  # (id, attempt, replays) of each job put back
        put_back: dict[str, int] = {}  # their ids, and the replay count each went back with
        offered: list[tuple[str, str]] = []  # what the letter last offered becomes once removed
        stop = stop if stop is not None else asyncio.Event()

        async def decide(body: bytes, key: str | bytes | None) -> list[Outgoing] | None:
            if stop.is_set():
                raise SweepStopped
            item = self.read(body)
            if item not in selection:
                return None
            envelope = item.letter.envelope
            if envelope is not None and (item.id, envelope.attempt, envelope.replays) in replayed:
                offered[:] = [("copy", item.id)]
                return []
            if envelope is not None and envelope.replays >= put_back.get(item.id, MAX_INT + 1):
                # A job put back by this run that failed again meanwhile: its new letter is left
                # for the next run (RabbitMQ's sweep takes letters until none is left). Told by
                # its replay count, not its time: the workers' clocks may be behind this host's.
                return None
            refusal = _refusal(item, max_replays) or await self._no_queue(item)
            if refusal:
                report.add("refused", item.id, refusal)
                return None
            assert envelope is not None  # (`_refusal` refused it otherwise)
            if rate and not dry_run:
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1 / rate)
                    raise SweepStopped
            offered[:] = [("replayed", item.id)]
            replayed.add((item.id, envelope.attempt, envelope.replays))
            put_back[item.id] = envelope.replays + 1
            return [self._replayed(item, key, body)]

        def removed() -> None:
            report.add(*offered.pop())

        if dry_run:
            with suppress(SweepStopped):
                for body in await (await self.app.transport()).browse(self.name):
                    if await decide(body, None) is not None:
                        removed()
        else:
            await (await self.app.transport()).sweep(self.name, decide, removed)
        return report

    async def purge(
        self,
        selection: Selection,
        told: Callable[[str], None] | None = None,
        stop: asyncio.Event | None = None,
    ) -> list[str]:
        """Remove the selected letters for good, telling `told` of each once it is gone, and
        none after `stop` is set; return their ids."""
        purged: list[str] = []
        offered: list[str] = []

        async def decide(body: bytes, key: str | bytes | None) -> list[Outgoing] | None:
            if stop is not None and stop.is_set():
                raise SweepStopped
            item = self.read(body)
            if item not in selection:
                return None
            offered[:] = [item.id]
            return []

        def removed() -> None:
            purged.append(offered.pop())
            if told is not None:
                told(purged[-1])

        await (await self.app.transport()).sweep(self.name, decide, removed)
        return purged

    def read(self, body: bytes) -> Letter:
        """A letter from its bytes; bytes that are not a dead letter are shown as undecodable,
        and a letter in a schema unknown here (a registry's id, say) as `unreadable`. A letter
        of bytes its worker could not read holds their job too when this process reads it. A job
        as it is, not in a letter, is `unroutable`: on RabbitMQ, `<prefix>.delay.dlq` keeps so the
        delayed jobs whose queue was gone when they were due.

        Any size a worker may write is read: workers with a larger `max_message_bytes` than
        this process's write larger letters, which a purge of `undecodable` must not select."""
        try:
            schema = self.app.registry.schema(DEAD_LETTER)
            _, record = codec.decode(body, self.app.registry, schema, max_bytes=LARGEST_LETTER_BYTES)
            letter = DeadLetter.from_avro(record)
        except UnknownSchema as exc:  # (a worker's letter: not `undecodable`, which a purge may select)
            detail = f"written in a schema unknown here ({exc}): read it with the workers' --registry"
            letter = DeadLetter(UNREADABLE, detail, self.name, 0, raw=body)
        except DecodeError as exc:
            if (job := self._job_in(body)) is not None:
                return self._as_it_is(job)
            letter = DeadLetter("undecodable", f"not a {DEAD_LETTER}: {exc}", self.name, 0, raw=body)
        else:
            if letter.envelope is None and letter.raw is not None:
                letter = replace(letter, envelope=self._job_in(letter.raw))
        if letter.envelope is not None:
            # On Kafka a delay tier's `.dlq` holds the delayed jobs no queue took when due
            # (`unroutable`), as RabbitMQ's `<prefix>.delay.dlq` keeps them as they are.
            delayed = letter.reason == UNROUTABLE and self._in_a_tier
            return Letter(letter.envelope.id, letter, as_it_is=delayed)
        return Letter(f"raw-{hashlib.sha256(letter.raw or body).hexdigest()[:16]}", letter)

    def _as_it_is(self, job: Envelope) -> Letter:
        """The letter of a job found as it is, not in a letter: on RabbitMQ, `<prefix>.delay.dlq`
        keeps so the delayed jobs no queue took when they were due, which a replay puts back as
        they were (see `_replayed`); in any other queue, another producer put it there."""
        delayed = self.name == dlq_name(f"{self.app.settings.prefix}.delay")
        if delayed:
            detail = f"a delayed job that no queue {job.queue!r} took when it was due"
        else:
            detail = f"a job for queue {job.queue!r}, put here as it is, not in a dead letter"
        letter = DeadLetter(UNROUTABLE, detail, self.name, job.run_at or job.created_at, envelope=job)
        return Letter(job.id, letter, as_it_is=delayed)

    def _job_in(self, raw: bytes) -> Envelope | None:
        """The job in bytes its worker could not read, if this process reads them: one framed
        with a registry's id, say, by another service, and read here with that registry. (It
        can then be replayed; else nothing but a script of one's own would ever get it back.)"""
        if self._registry_down:
            return None
        try:
            schema = self.app.registry.schema(ENVELOPE)
            _, record = codec.decode(raw, self.app.registry, schema, max_bytes=LARGEST_LETTER_BYTES)
        except DecodeError:
            return None
        except RegistryUnavailable:  # (not asked again for each letter: each would wait as long)
            self._registry_down = True
            return None
        return Envelope.from_avro(record)

    async def _no_queue(self, item: Letter) -> str | None:
        """Why the job cannot go back to its queue, if it cannot: the queue its envelope names
        (another producer's, maybe the reason it is here) does not exist, or is no queue."""
        envelope = item.letter.envelope
        assert envelope is not None  # (`_refusal` refused it otherwise)
        if await (await self.app.transport()).missing([envelope.queue]):
            return (
                f"its queue {envelope.queue!r} does not exist or is no queue: create it "
                "(`bridge topology apply`), or purge the letter"
            )
        return None

    def _replayed(self, item: Letter, key: str | bytes | None, letter: bytes) -> Outgoing:
        """The job back on its queue, with its envelope's key, or else with the record key its
        letter kept (the source record's: another producer may set only that one).

        Framed as the worker that wrote the `letter` frames: a letter in single-object framing
        (a worker with a schema directory) gets its envelope so too. (With a registry's id, a
        replay by a tool given a registry URL came back to those workers as `unknown_schema`,
        raw bytes that no replay takes.)"""
        envelope = item.letter.envelope
        assert envelope is not None
        if item.as_it_is:  # (it never ran: it goes back as it was, due when it was, counted)
            expires_at = envelope.expires_at if (envelope.expires_at or 0) > now_ms() else None
            fresh = replace(envelope, expires_at=expires_at, replays=envelope.replays + 1)
        else:
            # A `run_at` still ahead is kept: a job dead-lettered before it was due (of a type
            # no worker knew then, say) ran at once when replayed, days early.
            # (Not one past any delay bridge takes, a time in µs from another producer, say:
            # its every replay was dead-lettered again, a replay spent each time.)
            ahead_ms = (envelope.run_at or 0) - now_ms()
            run_at = envelope.run_at if 0 < ahead_ms <= LONGEST_S * 1000 else None
            fresh = replace(envelope, attempt=1, run_at=run_at, expires_at=None, replays=envelope.replays + 1)
        single = letter.startswith(codec.SINGLE_OBJECT_MAGIC)
        schema = own_schema(ENVELOPE) if single else self.app.registry.schema(ENVELOPE)
        body = codec.encode(schema, fresh.to_avro())
        return Outgoing(fresh.queue, body, fresh.key if fresh.key is not None else key)


def _refusal(item: Letter, max_replays: int) -> str | None:
    envelope = item.letter.envelope
    if item.letter.reason == UNREADABLE:
        return "its schema is unknown here; replay it with the registry its workers use (--registry)"
    if envelope is None:
        return (
            "its bytes never decoded as a job here: replay it with a --registry that reads them,"
            " or fix the producer, then purge it"
        )
    if envelope.replays >= MAX_INT:  # (one more is more than an Avro int: no reader would read it)
        return f"already replayed {envelope.replays:,} times, as many as a job can count; purge it"
    # (A delayed job kept as it is never failed, so no limit holds it back. Its count is still
    # raised: a replay run tells the jobs it put back, and any that return, by their counts.)
    if envelope.replays >= max_replays and not item.as_it_is:
        limit = f"the limit is {max_replays}"
        return f"already replayed {envelope.replays} times ({limit}); purge it or fix the handler"
    return None


def describe(app: Bridge, item: Letter) -> dict[str, Any]:
    """A letter as plain data for people and JSON: payload decoded when its schema is known."""
    letter = item.letter
    # (`at` is None for bytes that never decoded: when they were written is not known)
    out: dict[str, Any] = {
        "id": item.id, "reason": letter.reason, "detail": letter.detail, "queue": letter.queue,
        "partition": letter.partition, "offset": letter.offset,
        "consumer_group": letter.consumer_group, "at": letter.at or None,
    }  # fmt: skip
    envelope = letter.envelope
    if envelope is None:
        out["raw"] = (letter.raw or b"").hex()
        return out
    out["job"] = {
        "type": envelope.type, "queue": envelope.queue, "key": envelope.key,
        "attempt": envelope.attempt, "replays": envelope.replays, "created_at": envelope.created_at,
        "headers": envelope.headers, "payload": _payload(app, envelope.type, envelope.payload),
        "errors": [asdict(error) for error in envelope.errors],
    }  # fmt: skip
    return out


def _payload(app: Bridge, job_type: str, payload: bytes) -> Any:
    try:
        largest = app.settings.max_message_bytes
        return codec.decode(payload, app.registry, app.registry.schema(job_type), max_bytes=largest)[1]
    except BridgeError as exc:
        return {"undecoded": payload.hex(), "why": str(exc)}
