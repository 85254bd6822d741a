"""Settings: explicit arguments, then `BRIDGE_*` environment variables, then bridge.toml.

Frozen and validated at start, with every problem reported at once.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from bridge.errors import ConfigError, safe_url
from bridge.idempotency import check_url, default_url
from bridge.names import LONGEST_NAME, name_problem, tier_queue
from bridge.policy import DEFAULT_TIERS_S, parse_duration, tier_name

log = logging.getLogger("bridge.config")

BROKER_SCHEMES = ("kafka", "kafka+ssl", "amqp", "amqps", "memory")
# A wait shorter than every delay tier is spent in the worker, which holds the job's slot and
# its delivery meanwhile (see `policy.tier_for`): with tiers starting at an hour, a retry 40
# minutes away would hold both for 40 minutes, and RabbitMQ closes a channel that holds a
# delivery past its consumer_timeout (30 minutes by default).
MAX_SHORTEST_TIER_S = 60.0
# librdkafka's bounds of session.timeout.ms; a broker's own are group.min/max.session.timeout.ms.
MIN_SESSION_TIMEOUT_S, MAX_SESSION_TIMEOUT_S = 1.0, 3600.0
# What bridge may add to a job: the errors of its attempts (10 at most, each message and
# traceback cut to 2,000 characters) and, in a dead letter, its wrapping and detail.
ADDED_BYTES = 256 * 1024
LONGEST_TIER_S = 365 * 86400.0
# Kafka takes no record over 1,000,000,000 bytes (message.max.bytes), and a dead letter is the
# largest message bridge writes: a job and twice what bridge adds.
MAX_MESSAGE_BYTES = 1_000_000_000 - 2 * ADDED_BYTES
LARGEST_LETTER_BYTES = MAX_MESSAGE_BYTES + 2 * ADDED_BYTES  # what any worker may dead-letter
MAX_PREFETCH = 65535  # AMQP's basic.qos prefetch-count is a 16-bit number
MAX_CONCURRENCY = MAX_PREFETCH  # (a RabbitMQ channel would never hand a process more jobs)
# Each queue's topics (its own, its dead letters', the delay tiers') get this many partitions
# each: more than this is a typing mistake (Kafka's own limit is 2**31 - 1, but a cluster
# holds a few hundred thousand partitions at most; at 2**31, OverflowError).
MAX_PARTITIONS = 10_000


@dataclass(frozen=True)
class Settings:
    """Everything a Bridge needs to reach its broker and registry and to run jobs."""

    broker: str | None = None
    registry: str | None = None  # a directory of .avsc files, or a Confluent-compatible registry URL
    schemas: str | None = None  # with a registry URL: this app's own .avsc files
    prefix: str = "bridge"
    group: str = "bridge"  # Kafka consumer group; the consuming service's name on RabbitMQ
    concurrency: int = 16
    prefetch: int | None = None  # RabbitMQ deliveries held at once, per queue; None: twice concurrency
    # A job that came back to its queue this many times without an outcome (its worker was
    # killed, ran out of memory or lost its connection) is dead-lettered as `delivery_limit` the
    # next time it arrives, instead of running again. RabbitMQ counts the returns; on Kafka,
    # bridge does (transports/kafka/returns.py).
    delivery_limit: int = 10
    grace_s: float = 30.0
    # Kafka: how long the group waits for a member that stopped heartbeating (killed, frozen,
    # cut off) before it hands that member's partitions to the others. Their records wait that
    # long; too short, and a member the machine starves of CPU is evicted mid-job.
    session_timeout_s: float = 10.0
    partitions: int = 3
    delay_tiers: tuple[float, ...] = DEFAULT_TIERS_S  # seconds; `1s,5s,30s,2m,10m,1h,6h` in text
    max_message_bytes: int = 1024 * 1024
    origin: str | None = None
    idempotency: str | None = None  # store URL; None: sqlite in the data folder (memory:// brokers: memory)

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        toml_path: str | Path = "bridge.toml",
    ) -> Settings:
        """Settings from arguments, then BRIDGE_* variables, then bridge.toml; validated."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = _read_toml(Path(toml_path))
        if unknown := [_unknown(name) for name in values if name not in _FIELDS]:
            raise ConfigError(f"{toml_path}: {'; '.join(unknown)}")
        for f in fields(cls):
            if f"BRIDGE_{f.name.upper()}" in environ:
                values[f.name] = environ[f"BRIDGE_{f.name.upper()}"]
        _warn_of_near_misses(environ)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls._validated(values)

    @classmethod
    def _validated(cls, values: dict[str, Any]) -> Settings:
        problems = [_unknown(name) for name in values if name not in _FIELDS]
        converted: dict[str, Any] = {}
        for name, value in values.items():
            if name in _FIELDS:
                try:
                    converted[name] = _convert(name, value)
                except ValueError as exc:
                    problems.append(str(exc))
        unread = {name for name in values if name in _FIELDS and name not in converted}
        problems += cls(**converted)._problems(unread)
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**converted)

    def _problems(self, unread: Collection[str] = ()) -> list[str]:
        """Every problem of these settings, but those that compare with one of `unread` (its
        default stood in: a prefetch of 4 was said to be below a concurrency of 16 that nobody
        asked for, beside the real problem, a concurrency of `abc`)."""
        problems = []
        if self.broker is not None and (problem := _broker_problem(self.broker)):
            problems.append(
                f"broker {safe_url(self.broker)!r}: {problem}; use kafka://host:port or "
                "amqp://user:pass@host:port/vhost (with / ? # @ in the password percent-encoded)"
            )
        for name in ("concurrency", "partitions", "max_message_bytes", "delivery_limit"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.concurrency > MAX_CONCURRENCY:  # (1e300 in bridge.toml was taken)
            problems.append(f"concurrency must be at most {MAX_CONCURRENCY:,} (a RabbitMQ channel's most)")
        if self.max_message_bytes > MAX_MESSAGE_BYTES:
            problems.append(
                f"max_message_bytes must be at most {MAX_MESSAGE_BYTES:,}: Kafka takes no record over "
                "1,000,000,000 bytes, and a dead letter adds 512 KiB to a job"
            )
        if self.prefetch is not None and self.prefetch < self.concurrency and "concurrency" not in unread:
            problems.append(
                f"prefetch ({self.prefetch}) must be at least concurrency ({self.concurrency}):"
                " RabbitMQ would never hand this process enough jobs to fill its slots"
            )
        if self.partitions > MAX_PARTITIONS:
            problems.append(f"partitions must be at most {MAX_PARTITIONS:,}")
        if self.prefetch is not None and self.prefetch > MAX_PREFETCH:
            problems.append(f"prefetch must be at most {MAX_PREFETCH} (AMQP's limit)")
        if self.grace_s < 0:
            problems.append("grace_s must not be negative")
        if not MIN_SESSION_TIMEOUT_S <= self.session_timeout_s <= MAX_SESSION_TIMEOUT_S:
            problems.append(
                f"session_timeout_s must be from {MIN_SESSION_TIMEOUT_S:g} to {MAX_SESSION_TIMEOUT_S:g} "
                "seconds (a Kafka broker takes 6 to 1800 unless configured otherwise)"
            )
        if self.delay_tiers and self.delay_tiers[0] > MAX_SHORTEST_TIER_S:
            problems.append(
                f"delay_tiers start at {tier_name(self.delay_tiers[0])}: a shorter wait would hold its "
                f"job's slot in the worker; start them at {tier_name(MAX_SHORTEST_TIER_S)} or less, "
                "e.g. 1s,5s,30s,2m,10m,1h,6h"
            )
        if self.idempotency is not None:
            problems += check_url(self.idempotency)
        elif not (self.broker or "").startswith("memory://") and (default := check_url(default_url())):
            # (found at the first keyed job, the folder kept it waiting for the store for good)
            problems.append(
                f"{default[0]} (the default store: set BRIDGE_DATA to a folder, or BRIDGE_IDEMPOTENCY)"
            )
        if isinstance(self.registry, str) and (problem := _registry_problem(self.registry)):
            problems.append(
                f"registry {safe_url(self.registry)!r}: {problem}; use http(s)://host:port/path "
                "(several, comma-separated), or a directory of .avsc files"
            )
        if not self.prefix or not self.group:
            problems.append("prefix and group must not be empty")
        elif problem := name_problem(self.prefix, "prefix"):
            problems.append(problem)
        elif (
            len(longest := max(map(partial(tier_queue, self.prefix), self.delay_tiers), key=len))
            > LONGEST_NAME
        ):
            # (Kafka refused the tier's `.dlq.done` topic; RabbitMQ a 250ms tier's `.wait` queue)
            problems.append(
                f"prefix {self.prefix[:20]}... is {len(self.prefix)} characters: with its delay tiers, "
                f"names such as {longest[-40:]}.dlq.done would be longer than a Kafka topic's "
                f"{LONGEST_NAME + len('.dlq.done')}; give it at most "
                f"{LONGEST_NAME - len(longest) + len(self.prefix)}"
            )
        if not all(" " <= c <= "~" for c in self.group):
            # (librdkafka refuses the group's metadata in every transaction: "Input buffer group
            # id is not safe", and consume tried again every 5 s for good; the same on both brokers)
            problems.append(f"group {self.group!r} must be printable ASCII: letters, digits, punctuation")
        return problems

    @property
    def queue_bytes(self) -> int:
        """The largest message on a queue or delay tier: a job and the errors of its attempts."""
        return self.max_message_bytes + ADDED_BYTES

    @property
    def dlq_bytes(self) -> int:
        """The largest dead letter: the largest message on a queue, and its wrapping."""
        return self.queue_bytes + ADDED_BYTES

    def require_broker(self) -> str:
        """The broker URL, or one line saying how to give one."""
        if not self.broker:
            raise ConfigError("no broker: pass --broker, set BRIDGE_BROKER or broker in bridge.toml")
        return self.broker


_FIELDS = {f.name: f for f in fields(Settings)}


def _broker_problem(url: str) -> str | None:
    """What is wrong with a broker URL, found before connecting: the clients would retry a
    URL without a host for good (aio-pika), or report it as a broker that is down (Kafka)."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in BROKER_SCHEMES:
        return "unknown kind of broker"
    if scheme == "memory":
        return None
    if scheme.startswith("kafka"):
        if "@" in rest:
            return "a Kafka URL takes no user or password"
        if any(mark in rest.rstrip("/") for mark in "/?#"):  # (librdkafka read the host and port alone)
            return "a Kafka URL takes host:port[,host:port] and nothing more (no path or ?options)"
        servers = rest.rstrip("/").split(",")
        return next(filter(None, (_address_problem(f"//{server}") for server in servers)), None)
    return _address_problem(url) or _amqp_options_problem(url)


def _amqp_options_problem(url: str) -> str | None:
    """What is wrong with the numbers in an AMQP URL's options: aiormq reads one that is no
    whole number as 0, and a heartbeat of 0 turns heartbeats off (a dead connection is then
    found by TCP alone, minutes on). An option given twice, differently: aiormq reads the first."""
    pairs = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    options = dict(pairs)
    if twice := next((name for name, value in pairs if options[name] != value), None):
        return f"its {twice}= is given twice, differently: give it once"
    for name, most in (("heartbeat", 65534), ("timeout", None)):
        value = options.get(name)
        if value is not None and not (
            value.isascii() and value.isdigit() and (most is None or int(value) <= most)
        ):
            upto = f" from 0 to {most}" if most is not None else ""
            return f"its {name}= must be a whole number of seconds{upto}, not {value!r}"
    return None


def _registry_problem(url: str) -> str | None:
    """What is wrong with a registry server's URL (none for a directory's path), found before
    its client raised ValueError at the first schema, or called a port of 99999 silent."""
    if not url.startswith(("http://", "https://")):
        return None
    for one in url.split(","):  # (confluent-kafka's client takes several, comma-separated)
        if not one.startswith(("http://", "https://")):
            return f"{one!r} is not an http:// or https:// URL"
        if problem := _address_problem(one):
            return problem
    return None


def _address_problem(url: str) -> str | None:
    rest = url.partition("://")[2]
    authority = min((at for at in map(rest.find, "/?#") if at >= 0), default=len(rest))
    if "@" in rest[authority:]:  # (a user or password cut short: its port was blamed)
        return "its user or password holds / ? or # (percent-encoded, they go through)"
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # (an unclosed [ of an IPv6 address)
        return f"it is not a URL ({exc})"
    try:
        port = parts.port
    except ValueError:  # (a port that is no number, or out of range)
        return "its port must be a number from 1 to 65535"
    if not parts.hostname:
        return "it names no host"
    if port == 0:
        return "its port must be a number from 1 to 65535"
    return None


def _tiers(value: Any) -> tuple[float, ...]:
    parts = value.split(",") if isinstance(value, str) else list(value)
    tiers = tuple(sorted({parse_duration(part) for part in parts}))
    if not tiers or not all(0 < tier < math.inf for tier in tiers):
        raise ValueError("delay_tiers must be durations above zero, e.g. 1s,5s,30s,2m,10m,1h,6h")
    # A tier is named by its length in whole ms (`policy.tier_name`): two that round alike would
    # share a queue, and one under 1 ms would be named 0ms.
    if any(abs(tier * 1000 - round(tier * 1000)) > 1e-6 for tier in tiers):
        raise ValueError("delay_tiers must be whole milliseconds, e.g. 1s,5s,30s,2m,10m,1h,6h or 250ms")
    # (as read, `700ms` was 0.7000000000000001 s: a delay of 0.7 s did not fit it)
    tiers = tuple(round(tier * 1000) / 1000 for tier in tiers)
    if tiers[-1] > LONGEST_TIER_S:  # (RabbitMQ takes a queue TTL of some 6 years at most)
        raise ValueError(
            f"delay_tiers must be at most 365d, not {tier_name(tiers[-1])}: a longer wait goes round "
            "the longest tier again"
        )
    return tiers


def _whole(value: Any) -> int:
    """A whole number from text or a number; not True, 3.7 or inf."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(value)


