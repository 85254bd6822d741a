"""Offsets and what the records below them published, committed in Kafka transactions."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from contextlib import suppress
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from bridge.errors import TransportError
from bridge.transports.kafka.common import (
    METADATA_TIMEOUT_S,
    REFUSED_FOR_GOOD,
    Record,
    in_own_thread,
    kafka_error,
    log,
    mapped,
    new_producer,
    record_key,
)
from bridge.transports.kafka.returns import HANDED_OVER
from bridge.transports.offsets import TopicPartition as TP

COMMIT_INTERVAL_S = 0.05
# A record held longer than this behind an unsettled one of its partition is routed again as
# it goes out (`Committer.retier`); a shorter hold keeps its tier and its stamp.
HELD_SLACK_MS = 250
# A process killed mid-transaction blocks read_committed consumers of the topics it wrote to
# until the coordinator aborts it: after this, not the default 60 s. Transactions here last
# milliseconds. (A transaction with offsets of a deleted topic fails after it too.)
TRANSACTION_TIMEOUT_S = 10.0
# What each call of a transaction may take. Its requests to a coordinator that does not answer
# were seen to time out after TRANSACTION_TIMEOUT_S ("Local: Timed out (after 9995ms)"): a call
# out much longer is not waiting for an answer any more.
CALL_TIMEOUT_S = METADATA_TIMEOUT_S * 3
START_TIMEOUT_S = METADATA_TIMEOUT_S * 6  # init_transactions', which may wait for a coordinator to load
# librdkafka's send_offsets_to_transaction can wait for good, past its own timeout, for a group
# coordinator that went away (librdkafka issues 5456 and 5511, open in 2.16): seen here after a
# 15 s network cut between bridge consume and Kafka, which then ran nothing more and could not
# stop, and after Kafka restarts. A call still running this long past its own timeout has
# wedged its producer: the consumer's round ends, and a new one takes over. (Judged per call:
# a limit on the whole transaction, 80 s, held consumers up to 100 s after Kafka was back.)
WEDGED_PAST_TIMEOUT_S = METADATA_TIMEOUT_S
WEDGE_LOOK_S = 0.5  # how often a wait for a transaction looks whether it wedged
# Transactions aborted and tried again for this long without one committing are a WARNING, at
# most this often (each try is an INFO line): a broker refusing every try's records (its clock
# an hour off theirs, INVALID_TIMESTAMP) held back every commit of the process, said only at INFO.
STILL_ABORTED_WARN_S = 30.0
T = TypeVar("T")


Batch = dict[TP, tuple[int, str, list[tuple[int, list[Record]]]]]  # tp -> (offset, note, held records)


class Committer:
    """Commits consumed offsets, and what the records below them published, in Kafka transactions.

    One transactional producer per consumer process (a fresh transactional.id; the consumer
    group's metadata fences zombies, KIP-447). A transaction goes out every 50 ms while there is
    anything to commit, so its round trips are shared by every record settled meanwhile. Every
    offset of the group goes through here: a plain commit of a higher offset could otherwise be
    overwritten by a lower one from a transaction. A transaction refused because the group is
    rebalancing is aborted and tried again; any other failure stops the consumer, as does one
    that failed because a topic in it was deleted (but see `destinations_may_go`), and one
    whose call never returns (WEDGED_PAST_TIMEOUT_S).
    Each offset is committed with a note, its metadata: `note`, unless `mark` or
    `commit(leaving=...)` gave another (see returns.py).
    """

    def __init__(
        self,
        common: dict[str, Any],
        consumer: Consumer,
        transactional_id: str,
        owns: Callable[[TP], bool],
        note: str = "",
        retier: Callable[[Record, int], Record] | None = None,
        destinations_may_go: bool = False,
    ) -> None:
        self.consumer = consumer
        self.owns = owns
        self.note = note
        self.retier = retier  # a held record and the time it goes out: the record to send
        # Whether a topic it only publishes to may be deleted as a transaction goes out: for a
        # caller that then looks again at where its records go (the delay forwarder, whose
        # queues are anyone's), not a stop. It finds those topics in `gone_destinations`.
        self.destinations_may_go = destinations_may_go
        self.gone_destinations: list[str] = []
        self.producer = new_producer(
            common,
            {
                "transactional.id": transactional_id,
                "linger.ms": 5,
                "transaction.timeout.ms": int(TRANSACTION_TIMEOUT_S * 1000),
                # A transaction begun right after another is refused until the last one's
                # markers are written (CONCURRENT_TRANSACTIONS), and tried again after this:
                # 100 ms by default, a tenth of a second for each record of a careful start.
                "retry.backoff.ms": 10,
            },
        )
        self.held: dict[TP, list[tuple[int, list[Record]]]] = {}  # per partition, in offset order
        self.committable: dict[TP, int] = {}
        self.notes: dict[TP, str] = {}  # the next commit's note, where it is not `note`
        self.failure: BaseException | None = None
        # Set as its round ends, before its consumer closes. A call stuck then may return much
        # later (at the next Kafka restart): what it says is logged at DEBUG, as it concerns a
        # round long gone.
        self.retired = False
        self._lock = threading.Lock()  # one transaction at a time: the loop's or a rebalance's
        self._due: float | None = None  # when the librdkafka call running now should return by
        self._committing = asyncio.Lock()  # one `commit` at a time: the run loop's or a drain check's
        # The batch whose transaction is out, until its outcome is known: a failed one goes back
        # (`_restore`) before anything else is taken. A commit past it that did not wait would
        # commit offsets beyond records it never published: a rebalance's `commit_now` while the
        # run loop's transaction is out (which fails, sent with the generation before it), or a
        # `commit` after one cancelled mid-transaction (the round ended).
        self._out: tuple[Batch, concurrent.futures.Future[bool]] | None = None
        # Partitions lost or revoked while a transaction was out: if it fails, their part of
        # its batch is not put back, even if they are assigned here again by then (their new
        # assignment runs those records again, from the committed offset).
        self._forgotten: set[TP] = set()
        self._aborted_since: float | None = None  # the first of the tries aborted since one committed
        self._aborted_tries = 0
        self._aborted_last = 0.0
        self._try_started: float | None = None  # when the transaction being tried began
        self._warned_at = 0.0

    async def start(self) -> None:
        # (A cluster that cannot make __transaction_state at all is named at start: internal.py.)
        with mapped("could not start Kafka transactions (is its __transaction_state topic online?)"):
            await asyncio.to_thread(self.producer.init_transactions, START_TIMEOUT_S)

    def add(self, tp: TP, offset: int, records: list[Record], committable: int | None) -> None:
        """Record a settled offset: what it publishes waits for the offset commit past it."""
        if records:
            self.held.setdefault(tp, []).append((offset, records))
        if committable is not None:
            self.committable[tp] = committable

    def mark(self, tp: TP, offset: int, note: str) -> None:
        """Have the next commit put `note` at `offset`, the next record of `tp` to run."""
        self.committable[tp] = offset
        self.notes[tp] = note

    def fail(self, failure: BaseException) -> None:
        """End the consumer's round with `failure` (retriable: a new round consumes again from
        the committed offsets), unless it ends already: failed, or retired (a rebalance
        callback failing at every close would have a burst run start round after round)."""
        if self.failure is None and not self.retired:
            self.failure = failure

    def forget(self, tp: TP) -> None:
        """Drop what a lost or revoked partition held: its records run again elsewhere."""
        self.held.pop(tp, None)
        self.committable.pop(tp, None)
        self.notes.pop(tp, None)
        if self._out is not None:
            self._forgotten.add(tp)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.failure is None:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            await self.commit()

    async def commit(self, leaving: Mapping[TP, int] | None = None) -> bool:
        """Commit what is committable now; whether everything settled so far is committed.

        A commit made while another one's transaction is out (the run loop's) waits for it:
        that one took the batch, and finding nothing left to take is no proof it committed.
        `leaving` maps partitions with nothing in flight to where they are settled up to: they
        are committed there as handed over.
        """
        async with self._committing:
            if self.failure is not None:  # (one that wedged would be waited for again)
                return False
            if self._out is not None and not await self._outcome(self._out[1]):
                return False
            batch = self._take(leaving)
            if batch is None:
                return self.failure is None
            running = self._send(batch)
            if not await self._outcome(running):
                return False
            return running.result()

    async def _outcome(self, running: concurrent.futures.Future[bool]) -> bool:
        """Wait for the transaction `running` (out, maybe sent by a cancelled `commit`) and
        settle it, unless a rebalance's `commit_now` did; False if it wedged."""
        if not await self._returned(running):
            return False
        self._settle(running)
        return True

    async def _returned(self, running: concurrent.futures.Future[Any]) -> bool:
        """Wait for `running`; False if it wedged (`_overdue`). A wait cancelled, or given up,
        leaves the transaction running: it is out until it returns, and its result is dropped
        if nobody waits any more (even after the event loop closed)."""
        waiting = asyncio.wrap_future(running)
        try:
            while not (await asyncio.wait([waiting], timeout=WEDGE_LOOK_S))[0]:
                if self._overdue():
                    return self._wedged()
            return True
        finally:
            waiting.cancel()  # (only this end of it: `running` runs on)

    def commit_now(self, leaving: Mapping[TP, int] | None = None) -> None:
        """The same, blocking: for rebalance callbacks, which must finish before returning."""
        if self._wait_out() and (batch := self._take(leaving)) is not None:
            self._send(batch)
            self._wait_out()

    def _wait_out(self) -> bool:
        """Block until the transaction out, if any, is done, and settle it; False if it wedged
        (now, or before: a producer that failed is not waited for again)."""
        if self.failure is not None:
            return False
        if self._out is None:
            return True
        running = self._out[1]
        while not concurrent.futures.wait([running], timeout=WEDGE_LOOK_S).done:
            if self._overdue():
                return self._wedged()
        self._settle(running)
        return True

    def _send(self, batch: Batch) -> concurrent.futures.Future[bool]:
        """Start `batch`'s transaction in a thread of its own; it is out until `_settle`.

        The group metadata is read here, on the thread that consumes, not in the transaction's
        thread: a consumer call from another thread can wait on a consume() that is running a
        rebalance callback, and that callback (`commit_now`) waits for this transaction to
        finish; the two would wait on each other for good.
        """
        metadata = self.consumer.consumer_group_metadata()
        records, offsets, notes = _flatten(batch)
        if self.retier is not None and records:
            now = time.time_ns() // 1_000_000
            records = [self.retier(r, now) if now - r[4] > HELD_SLACK_MS else r for r in records]
        running = in_own_thread(
            lambda: self._transact(records, offsets, notes, metadata), "bridge-kafka-transaction"
        )
        self._out = (batch, running)
        return running

    def _settle(self, running: concurrent.futures.Future[bool]) -> None:
        """Once `running` is done: put its batch back if it did not commit (once only)."""
        if self._out is None or self._out[1] is not running:
            return  # settled already
        batch, self._out = self._out[0], None
        forgotten, self._forgotten = self._forgotten, set()
        if not running.result():
            self._restore({tp: part for tp, part in batch.items() if tp not in forgotten})

    def _take(self, leaving: Mapping[TP, int] | None) -> Batch | None:
        if self.failure is not None:
            return None
        batch: Batch = {}
        for tp, committable in self.committable.items():
            waiting = self.held.get(tp, [])
            note = self.notes.pop(tp, self.note)
            batch[tp] = (committable, note, [entry for entry in waiting if entry[0] < committable])
            self.held[tp] = [entry for entry in waiting if entry[0] >= committable]
        self.committable = {}
        for tp, offset in (leaving or {}).items():
            batch[tp] = (offset, HANDED_OVER, batch[tp][2] if tp in batch else [])
        return batch or None

    def _restore(self, batch: Batch) -> None:
        for tp, (committable, note, entries) in batch.items():
            if self.owns(tp):  # a partition revoked meanwhile runs its records elsewhere
                self.held[tp] = entries + self.held.get(tp, [])
                self.committable[tp] = max(committable, self.committable.get(tp, committable))
                if note != self.note and committable == self.committable[tp]:
                    self.notes.setdefault(tp, note)

    async def transact(
        self, records: list[Record], offsets: dict[TP, int], notes: dict[TP, str] | None = None
    ) -> bool:
        """Publish `records` and commit `offsets` (with `notes`) atomically; whether it committed.

        For records and offsets of the caller's own (the delay forwarder's), not the batches
        of `commit`. Call it from the thread that consumes, as `_send` says why.
        """
        if self.failure is not None:
            return False
        metadata = self.consumer.consumer_group_metadata()
        running = in_own_thread(
            lambda: self._transact(records, offsets, notes or {}, metadata), "bridge-kafka-transaction"
        )
        return await self._returned(running) and running.result()

    def _call(self, call: Callable[..., T], *args: Any, timeout: float) -> T:
        """`call(*args, timeout)`, a blocking librdkafka call, watched for a wedge (`_overdue`)."""
        self._due = time.monotonic() + timeout
        try:
            return call(*args, timeout)
        finally:
            self._due = None

    def _overdue(self) -> bool:
        """Whether the librdkafka call running now outlived its timeout (see WEDGED_PAST_TIMEOUT_S)."""
        due = self._due
        return due is not None and time.monotonic() > due + WEDGED_PAST_TIMEOUT_S

    def _wedged(self) -> bool:
        """A transaction whose call never returned: this producer is done for."""
        log.error(
            "a Kafka transaction's call ran %g s past its timeout (librdkafka waits for a coordinator "
            "that went away); consuming stops, and starts again with a new producer", WEDGED_PAST_TIMEOUT_S,
        )  # fmt: skip
        self.failure = KafkaException(
            KafkaError(
                KafkaError._TIMED_OUT,
                f"a transaction's call ran {WEDGED_PAST_TIMEOUT_S:g} s past its timeout",
            )
        )
        return False

    def _transact(
        self, records: list[Record], offsets: dict[TP, int], notes: dict[TP, str], metadata: object
    ) -> bool:
        """Publish and commit in one transaction (blocking); touches only the producer."""
        with self._lock:
            self._try_started = time.monotonic()
            try:
                self.producer.begin_transaction()
                for topic, value, key, headers, timestamp in records:
                    self.producer.produce(topic, value, record_key(key), headers=headers, timestamp=timestamp)
                positions = [
                    TopicPartition(t, p, offset, metadata=notes.get((t, p), self.note))
                    for (t, p), offset in offsets.items()
                ]
                self._call(
                    self.producer.send_offsets_to_transaction, positions, metadata, timeout=CALL_TIMEOUT_S
                )
                self._call(self.producer.commit_transaction, timeout=CALL_TIMEOUT_S)
                self._aborted_since, self._aborted_tries, self._try_started = None, 0, None
                return True
            except KafkaException as exc:
                return self._failed(exc, {record[0] for record in records}, {t for t, _ in offsets})
            except Exception as exc:  # BufferError: more records than librdkafka queues (100,000)
                # Raised on, it ended the commit loop and came back from every later commit,
                # while the consumer ran on, committing nothing.
                with suppress(KafkaException):
                    self._call(self.producer.abort_transaction, timeout=METADATA_TIMEOUT_S)
                self._say(
                    logging.ERROR, "Kafka transaction failed (%r); stopping so its records run again", exc
                )
                self.failure = exc
                return False

    def _failed(self, exc: KafkaException, written: set[str], committed: Collection[str] = ()) -> bool:
        """Abort the transaction that failed with `exc`, having written to the topics `written`
        and committed offsets of `committed`, and say why; False (it did not commit)."""
        error = kafka_error(exc)
        not_aborted: KafkaException | None = None
        try:
            self._call(self.producer.abort_transaction, timeout=METADATA_TIMEOUT_S)
        except KafkaException as abort_failed:
            not_aborted = abort_failed  # (said below, unless a cause that says more is found)
        gone = self._gone(written | set(committed))
        if gone and self.destinations_may_go and not set(gone) & set(committed):
            self.gone_destinations = gone
            if not_aborted is None:
                self._say(logging.WARNING, "Kafka transaction failed: topic %s it wrote to is gone (%s); "
                          "where its records go is looked at again", ", ".join(gone), exc)  # fmt: skip
                return False
            # (Seen on Kafka 4.2 in one try of four: the abort fenced, the producer done for.)
            self._say(logging.ERROR, "Kafka transaction failed: topic %s it wrote to is gone (%s), and "
                      "could not be aborted (%s)", ", ".join(gone), exc, not_aborted)  # fmt: skip
            self.failure = TransportError(
                f"Kafka topic {', '.join(gone)} it wrote to is gone, and its transaction could not be"
                f" aborted ({not_aborted}); a new round looks again where its records go",
                retriable=True,
            )
            return False
        if gone:
            # A topic it commits offsets for or publishes to was deleted: the transaction can
            # never commit, and trying again would hold back every other topic's commits too.
            # (Each try took 10 s, the transaction's timeout, and its error named no topic.)
            self._say(logging.ERROR, "Kafka transaction failed: topic %s is gone (%s)", ", ".join(gone), exc)
            self.failure = TransportError(
                f"Kafka topic {', '.join(gone)} was deleted; `bridge topology apply` makes it again",
                retriable=False,
            )
            return False
        if isinstance(error, KafkaError) and error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
            # A topic takes smaller records than bridge writes to it: every try would fail the
            # same way and hold back every other commit, in a loop.
            self._say(logging.ERROR, "Kafka transaction failed: %s", error.str())
            self.failure = TransportError(
                f"a topic refused a record as too large ({error.str()}); `bridge topology apply`"
                " raises the topics' max.message.bytes to what bridge writes",
                retriable=False,
            )
            return False
        if isinstance(error, KafkaError) and error.code() in REFUSED_FOR_GOOD:
            # librdkafka has the transaction aborted, which reads as an error a try gets past:
            # it was tried again every 50 ms for good, at INFO, holding back every commit.
            self._say(logging.ERROR, "Kafka transaction failed: %s", error.str())
            self.failure = TransportError(
                f"Kafka refuses a write of this transaction whatever the try ({error.name()}: "
                f"{error.str()}); its records run again once that is fixed",
                retriable=False,
            )
            return False
        if not_aborted is not None:
            # A producer with an abort still out refuses every later call ("Conflicting
            # abort_transaction API call is already in progress"), and one resumed may never
            # leave librdkafka: a consumer tried again every 10 s, committing nothing, for good.
            self._say(logging.ERROR, "Kafka transaction failed (%s), and could not be aborted (%s); "
                      "stopping so its records run again", exc, not_aborted)  # fmt: skip
            self.failure = not_aborted
            return False
        if (
            isinstance(error, KafkaError)
            and not error.fatal()
            and (error.txn_requires_abort() or error.retriable())
        ):
            self._aborted(error)
            return False
        self._say(logging.ERROR, "Kafka transaction failed (%s); stopping so its records run again", exc)
        self.failure = exc
        return False

    def _aborted(self, error: KafkaError) -> None:
        """Say that a transaction was aborted with `error` and is tried again: at INFO, or at
        WARNING once tries have failed for STILL_ABORTED_WARN_S, and that often after."""
        now = time.monotonic()
        # (From the try's start: a try may itself take 30 s and more, its calls timing out.)
        started, self._try_started = self._try_started or now, None
        if self._aborted_since is None or started - self._aborted_last > STILL_ABORTED_WARN_S:
            self._aborted_since, self._aborted_tries = started, 0  # (a try long after the last: anew)
        self._aborted_tries += 1
        self._aborted_last = now
        failing_s = now - self._aborted_since
        if failing_s < STILL_ABORTED_WARN_S or now - self._warned_at < STILL_ABORTED_WARN_S:
            self._say(logging.INFO, "Kafka transaction aborted (%s); it is tried again", error.str())
            return
        self._warned_at = now
        self._say(
            logging.WARNING,
            "Kafka transactions have been aborted for %.0f s (%d tries, nothing committed; the last: %s); "
            "they are tried again",
            failing_s, self._aborted_tries, error.str(),
        )  # fmt: skip

    def _say(self, level: int, message: str, *args: object) -> None:
        log.log(logging.DEBUG if self.retired else level, message, *args)

    def _gone(self, topics: set[str]) -> list[str]:
        """Those of `topics` that Kafka no longer has: none, when it does not answer."""
        try:
            existing = self._call(
                lambda timeout: self.producer.list_topics(timeout=timeout), timeout=METADATA_TIMEOUT_S
            ).topics
        except KafkaException:
            return []
        return sorted(topics - set(existing))


def _flatten(batch: Batch) -> tuple[list[Record], dict[TP, int], dict[TP, str]]:
    records = [record for _, _, entries in batch.values() for _, held in entries for record in held]
    offsets = {tp: committable for tp, (committable, _, _) in batch.items()}
    return records, offsets, {tp: note for tp, (_, note, _) in batch.items()}
