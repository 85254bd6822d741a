"""The Kafka transport: producing, consuming in a group, topology and the dead-letter tools."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # not in its __all__
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from bridge.config import LARGEST_LETTER_BYTES, Settings
from bridge.envelope import iso_ms
from bridge.errors import ConfigError, PublishError, PublishUnconfirmed, TransportError
from bridge.names import is_dead_letters, tier_queue
from bridge.policy import parse_duration, tier_for, tier_name
from bridge.transports.base import (
    PUBLISH_TIMEOUT_S,
    BurstWait,
    Decide,
    Delivery,
    InFlight,
    Outgoing,
    Process,
    SweepStopped,
    dlq_name,
    tier_names,
    unheard,
)
from bridge.transports.kafka.commit import COMMIT_INTERVAL_S, Committer
from bridge.transports.kafka.common import (
    AUTHORIZATION_FAILED,
    FETCH_BATCH,
    IDLE_SLEEP_MAX_S,
    METADATA_TIMEOUT_S,
    QUEUE_HEADER,
    SERVED_POLL_S,
    Headers,
    Record,
    RoundEnded,
    client_log,
    coordinates,
    guarded,
    kafka_error,
    leave_group,
    log,
    mapped,
    new_producer,
    read_committed,
    read_to_end,
    record_key,
    resume_leaving,
    wait_until_served,
)
from bridge.transports.kafka.forwarder import DelayForwarder
from bridge.transports.kafka.internal import require_internal_topics
from bridge.transports.kafka.returns import RUNNING, Gate, trying
from bridge.transports.offsets import OffsetTracker
from bridge.transports.offsets import TopicPartition as TP

PAUSE_AFTER_S = 1.0
# How many records of a partition may be handed out from its first one not settled yet (a slow
# job's) before the partition is paused, until half as many are left. Unbounded, the records
# after a 10-minute job all ran meanwhile, held in memory with what they publish (GBs at tens
# of thousands of jobs a second), all ran again if its worker died, and the transaction past
# them overflowed librdkafka's queue of 100,000 records, which ended the round.
RUN_AHEAD_MAX = 20_000
DRAIN_CHECK_S = 0.25
TOPIC_LOOK_S = 5.0  # how often to look whether the consumed topics still exist, and for new tiers
NEW_TOPIC_GRACE_S = 2.0  # at consume start, how long a topic may be missing before bridge refuses
# After a failed transaction, before a new round consumes again from the committed offsets.
RESTART_AFTER_S = 5.0
# At a round's end, how long the delay forwarder may take to stop before it is cancelled. A
# transaction it had out then commits or aborts on its own, records and offsets together: nothing
# is lost or forwarded twice. (Waited for, one out when Kafka went away held the next round back
# until its call wedged, for 80 s and more after Kafka was back.)
FORWARDER_END_S = METADATA_TIMEOUT_S
CLOSE_FLUSH_S = 10.0  # how long `close` waits for Kafka to acknowledge what was published
# A delay tier's records are kept a week (Kafka's usual default, which a cluster may lower), or
# twice the tier if that is longer: long enough for workers stopped a while to find them.
TIER_RETENTION_MS = 7 * 86_400_000
MAX_POLL_INTERVAL_S = 86_400.0  # librdkafka's largest max.poll.interval.ms


class KafkaTransport:
    """A producer for publishing and, while consuming, one group consumer."""

    name = "kafka"

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        scheme, _, rest = url.partition("://")
        self._common: dict[str, Any] = {
            "bootstrap.servers": rest.rstrip("/"),
            "logger": client_log,  # librdkafka would otherwise write straight to stderr
            "log.connection.close": False,
            # bridge writes records up to the largest dead letter (librdkafka's default: 1 MB)
            "message.max.bytes": settings.dlq_bytes,
        }
        if scheme == "kafka+ssl":
            self._common["security.protocol"] = "SSL"
        self._producer: Producer | None = None
        self._topics: set[str] = set()
        self._lookup = asyncio.Lock()
        self._closing = threading.Event()
        self._poller: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Delivery reports, appended by whichever thread serves librdkafka's callbacks and
        # resolved on the event loop in batches (deque: both ends are thread-safe).
        self._reports: deque[tuple[asyncio.Future[None], KafkaError | None, str]] = deque()
        self._consumer: Consumer | None = None
        self._consuming = False  # a consume() is running
        self._offsets = OffsetTracker()
        self._backlog: deque[Message] = deque()  # fetched while every slot was busy
        self._ahead: set[TP] = set()  # partitions paused RUN_AHEAD_MAX records past a slow job
        self._tiers = {tier_s: tier_queue(settings.prefix, tier_s) for tier_s in settings.delay_tiers}
        self._tier_names = tier_names(settings.prefix)
        # Tier topics of the prefix that `delay_tiers` does not name (an earlier setting's, or a
        # producer's with other tiers), each with its wait: their jobs are forwarded too.
        self._retired_tiers: dict[str, float] = {}
        self._forwarder: DelayForwarder | None = None
        self._burst_wait = BurstWait(settings.prefix)  # (says what a burst run waits for)
        self._forwarding: asyncio.Task[None] | None = None  # the forwarder's run, this round
        self._committer: Committer | None = None
        self._gates: dict[TP, Gate] = {}  # partitions assigned whose records wait to be marked
        self._opening: set[asyncio.Task[None]] = set()  # each reading where an assignment was left
        self._alone: asyncio.Lock | None = None  # held by the record of a careful start running
        self._leaving = False  # the round's consumer is leaving its group (`leave_group`)
        self._careful = 0  # how many records run alone after an owner stopped holding some
        self._process: Process | None = None

    # -- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        self._producer = new_producer(
            self._common,
            {
                "enable.idempotence": True,  # off by default in librdkafka; acks=all comes with it
                "acks": "all",
                "linger.ms": 2,
                "message.timeout.ms": int(PUBLISH_TIMEOUT_S * 1000),
            },
        )
        self._topics = await self._topic_names()  # fails fast, with a clear line, if nothing answers
        self._loop = asyncio.get_running_loop()
        self._poller = threading.Thread(target=self._serve_reports, name="bridge-kafka", daemon=True)
        self._poller.start()

    def _serve_reports(self) -> None:
        """Serve librdkafka's delivery reports, and hand each poll's to the loop in one call.

        One wake-up of the loop per poll rather than per message: call_soon_threadsafe writes
        to the loop's self-pipe each time, a system call, and was a tenth of a publish's cost.
        """
        assert self._producer is not None and self._loop is not None
        # (It ends with its loop too: an app used in `asyncio.run(app.enqueue_async(...))`
        # without `async with app` never closes this transport.)
        while not self._closing.is_set() and not self._loop.is_closed():
            self._producer.poll(0.05)
            if self._reports:
                with suppress(RuntimeError):  # the loop closed just now
                    self._loop.call_soon_threadsafe(self._resolve_reports)

    def _resolve_reports(self) -> None:
        while self._reports:
            _resolve(*self._reports.popleft())

    async def close(self) -> None:
        if self._producer is not None:
            # (flush serves the delivery reports in its thread)
            if await asyncio.to_thread(self._producer.flush, CLOSE_FLUSH_S):
                # Publishes Kafka has not acknowledged by now fail, rather than wait for good:
                # with the client gone, nothing would ever report them.
                self._producer.purge()
                await asyncio.to_thread(self._producer.flush, CLOSE_FLUSH_S)
            self._resolve_reports()
        self._closing.set()
        if self._poller is not None:
            self._poller.join(timeout=1)
        self._producer = self._poller = None

    async def _topic_names(self) -> set[str]:
        try:
            with mapped(f"cannot reach Kafka at {self.url}; is it running? (`bridge dev up` starts one)"):
                assert self._producer is not None
                metadata = await asyncio.to_thread(self._producer.list_topics, timeout=METADATA_TIMEOUT_S)
        except TransportError as exc:
            # (librdkafka says "Broker transport failure" whatever it was: say a name that does not resolve)
            servers, tls = self._common["bootstrap.servers"], "security.protocol" in self._common
            if unresolved := await asyncio.to_thread(_unresolved, servers):
                raise TransportError(f"{exc} ({unresolved})", retriable=exc.retriable) from exc
            if mismatch := await asyncio.to_thread(_tls_mismatch, servers, tls):
                raise TransportError(f"{exc} ({mismatch})", retriable=exc.retriable) from exc
            raise
        return set(metadata.topics)

    def held(self, delivery: Delivery) -> bool:
        # Its partition's assignment has not ended: one revoked (even if given straight back)
        # is read again from its committed offset, by whoever owns it now.
        return not delivery.handle.ended

    async def missing(self, queues: Collection[str]) -> list[str]:
        """Those of `queues` that no job can go to: topics that do not exist, Kafka's own
        (`__consumer_offsets`, ...), dead-letter topics and delay tiers' (those of tiers other
        settings made too, and their dead-letter topics).

        A job from another producer may name any topic as its queue, where its retries and delays
        go: one of Kafka's would fail every transaction it is in (a client may not write there),
        and a tier would send it round that tier for good.
        """
        absent = await self.absent(queues)
        return [
            t
            for t in queues
            if t in absent or t.startswith("__") or is_dead_letters(t) or self._tier_names.fullmatch(t)
        ]

    async def absent(self, topics: Collection[str]) -> list[str]:
        """Those of `topics` that do not exist, after a fresh look at any not seen before.

        A look that fails is retriable, whatever librdkafka says: it calls an unreachable Kafka
        (`_TRANSPORT`) no retriable error, and an outcome or a forward waiting on the look
        stopped `bridge consume` for good, where a new round was due once Kafka is back.
        """
        absent = [t for t in topics if t not in self._topics]
        if absent:
            async with self._lookup:  # one metadata request, however many publishes wait on it
                if any(t not in self._topics for t in absent):
                    try:
                        self._topics = await self._topic_names()
                    except TransportError as exc:
                        raise TransportError(str(exc), retriable=True) from exc
            absent = [t for t in absent if t not in self._topics]
        return absent

    def forget_topics(self, topics: Collection[str]) -> None:
        """Take `topics`, found deleted, out of those known to exist: the next look asks Kafka."""
        self._topics = self._topics - set(topics)

    async def _require_topics(self, topics: Sequence[str]) -> None:
        missing = await self.absent(topics)
        if missing:
            raise TransportError(
                f"Kafka topic {missing[0]} does not exist: run `bridge topology apply`"
                if len(missing) == 1
                else f"Kafka topics {', '.join(missing)} do not exist: run `bridge topology apply`",
                retriable=False,
            )

    async def _require_topics_soon(self, topics: Sequence[str]) -> None:
        """`_require_topics`, after a few looks over NEW_TOPIC_GRACE_S for any that are absent.

        Another tool's CreateTopics answers once Kafka's controller has recorded a topic; the
        broker bridge asks may leave it out of its metadata a moment longer (Kafka's AdminClient
        says so). A `bridge consume` started right after such a tool refused to start. Only the
        consume start waits: a publish to a missing topic, or a job naming one, fails at once.
        """
        deadline = time.monotonic() + NEW_TOPIC_GRACE_S
        while await self.absent(topics) and time.monotonic() < deadline:
            await asyncio.sleep(SERVED_POLL_S)
        await self._require_topics(topics)

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, message: Outgoing) -> None:
        # A job put straight in a tier has no header naming its queue: the forwarder would
        # dead-letter it there.
        if self._tier_names.fullmatch(message.queue):
            raise PublishError(
                f"Kafka topic {message.queue} is a delay tier, not a queue: enqueue the job to its own queue",
                retriable=False,
            )
        topic, headers = await self._route(message)
        await self._produce(topic, message.body, message.key, headers)

    async def _route(self, message: Outgoing) -> tuple[str, Headers | None]:
        """The topic (and headers) for `message`, once the topics it needs are known to exist.

        A delay shorter than every tier goes straight to the queue (see `tier_for`).
        """
        tier_s = tier_for(message.delay_s, tuple(self._tiers)) if message.delay_s else None
        if tier_s is None:
            await self._require_topics([message.queue])
            return message.queue, None
        # A delayed job waits in the tier that fits; the forwarder reads its queue from a header.
        tier = self._tiers[tier_s]
        await self._require_topics([message.queue, tier])
        return tier, [(QUEUE_HEADER, message.queue.encode())]

    async def _produce(
        self, topic: str, body: bytes | None, key: str | bytes | None, headers: Headers | None = None
    ) -> None:
        delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def report(err: KafkaError | None, _: Message) -> None:
            self._reports.append((delivered, err, topic))

        assert self._producer is not None, "publish() before connect()"
        while True:
            try:
                self._producer.produce(topic, body, record_key(key), headers=headers, on_delivery=report)
                break
            except BufferError:  # librdkafka's local queue is full: let deliveries drain
                await asyncio.sleep(0.005)
        await delivered

    async def settle(self, delivery: Delivery, publish: Sequence[Outgoing] = ()) -> bool:
        """Hand the outcome to the committer: it becomes durable with the offset past it.

        What a record publishes waits until every record before it in its partition is settled
        too, then goes out in the same transaction as the offset commit. A crash before that
        commit loses both, and the records run again: no hop is ever published twice.
        """
        assert delivery.partition is not None and delivery.offset is not None
        assert self._committer is not None, "settle() outside consume()"
        # Stamped now: a tier's wait counts from here, not from when the transaction goes out.
        now = time.time_ns() // 1_000_000
        outgoing: list[Record] = []
        tp = (delivery.queue, delivery.partition)
        for message in publish:
            try:
                topic, headers = await self._route(message)
            except TransportError as exc:
                if exc.retriable:  # (else its worker stops) unsettled, it held back tp for good
                    self._committer.fail(_unsettled(tp, delivery.offset, exc))
                raise
            outgoing.append((topic, message.body, message.key, headers, now))
        committable = self._offsets.done(tp, delivery.offset, delivery.handle)
        if committable is None and not self._offsets.owns(tp, delivery.handle):
            return False  # revoked meanwhile: its next owner runs it again
        self._committer.add(tp, delivery.offset, outgoing, committable)
        if committable is not None and tp in self._ahead and self._offsets.ahead(tp) <= RUN_AHEAD_MAX // 2:
            self._ahead.discard(tp)
            assert self._consumer is not None
            self._consumer.resume([TopicPartition(*tp)])
        return True

    def _retier(self, record: Record, now: int) -> Record:
        """A delay hop held behind an unsettled record of its partition (a slow job), routed
        again for the wait it has left as it goes out, and stamped then.

        Kept in its tier with the stamp of its settle, it went into its tier partition behind
        hops stamped later, and waited for them: up to a tier past its time.
        """
        topic, value, key, headers, stamp = record
        tier_s = next((s for s, name in self._tiers.items() if name == topic), None)
        if tier_s is None or stamp == 0:  # not a hop into a tier
            return record
        left_s = tier_s - (now - stamp) / 1000
        fitting = tier_for(left_s, tuple(self._tiers))
        if fitting is not None:
            return self._tiers[fitting], value, key, headers, 0
        queue = next(value for name, value in headers or () if name == QUEUE_HEADER)
        assert isinstance(queue, bytes)
        return queue.decode(), value, key, None, 0  # less than a tier left: the worker waits it out

    # -- consuming -------------------------------------------------------------------------

    async def consume(
        self,
        queues: Sequence[str],
        process: Process,
        *,
        concurrency: int,
        stop: asyncio.Event,
        burst: bool = False,
        grace_s: float = 30.0,
    ) -> None:
        with self._alone_consuming():
            await self._require_topics_soon([*queues, *self._tiers.values()])
            await self._warn_if_too_small([*queues, *self._tiers.values()])
            await require_internal_topics(self._common, self._topics)
            self._retired_tiers = self._tiers_not_named(self._topics)
            restarting = False  # a round ended in a failed transaction: consume was up and running
            while True:
                try:
                    await self._consume_round(queues, process, concurrency, stop, burst, grace_s)
                    return
                except _TransactionBroke as exc:
                    if stop.is_set():  # (a stop that was asked for ends well: nothing is lost)
                        log.error("%s; stopping, as asked", exc)
                        return
                    log.error("%s; consuming again in %g s", exc, RESTART_AFTER_S)
                except _NotStarted as exc:
                    # At the first start the error is the user's to see (bridge consume exits with
                    # it). After a Kafka restart, a new round may find Kafka still loading its
                    # transaction coordinator, for minutes: consume keeps trying, as it was running.
                    if not restarting or not exc.retriable or stop.is_set():
                        raise
                    log.error("%s; trying again in %g s", exc, RESTART_AFTER_S)
                restarting = True
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RESTART_AFTER_S)
                if stop.is_set():
                    return

    @contextmanager
    def _alone_consuming(self) -> Iterator[None]:
        """While a consume() runs: a second one of the app at once is refused. (Each consume's
        consumer and committer live on the transport, which an app's consumes share: a second
        one took over the first's commits, and stopping left the first committing nothing.)"""
        if self._consuming:
            raise ConfigError(
                "this app is consuming already, and a Kafka app consumes once at a time: give "
                "that consume() every queue, or make an app for each"
            )
        self._consuming = True
        try:
            yield
        finally:
            self._consuming = False

    async def _consume_round(
        self,
        queues: Sequence[str],
        process: Process,
        concurrency: int,
        stop: asyncio.Event,
        burst: bool,
        grace_s: float,
    ) -> None:
        """Consume with a new group member and transactional producer, from the committed offsets,
        until `stop` is set, a burst run drains, or a transaction fails."""
        consumer = self.group_consumer(self.settings.group)
        self._consumer = consumer
        transactional_id = f"{self.settings.group}.{uuid.uuid4().hex}"
        self._committer = committer = Committer(
            self._common, consumer, transactional_id, self._offsets.assigned, note=RUNNING,
            retier=self._retier,
        )  # fmt: skip
        self._process, self._careful, self._alone = process, concurrency, asyncio.Lock()
        self._gates.clear()
        self._ahead.clear()
        self._offsets.clear()  # (a rebalance callback that failed may have left partitions)
        self._leaving = False
        try:
            await committer.start()
        except TransportError as exc:
            self._consumer = self._committer = None
            await leave_group(consumer)  # (not subscribed yet: it never joined the group)
            raise _NotStarted(str(exc), retriable=exc.retriable) from exc
        ending = asyncio.Event()  # set when `stop` is, or when this round ends
        following = asyncio.create_task(_follow(stop, ending))
        consumer.subscribe(
            list(queues),
            on_assign=guarded(self._on_assign, committer.fail),
            on_revoke=guarded(self._on_revoke, committer.fail),
            on_lost=guarded(self._on_lost, committer.fail),
        )
        self._forwarder = DelayForwarder(self, f"{self.settings.prefix}.delay")
        self._forwarding = forwarding = asyncio.create_task(self._forwarder.run(ending))
        committing = asyncio.create_task(committer.run(ending))
        inflight = InFlight(self._run, concurrency)
        try:
            await self._fetch(consumer, queues, inflight, concurrency, ending, burst)
        finally:
            late = await inflight.finish(grace_s)
            if late:
                log.warning("%d jobs did not finish within %ss; they will run again", late, grace_s)
            ending.set()  # a burst run ends here: the forwarder and committer stop with it
            following.cancel()
            for opening in list(self._opening):
                opening.cancel()
            if not (await asyncio.wait([forwarding], timeout=FORWARDER_END_S))[0]:
                forwarding.cancel()
                await asyncio.wait([forwarding])
            # (what it raised is in `_failure`)
            await committing
            # What finished in the grace period; partitions with nothing left are handed over.
            # Tried twice: the revoke as it leaves its group commits nothing (see `_on_revoke`).
            for _ in range(2):
                if await committer.commit(leaving=self._handed_over()) or committer.failure is not None:
                    break
            self._leaving = committer.retired = True
            # The forwarder's consumer too, here: its task may have been cancelled above.
            await asyncio.gather(leave_group(consumer), self._forwarder.leave())
            failure = self._failure()
            self._consumer = self._committer = None
        if failure is not None:
            error = f"Kafka transaction failed; records since the last commit run again: {failure}"
            if failure is self._forwarder_failure():
                error = f"the delay forwarder stopped: {failure}"
            elif isinstance(failure, RoundEnded):
                error = f"{failure}; records since the last commit run again"
            if (isinstance(failure, KafkaException) and not _for_good(failure)) or (
                isinstance(failure, TransportError) and failure.retriable
            ):
                raise _TransactionBroke(error)
            raise TransportError(error, retriable=False)

    async def _warn_if_too_small(self, queues: Sequence[str]) -> None:
        """Say so at start when topics that consuming `queues` writes to take smaller records
        than it may write: a failing job near `max_message_bytes` would stop the worker later."""
        written = [name for q in queues for name in (q, dlq_name(q)) if name in self._topics]
        try:
            small = await self._too_small(written)
        except TransportError as exc:  # (no right to read configs, say): only the warning is lost
            log.info("could not compare the topics' max.message.bytes with what bridge writes: %s", exc)
            return
        if small:
            log.warning(
                "Kafka %s: a failing job near max_message_bytes would stop `bridge consume`;"
                " `bridge topology apply` raises max.message.bytes",
                "; ".join(
                    f"topic {t} takes {n} bytes of the {self._largest(t)} bridge may write"
                    for t, n in small.items()
                ),
            )

    def _failure(self) -> BaseException | None:
        """A failed transaction of the consumer or the forwarder, or a forwarder that stopped
        with an error (its transactions could not start, say): the consumer must stop. With no
        forwarder, no delayed job or retry would come back, and a burst run would never end."""
        forwarder = self._forwarder.committer if self._forwarder else None
        for committer in (self._committer, forwarder):
            if committer is not None and committer.failure is not None:
                return committer.failure
        return self._forwarder_failure()

    def _forwarder_failure(self) -> BaseException | None:
        forwarding = self._forwarding
        if forwarding is None or not forwarding.done() or forwarding.cancelled():
            return None
        return forwarding.exception()

    def group_consumer(self, group: str, **settings: Any) -> Consumer:
        """A consumer in `group` whose offsets are committed only inside transactions."""
        session_ms = int(self.settings.session_timeout_s * 1000)
        # Nothing polls while a stop's grace period lasts: a member not polled for this long
        # leaves its group, which reruns its jobs elsewhere and refuses its last commit.
        # librdkafka's default is 300 s; it must be at least the session timeout, and at most a day.
        poll_ms = int(min(MAX_POLL_INTERVAL_S, max(300.0, self.settings.grace_s + 60.0)) * 1000)
        return Consumer(
            {
                **self._common,
                "group.id": group,
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                "enable.partition.eof": False,
                # A member that died is noticed within this (librdkafka's default is 45 s), and
                # heartbeats go three times in it (librdkafka's default: every 3 s).
                "session.timeout.ms": session_ms,
                "heartbeat.interval.ms": min(3000, session_ms // 3),
                "max.poll.interval.ms": max(poll_ms, session_ms),
                **settings,
            }
        )

    async def _fetch(
        self,
        consumer: Consumer,
        queues: Sequence[str],
        inflight: InFlight,
        concurrency: int,
        stop: asyncio.Event,
        burst: bool,
    ) -> None:
        backlog = self._backlog
        backlog.clear()
        next_check = 0.0
        next_look = time.monotonic() + TOPIC_LOOK_S
        # The look runs beside the fetching, busy or idle (a busy consumer never looked): awaited
        # here, a slow metadata answer (up to METADATA_TIMEOUT_S) held back every fetch as long.
        look: asyncio.Task[None] | None = None
        paused = False
        idle_s = 0.001
        try:
            # A failed transaction stops fetching at once: what runs after it could never commit.
            while not stop.is_set() and self._failure() is None:
                if look is not None and look.done():
                    looked, look = look, None
                    looked.result()  # (a consumed topic deleted: TransportError)
                    next_look = time.monotonic() + TOPIC_LOOK_S
                if look is None and time.monotonic() >= next_look:
                    look = asyncio.create_task(self._require_still_there(queues))
                room = concurrency - len(inflight)
                if room <= 0:
                    if await inflight.wait_for_room(PAUSE_AFTER_S):
                        continue
                    # Every slot has been busy for a while: stop fetching but keep polling, so the
                    # group does not evict this consumer for exceeding max.poll.interval.ms.
                    paused = paused or self._pause(consumer, True)
                    backlog.extend(consumer.consume(1, 0))
                    continue
                if paused:
                    paused = self._pause(consumer, False)
                records = [backlog.popleft() for _ in range(min(room, len(backlog)))]
                if len(records) < room:
                    records += consumer.consume(min(room - len(records), FETCH_BATCH), 0)
                    if self._failure() is not None:
                        break  # (a rebalance callback in it failed: what it fetched runs next round)
                for record in records:
                    self._start(record, inflight)
                if records:
                    idle_s = 0.001
                    # Let the workers run what was just started. Handlers that do not suspend
                    # have all finished when this returns, so fetching goes on without waiting;
                    # if one did, the rest of the batch starts side by side.
                    await asyncio.sleep(0)
                    inflight.spread()
                    continue
                if burst and not inflight and time.monotonic() >= next_check:
                    if await self._drained(consumer, queues):
                        return
                    next_check = time.monotonic() + DRAIN_CHECK_S  # each check reads every partition
                await asyncio.sleep(idle_s)
                idle_s = min(idle_s * 2, IDLE_SLEEP_MAX_S)
        finally:
            if look is not None and not look.done():
                look.cancel()  # (not awaited: a cancel of this task must not be taken for its)
            elif look is not None and not look.cancelled():
                look.exception()  # (retrieved: what it found is moot once fetching ended)

    async def _require_still_there(self, queues: Sequence[str]) -> None:
        """Raise TransportError if a topic being consumed was deleted (a fresh metadata look);
        have the forwarder read the tier topics of the prefix made since (`_tiers_not_named`).

        Nothing else would tell: librdkafka only notes that the topic has no partitions any more,
        and a consumer with nothing to commit sits there for good. A broker that does not answer
        is no evidence either way; the next look tries again.
        """
        try:
            self._topics = await self._topic_names()
        except TransportError as exc:
            log.debug("could not look whether %s still exist: %s", ",".join(queues), exc)
            return
        if (found := self._tiers_not_named(self._topics)).keys() - self._retired_tiers.keys():
            self._retired_tiers |= found
            if self._forwarder is not None:  # a tier made since it started: forward from it too
                self._forwarder.add_tiers(found)
        if emptied := [t for t in self._retired_tiers if t not in self._topics]:
            # Deleted once empty, as the README says: still read, it was never read to its end,
            # and a burst run waited for it for good.
            log.info("delay tier topic %s is gone: no longer forwarded from", ", ".join(emptied))
            for topic in emptied:
                del self._retired_tiers[topic]
            if self._forwarder is not None:
                self._forwarder.drop_tiers(emptied)
        gone = [topic for topic in [*queues, *self._tiers.values()] if topic not in self._topics]
        if gone:
            raise TransportError(
                f"Kafka topic {', '.join(gone)} was deleted while bridge consume read it; "
                "`bridge topology apply` makes it again",
                retriable=False,
            )

    def _start(self, record: Message, inflight: InFlight) -> None:
        error = record.error()
        if error is not None:
            if error.code() == KafkaError.INVALID_SESSION_TIMEOUT:  # it would never join the group
                raise TransportError(
                    f"Kafka refuses session_timeout_s={self.settings.session_timeout_s:g}: a broker "
                    "takes from group.min.session.timeout.ms to group.max.session.timeout.ms "
                    "(6 s to 30 min unless configured otherwise)",
                    retriable=False,
                )
            log.warning("Kafka consumer: %s", error)
            return
        topic, partition, offset = coordinates(record)
        assignment = self._offsets.started((topic, partition), offset)
        if assignment is None:
            return  # its partition was revoked since it was fetched: the next owner runs it
        delivery = Delivery(record.value() or b"", topic, record.key(), partition, offset, handle=assignment)
        inflight.start(delivery)
        if len(assignment.order) > RUN_AHEAD_MAX and (topic, partition) not in self._ahead:
            self._ahead.add((topic, partition))  # (`settle` resumes it)
            assert self._consumer is not None
            self._consumer.pause([TopicPartition(topic, partition)])

    def _run(self, delivery: Delivery) -> Awaitable[None]:
        """Process `delivery`, through its partition's gate while that is closed (returns.py).

        Not a coroutine itself: a frame more per job was 1.5% of the no-op rate."""
        assert self._process is not None
        if not self._gates:  # every partition open: all but the first moments of an assignment
            return self._process(delivery)
        assert delivery.partition is not None
        gate = self._gates.get((delivery.queue, delivery.partition))
        return self._process(delivery) if gate is None else self._through(gate, delivery)

    async def _through(self, gate: Gate, delivery: Delivery) -> None:
        """Run `delivery` once its partition is marked; alone while its careful start lasts.

        Alone in the process, not only in its partition: when the process stops, the one record
        of a careful start then running is the one its note names. (With one per partition, the
        record running beside a killer in each other partition was counted with it, each time,
        and dead-lettered with it.) The records of partitions that opened run meanwhile.
        """
        assert self._process is not None and self._alone is not None
        # The lock first, in the order the records were started (asyncio's locks are fair), and
        # only then the wait for the gate to learn where the partition was left: a record
        # started as the gate learnt it could go first, and find the records before it
        # unsettled, as after a failed settling (the round ended, for nothing).
        async with gate.lock:
            await gate.ready.wait()
            if not gate.open:
                async with self._alone:
                    if not await self._pass(gate, delivery):
                        return  # its partition moved on, or the consumer failed: it runs elsewhere
                    if delivery.returns:  # it runs alone: the next record waits for it
                        await self._process(delivery)
                        return
        await self._process(delivery)

    async def _pass(self, gate: Gate, delivery: Delivery) -> bool:
        """Commit the note `delivery` runs under; whether it may run.

        Not while a record before it is unsettled, one whose settling failed: it would be
        committed past, and lost. The round ends instead (if its worker is not stopping
        already), and the next one runs both again.
        """
        assert delivery.partition is not None and delivery.offset is not None and self._committer
        if delivery.handle.ended:  # revoked while it waited: the records before it are another
            return False  # assignment's, and its partition's next owner runs it
        tp = (delivery.queue, delivery.partition)
        earlier = self._offsets.first_unsettled(tp)
        if earlier is not None and earlier < delivery.offset:
            self._committer.fail(_unsettled(tp, earlier, None))
            return False
        returns = gate.returns(delivery.offset)
        note = trying(returns) if returns else RUNNING
        if not await self._mark({tp: (delivery.offset, note)}, {tp: gate}):
            return False
        delivery.returns = returns
        gate.passed(returns)
        self._let_through(tp, gate)
        return True

    async def _open(self, gates: dict[TP, Gate]) -> None:
        """Read where newly assigned partitions were left; mark those handed over cleanly.

        One lookup and one transaction for the whole assignment, in the background: a record
        that arrives meanwhile waits at its gate. (Marking each partition at its first record
        took a transaction each, one after the other: the first 20 ms of every run.)
        """
        assert self._consumer is not None
        try:
            clean = await self._learn(self._consumer, gates)
            if clean and await self._mark(clean, gates):
                for tp in clean:
                    gates[tp].passed(0)
                    self._let_through(tp, gates[tp])
        finally:  # else its records would wait for good; unread, each first record is marked
            for gate in gates.values():
                gate.ready.set()

    async def _learn(self, consumer: Consumer, gates: dict[TP, Gate]) -> dict[TP, tuple[int, str]]:
        """Tell each gate its partition's committed offset and note; return the partitions
        handed over cleanly, each with the note to commit before its records run."""
        try:
            found = await asyncio.to_thread(_where_left, consumer, list(gates))
        except KafkaException as exc:  # counted as an owner that stopped: a careful start is safe
            log.info("could not read the committed offsets of %s: %s", ", ".join(map(str, gates)), exc)
            found = [(None, RUNNING) for _ in gates]
        clean: dict[TP, tuple[int, str]] = {}
        for (tp, gate), (offset, note) in zip(gates.items(), found, strict=True):
            gate.learn(offset, note)
            if offset is not None and self._gates.get(tp) is gate:
                self._offsets.found(tp, offset)
                if not gate.returns(offset):
                    clean[tp] = (offset, RUNNING)
        return clean

    def _let_through(self, tp: TP, gate: Gate) -> None:
        if gate.open and self._gates.get(tp) is gate:
            del self._gates[tp]

    async def _mark(self, notes: dict[TP, tuple[int, str]], gates: dict[TP, Gate]) -> bool:
        """Commit each `notes` (offset, note) of the partitions whose `gates` are still theirs;
        whether they are committed (False: a partition moved on, or the consumer failed)."""
        assert self._committer is not None
        while all(self._gates.get(tp) is gates[tp] for tp in notes) and self._failure() is None:
            for tp, (offset, note) in notes.items():
                self._committer.mark(tp, offset, note)
            if await self._committer.commit():
                return True
            await asyncio.sleep(COMMIT_INTERVAL_S)  # a rebalance refused it: try again
        return False

    def _pause(self, consumer: Consumer, pause: bool) -> bool:
        assignment = [tp for tp in consumer.assignment() if (tp.topic, tp.partition) not in self._ahead]
        if assignment:
            (consumer.pause if pause else consumer.resume)(assignment)
        return pause

    def _tiers_not_named(self, topics: Collection[str]) -> dict[str, float]:
        """The tier topics among `topics` that `delay_tiers` does not name, each with its wait,
        said once each. Left unread, the jobs waiting there (put there before the tiers were
        changed, or by a producer with other tiers) were never run, and went at retention."""
        found = self._unnamed_tiers(topics)
        for topic in found.keys() - self._retired_tiers.keys():
            tiers = ", ".join(tier_name(tier_s) for tier_s in self._tiers)
            log.warning(
                "delay tier topic %s is not in delay_tiers (%s): the jobs waiting there are forwarded"
                " when due all the same; delete the topic once it is empty, if no producer uses it",
                topic, tiers,
            )  # fmt: skip
        return found

    def _unnamed_tiers(self, topics: Collection[str]) -> dict[str, float]:
        """The tier topics among `topics` that `delay_tiers` does not name, each with its wait."""
        named = set(self._tiers.values())
        pattern = re.compile(rf"{re.escape(self.settings.prefix)}\.delay\.(\d+(?:ms|s|m|h|d))")
        return {
            t: parse_duration(m[1]) for t in sorted(topics) if (m := pattern.fullmatch(t)) and t not in named
        }

    async def _drained(self, consumer: Consumer, queues: Sequence[str]) -> bool:
        """Whether the group has read every partition of `queues` to its end.

        Partitions owned by other members (or by a member that died and whose session has
        not expired yet) count too: a burst run must not stop while they hold jobs.
        """
        if self._offsets.in_flight():
            return False
        assert self._committer is not None
        if not await self._committer.commit():
            return False
        # The tiers first: anything they forward before they are found empty is then counted
        # in the queues' high watermarks.
        assert self._forwarder is not None
        if await self._forwarder.drained():
            return await read_to_end(consumer, queues, self._common)
        if (due_ms := self._forwarder.next_due_ms()) is not None:
            self._burst_wait.delayed(f"delayed jobs (the next due at {iso_ms(due_ms, timespec='seconds')})")
        return False

    # Rebalance callbacks run inside consumer.consume(), on the event loop's thread: also as
    # the round's consumer leaves its group (`leave_group`). (Each is `guarded`: one that
    # raises there breaks the client.)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._leaving:
            # A rebalance that leaving meets may still assign partitions (those of a member
            # that left just before): they are revoked before it ends, and nothing of theirs
            # runs here.
            return
        for tp in partitions:
            self._offsets.assign((tp.topic, tp.partition))
        gates = {(tp.topic, tp.partition): Gate(self._careful) for tp in partitions}
        self._gates.update(gates)
        if gates:
            opening = asyncio.get_running_loop().create_task(self._open(gates))
            self._opening.add(opening)
            opening.add_done_callback(self._opening.discard)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            if self._committer is not None and not self._leaving:
                # What is settled so far, before the partitions move; those with nothing in
                # flight are handed over (their next owner need not start carefully). As the
                # round's consumer leaves, its last commit, just before, handed over what it
                # could: nothing has run since. (There, the member may have left its group
                # already, and the commit raised "Consumer group metadata not available".)
                self._committer.commit_now(leaving=self._handed_over(partitions))
        finally:
            self._drop(consumer, partitions)  # (whatever happens: they are not ours any more)

    def _handed_over(self, partitions: list[TopicPartition] | None = None) -> dict[TP, int]:
        """Those of `partitions` (default: all assigned) that can be handed over cleanly, and
        where: nothing in flight, and no note to keep where they were left (a count of returns
        for a record that has not run again yet)."""
        chosen = None if partitions is None else {(tp.topic, tp.partition) for tp in partitions}
        return {
            tp: at
            for tp, at in self._offsets.settled().items()
            if (chosen is None or tp in chosen) and not (tp in self._gates and self._gates[tp].keeps_note)
        }

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """The group session ended (Kafka was away longer than the session timeout, say): the
        round ends, and the next one consumes with a new producer and group member.

        The producer that lived through a Kafka restart was seen to wedge on its first
        send_offsets_to_transaction after it (see WEDGED_PAST_TIMEOUT_S): nothing ran for
        the 20 s until that was judged, 3 restarts in 8. Nothing more runs again for the
        round's end: this member could not commit the lost partitions' records any more.
        """
        self._drop(consumer, partitions)
        if partitions and self._committer is not None:  # (as it leaves, it is retired: no failure)
            self._committer.fail(
                RoundEnded("the Kafka consumer's group session ended, and its partitions with it")
            )

    def _drop(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Forget partitions revoked or lost: what they hold runs again at their next owner."""
        resume_leaving(consumer, partitions)  # (paused while every slot was busy, or far ahead)
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._ahead -= gone
        for tp in gone:  # another member may own them already: commit nothing more
            self._offsets.revoke(tp)
            self._gates.pop(tp, None)
            if self._committer is not None:
                self._committer.forget(tp)
        # Records fetched but not started: their next owner reads them from the committed offset.
        kept = [r for r in self._backlog if r.error() is not None or (r.topic(), r.partition()) not in gone]
        self._backlog.clear()
        self._backlog.extend(kept)

    # -- dead-letter tools -----------------------------------------------------------------
    # A record cannot be deleted from a Kafka log: a removed one is marked done in the
    # compacted topic `<topic>.done` (key `partition:offset`), in the same transaction as
    # whatever is published in its place. A mark is cleared by a tombstone (`_clear_done`).

    async def browse(self, queue: str) -> list[bytes]:
        await self._require_topics([queue, done_topic(queue)])
        done = await asyncio.to_thread(self._done_keys, done_topic(queue))
        return [body or b"" for _, _, body in await asyncio.to_thread(self._read_topic, queue, done)]

    async def sweep(self, queue: str, decide: Decide, removed: Callable[[], None] = unheard) -> int:
        await self._require_topics([queue, done_topic(queue)])
        # Any record a worker wrote goes back, whatever this process's own max_message_bytes:
        # a larger one was refused here, and ended every replay at that letter.
        producer = new_producer(
            self._common,
            {
                "transactional.id": f"{self.settings.prefix}.sweep.{queue}",
                "message.max.bytes": LARGEST_LETTER_BYTES,
            },
        )
        with mapped(f"could not start a transaction on {queue}"):
            # Fences any other sweep of this queue (its open transaction is aborted) before the
            # done marks are read, so two runs can never both act on the same record.
            await asyncio.to_thread(producer.init_transactions, METADATA_TIMEOUT_S * 6)
        done = await asyncio.to_thread(self._done_keys, done_topic(queue))
        count = 0
        for name, key, body in await asyncio.to_thread(self._read_topic, queue, done):
            try:
                publish = await decide(body or b"", key)
            except SweepStopped:
                break
            if publish is None:
                continue
            await self._require_topics([m.queue for m in publish])
            with mapped(f"could not remove a record from {queue}"):
                producer.begin_transaction()
                for message in publish:
                    producer.produce(message.queue, message.body, record_key(message.key))
                producer.produce(done_topic(queue), b"", name)
                await asyncio.to_thread(producer.commit_transaction, METADATA_TIMEOUT_S * 6)
            count += 1
            removed()
        return count

    def _done_keys(self, topic: str) -> set[str]:
        """The marks of a `.done` topic: each key whose last record is a mark, not a tombstone."""
        marked: dict[str, bool] = {}
        for name, _, value in self._read_topic(topic):
            marked[name] = value is not None
        return {key for key, mark in marked.items() if mark}

    def _clear_done(self, topics: list[str]) -> None:
        """Tombstone every mark of these `.done` topics (blocking): their dead-letter topics
        were made again, from offset 0, and an old mark `0:0` would hide the new letter there."""
        assert self._producer is not None
        for topic in topics:
            for key in self._done_keys(topic):
                self._producer.produce(topic, None, key)
        if self._producer.flush(METADATA_TIMEOUT_S * 6):
            raise TransportError(f"Kafka did not take the clearing of {', '.join(topics)}")

    def _read_topic(
        self, topic: str, done: Collection[str] = ()
    ) -> list[tuple[str, bytes | None, bytes | None]]:
        """Every committed record of `topic` as (its name, key, value), but those named in
        `done`: a record is named by `partition:offset`, or in a `.done` topic by its key (the
        record it marks). (A dead-letter topic keeps every letter for good: those replayed or
        purged are not held in memory, which every `bridge dlq` command filled with them.)"""
        assert self._producer is not None
        metadata = self._producer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
        start = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.topics[topic].partitions]
        records = []
        for record in read_committed(self._common, start):
            _, partition, offset = coordinates(record)
            key = record.key()
            marked = key if topic.endswith(".done") else None
            name = marked.decode() if isinstance(marked, bytes) else marked or f"{partition}:{offset}"
            if name not in done:
                records.append((name, key, record.value()))
        return records

    # -- topology --------------------------------------------------------------------------

    async def apply_topology(self, queues: Sequence[str], *, dry_run: bool = False) -> list[str]:
        existing = await self._topic_names()
        wanted = [name for q in queues for name in (q, dlq_name(q), done_topic(dlq_name(q)))]
        # A tier's own dead-letter topics take the records in it that name no queue (forwarder.py);
        # a tier the settings no longer name is forwarded from too, so it gets them as well.
        tier_topics = [*self._tiers.values(), *self._unnamed_tiers(existing)]
        tiers = [name for t in tier_topics for name in (t, dlq_name(t), done_topic(dlq_name(t)))]
        wanted += [name for name in tiers if name not in wanted]
        new = [t for t in wanted if t not in existing]
        small = await self._too_small([t for t in wanted if t in existing])
        short = await self._too_short([t for t in wanted if t in existing])
        plan = [f"kafka: topic {t} exists" for t in wanted if t in existing and t not in {*small, *short}]
        plan += [
            f"kafka: raise max.message.bytes of topic {t} from {limit} to {self._largest(t)}"
            for t, limit in small.items()
        ]
        plan += [
            f"kafka: raise retention.ms of topic {t} from {ms} to {self._tier_retention_ms(t)}"
            for t, ms in short.items()
        ]
        plan += [f"kafka: create topic {t} ({self.settings.partitions} partitions)" for t in new]
        # A dead-letter topic made again (deleted, say) starts at offset 0 beside its old marks.
        stale = [done_topic(t) for t in new if t.endswith(".dlq") and done_topic(t) in existing]
        plan += [f"kafka: clear the marks in topic {t} (its dead-letter topic is new)" for t in stale]
        if new and not dry_run:
            await self._create_topics(new)
        if stale and not dry_run:
            await asyncio.to_thread(self._clear_done, stale)
        if small and not dry_run:
            await self._set_configs("max.message.bytes", {t: str(self._largest(t)) for t in small})
        if short and not dry_run:
            await self._set_configs("retention.ms", {t: str(self._tier_retention_ms(t)) for t in short})
        return plan

    def _largest(self, topic: str) -> int | None:
        """The largest record bridge writes to `topic` (a broker takes 1 MB unless told more).

        A queue or tier takes jobs up to `max_message_bytes` plus the errors of their attempts,
        a dead-letter topic a dead letter of such a job; a `.done` topic, markers only (None).
        """
        if topic.endswith(".done"):
            return None
        return self.settings.dlq_bytes if topic.endswith(".dlq") else self.settings.queue_bytes

    def _new_topic(self, topic: str) -> NewTopic:
        largest = self._largest(topic)
        if largest is None:
            return NewTopic(topic, 1, config={"cleanup.policy": "compact"})
        config = {"max.message.bytes": str(largest)}
        if topic.endswith(".dlq"):  # dead letters stay until replayed or purged, as on RabbitMQ
            config["retention.ms"] = "-1"  # (a broker's default, 7 days, would delete them unseen)
        if (keep_ms := self._tier_retention_ms(topic)) is not None:
            config["retention.ms"] = str(keep_ms)
        return NewTopic(topic, self.settings.partitions, config=config)

    def _tier_retention_ms(self, topic: str) -> int | None:
        """How long delay tier `topic` keeps records (None: not a tier). A delayed job waits
        there for its forwarder, however long its tier; a cluster's default retention may be
        shorter than a tier, and its jobs were deleted before they were due."""
        tier_s = next((tier_s for tier_s, tier in self._tiers.items() if tier == topic), None)
        return None if tier_s is None else max(TIER_RETENTION_MS, round(2 * tier_s * 1000))

    async def _too_small(self, topics: Sequence[str]) -> dict[str, int]:
        """Those of `topics` (existing) that take smaller records than bridge writes to them,
        each with its `max.message.bytes`: topics made by hand or by another tool, or by a
        bridge from before it sized them, keep the broker's limit."""
        largest = {t: size for t in topics if (size := self._largest(t)) is not None}
        limits = await self._configs(list(largest), "max.message.bytes")
        return {t: int(limit) for t, limit in limits.items() if int(limit) < largest[t]}

    async def _too_short(self, topics: Sequence[str]) -> dict[str, int]:
        """Those of `topics` (existing) that are delay tiers keeping records for less time than
        `_tier_retention_ms`, each with its `retention.ms`: made by another tool, or by a
        bridge from before it set it."""
        wanted = {t: ms for t in topics if (ms := self._tier_retention_ms(t)) is not None}
        kept = await self._configs(list(wanted), "retention.ms")
        return {t: int(ms) for t, ms in kept.items() if int(ms) != -1 and int(ms) < wanted[t]}

    async def _configs(self, topics: list[str], name: str) -> dict[str, str]:
        """Each of `topics`' setting `name`, as the broker reports it."""
        if not topics:
            return {}
        admin = AdminClient(self._common)  # (kept until its futures are done: they fail once it is freed)
        futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in topics])
        values: dict[str, str] = {}
        for resource, future in futures.items():
            with mapped(f"could not read the config of Kafka topic {resource.name}"):
                config = await asyncio.wrap_future(future)
            values[resource.name] = config[name].value
        return values

    async def _set_configs(self, name: str, values: dict[str, str]) -> None:
        """Set each topic's setting `name` to its value in `values`, and wait until the broker
        applies them (a record written before then would still be refused, say)."""
        admin = AdminClient(self._common)
        changes = [
            ConfigResource(
                ResourceType.TOPIC,
                t,
                incremental_configs=[ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)],
            )
            for t, value in values.items()
        ]
        for resource, future in admin.incremental_alter_configs(changes).items():
            with mapped(f"could not set {name} of Kafka topic {resource.name}"):
                await asyncio.wrap_future(future)
        deadline = time.monotonic() + METADATA_TIMEOUT_S * 6
        while True:
            reported = await self._configs(list(values), name)
            if not (still := [t for t, value in reported.items() if value != values[t]]):
                return
            if time.monotonic() >= deadline:
                raise TransportError(f"Kafka topic {', '.join(still)} did not take the new {name}")
            await asyncio.sleep(SERVED_POLL_S)

    async def _create_topics(self, topics: list[str]) -> None:
        admin = AdminClient(self._common)
        futures = admin.create_topics([self._new_topic(t) for t in topics])
        for topic, future in futures.items():
            with mapped(f"could not create Kafka topic {topic}"):
                try:
                    await asyncio.wrap_future(future)
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
        # Recorded by the controller is not yet served by the leaders (see wait_until_served).
        await asyncio.to_thread(wait_until_served, self._common, topics, METADATA_TIMEOUT_S * 6)
        self._topics.update(topics)


