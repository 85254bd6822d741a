"""Moves delayed records from the tier topics to their queues once they are due."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, Message, TopicPartition

from bridge import codec
from bridge.envelope import UNROUTABLE, DeadLetter, cut_raw, now_ms
from bridge.errors import TransportError
from bridge.registry import DEAD_LETTER, own_schema
from bridge.transports.base import dlq_name
from bridge.transports.kafka.commit import Committer
from bridge.transports.kafka.common import (
    FETCH_BATCH,
    IDLE_SLEEP_MAX_S,
    QUEUE_HEADER,
    Record,
    coordinates,
    guarded,
    leave_group,
    log,
    read_to_end,
    resume_leaving,
)
from bridge.transports.offsets import TopicPartition as TP

if TYPE_CHECKING:
    from bridge.transports.kafka.transport import KafkaTransport


class DelayForwarder:
    """Moves records from the delay tiers to their queues once they are due.

    Karafka's way: a tier's records all wait the same time, so they come due in order; when a
    partition's head is not due yet, seek back to it and pause the partition until it is. Only
    one record per partition is ever looked at, however many wait. Every `bridge consume` of
    the prefix shares one group, so each delayed record is forwarded by one of them.
    """

    def __init__(self, transport: KafkaTransport, group: str) -> None:
        self.transport = transport
        self.group = group
        self.delay_ms = {topic: round(tier_s * 1000) for tier_s, topic in transport._tiers.items()}
        self.delay_ms |= {topic: round(tier_s * 1000) for topic, tier_s in transport._retired_tiers.items()}
        self.consumer: Consumer | None = None
        self.waiting: dict[tuple[str, int], int] = {}  # paused partition -> when its head is due
        # A partition's head stamped in the future: its offset, and when this forwarder first saw it
        self.ahead: dict[tuple[str, int], tuple[int, int]] = {}
        self.forwarding = False
        self.committer: Committer | None = None
        self.subscribed: list[str] = []  # the tier topics its consumer is subscribed to

    async def run(self, stop: asyncio.Event) -> None:
        # Small fetches (records are looked at one partition head at a time anyway), and short
        # fetch waits, so a partition resumed when its head is due is read at once. Its
        # subscription's metadata is looked at every 2 s, not 5 minutes: a tier topic another
        # producer just made, to which it subscribes once the transport's look found it, may
        # still be unknown to its first metadata answer ("Subscribed topic not available",
        # seen once in CI), and until the next look its jobs waited in that tier.
        settings = {
            "queued.max.messages.kbytes": 1024,
            "fetch.wait.max.ms": 50,
            "topic.metadata.refresh.interval.ms": 2000,
        }
        consumer = self.transport.group_consumer(self.group, **settings)
        self.consumer = consumer
        transactional_id = f"{self.group}.{uuid.uuid4().hex}"
        self.committer = committer = Committer(
            self.transport._common, consumer, transactional_id, lambda _: True, destinations_may_go=True
        )
        try:  # (whatever it raises ends the consumer's round: KafkaTransport._failure)
            await committer.start()
            idle_s = 0.001
            while not stop.is_set() and committer.failure is None:
                if self.subscribed != list(self.delay_ms):  # (at first, and once `add_tiers` adds one)
                    self.subscribed = list(self.delay_ms)
                    on_lost = guarded(self._on_lost, committer.fail)
                    consumer.subscribe(self.subscribed, on_revoke=on_lost, on_lost=on_lost)
                self._resume_due(consumer)
                records = consumer.consume(FETCH_BATCH, 0)
                due = self._take_due(consumer, records)
                if due:
                    await self._forward(consumer, due)
                if records:
                    idle_s = 0.001
                    continue
                await asyncio.sleep(min(idle_s, self._until_next_due_s()))
                idle_s = min(idle_s * 2, IDLE_SLEEP_MAX_S)
        finally:
            committer.retired = True  # (its consumer leaves its group at the round's end: `leave`)

    async def leave(self) -> None:
        """Have the consumer of `run`, once it has ended, leave its group and close."""
        if self.consumer is not None:
            await leave_group(self.consumer)

    def add_tiers(self, tiers: dict[str, float]) -> None:
        """Forward from the tier topics `tiers` (topic -> seconds) too: made after this started
        (by a producer with other tiers, say), they were not read until the next restart."""
        self.delay_ms |= {topic: round(tier_s * 1000) for topic, tier_s in tiers.items()}

    def drop_tiers(self, topics: list[str]) -> None:
        """Forward from the tier topics `topics` no more: they were deleted."""
        for topic in topics:
            self.delay_ms.pop(topic, None)
        for tp in [tp for tp in self.waiting if tp[0] in topics]:
            del self.waiting[tp]
            self.ahead.pop(tp, None)

    async def drained(self) -> bool:
        """Whether every tier is empty: nothing waiting, nothing being forwarded, nothing unread."""
        if self.consumer is None or self.waiting or self.forwarding:
            return False
        return await read_to_end(self.consumer, list(self.delay_ms), self.transport._common)

    def _take_due(self, consumer: Consumer, records: list[Message]) -> list[Message]:
        now = time.time_ns() // 1_000_000
        due = []
        for record in records:
            if record.error() is not None:
                log.warning("delay forwarder: %s", record.error())
                continue
            topic, partition, offset = coordinates(record)
            if (topic, partition) in self.waiting:
                continue  # its partition was rewound to an earlier head; it comes again later
            if topic not in self.delay_ms:
                continue  # fetched before its tier topic was found deleted (`drop_tiers`)
            ready_at = self._written_at(topic, partition, offset, record.timestamp()[1], now)
            ready_at += self.delay_ms[topic]
            if ready_at > now:
                consumer.pause([TopicPartition(topic, partition)])
                consumer.seek(TopicPartition(topic, partition, offset))
                self.waiting[(topic, partition)] = ready_at
                continue
            due.append(record)
        return due

    def _written_at(self, topic: str, partition: int, offset: int, stamp: int, now: int) -> int:
        """When a record was written, as far as its timestamp can be trusted: one stamped in
        the future (another host's clock runs ahead, or another producer's stamp) counts from
        when this forwarder first saw it, so it waits one tier, not until then with every
        record behind it."""
        if stamp <= now:
            return stamp
        first = self.ahead.get((topic, partition))
        if first is None or first[0] != offset:
            first = self.ahead[(topic, partition)] = (offset, now)
        return first[1]

    def _resume_due(self, consumer: Consumer) -> None:
        now = time.time_ns() // 1_000_000
        for tp, ready_at in list(self.waiting.items()):
            if ready_at <= now:
                del self.waiting[tp]
                consumer.resume([TopicPartition(*tp)])

    def next_due_ms(self) -> int | None:
        """When the next record waiting in a tier is due (epoch ms); None if none is known to wait."""
        return min(self.waiting.values(), default=None)

    def _until_next_due_s(self) -> float:
        if not self.waiting:
            return IDLE_SLEEP_MAX_S
        return max(0.0, (min(self.waiting.values()) - time.time_ns() // 1_000_000) / 1000)

    async def _forward(self, consumer: Consumer, records: list[Message]) -> None:
        """Publish each record to its queue and commit the offsets past them, in one transaction."""
        assert self.committer is not None
        self.forwarding = True
        try:
            offsets: dict[TP, int] = {}
            first: dict[TP, int] = {}
            routed: list[tuple[Message, str]] = []
            unroutable: list[tuple[Message, str]] = []
            for record in records:
                topic, partition, offset = coordinates(record)
                offsets[(topic, partition)] = offset + 1
                first.setdefault((topic, partition), offset)
                queue = dict(record.headers() or []).get(QUEUE_HEADER)
                if queue is None:  # not written by bridge: nothing says where it goes
                    unroutable.append((record, f"it has no {QUEUE_HEADER} header"))
                    continue
                try:
                    routed.append((record, queue.decode() if isinstance(queue, bytes) else queue))
                except UnicodeDecodeError:
                    unroutable.append((record, f"its {QUEUE_HEADER} header is not UTF-8 text: {queue!r}"))
            missing = await self.transport.missing({queue for _, queue in routed})
            batch: list[Record] = []
            largest = self.transport.settings.queue_bytes
            for record, queue in routed:
                if queue in missing:  # one bad record must not stop every delayed job
                    unroutable.append(
                        (record, f"its {QUEUE_HEADER} header names {queue!r}, which is no queue")
                    )
                    continue
                if (size := len(record.value() or b"")) > largest:  # (compressed, the tier took it)
                    # Forwarded, the queue would refuse it, and so every forward of the tier.
                    why = f"it is {size:,} bytes, more than a queue takes ({largest:,})"
                    unroutable.append((record, why))
                    continue
                batch.append((queue, record.value(), record.key(), None, 0))
            if unroutable:  # (only then: each look for a missing topic is a metadata request)
                tiers = {coordinates(record)[0] for record, _ in unroutable}
                if no_dlq := await self.transport.absent([dlq_name(tier) for tier in tiers]):
                    record, why = next((r, w) for r, w in unroutable if dlq_name(coordinates(r)[0]) in no_dlq)
                    self.committer.fail(self._nowhere(record, why))
                    return  # (nothing of the batch forwarded, nor committed: it comes again)
                batch += [self._dead_letter(record, why) for record, why in unroutable]
            if not await self.committer.transact(batch, offsets):
                # A queue deleted since the transport last looked (a look every 5 s): the next
                # try looks afresh, and dead-letters its records as those of any other non-queue.
                self.transport.forget_topics(self.committer.gone_destinations)
                self.committer.gone_destinations = []
                for (topic, partition), offset in first.items():  # aborted: forward them again
                    consumer.seek(TopicPartition(topic, partition, offset))
                    # (now, not when a later record of the batch, which paused it, is due)
                    if self.waiting.pop((topic, partition), None) is not None:
                        consumer.resume([TopicPartition(topic, partition)])
        finally:
            self.forwarding = False

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Every forwarded batch is committed before the next fetch: only waiting heads to drop.
        for tp in partitions:
            self.waiting.pop((tp.topic, tp.partition), None)
            self.ahead.pop((tp.topic, tp.partition), None)
        resume_leaving(consumer, partitions)

    @staticmethod
    def _nowhere(record: Message, why: str) -> TransportError:
        """What stops a forwarder that found a record no queue owns in a tier without its `.dlq`
        (a topology older than them, or a tier the settings no longer name). Skipped, the
        record was committed past, and lost: its offset stays uncommitted, and nothing is."""
        topic, partition, offset = coordinates(record)
        return TransportError(
            f"delay forwarder: record {offset} of {topic} partition {partition} goes nowhere: {why}, "
            f"and there is no {dlq_name(topic)} to dead-letter it to: run `bridge topology apply`",
            retriable=False,
        )

    def _dead_letter(self, record: Message, why: str) -> Record:
        """The dead letter of a tier record no queue owns, for its tier's `.dlq` (bad input),
        written with the forwarded records and the offsets, in one transaction."""
        topic, partition, offset = coordinates(record)
        log.warning(
            "delay forwarder: dead-lettering record %s of %s partition %s: %s", offset, topic, partition, why
        )
        raw, cut = cut_raw(record.value() or b"", self.transport.settings.queue_bytes)
        letter = DeadLetter(
            UNROUTABLE, f"a delay-tier record bridge cannot route: {why}{cut}", topic, now_ms(),
            partition=partition, offset=offset, consumer_group=self.group, raw=raw,
        )  # fmt: skip
        body = codec.encode(own_schema(DEAD_LETTER), letter.to_avro())
        return (dlq_name(topic), body, record.key(), None, 0)
