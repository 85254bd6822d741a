"""What the parts of the Kafka transport share: settings, record types, reading to the end."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from typing import Any, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import TopicMetadata  # type: ignore[attr-defined]  # not in its __all__

from bridge.errors import TransportError
from bridge.logs import REPEAT_WINDOW_S, Repeats

log = logging.getLogger("bridge.kafka")
client_log = logging.getLogger("bridge.kafka.client")  # librdkafka's own lines, through Repeats
FETCH_BATCH = 500
IDLE_SLEEP_MAX_S = 0.02
METADATA_TIMEOUT_S = 5.0
# How long the broker may hold a fetch of a reader that reads a topic to its end: at the end
# there is nothing to wait for (librdkafka's default, 500 ms, is paid at every end).
READER_FETCH_WAIT_MS = 10
SERVED_POLL_S = 0.05  # between looks at whether new topics are served yet
# How long a group member may take to give up its partitions, then to close (`leave_group`);
# each takes milliseconds when all is well.
LEAVE_S = 10.0
CLOSE_S = 30.0
# Errors of a partition whose log its leader has not created yet: wait and look again.
NOT_SERVED_YET = {
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC,
}  # fmt: skip
QUEUE_HEADER = "bridge-queue"  # on records in a delay tier: the topic they return to
Headers = list[tuple[str, str | bytes | None]]
# topic, value, key, headers, timestamp (epoch ms; 0 lets the producer stamp it)
Record = tuple[str, bytes | None, str | bytes | None, Headers | None, int]
MAX_KEY_BYTES = 4096  # a longer record key is written as its digest (`record_key`)
T = TypeVar("T")


def new_producer(common: dict[str, Any], settings: dict[str, Any]) -> Producer:
    """A producer of bridge's: `common` and `settings`, keys partitioned as the Java client does.

    murmur2, where librdkafka's default is CRC32: a key lands on one partition whichever
    language produced the job, and a retry or hop of a keyed job lands where the job was.
    """
    return Producer({**common, "partitioner": "murmur2_random", **settings})


async def read_to_end(consumer: Consumer, topics: Sequence[str], common: dict[str, Any]) -> bool:
    """Whether `consumer`'s group has no committed record left to read in `topics`.

    Every partition counts, also those owned by other members (or by one that died and whose
    session has not expired): a burst run must not stop while they hold jobs. The check reads
    from the group's committed offsets with a throwaway read_committed consumer, since
    transaction markers take offsets too and a committed offset below the high watermark may
    have nothing but markers after it. Offsets that cannot be read (the group is rebalancing)
    count as not read.
    """
    try:
        metadata = await asyncio.to_thread(consumer.list_topics, timeout=METADATA_TIMEOUT_S)
        partitions = [TopicPartition(t, p) for t in topics for p in metadata.topics[t].partitions]
        committed = await asyncio.to_thread(consumer.committed, partitions, METADATA_TIMEOUT_S)
        return await asyncio.to_thread(_nothing_after, common, committed)
    except (KafkaException, KeyError) as exc:  # KeyError: metadata of a new topic not there yet
        log.debug("cannot tell yet whether %s are read to the end: %r", ",".join(topics), exc)
        return False


def _nothing_after(common: dict[str, Any], committed: list[TopicPartition]) -> bool:
    """Whether no committed record sits at or after these offsets (runs in a thread)."""
    if _transaction_open(common, [TopicPartition(tp.topic, tp.partition) for tp in committed]):
        return False
    start = [TopicPartition(tp.topic, tp.partition, max(tp.offset, OFFSET_BEGINNING)) for tp in committed]
    try:
        with closing(read_committed(common, start)) as records:
            return next(records, None) is None  # a record nobody in the group has committed past
    except TransportError:
        return False


def _transaction_open(common: dict[str, Any], partitions: list[TopicPartition]) -> bool:
    """Whether any of `partitions` ends in records a read_committed reader cannot see yet.

    Such a reader stops at the last stable offset: before the records of a transaction still
    open, or just committed, whose markers the coordinator writes a moment after its producer's
    commit returns (a delay hop a consumer has just settled, for one). Those partitions are not
    read to their end. Looked at before reading, so a transaction completing meanwhile is read.
    Any error counts as open: the caller looks again.
    """
    ends: dict[str, list[int]] = {}
    try:
        for isolation in ("read_uncommitted", "read_committed"):  # the high watermark, then the LSO
            viewer = Consumer(
                {**common, "group.id": f"bridge-reader-{uuid.uuid4().hex}", "isolation.level": isolation}
            )
            try:
                ends[isolation] = [
                    viewer.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S)[1] for tp in partitions
                ]
            finally:
                viewer.close()
    except KafkaException as exc:
        log.debug("cannot tell whether a transaction is open on %s: %r", partitions, exc)
        return True
    return ends["read_uncommitted"] != ends["read_committed"]


def read_committed(common: dict[str, Any], start: list[TopicPartition]) -> Generator[Message, None, None]:
    """Every committed record from `start` to the end of each partition (blocking).

    Transaction markers take offsets too and are never delivered, so the end is where the
    consumer reports it, not the offset below the high watermark. A read that makes no progress
    for METADATA_TIMEOUT_S raises TransportError.
    """
    reader = Consumer({**common, "group.id": f"bridge-reader-{uuid.uuid4().hex}", "enable.auto.commit": False,
                       "isolation.level": "read_committed", "enable.partition.eof": True,
                       "fetch.wait.max.ms": READER_FETCH_WAIT_MS})  # fmt: skip
    try:
        # Leaders first: a partition assigned before its leader is known waits out librdkafka's
        # 500 ms retry before its first offset is even looked up.
        for topic in {tp.topic for tp in start}:
            with mapped(f"could not read {topic}"):
                reader.list_topics(topic, timeout=METADATA_TIMEOUT_S)
        reader.assign(start)
        at_end: set[tuple[str | None, int | None]] = set()
        deadline = time.monotonic() + METADATA_TIMEOUT_S
        while len(at_end) < len(start):
            if time.monotonic() > deadline:
                raise TransportError(f"timed out reading {', '.join(sorted({tp.topic for tp in start}))}")
            record = reader.poll(0.2)
            if record is None:
                continue
            deadline = time.monotonic() + METADATA_TIMEOUT_S
            error = record.error()
            if error is None:
                yield record
            elif error.code() == KafkaError._PARTITION_EOF:
                at_end.add((record.topic(), record.partition()))
    finally:
        reader.close()


def wait_until_served(common: dict[str, Any], topics: Sequence[str], timeout_s: float) -> None:
    """Block until the leader of every partition of `topics` answers for it (a thread's work).

    CreateTopics returns once the controller has recorded a topic; each partition's leader
    creates its log a moment later (150 to 250 ms for 30 new topics here) and refuses
    records until then. librdkafka retries those, yet in one CI run three jobs published within
    4 ms of their topic's creation were acknowledged and never appeared in it. A topic is ready
    here once each of its partitions answers a ListOffsets request, which only its leader does.
    Raises TransportError after `timeout_s`, or at once for an error that waiting cannot cure.
    """
    probe = Consumer({**common, "group.id": f"bridge-probe-{uuid.uuid4().hex}"})  # subscribes to nothing
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            waiting = _not_served(probe, topics)
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise TransportError(
                    f"Kafka has not started serving {', '.join(waiting)} {timeout_s:.0f}s after creating "
                    "them: its brokers' logs say why"
                )
            time.sleep(SERVED_POLL_S)
    finally:
        probe.close()


def _not_served(probe: Consumer, topics: Sequence[str]) -> list[str]:
    """Those of `topics` with a partition its leader does not serve yet."""
    with mapped(f"could not read the metadata of {', '.join(topics)}"):
        metadata = probe.list_topics(timeout=METADATA_TIMEOUT_S)
    waiting = []
    for topic in topics:
        error = _serving_error(probe, topic, metadata.topics.get(topic))
        if error is None:
            continue
        if error.code() not in NOT_SERVED_YET:
            raise TransportError(f"could not read Kafka topic {topic}: {error.str()}")
        waiting.append(topic)
    return waiting


def _serving_error(probe: Consumer, topic: str, found: TopicMetadata | None) -> KafkaError | None:
    """Why `topic` is not served yet, or None once each of its partitions answers."""
    if found is None or not found.partitions:
        return KafkaError(KafkaError._UNKNOWN_TOPIC)
    if found.error is not None:
        return found.error
    for partition in found.partitions:
        try:
            probe.get_watermark_offsets(TopicPartition(topic, partition), timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            return error
    return None


def client_text(record: logging.LogRecord) -> str:
    """A librdkafka line's facility and text, without the client's name (confluent-kafka logs
    `"%s [%s] %s"` with the facility, the client's name and the text)."""
    if isinstance(record.args, tuple) and len(record.args) == 3:
        facility, _, text = record.args
        return f"{facility} {text}"
    return record.getMessage()


client_log.addFilter(Repeats(REPEAT_WINDOW_S, client_text))


def resume_leaving(consumer: Consumer, partitions: list[TopicPartition]) -> None:
    """Resume `partitions` as they are revoked or lost (in the rebalance callback). A paused
    partition stays paused in librdkafka after it leaves: assigned here again later, it would
    never be fetched, and nothing here would know to resume it."""
    with suppress(KafkaException):  # (gone from the assignment already: nothing to resume)
        consumer.resume(partitions)


Rebalance = Callable[[Consumer, list[TopicPartition]], None]


class RoundEnded(TransportError):
    """A consumer's round ended for a reason other than a failed transaction. (Retriable, as
    TransportError is by default: the next round joins the group again.)"""


def guarded(callback: Rebalance, fail: Callable[[BaseException], None]) -> Rebalance:
    """`callback`, safe to hand librdkafka as a rebalance callback.

    One that raised left the partitions it was handling half done, and confluent-kafka (on
    Python 3.11) lost its error: the call that ran the callback raised a SystemError instead,
    "exception <class 'str'> is not a BaseException subclass". Here the error is logged with its
    traceback and ends the round (`fail`); the next round starts from the committed offsets.
    """

    def call(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            callback(consumer, partitions)
        except Exception as exc:
            log.exception("a Kafka rebalance callback failed")
            fail(RoundEnded(f"a Kafka rebalance callback failed ({exc!r})"))

    return call


async def leave_group(consumer: Consumer) -> None:
    """Have `consumer` leave its group, and close it, without waiting for good.

    Its partitions are revoked first, here on the event loop's thread: unsubscribe, then poll
    until nothing is assigned, twice in a row (a rebalance already on its way is served here
    too; what is fetched meanwhile is dropped: its next owner reads it from the committed
    offset). A close() that met a rebalance itself ran the callbacks in its own thread, and
    once in CI waited for good in librdkafka's unassign after them (librdkafka issue 4884,
    open; unsubscribing first is the workaround given in librdkafka issue 4527). close() then
    runs in a thread of its own for at most CLOSE_S: one that does not return is left behind
    with an error line, and cannot hold the process at its exit.
    """
    try:
        consumer.unsubscribe()
        deadline, quiet = time.monotonic() + LEAVE_S, 0
        while quiet < 2 and time.monotonic() < deadline:
            consumer.consume(FETCH_BATCH, 0)  # (serves the rebalance callbacks)
            quiet = 0 if consumer.assignment() else quiet + 1
            await asyncio.sleep(IDLE_SLEEP_MAX_S)
    except (KafkaException, RuntimeError) as exc:  # (the client failed: close() is all there is)
        log.debug("a Kafka consumer could not leave its group before closing: %r", exc)
    closing = asyncio.wrap_future(in_own_thread(consumer.close, "bridge-kafka-close"))
    if not (await asyncio.wait([closing], timeout=CLOSE_S))[0]:
        closing.cancel()  # (only this end of it)
        log.error("a Kafka consumer did not close within %g s; bridge goes on without it", CLOSE_S)
        return
    closing.result()


def in_own_thread(call: Callable[[], T], name: str) -> concurrent.futures.Future[T]:
    """Run `call` in a daemon thread of its own. A call that never returns (WEDGED_PAST_TIMEOUT_S,
    `leave_group`) then holds no worker of a shared pool, and the process can still exit.

    The future is marked running first, as an executor does: a caller that gave up waiting
    cancels its end of it, which then leaves this one alone, and a call that returns late
    is dropped. (Setting the result of a cancelled future raised in the thread.)"""
    result: concurrent.futures.Future[T] = concurrent.futures.Future()
    result.set_running_or_notify_cancel()

    def run() -> None:
        try:
            result.set_result(call())
        except BaseException as exc:  # the caller's to see
            result.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return result


def coordinates(record: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a record that is not an error."""
    topic, partition, offset = record.topic(), record.partition(), record.offset()
    assert topic is not None and partition is not None and offset is not None  # set unless error()
    return topic, partition, offset


@contextmanager
def mapped(what: str) -> Iterator[None]:
    """Translate librdkafka's errors into TransportError at one place."""
    try:
        yield
    except KafkaException as exc:
        error = kafka_error(exc)
        detail = error.str() if error is not None else str(exc)
        retriable = bool(error is not None and error.retriable())
        raise TransportError(f"{what}: {detail}", retriable=retriable) from exc


# A missing right: no try gets past it (a consumer stops, naming it).
AUTHORIZATION_FAILED = {
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
}  # fmt: skip
# ... nor past a record a topic's settings refuse: one without a key on a compacted topic
# (INVALID_RECORD), or a batch larger than it takes. (Not INVALID_TIMESTAMP: a broker whose
# clock is off refuses stamps it would take once its clock is right, and a new round stamps
# what it holds back again.)
REFUSED_FOR_GOOD = AUTHORIZATION_FAILED | {KafkaError.INVALID_RECORD, KafkaError.RECORD_LIST_TOO_LARGE}


def kafka_error(exc: KafkaException) -> KafkaError | None:
    """The KafkaError that librdkafka raised `exc` with, if it gave one."""
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else None


def record_key(key: str | bytes | None) -> str | bytes | None:
    """The record key bridge writes for `key`: itself, or when longer than MAX_KEY_BYTES its
    SHA-256 digest (`sha256:` and 64 hex digits), which keeps to one partition as the key does.

    A topic's record size is made for a job and the errors of its attempts, not for a key as
    large: another producer's long key (compressed, Kafka took it) made its job's dead letter,
    retry or delay larger than its topic takes, and every commit of its partition failed, at
    every start.
    """
    if key is None or len(key) <= MAX_KEY_BYTES // 4:  # (at most 4 bytes a character)
        return key
    raw = key.encode() if isinstance(key, str) else key
    if len(raw) <= MAX_KEY_BYTES:
        return key
    return "sha256:" + hashlib.sha256(raw).hexdigest()