def _finite(value: Any) -> float:
    """A number from text or a number; not True, NaN or infinity."""
    number = float(value) if not isinstance(value, bool) else math.nan
    if not math.isfinite(number):
        raise ValueError
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str | os.PathLike):  # (a path: the registry's or the schemas' folder)
        raise TypeError
    return os.fspath(value)


_TYPES: dict[str, Any] = {
    "concurrency": _whole,
    "prefetch": _whole,
    "delivery_limit": _whole,
    "partitions": _whole,
    "max_message_bytes": _whole,
    "grace_s": _finite,
    "session_timeout_s": _finite,
    "delay_tiers": _tiers,
}


def _convert(name: str, value: Any) -> Any:
    kind = _TYPES.get(name, _text)
    if kind is _tiers:
        try:
            return _tiers(value)
        except ConfigError as exc:
            raise ValueError(f"delay_tiers: {exc}") from None
        except TypeError:  # (a number in bridge.toml, say: a list of durations, or one string)
            raise ValueError(f'delay_tiers must be durations such as "1s,5s,30s", got {value!r}') from None
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        what = {_whole: "a whole number", _finite: "a finite number"}.get(kind, "text")
        raise ValueError(f"{name} must be {what}, got {value!r}") from None


def _warn_of_near_misses(environ: Mapping[str, str]) -> None:
    """Say once of each BRIDGE_* variable that is no setting's but looks like one's: a typo
    (BRIDGE_CONCURENCY) left the default in place without a word. A warning, not an error:
    another program's variable may share the prefix. (BRIDGE_DEV_* are `bridge dev`'s.)"""
    for variable in environ:
        name = variable.removeprefix("BRIDGE_").lower()
        if (
            not variable.startswith("BRIDGE_")
            or name in _FIELDS
            or name.startswith("dev_")
            or variable in _warned
        ):
            continue
        if close := difflib.get_close_matches(name, _FIELDS, n=1):
            _warned.add(variable)
            log.warning(
                "%s is not a setting, and is ignored: did you mean BRIDGE_%s?", variable, close[0].upper()
            )