def _where_left(consumer: Consumer, partitions: list[TP]) -> list[tuple[int | None, str | None]]:
    """Each partition's committed offset and its note (blocking). A partition never committed
    is read from its start, so it counts as left there, with no note; one whose offset could not
    be read counts as left by an owner that stopped (a careful start is safe)."""
    found = consumer.committed([TopicPartition(*tp) for tp in partitions], METADATA_TIMEOUT_S)
    left: list[tuple[int | None, str | None]] = []
    for committed in found:
        if committed.error is not None:
            left.append((None, RUNNING))
        elif committed.offset >= 0:
            left.append((committed.offset, committed.metadata))
        else:
            start, _ = consumer.get_watermark_offsets(committed, METADATA_TIMEOUT_S, cached=False)
            left.append((start if start >= 0 else None, None))
    return left


class _TransactionBroke(TransportError):
    """A transaction failed in a way that a new producer and group member may get past (Kafka
    restarted, say): the records since the last commit run again, as after a process restart."""


class _NotStarted(TransportError):
    """A round's transactional producer could not start, so the round consumed nothing."""


# Failed transactions that a new round would fail again: the user must grant a right.
def _unsettled(tp: TP, offset: int, why: TransportError | None) -> TransportError:
    """Why a round ends: a record that could not be settled, which then runs again."""
    because = f" ({why})" if why is not None else ""
    return TransportError(
        f"the record at offset {offset} of {tp[0]} [{tp[1]}] could not be settled{because}", retriable=True
    )


