"""Local services for development: `up`, `down` and `status` of the brokers, stores and registry.

The brokers are Kafka and RabbitMQ (for BRIDGE_BROKER), the stores PostgreSQL and Redis (for
BRIDGE_IDEMPOTENCY), the registry Apicurio (a schema registry with Confluent's API). With a
Docker engine, the services of docker-compose.yml; without one, a Kafka broker run from Maven
Central jars, Apicurio Registry from Maven Central on a Java runtime from PyPI, and Debian's
rabbitmq-server, postgresql and redis-server packages. All listen on loopback only, on the
same ports either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from bridge.dev import apicurio, compose, kafka, postgres, rabbitmq, redis
from bridge.dev._common import ServiceStatus, is_root
from bridge.dev._proc import Log, apt_install, find_program
from bridge.errors import DevError

__all__ = [
    "BROKERS",
    "REGISTRIES",
    "SERVICES",
    "STORES",
    "ServiceStatus",
    "down",
    "ensure_tools",
    "status",
    "up",
]

BROKERS: Final = ("kafka", "rabbitmq")
STORES: Final = ("postgres", "redis")
REGISTRIES: Final = ("apicurio",)
SERVICES: Final = (*BROKERS, *STORES, *REGISTRIES)


@dataclass(frozen=True)
class _Native:
    up: Callable[[Log], ServiceStatus]
    down: Callable[[Log], ServiceStatus]
    status: Callable[[], ServiceStatus]


_NATIVE: Final = {
    "kafka": _Native(kafka.up, kafka.down, kafka.status),
    "rabbitmq": _Native(rabbitmq.up, rabbitmq.down, rabbitmq.status),
    "postgres": _Native(postgres.up, postgres.down, postgres.status),
    "redis": _Native(redis.up, redis.down, redis.status),
    "apicurio": _Native(apicurio.up, apicurio.down, apicurio.status),
}

# Debian packages of the independent test clients, by a program each provides.
_TOOLS: Final = {"kcat": "kcat", "amqp-publish": "amqp-tools"}


def up(services: Sequence[str] = SERVICES, *, log: Log = print) -> list[ServiceStatus]:
    """Start the services that are not answering yet and wait until they serve clients."""
    names = _names(services)
    if compose.engine_available():
        return compose.up(names, log)
    return [_NATIVE[name].up(log) for name in names]


def down(services: Sequence[str] = SERVICES, *, log: Log = print) -> list[ServiceStatus]:
    """Stop the services `up` started; data is kept for the next `up`."""
    names = _names(services)
    if compose.engine_available():
        return compose.down(names, log)
    return [_NATIVE[name].down(log) for name in names]


def status(services: Sequence[str] = SERVICES) -> list[ServiceStatus]:
    """Whether each service answers on its port, changing nothing."""
    return [_NATIVE[name].status() for name in _names(services)]


def ensure_tools(log: Log = print) -> None:
    """Install the Debian test clients (kcat, amqp-tools) that are missing."""
    missing = [package for program, package in _TOOLS.items() if find_program(program) is None]
    if not missing:
        return
    if not is_root():
        raise DevError(f"missing test clients: run `sudo apt-get install {' '.join(missing)}`")
    apt_install(missing, log)


def _names(services: Sequence[str]) -> list[str]:
    # A bare string is one name, not a sequence of one-letter names.
    chosen = [services] if isinstance(services, str) else list(services)
    unknown = [name for name in chosen if name not in _NATIVE]
    if unknown:
        raise DevError(f"unknown service {unknown[0]!r}: choose from {', '.join(SERVICES)}")
    return list(dict.fromkeys(chosen))
