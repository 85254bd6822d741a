"""bridge: job semantics (delays, retries, dead letters, idempotency) on Kafka and RabbitMQ."""

from __future__ import annotations

from bridge.app import Bridge
from bridge.errors import BridgeError, Permanent, Retry, TimeLimitExceeded
from bridge.jobs import JobContext

__all__ = ["Bridge", "BridgeError", "JobContext", "Permanent", "Retry", "TimeLimitExceeded"]
__version__ = "0.1.0"
