"""Settings: explicit arguments, then `BRIDGE_*` environment variables, then bridge.toml.

Frozen and validated at start, with every problem reported at once.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bridge.errors import ConfigError
from bridge.idempotency import check_url
from bridge.policy import DEFAULT_TIERS_S, parse_duration, tier_name

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


@dataclass(frozen=True)
class Settings:
    """Everything a Bridge needs to reach its broker and registry and to run jobs."""

    broker: str | None = None
    registry: str | None = None  # a directory of .avsc files, or a Confluent-compatible registry URL
    schemas: str | None = None  # with a registry URL: this app's own .avsc files
    prefix: str = "bridge"
    group: str = "bridge"  # Kafka consumer group; the consuming service's name on RabbitMQ
    concurrency: int = 16
    prefetch: int | None = None  # RabbitMQ deliveries held at once; None: twice concurrency
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
        for f in fields(cls):
            if f"BRIDGE_{f.name.upper()}" in environ:
                values[f.name] = environ[f"BRIDGE_{f.name.upper()}"]
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls._validated(values)

    @classmethod
    def _validated(cls, values: dict[str, Any]) -> Settings:
        problems = [f"unknown setting {k!r}" for k in values if k not in _FIELDS]
        converted: dict[str, Any] = {}
        for name, value in values.items():
            if name in _FIELDS:
                try:
                    converted[name] = _convert(name, value)
                except ValueError as exc:
                    problems.append(str(exc))
        problems += cls(**converted)._problems()
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**converted)

    def _problems(self) -> list[str]:
        problems = []
        if self.broker is not None and self.broker.partition("://")[0] not in BROKER_SCHEMES:
            problems.append(
                f"broker {self.broker!r}: use kafka://host:port or amqp://user:pass@host:port/vhost"
            )
        for name in ("concurrency", "partitions", "max_message_bytes", "delivery_limit"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.prefetch is not None and self.prefetch < self.concurrency:
            problems.append(
                f"prefetch ({self.prefetch}) must be at least concurrency ({self.concurrency}):"
                " RabbitMQ would never hand this process enough jobs to fill its slots"
            )
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
        if not self.prefix or not self.group:
            problems.append("prefix and group must not be empty")
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


def _tiers(value: Any) -> tuple[float, ...]:
    parts = value.split(",") if isinstance(value, str) else list(value)
    tiers = tuple(sorted({parse_duration(part) for part in parts}))
    if not tiers or tiers[0] <= 0:
        raise ValueError("delay_tiers must be durations above zero, e.g. 1s,5s,30s,2m,10m,1h,6h")
    return tiers


_TYPES: dict[str, Any] = {
    "concurrency": int,
    "prefetch": int,
    "delivery_limit": int,
    "partitions": int,
    "max_message_bytes": int,
    "grace_s": float,
    "session_timeout_s": float,
    "delay_tiers": _tiers,
}


def _convert(name: str, value: Any) -> Any:
    kind = _TYPES.get(name, str)
    if kind is _tiers:
        try:
            return _tiers(value)
        except ConfigError as exc:
            raise ValueError(f"delay_tiers: {exc}") from None
        except TypeError:  # (a number in bridge.toml, say: a list of durations, or one string)
            raise ValueError(f'delay_tiers must be durations such as "1s,5s,30s", got {value!r}') from None
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = {int: "a whole number", float: "a number"}.get(kind, "text")
        raise ValueError(f"{name} must be {what}, got {value!r}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return dict(data.get("bridge", data))