def _for_good(failure: KafkaException) -> bool:
    error = kafka_error(failure)
    return error is not None and error.code() in AUTHORIZATION_FAILED


async def _follow(stop: asyncio.Event, ending: asyncio.Event) -> None:
    await stop.wait()
    ending.set()


def done_topic(topic: str) -> str:
    """The compacted topic marking records of `topic` that the dead-letter tools removed."""
    return f"{topic}.done"


def _resolve(future: asyncio.Future[None], err: KafkaError | None, topic: str) -> None:
    if future.done():
        return
    if err is None:
        future.set_result(None)
        return
    detail, error = err.str(), PublishError
    if err.code() in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT):  # (by `close`)
        detail, error = f"the client closed first; it may still be published ({detail})", PublishUnconfirmed
    elif err.code() == KafkaError._MSG_TIMED_OUT:  # (librdkafka's own code for it)
        detail = (
            f"not taken within {PUBLISH_TIMEOUT_S:g} s: is Kafka reachable, and has the topic a "
            f"leader? It may still be published ({detail})"
        )
        error = PublishUnconfirmed
    future.set_exception(error(f"Kafka did not acknowledge a publish to {topic}: {detail}"))


TLS_LOOK_S = 2.0  # how long the look at whether a broker speaks TLS waits for it
# How a listener that is no TLS one answers a TLS handshake: Kafka reads the ClientHello as the
# size of a request far over its limit, and closes the connection.
NOT_TLS = ("WRONG_VERSION_NUMBER", "wrong version number", "UNEXPECTED_EOF", "EOF occurred", "record layer")