_warned: set[str] = set()  # the variables warned of (settings are loaded again by each app)


def _unknown(name: str) -> str:
    """A setting that does not exist, with the one it may have meant."""
    close = difflib.get_close_matches(name, _FIELDS, n=1)
    return f"unknown setting {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _read_toml(path: Path) -> dict[str, Any]:
    """The settings in bridge.toml: its `[bridge]` table, or, without one, the whole file."""
    if not path.exists() and not path.is_symlink():
        return {}  # (one that is a directory, or a link to nothing, is said below: it was ignored)
    try:
        if path.is_dir():
            raise ConfigError(f"{path} is a directory, not a settings file")
        if not path.exists():
            raise ConfigError(f"{path} links to {path.readlink()}, which does not exist")
        # (-sig: a byte-order mark, as some Windows editors write, was "Invalid statement")
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        # (TOML's "Invalid value" is most often text without its quotes)
        quote = (
            ' (text goes in quotes: broker = "kafka://127.0.0.1:9092")' if "Invalid value" in str(exc) else ""
        )
        raise ConfigError(f"{path}: {exc}{quote}") from None
    if "bridge" not in data:
        return data
    settings, others = data.pop("bridge"), sorted(data)
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: bridge must be a table of settings ([bridge]), not {settings!r}")
    if others:  # (they would be dropped unread: a setting there does nothing)
        raise ConfigError(f"{path}: {', '.join(others)} outside the [bridge] table; move settings into it")
    return settings
