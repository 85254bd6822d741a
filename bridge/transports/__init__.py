"""Transports move and settle bytes; one broker client library per module."""

from __future__ import annotations

from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.transports.base import Delivery, Outgoing, Transport, dlq_name

__all__ = ["Delivery", "Outgoing", "Transport", "dlq_name", "open_transport"]


def open_transport(settings: Settings) -> Transport:
    """A new, unconnected transport for the broker URL in `settings`."""
    url = settings.require_broker()
    scheme = url.partition("://")[0]
    if scheme in ("kafka", "kafka+ssl"):
        from bridge.transports.kafka import KafkaTransport  # imported only when used

        return KafkaTransport(url, settings)
    if scheme in ("amqp", "amqps"):
        from bridge.transports.rabbitmq import RabbitTransport

        return RabbitTransport(url, settings)
    raise ConfigError(f"broker {url!r}: memory:// is per process; use Bridge(broker='memory://')")
