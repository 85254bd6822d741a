"""The one error tree of bridge.

    BridgeError
    ├── ConfigError          bad settings, flags or environment (one line says what to fix)
    ├── SchemaError          a schema that cannot be loaded, or a payload that does not fit its schema
    ├── UnknownJobType       a job type with no schema or no handler
    ├── DecodeError          bytes that are not a valid framed Avro message (keeps the raw bytes)
    │   ├── UnknownSchema    framed bytes naming a schema (fingerprint or id) unknown here
    │   └── SchemaMismatch   a record its reader's schema cannot read (another name, incompatible)
    ├── TransportError       a broker refused, could not be reached, or did not confirm
    │   └── PublishError     a publish was not acknowledged (unroutable, nacked, timed out)
    │       └── PublishRefused   the broker refused it (RabbitMQ's nack: a full queue, no quorum)
    ├── RegistryUnavailable  the schema registry did not answer (what needed it waits)
    ├── StoreError           the idempotency store could not be reached or refused
    │   └── LeaseLost        a job's claim on its idempotency key ended before it completed
    ├── KeyInFlight          an idempotency key to forget is held by a job or a publish under way
    ├── TimeLimitExceeded    a handler ran past its job type's `timeout_s` (a failure, retried)
    └── DevError             `bridge dev` could not provision or start a local broker

Handlers steer retries with `Retry` and `Permanent`, which are not errors of bridge itself.
Messages name servers by `safe_url`, which never shows a password.
"""

from __future__ import annotations

from datetime import timedelta


def safe_url(url: str) -> str:
    """`url` without its password, for messages and logs.

    The password ends at the last `@`, not where a URL parser ends the authority: a password
    written with a `/`, `?`, `#` or `@` that should have been percent-encoded (`p/ss`) would
    otherwise show in part. Whatever else stands before that `@` goes too (masking too much
    is the safe side).
    """
    scheme, separator, rest = url.partition("://")
    user_info, at, host = rest.rpartition("@")
    if not separator or not at or ":" not in user_info:
        return url
    return f"{scheme}://{user_info.partition(':')[0]}:***@{host}"


def message_of(exc: BaseException) -> str:
    """`str(exc)`, as an envelope can carry it. A handler's own exception class may have a
    `__str__` that raises (one that formats a field left None): its job must still retry or
    dead-letter."""
    try:
        return utf8(str(exc))
    except Exception as broken:
        return f"(its message could not be read: {type(broken).__name__} in __str__)"


def utf8(text: str) -> str:
    """`text`, with any lone surrogate (a file name that `os.fsdecode` could not decode, say)
    as its escape `\\udcff`: UTF-8, and so Avro, cannot carry one."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def describe(exc: BaseException) -> str:
    """`exc` as `Type: message` (or `Type`, with no message), for dead letters' details."""
    message = message_of(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class BridgeError(Exception):
    """Base of every error bridge raises on purpose."""


class ConfigError(BridgeError):
    """Settings, flags or environment that cannot work; the message says what to fix."""


class SchemaError(BridgeError):
    """A schema that cannot be used, or a payload that does not match its schema."""


class JobTooLarge(BridgeError):
    """A job larger than `max_message_bytes`: there would be no room for what its retries add."""


class UnknownJobType(BridgeError):
    """A job type that has no schema in the registry or no handler in the app."""


class DecodeError(BridgeError):
    """Bytes that do not decode exactly as a framed Avro message.

    The raw bytes are kept so that a dead letter can carry them unchanged.
    """

    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw


class UnknownSchema(DecodeError):
    """Framed bytes whose fingerprint or registry id names no schema known here."""


class SchemaMismatch(DecodeError):
    """A record its reader's schema cannot read: another record, or an incompatible version."""


class TransportError(BridgeError):
    """A broker operation failed; `retriable` says whether trying again may help."""

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class PublishError(TransportError):
    """A publish that the broker did not acknowledge."""


class PublishUnconfirmed(PublishError):
    """A publish whose outcome is not known: the broker did not confirm it in time, or the
    client closed first. The broker may still take it."""


class PublishRefused(PublishError):
    """A publish the broker refused (RabbitMQ's nack): a queue at its length limit, or without
    a quorum. It may be taken later, once the queue drains or regains its quorum."""


class RegistryUnavailable(BridgeError):
    """The schema registry did not answer; what needed it waits and tries again."""


class StoreError(BridgeError):
    """The idempotency store could not be reached or refused an operation."""


class LeaseLost(StoreError):
    """A claim on an idempotency key ended (its lease ran out) before the job completed."""


class KeyInFlight(BridgeError):
    """An idempotency key to forget is held by a job or a publish under way (`bridge keys forget`)."""


class TimeLimitExceeded(BridgeError):
    """A handler ran past its job type's `timeout_s` and was stopped: a failure like any other,
    retried (one of `retry_on` by default) and dead-lettered after the last attempt."""


class DevError(BridgeError):
    """A local development broker could not be provisioned or started."""


class Retry(Exception):
    """Raised by a handler to ask for another attempt after `delay_s` seconds (None: the job
    type's backoff). `Retry("rate limited")` is a reason, as in Dramatiq: with the delay first,
    it was compared as one, and the job was dead-lettered."""

    def __init__(self, delay_s: float | timedelta | str | None = None, reason: str = "") -> None:
        if isinstance(delay_s, str):
            reason = reason or delay_s
            delay_s = None
        if isinstance(delay_s, timedelta):  # (as enqueue's `delay=` takes; compared, it failed the job)
            delay_s = delay_s.total_seconds()
        super().__init__(reason or f"retry requested (delay_s={delay_s})")
        self.delay_s = delay_s


class Permanent(Exception):
    """Raised by a handler when retrying cannot help; the job is dead-lettered at once.
    (`raise Permanent`, with no reason, too: it raised TypeError, which was retried.)"""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
