"""Helpers for users' own unit tests: run handlers in-process on the in-memory transport.

app = Bridge(broker="memory://", registry="schemas")
await app.enqueue_async("billing.ChargeCard", {...})
await app.consume(burst=True)          # runs every job enqueued, then returns
assert dead_letters(app, "billing") == []
"""

from __future__ import annotations

from bridge import codec
from bridge.app import Bridge
from bridge.envelope import DeadLetter, Envelope
from bridge.errors import ConfigError
from bridge.registry import DEAD_LETTER, ENVELOPE
from bridge.transports.base import dlq_name
from bridge.transports.memory import MemoryTransport

__all__ = ["MemoryTransport", "dead_letters", "memory_transport", "waiting"]


def memory_transport(app: Bridge) -> MemoryTransport:
    """The in-memory broker of `app` (which must use broker="memory://" and have been used)."""
    if app._memory is None:
        raise ConfigError("this app has no in-memory transport: use Bridge(broker='memory://')")
    return app._memory


def waiting(app: Bridge, queue: str) -> list[Envelope]:
    """The jobs waiting in `queue`, oldest first."""
    schema = app.registry.schema(ENVELOPE)
    bodies = memory_transport(app).messages(queue)
    largest = app.settings.queue_bytes
    return [
        Envelope.from_avro(codec.decode(body, app.registry, schema, max_bytes=largest)[1]) for body in bodies
    ]


def dead_letters(app: Bridge, queue: str) -> list[DeadLetter]:
    """The dead letters of `queue`, oldest first."""
    schema = app.registry.schema(DEAD_LETTER)
    bodies = memory_transport(app).messages(dlq_name(queue))
    largest = app.settings.dlq_bytes
    return [
        DeadLetter.from_avro(codec.decode(body, app.registry, schema, max_bytes=largest)[1])
        for body in bodies
    ]
