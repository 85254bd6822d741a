"""The job envelope and the dead letter, as typed records (schemas/bridge.*.avsc).

Pure: times are integers in milliseconds since the epoch, as on the wire, and `now_ms` is
passed in by the caller.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

UNROUTABLE = "unroutable"  # a job or delay-tier record naming no queue that exists to go to
DELIVERY_LIMIT = "delivery_limit"  # came back unsettled too often (its worker kept stopping)
REASONS = (
    "exhausted",
    "permanent",
    "expired",
    "undecodable",
    "unknown_type",
    "schema_mismatch",
    "unknown_schema",
    UNROUTABLE,
    DELIVERY_LIMIT,
)


_last_uuid7 = (-1, 0)  # the millisecond and the 74 random bits of the process's last UUIDv7
_uuid7_lock = threading.Lock()


def _forked() -> None:
    """A forked child starts from fresh random bits: going on from its parent's, the two would
    make the same ids in the same millisecond."""
    global _last_uuid7, _uuid7_lock
    _last_uuid7, _uuid7_lock = (-1, 0), threading.Lock()


os.register_at_fork(after_in_child=_forked)


def uuid7(now_ms: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits; sorts by time.

    Within one millisecond the process's ids go up by one from the first one's random bits
    (RFC 9562's monotonic random, method 2), so that the jobs one process enqueues sort in
    the order it enqueued them.
    """
    global _last_uuid7
    ms = (time.time_ns() // 1_000_000 if now_ms is None else now_ms) & (2**48 - 1)
    with _uuid7_lock:
        last_ms, last_rand = _last_uuid7
        if ms == last_ms and last_rand + 1 < 2**74:
            rand = last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 7  # (74 bits, the top one clear)
        _last_uuid7 = (ms, rand)
    value = ms << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | rand & (2**62 - 1)
    return str(uuid.UUID(int=value))


# The furthest ahead bridge takes a time to be (a delay, a retry's delay, an idempotency window
# or lease): envelopes and stores keep times as 64-bit epoch ms, and Python's dates end in 9999.
LONGEST_S = 100 * 365 * 24 * 3600.0
MAX_INT = 2**31 - 1  # an Avro int: the envelope's attempt, max_attempts and replays


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds (the edges call this; the core takes it as input)."""
    return time.time_ns() // 1_000_000


def iso_ms(epoch_ms: int, timespec: str = "milliseconds") -> str:
    """`epoch_ms` as an ISO 8601 UTC time, for people; as the number itself when it has no date.

    An envelope from another producer may hold any 64-bit long, and Python's dates run from year
    1 to 9999 only: a time that cannot be written must not stop what reports it.
    """
    try:
        return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec=timespec)
    except (ValueError, OverflowError, OSError):
        return f"{epoch_ms} ms from 1970 (no calendar date)"


@dataclass(slots=True, frozen=True)
class JobError:
    """One failed attempt (frozen: a handler sees its job's through `ctx.errors`)."""

    attempt: int
    at: int
    type: str
    message: str
    traceback: str | None = None


@dataclass
class Envelope:
    """A job: its identity, payload bytes and everything bridge needs to run it.

    Not slotted: `from_avro` adopts the decoded record as the instance's `__dict__`, which
    costs a fraction of calling `__init__` with fifteen arguments for every job consumed.
    """

    id: str
    type: str
    payload: bytes
    queue: str
    created_at: int
    key: str | None = None
    idempotency_key: str | None = None
    attempt: int = 1
    max_attempts: int | None = None
    run_at: int | None = None
    expires_at: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    origin: str | None = None
    errors: list[JobError] = field(default_factory=list)
    replays: int = 0

    def to_avro(self) -> dict[str, Any]:
        """The record as fastavro writes it."""
        record = {name: getattr(self, name) for name in _ENVELOPE_FIELDS}  # asdict() deep-copies
        record["errors"] = [asdict(error) for error in self.errors]
        return record

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> Envelope:
        """The envelope from a record decoded with the envelope's schema (which it takes over).

        An `attempt` below 1 (another producer counting from 0, or any int) reads as 1: counted
        up from there, a job that keeps failing would be retried up to 2^31 times.
        """
        if record["attempt"] < 1:
            record["attempt"] = 1
        if record["errors"]:
            record["errors"] = [JobError(**e) for e in record["errors"]]
        envelope = cls.__new__(cls)
        envelope.__dict__ = record
        return envelope


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))


@dataclass(slots=True)
class DeadLetter:
    """Why a job stopped, where it came from, and the job or its raw bytes (see `cut_raw`)."""

    reason: str
    detail: str
    queue: str
    at: int
    partition: int | None = None
    offset: int | None = None
    consumer_group: str | None = None
    envelope: Envelope | None = None
    raw: bytes | None = None

    def to_avro(self) -> dict[str, Any]:
        """The record as fastavro writes it."""
        return asdict(self)

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> DeadLetter:
        """The dead letter from a decoded record."""
        envelope = record["envelope"]
        return cls(**{**record, "envelope": Envelope.from_avro(envelope) if envelope else None})


def cut_raw(raw: bytes, limit: int) -> tuple[bytes, str]:
    """`raw` as a dead letter can hold it, and what its detail should add. A message larger than
    `limit` (the largest on a queue) keeps its first `limit` bytes: Kafka takes a record another
    producer compressed below a topic's limit, and its dead letter, written as it is, would be
    refused, and stop the consumer, at every start."""
    if len(raw) <= limit:
        return raw, ""
    return raw[:limit], f" (its {len(raw):,} bytes cut to the first {limit:,}: a dead letter holds no more)"
