"""Kafka's own topics that `bridge consume` needs: a cluster that cannot make them, said at start.

Consumer groups keep their offsets in `__consumer_offsets`, and transactions their state in
`__transaction_state`. Kafka makes each at its first use, with the replication factor of its
broker setting, and a cluster with fewer brokers than that never makes it: a group never forms,
a transaction never starts. On a single-broker Kafka whose settings say 3 (Confluent's images
unless told otherwise), `bridge consume` waited 30 s and said only "could not start Kafka
transactions: Timed out waiting for operation to finish", while enqueueing worked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # not in its __all__
    AdminClient,
    ConfigResource,
    ResourceType,
)

from bridge.errors import TransportError
from bridge.transports.kafka.common import METADATA_TIMEOUT_S, log

# Each internal topic: what cannot work without it, the prefix of its broker settings, and
# the one of them that must not exceed its replication factor either.
INTERNAL = {
    "__consumer_offsets": ("no consumer group can form", "offsets.topic", None),
    "__transaction_state": (
        "no transaction can start",
        "transaction.state.log",
        "transaction.state.log.min.isr",
    ),
}


async def require_internal_topics(common: dict[str, Any], known: Collection[str]) -> None:
    """Raise TransportError if Kafka lacks an internal topic it cannot make. `known`: topics
    seen already (once made, Kafka keeps them: no request when both are there). A cluster that
    does not answer, or does not let bridge read its settings, is taken as able: the consumer
    then fails, or not, as it would have."""
    if all(topic in known for topic in INTERNAL):
        return
    try:
        problems = await asyncio.to_thread(_problems, common)
    except (KafkaException, TimeoutError) as exc:
        log.debug("could not look at Kafka's internal topics: %s", exc)
        return
    if problems:
        raise TransportError(f"Kafka cannot run bridge consume: {'; '.join(problems)}", retriable=False)


def _problems(common: dict[str, Any]) -> list[str]:
    """For each internal topic Kafka lacks and cannot make, a line saying why (blocking)."""
    admin = AdminClient(common)
    metadata = admin.list_topics(timeout=METADATA_TIMEOUT_S)
    lacking = [topic for topic in INTERNAL if topic not in metadata.topics]
    if not lacking or not metadata.brokers:
        return []  # (made since `known` was read)
    brokers = len(metadata.brokers)
    resource = ConfigResource(ResourceType.BROKER, str(next(iter(metadata.brokers))))
    config = admin.describe_configs([resource])[resource].result(timeout=METADATA_TIMEOUT_S)
    problems = []
    for topic in lacking:
        consequence, prefix, also = INTERNAL[topic]
        entry = config.get(f"{prefix}.replication.factor")
        if entry is None or int(entry.value) <= brokers:
            continue
        variable = f"KAFKA_{prefix.replace('.', '_').upper()}_REPLICATION_FACTOR"
        problems.append(
            f"{prefix}.replication.factor is {entry.value} ({variable} with the Docker images) but "
            f"the cluster has {brokers} broker{'s' if brokers > 1 else ''}, so Kafka cannot make "
            f"{topic} and {consequence}; set it to at most {brokers}"
            + (f" (and {also} no higher)" if also else "")
            + " in the brokers' settings and restart them"
        )
    return problems