def _tls_mismatch(servers: str, tls: bool) -> str | None:
    """Why a broker that answers is not understood, if the first of `servers` that answers
    speaks TLS where the URL says plaintext (`tls` False), or the other way: librdkafka calls
    either a "Broker transport failure", as it does a broker that is down. A handshake refused
    for another reason (a client certificate it wants, say) says nothing either way."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # (only: does it speak TLS?)
    for server in servers.split(","):
        host, port = _host_port(server)
        try:
            raw = socket.create_connection((host, int(port)), timeout=TLS_LOOK_S)
        except (OSError, ValueError):
            continue  # (nothing answers there: the error says so as it is)
        with raw:
            try:
                with context.wrap_socket(raw, server_hostname=host):
                    speaks = True
            except (ssl.SSLError, ConnectionError) as exc:
                if not isinstance(exc, ConnectionError) and not any(sign in str(exc) for sign in NOT_TLS):
                    return None
                speaks = False
            except OSError:  # (a timeout: a broker that holds the connection says nothing)
                return None
        if speaks and not tls:
            return f"{server} speaks TLS: use kafka+ssl:// for it"
        if tls and not speaks:  # (or something between resets connections: said so, not judged)
            return f"{server} answers, but not in TLS: for a plaintext listener, use kafka://"
        return None
    return None


def _unresolved(servers: str) -> str | None:
    """Why none of `servers` (host:port,...) can be reached by name, if none resolves."""
    reasons = []
    for server in servers.split(","):
        host, port = _host_port(server)
        try:
            socket.getaddrinfo(host, port or None)
            return None
        except (OSError, UnicodeError) as exc:
            reasons.append(f"{host} does not resolve: {getattr(exc, 'strerror', None) or exc}")
    return "; ".join(reasons) or None


def _host_port(server: str) -> tuple[str, str]:
    """`host:port` (an IPv6 host in brackets) as its host, without the brackets, and port."""
    host, _, port = server.rpartition(":")
    return host.strip("[]"), port
