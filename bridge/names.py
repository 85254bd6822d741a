"""What bridge's queues may be called, on both brokers."""

from __future__ import annotations

import re

from bridge.policy import tier_name


def is_dead_letters(name: str) -> bool:
    """Whether `name` is a dead-letter queue's (or on Kafka its `.done` topic's): no job goes there.

    An envelope naming one as its queue (another producer's, hostile or confused) had its retries
    and delays put there as bare jobs, which the dead-letter tools could only call undecodable."""
    return name.endswith((".dlq", ".dlq.done"))


def job_queue_of(name: str) -> str:
    """The job queue whose dead-letter queue (or `.done` topic) `name` is."""
    return name.removesuffix(".done").removesuffix(".dlq")


def tier_queue(prefix: str, tier_s: float) -> str:
    """The queue or topic of a delay tier: `<prefix>.delay.<tier>`, e.g. bridge.delay.30s."""
    return f"{prefix}.delay.{tier_name(tier_s)}"


QUEUE_NAME = re.compile(r"[A-Za-z0-9._-]+")
LONGEST_NAME = 249 - len(".dlq.done")  # Kafka takes topic names of up to 249 characters


def name_problem(name: str, what: str = "queue") -> str | None:
    """What makes `name` no name for a job queue (`what`: or the prefix of bridge's own names)
    on both brokers, in a line that says what to use; None if it is one. A name either broker
    refuses made every RabbitMQ command a traceback, and a Kafka one say to apply a topology
    that Kafka then refused."""
    if not QUEUE_NAME.fullmatch(name):
        return f"{what} {name!r}: use letters, digits, '.', '_' and '-' (as Kafka's topic names do)"
    if len(name) > LONGEST_NAME:
        return f"{what} {name[:20]}...: at most {LONGEST_NAME} characters, not {len(name)} (Kafka's limit)"
    if name in (".", ".."):  # (Kafka's rule; `bridge topology apply` planned them, Kafka refused)
        return f"{what} {name!r}: Kafka takes no topic named . or ..: use letters or digits too"
    if name.startswith(("__", "amq.")):
        return f"{what} {name!r}: names starting with __ are Kafka's own, with amq. RabbitMQ's"
    if what == "queue" and is_dead_letters(name):
        job_queue = job_queue_of(name)
        return f"queue {name!r} is {job_queue!r}'s dead-letter queue: no job goes there (see `bridge dlq`)"
    return None
