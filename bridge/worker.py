"""The steps that run one delivery: decode, find the handler, run it, decide, settle.

A delivery always ends settled with what it must leave behind (nothing, or a dead letter), or
not settled at all when settling itself failed, in which case the broker delivers it again.
Nothing a message contains can crash this loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from bridge import codec
from bridge.codec import Schema
from bridge.config import Settings
from bridge.envelope import (
    DELIVERY_LIMIT,
    LONGEST_S,
    UNROUTABLE,
    DeadLetter,
    Envelope,
    JobError,
    cut_raw,
    iso_ms,
    now_ms,
)
from bridge.errors import (
    ConfigError,
    DecodeError,
    RegistryUnavailable,
    SchemaMismatch,
    StoreError,
    TransportError,
    UnknownJobType,
    UnknownSchema,
    describe,
    message_of,
    utf8,
)
from bridge.idempotency import Busy, Claim, Done, Store, new_token, refuses_for_good, run_key
from bridge.idempotency.lease import Lease
from bridge.idempotency.outage import Outage
from bridge.jobs import JobContext, JobSpec
from bridge.policy import Decision, GiveUp, decide, keep_recent, tier_for
from bridge.registry import DEAD_LETTER, ENVELOPE
from bridge.time_limits import Interruptible, TimeUp, past, within
from bridge.transports.base import (
    Delivery,
    Outgoing,
    Transport,
    cancelled_here,
    cut_off,
    dlq_name,
)

if TYPE_CHECKING:
    from bridge.app import Bridge

log = logging.getLogger("bridge.worker")
TRACEBACK_CHARS = 2000
TRACEBACK_PART_CHARS = 400  # a frame, or an exception's line with its message
DETAIL_CHARS = 2000  # of a dead letter's detail
TEST_CLOCK_STEP_S = 0.01  # how often a wait looks at an app clock that is not the real one
SCHEMA_FETCH_S = 30.0  # a job waits this long for the registry to answer for a new schema id


@dataclass
class Stats:
    """What one `consume` did: deliveries settled, dead letters, and when work began and ended."""

    processed: int = 0
    retried: int = 0
    delayed: int = 0  # arrived early, or found its key held, and went back (to a delay tier)
    dead_lettered: int = 0
    duplicates: int = 0  # acknowledged without running: their idempotency key was done
    first_s: float = 0.0  # time.monotonic() of the first delivery
    last_s: float = 0.0  # ... and of the last settle

    def summary(self) -> str:
        """One line for people: how many, and how fast once work began."""
        busy = max(0.0, self.last_s - self.first_s)  # (a stop before the first settle: no last_s)
        rate = f", {self.processed / busy:,.0f} jobs/s" if busy > 0 else ""
        outcomes = (
            f"{self.retried} retried, {self.delayed} delayed, {self.dead_lettered} dead-lettered, "
            f"{self.duplicates} duplicates"
        )
        return f"{self.processed} settled ({outcomes}) in {busy:.2f} s{rate}"


class Worker:
    """Runs an app's handlers for deliveries from one transport."""

    def __init__(self, app: Bridge, transport: Transport, settings: Settings) -> None:
        self.app = app
        self.transport = transport
        self.settings = settings
        self._registry = registry = app.registry
        registry.prepare(app.jobs)  # a type the registry lacks, or cannot be read here: no start
        self._envelope = registry.schema(ENVELOPE)
        self._dead_letter = registry.schema(DEAD_LETTER)
        self._jobs = _resolve(app, registry.schema)
        self._threads = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="bridge-job")
        self._store: Store | None = None  # the app's idempotency store, once a job needs it
        self._outage = Outage()  # keyed jobs wait here while the store does not answer
        self._leases: set[Lease] = set()  # idempotency keys held by running handlers
        # The outcomes counted by each delivery's run while it runs (by id(delivery)): see `_let_go`
        self._tallies: dict[int, dict[str, int]] = {}
        # Handler threads that outlived their task, and their keys' completions (`_in_thread`)
        self._outliving: set[Future[None]] = set()
        self._finishing: set[asyncio.Task[None]] = set()
        # Threads of handlers without a key whose tasks were cancelled (a stop's grace period
        # ending) while they ran; each leaves the set as it ends.
        self._unkeyed_outliving: set[Future[None]] = set()
        self._fetching: dict[int, asyncio.Future[Exception | None]] = {}  # schema ids asked for now
        self._stop = asyncio.Event()  # `run`'s: set when a delivery cannot ever be settled
        self._failure: TransportError | ConfigError | None = None  # ... and why
        self.stats = Stats()

    async def run(self, queues: Sequence[str], stop: asyncio.Event, *, burst: bool) -> None:
        """Consume `queues` until `stop` is set or, with `burst`, until they drain."""
        log.info("consuming %s on %s", ",".join(queues), self.transport.name)
        self._stop = stop
        renewing = asyncio.create_task(self._renew_leases())
        checking = asyncio.create_task(self._check_store())
        try:
            await self.transport.consume(
                queues, self.process, concurrency=self.settings.concurrency, stop=stop,
                burst=burst, grace_s=self.settings.grace_s,
            )  # fmt: skip
        finally:
            await self._wait_for_outliving()
            renewing.cancel()
            checking.cancel()
            self._threads.shutdown(wait=False, cancel_futures=True)
            if outliving := sum(not running.done() for running in list(self._unkeyed_outliving)):
                log.warning(
                    "%d handlers run on in threads past the grace period (a thread cannot be "
                    "stopped), and their jobs run again elsewhere; the process exits when they "
                    "end (signal again to exit now)",
                    outliving,
                )
        if self._failure is not None:
            raise self._failure

    async def _check_store(self) -> None:
        """Stop at once if the PostgreSQL or Redis store named refuses this worker (a wrong
        password, user or database): its keyed jobs would wait for it for good, as in an
        outage. Looked at beside the start, which a store that is away does not hold up."""
        url = self.settings.idempotency
        if url is None or not url.startswith(("postgres", "redis")):
            return
        try:
            await (self._store or await self._open_store()).inspect(run_key("bridge", "start"))
        except StoreError as exc:
            if not refuses_for_good(exc):
                return  # (away: keyed jobs wait for it, and say so)
            if self._failure is None:  # (raised once consume has stopped)
                self._failure = ConfigError(f"{exc}: check the user, password and database in its URL")
            self._stop.set()

    async def _wait_for_outliving(self) -> None:
        """Wait for keyed handlers' threads that outlived the grace period, renewing their
        keys, then record them (see `_in_thread`): the process could not exit before those
        threads end anyway, and a key given up early would let a copy of the job run again."""
        if self._outliving:
            log.warning(
                "%d keyed handlers run on in threads past the grace period (a thread cannot be "
                "stopped); waiting for them, to record their keys (signal again to exit now)",
                len(self._outliving),
            )
        elif self._finishing:
            log.warning(
                "recording the keys of %d finished jobs past the grace period (waiting for the "
                "store; signal again to exit now)",
                len(self._finishing),
            )
        while self._outliving or self._finishing:
            await asyncio.wait([*map(_wrapped, self._outliving), *self._finishing])

    async def _renew_leases(self) -> None:
        """Renew the keys held by running handlers, a few times per lease.

        All of a round's renewals go out together: the store batches them into one commit or
        round trip, and a store that answers slowly delays each by its own wait, not by the
        sum of the waits before it (one after the other, 16 renewals waiting 5 s each would
        outlast a 60 s lease). A renewal that fails in a way nobody expected is logged, and the
        next round renews again: it must not end the renewals of every later key.
        """
        every_s = min((spec.idempotency_lease_s for spec, _ in self._jobs.values()), default=60.0) / 3
        while True:
            await asyncio.sleep(every_s)
            leases = list(self._leases)
            outcomes = await asyncio.gather(*(lease.renew() for lease in leases), return_exceptions=True)
            for lease, outcome in zip(leases, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    job, key = lease.job_id, lease.key
                    log.error("could not renew job %s's claim on %r", job, key, exc_info=outcome)

    def _count(self, outcome: str, delivery: Delivery) -> None:
        """Count an outcome in `stats`, and in the tally of the delivery's run (see `_let_go`)."""
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        tally = self._tallies.setdefault(id(delivery), {})
        tally[outcome] = tally.get(outcome, 0) + 1

    def _let_go(self, delivery: Delivery, publish: Sequence[Outgoing], tally: dict[str, int]) -> None:
        """A delivery the broker took back while its job ran (RabbitMQ closed its channel: a
        consumer_timeout, a lost connection) comes again, and that run decides its outcome.
        This run's is dropped, and uncounted: a retry or dead letter published too would be a
        second one, and each would go on alone (two retry chains, two letters for one job)."""
        for outcome, times in tally.items():
            setattr(self.stats, outcome, getattr(self.stats, outcome) - times)
        if publish:
            log.warning(
                "a delivery from %s went back to the broker while its job ran: this run's outcome"
                " (%s) is left to its next run",
                delivery.queue, ", ".join(f"a publish to {m.queue}" for m in publish),
            )  # fmt: skip

    async def process(self, delivery: Delivery) -> None:
        """Run one delivery to its outcome and settle it; never raises. One that the broker took
        back while it waited (for a slot, or for its run_at) is left as it is: it comes again."""
        try:
            self.stats.first_s = self.stats.first_s or time.monotonic()
            try:
                publish = await self._outcome(delivery) if self.transport.held(delivery) else None
                if publish is None:
                    return
                if not self.transport.held(delivery):  # (see `_let_go`)
                    self._let_go(delivery, publish, self._tallies.get(id(delivery), {}))
                    return
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug in bridge: the delivery is neither lost nor left unsettled (which would
                # hold back a Kafka partition's commits), but goes round the shortest tier again.
                log.exception("no outcome for a delivery from %s; it waits and comes back", delivery.queue)
                publish = [self._again(delivery)]
            if not await self.transport.settle(delivery, publish):  # (it said why)
                self._let_go(delivery, (), self._tallies.get(id(delivery), {}))
                return
            self.stats.processed += 1
            self.stats.last_s = time.monotonic()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._let_go(delivery, (), self._tallies.get(id(delivery), {}))  # (unsettled: it runs again)
            if isinstance(exc, TransportError) and not exc.retriable:  # e.g. its dead-letter queue is gone
                self._stop_for(delivery, exc)
            else:  # the broker went away: the delivery stays unsettled and comes back
                log.exception("could not settle a delivery from %s", delivery.queue)
        finally:
            self._tallies.pop(id(delivery), None)

    def _refused_by_registry(self, exc: ConfigError) -> None:
        """Stop, the delivery left unsettled (it runs again once that is fixed): the registry
        refuses this worker's credentials (they expired, say), or its URL is not a registry's
        API. Every job would meet it: each was logged as a bug of bridge's, with a traceback,
        and sent round the shortest tier, again and again."""
        if self._failure is None:
            log.error("stopping: %s", exc)
            self._failure = exc
        self._stop.set()

    def _stop_for(self, delivery: Delivery, exc: TransportError) -> None:
        """Stop consuming, leaving `delivery` unsettled: it runs again once the cause is fixed.

        Going on would leave it unsettled for good: on RabbitMQ it holds a prefetch slot, on
        Kafka it holds back every later commit of its partition.
        """
        if self._failure is None:
            log.error("stopping: a delivery from %s cannot be settled: %s", delivery.queue, exc)
            self._failure = TransportError(
                f"stopped: a delivery from {delivery.queue} could not be settled, and runs again "
                f"once this is fixed: {exc}",
                retriable=False,
            )
        self._stop.set()

    async def _outcome(self, delivery: Delivery) -> Sequence[Outgoing] | None:
        try:
            if (unknown := self._unfetched(delivery.body, self.settings.queue_bytes)) is not None:
                await self._fetch(unknown)
            _, record = codec.decode(
                delivery.body, self._registry, self._envelope, max_bytes=self.settings.queue_bytes
            )
            envelope = Envelope.from_avro(record)
        except UnknownSchema as exc:  # nothing of it is decoded: it names no schema known here
            return [self._dead(delivery, "unknown_schema", str(exc), raw=delivery.body)]
        except SchemaMismatch as exc:
            return [self._dead(delivery, "undecodable", f"not a {ENVELOPE}: {exc}", raw=delivery.body)]
        except DecodeError as exc:
            return [self._dead(delivery, "undecodable", str(exc), raw=delivery.body)]
        except RegistryUnavailable as exc:
            log.error("a message from %s waits: %s", delivery.queue, exc)
            return [self._again(delivery)]
        except ConfigError as exc:  # the registry refuses this worker's credentials, or is no registry
            self._refused_by_registry(exc)
            return None
        if delivery.returns >= self.settings.delivery_limit:  # a job that stops its worker
            return [self._dead(delivery, DELIVERY_LIMIT, _returned(delivery), envelope=envelope)]
        if envelope.queue != delivery.queue and await self.transport.missing([envelope.queue]):
            # Bad input (bridge publishes a job to its envelope's queue): its retries and delays
            # would go there, and a publish to a queue that does not exist stops the worker (on
            # Kafka, one to Kafka's own topics fails every transaction it is in).
            detail = (
                f"its envelope names queue {envelope.queue!r}, which does not exist or is no queue "
                f"(it came from {delivery.queue!r}): its retries and delays could go nowhere"
            )
            return [self._dead(delivery, UNROUTABLE, detail, envelope=envelope)]
        job = self._jobs.get(envelope.type)
        if job is None:
            detail = f"no handler for job type {envelope.type!r} in this app"
            return [self._dead(delivery, "unknown_type", detail, envelope=envelope)]
        spec, schema = job
        try:
            if (unknown := self._unfetched(envelope.payload, self.settings.max_message_bytes)) is not None:
                await self._fetch(unknown)
            _, payload = codec.decode(
                envelope.payload, self._registry, schema, max_bytes=self.settings.max_message_bytes
            )
        except SchemaMismatch as exc:
            detail = f"payload of a {envelope.type} envelope: {exc}"
            return [self._dead(delivery, "schema_mismatch", detail, envelope=envelope)]
        except UnknownSchema as exc:
            return [self._dead(delivery, "unknown_schema", f"payload: {exc}", envelope=envelope)]
        except DecodeError as exc:
            return [self._dead(delivery, "undecodable", f"payload: {exc}", envelope=envelope)]
        except RegistryUnavailable as exc:
            log.error("job %s (%s) waits: %s", envelope.id, envelope.type, exc)
            return [self._later(envelope, delivery, 0.0)]
        except ConfigError as exc:
            self._refused_by_registry(exc)
            return None
        if envelope.expires_at is not None or envelope.run_at is not None:  # most jobs have neither
            now = self.app.clock()
            for field, at in (("run_at", envelope.run_at), ("expires_at", envelope.expires_at)):
                if at is not None and now >= 10**12 and 10**9 <= at < 10**11:
                    # 1970-01-12 to 1973-03-03 in ms; in seconds, 2001 to 5138. (A run_at ran at
                    # once; an expires_at dead-lettered the job as `expired`, in 1970.)
                    detail = (
                        f"its {field}, {at}, is {iso_ms(at)}: an envelope's times are epoch"
                        f" milliseconds (was it written in seconds? {iso_ms(at * 1000)})"
                    )
                    return [self._dead(delivery, "undecodable", detail, envelope=envelope)]
            starts = max(now, envelope.run_at or now)  # (the soonest it may start)
            if envelope.expires_at is not None and envelope.expires_at <= starts:
                # (A retry too, as Celery's `expires` and Dramatiq's `max_age` do: a job not
                # worth running after then is not worth retrying either. One due then or later
                # goes now: the worker would wait for it, if its time is less than a tier away.)
                return [self._expired(envelope, delivery)]
            if envelope.run_at is not None and envelope.run_at > now:
                early_s = (envelope.run_at - now) / 1000
                if early_s > LONGEST_S:  # (it would go round the delay tiers for good)
                    detail = (
                        f"its run_at, {iso_ms(envelope.run_at)}, is more than 100 years ahead: an "
                        "envelope's times are epoch milliseconds (was it written in microseconds?)"
                    )
                    return [self._dead(delivery, "undecodable", detail, envelope=envelope)]
                if tier_for(early_s, self.settings.delay_tiers) is not None:  # back to a tier
                    self._count("delayed", delivery)
                    return [Outgoing(envelope.queue, delivery.body, _key(envelope, delivery), early_s)]
                # Less than any tier early: more precise here. At a stop it has not started, and
                # goes back to its queue as it came (a wait of up to a minute ran on into the
                # grace period and started there, or was cut off and counted as a return; left
                # unsettled, every later job of its Kafka partition would run again).
                if not await self._until(envelope.run_at):
                    self._count("delayed", delivery)
                    return [Outgoing(envelope.queue, delivery.body, _key(envelope, delivery))]
                if not self.transport.held(delivery):
                    return None
        if envelope.idempotency_key is not None:
            return await self._run_once(spec, payload, envelope, delivery)
        return await self._run(spec, payload, envelope, delivery)

    def _unfetched(self, data: bytes, max_bytes: int) -> int | None:
        """The schema id `data` names, when the registry must be asked for it before decoding:
        `_fetch` asks off the event loop. (Asked on it, a registry slow to answer held up every
        job, and the worker's stop with them; one down slept the loop between its tries.)
        Not a coroutine, called twice a job: each frame more per job costs the no-op rate."""
        schema_id = codec.frame_id(data)
        if schema_id is None or len(data) > max_bytes or self._registry.cached(schema_id):
            return None
        return schema_id

    async def _fetch(self, schema_id: int) -> None:
        """Have the registry answer for `schema_id` (one request for the jobs that wait for it);
        RegistryUnavailable after SCHEMA_FETCH_S, while the request runs on and is remembered."""
        fetching = self._fetching.get(schema_id)
        if fetching is None:
            fetching = self._fetching[schema_id] = asyncio.get_running_loop().create_future()
            fetching.add_done_callback(lambda _: self._fetching.pop(schema_id, None))
            # A daemon thread: a request that hangs keeps no pool's thread, nor the exit, waiting.
            threading.Thread(
                target=self._ask_registry, args=(schema_id, fetching), name="bridge-registry", daemon=True
            ).start()
        try:
            failure = await asyncio.wait_for(asyncio.shield(fetching), SCHEMA_FETCH_S)
        except TimeoutError:
            raise RegistryUnavailable(
                f"the schema registry did not answer for schema id {schema_id} in {SCHEMA_FETCH_S:g} s"
            ) from None
        if failure is not None:
            raise failure

    def _ask_registry(self, schema_id: int, answered: asyncio.Future[Exception | None]) -> None:
        """In a thread: ask for `schema_id`, and settle `answered` with what that raised, except
        the refusal the registry remembers (decoding raises it again, with the bytes)."""
        failure: Exception | None = None
        try:
            self._registry.by_id(schema_id)
        except UnknownSchema:
            pass
        except Exception as exc:  # RegistryUnavailable, or ConfigError: not a registry's API
            failure = exc
        with suppress(RuntimeError):  # the event loop closed meanwhile: nobody waits
            answered.get_loop().call_soon_threadsafe(_settle, answered, failure)

    async def _until(self, run_at: int) -> bool:
        """Wait until `run_at` by the app's clock, or until the worker stops (then False): in one
        wait on the real clock, in steps on a test's, which may move faster than time (a wait
        of the time left ignored it)."""
        while (early_s := (run_at - self.app.clock()) / 1000) > 0:
            if self._stop.is_set():
                return False
            with suppress(TimeoutError):
                step_s = early_s if self.app.clock is now_ms else min(early_s, TEST_CLOCK_STEP_S)
                await asyncio.wait_for(self._stop.wait(), step_s)
        return not self._stop.is_set()

    async def _run_once(
        self, spec: JobSpec, payload: Any, envelope: Envelope, delivery: Delivery
    ) -> Sequence[Outgoing]:
        """Claim the job's idempotency key, run it, then complete or release the key."""
        assert envelope.idempotency_key is not None
        key = run_key(envelope.type, envelope.idempotency_key)
        lease_s = spec.idempotency_lease_s
        # One token for every try: a claim that landed though its answer was lost is then this
        # job's on the next try, not another holder's to wait a whole lease for.
        token = new_token()
        try:
            claim = await self._claim(key, envelope.id, lease_s, token)
        except StoreError as exc:  # wait for the store here, beside the worker's other keyed jobs
            try:
                claim = await self._outage.retry(exc, lambda: self._claim(key, envelope.id, lease_s, token))
            except StoreError as last:  # it waited GIVE_UP_S: the delay tiers take it from here
                log.error("%s waits in a delay tier: its key could not be claimed: %s", _job(envelope), last)
                return [self._later(envelope, delivery, self._outage.wait_s)]
        if isinstance(claim, Done):
            log.info("%s is a duplicate: its key was done by job %s", _job(envelope), claim.job_id)
            self._count("duplicates", delivery)
            return ()
        if isinstance(claim, Busy):
            return [self._later(envelope, delivery, claim.wait_s)]
        store = self._store
        assert store is not None  # the claim opened it
        lease = Lease(store, key, claim.token, envelope.id, lease_s, spec.idempotency_ttl_s, self._outage)
        if envelope.expires_at is not None and envelope.expires_at <= self.app.clock():
            await lease.finish(succeeded=False)  # (its claim waited out a store outage past then)
            return [self._expired(envelope, delivery)]
        self._leases.add(lease)
        try:
            outcome = await self._run(spec, payload, envelope, delivery, lease)
        except asyncio.CancelledError:
            if cancelled_here() and not lease.outlived:  # cut off by a stop: it runs again
                self._finish_later(lease, False)  # (held, its copy waited for the lease's end)
            raise
        finally:
            if not lease.outlived:
                self._leases.discard(lease)
        try:
            await lease.finish(succeeded=not outcome)
        except asyncio.CancelledError:
            if cancelled_here():  # the grace period ended while the key was being recorded
                # (Cut off, a success whose key the store did not take yet, waiting out an
                # outage, ran again once the claim lapsed. The first try may have landed.)
                self._finish_later(lease, not outcome, again=True)
            raise
        return outcome

    async def _claim(self, key: str, job_id: str, lease_s: float, token: str) -> Claim:
        """Claim `key`, opening the app's store at the first keyed job."""
        return await (self._store or await self._open_store()).claim(key, job_id, lease_s, token)

    async def _open_store(self) -> Store:
        self._store = await self.app.idempotency_store(concurrency=self.settings.concurrency)
        return self._store

    def _expired(self, envelope: Envelope, delivery: Delivery) -> Outgoing:
        attempt = f"attempt {envelope.attempt} " if envelope.attempt > 1 else ""
        detail = f"{attempt}not started before {iso_ms(envelope.expires_at or 0)}"
        return self._dead(delivery, "expired", detail, envelope=envelope)

    def _again(self, delivery: Delivery) -> Outgoing:
        """The delivery's bytes as they are, back through the shortest tier."""
        self._count("delayed", delivery)
        return Outgoing(delivery.queue, delivery.body, delivery.key, self.settings.delay_tiers[0])

    def _later(self, envelope: Envelope, delivery: Delivery, wait_s: float) -> Outgoing:
        """The job again, through a delay tier: at least the shortest one, so never a busy loop,
        and not before its own time (a job that waits for the registry may be early)."""
        self._count("delayed", delivery)
        now = self.app.clock()
        early_s = (envelope.run_at - now) / 1000 if envelope.run_at is not None else 0.0
        delay_s = max(wait_s, early_s, self.settings.delay_tiers[0])
        envelope.run_at = now + int(delay_s * 1000)
        body = codec.encode(self._envelope, envelope.to_avro())
        return Outgoing(envelope.queue, body, _key(envelope, delivery), delay_s)

    async def _run(
        self, spec: JobSpec, payload: Any, envelope: Envelope, delivery: Delivery, lease: Lease | None = None
    ) -> Sequence[Outgoing]:
        ctx = JobContext(envelope, lease.transaction if lease else None)
        task = asyncio.current_task()
        asked = task.cancelling() if task else 0
        try:
            try:
                if spec.is_async:
                    running = spec.func(payload, ctx)
                    await (running if spec.timeout_s is None else within(spec.timeout_s, running))
                else:
                    await self._in_thread(spec, payload, ctx, lease)
            except asyncio.CancelledError:
                raise  # (a stop's, or the handler's own: told apart below)
            except BaseException:
                await _take_back_stray_cancels(task, asked, envelope)
                raise
            await _take_back_stray_cancels(task, asked, envelope)
        except _Raised as carried:  # (a BaseException from a thread: decided as in `async def`)
            return self._outcome_of_failure(spec, envelope, carried.raised, delivery, lease)
        except Exception as exc:
            if cancelled_here():  # the worker stops, and the handler made its cancellation
                # into another error (a wrapper's, a cleanup's): cut off, it runs again, at the
                # same attempt. (Taken for its failure, it spent an attempt, or dead-lettered it.)
                raise asyncio.CancelledError from exc
            return self._outcome_of_failure(spec, envelope, exc, delivery, lease)
        except asyncio.CancelledError as exc:
            if cancelled_here():  # the worker stops
                raise
            # The handler's own: it awaited something that another task cancelled (or, in a
            # thread, a cancelled concurrent future). A failure like any other, to retry.
            failure = RuntimeError("the handler raised CancelledError: something it awaited was cancelled")
            failure.__cause__ = exc
            return self._outcome_of_failure(spec, envelope, failure, delivery, lease)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a library's SystemExit, or an abort of its own
            # A failure of the job, not the worker's: raised on, it left the delivery unsettled
            # (a Kafka partition's commits held back for good), and SystemExit ended the worker.
            return self._outcome_of_failure(spec, envelope, exc, delivery, lease)
        return ()

    def _outcome_of_failure(
        self, spec: JobSpec, envelope: Envelope, exc: BaseException, delivery: Delivery, lease: Lease | None
    ) -> Sequence[Outgoing]:
        """A retry or a dead letter; nothing once the job's inbox committed, which marked its key
        done: a retry would be dropped as a duplicate, and so would a replay of its letter.

        A job whose inbox the store failed (`Lease.unavailable`) waits for it in a delay tier,
        spending no attempt: a store outage is no more its failure there than at its claim."""
        if lease is not None and exc is lease.unavailable:
            log.error(
                "%s waits in a delay tier: the store failed its ctx.transaction(): %s", _job(envelope), exc
            )
            return [self._later(envelope, delivery, self._outage.wait_s)]
        if lease is None or not lease.completed:
            return [self._failed(spec, envelope, exc, delivery)]
        log.error(
            "%s raised after its ctx.transaction() committed, which recorded its key as done: "
            "it is not retried (what it does after the block runs once at most): %r",
            _job(envelope), exc,
        )  # fmt: skip
        return ()

    async def _in_thread(self, spec: JobSpec, payload: Any, ctx: JobContext, lease: Lease | None) -> None:
        """Run a plain `def` handler in one of the worker's threads.

        A thread cannot be stopped. If this task is cancelled (the worker stopped, and the grace
        period ran out), the handler runs on, and its key, if it has one, stays claimed and
        renewed until it ends, then is completed or released as the handler ended. A copy of
        the job delivered again meanwhile finds the key busy, then done. (The claim lapsed
        instead, and the copy ran a second time beside the first.)
        """
        clock = timer = None
        if (limit_s := spec.timeout_s) is not None:  # (counted from here: a wait for a thread too)
            clock = Interruptible()
            timer = asyncio.get_running_loop().call_later(limit_s, clock.interrupt)
        running = self._threads.submit(_in_a_thread, spec.func, payload, ctx, clock)
        try:
            result = await asyncio.wrap_future(running)
        except TimeUp:
            if not clock or not clock.returned:
                raise past(limit_s or 0) from None
            result = clock.returned[0]  # (the handler had returned: its limit came too late)
        except asyncio.CancelledError:
            if lease is None and cancelled_here() and running.running():
                self._unkeyed_outliving.add(running)  # (the process cannot exit before it ends: said at stop)
                running.add_done_callback(self._unkeyed_outliving.discard)
                if timer is not None and clock is not None and not clock.interrupted:  # (nothing
                    # waits on the loop for it: the loop's timer ended with the loop, and the
                    # handler, past its limit, ran on; once interrupted, it is not again)
                    timer.cancel()
                    left_s = max(0.0, timer.when() - asyncio.get_running_loop().time())
                    limit = threading.Timer(left_s, clock.interrupt)
                    limit.daemon = True
                    limit.start()
            if lease is not None and cancelled_here() and not running.cancelled():
                lease.outlived = True
                self._outliving.add(running)
                loop = asyncio.get_running_loop()
                running.add_done_callback(lambda _: self._thread_ended(loop, lease, running))
            raise
        finally:
            if timer is not None and running.done():  # (left on when a stop cut this task off:
                timer.cancel()  # a handler that runs on keeps its limit)
        if inspect.isawaitable(result):  # an async handler bridge took for a plain one
            if inspect.iscoroutine(result):
                result.close()
            raise TypeError(
                f"the {spec.type} handler returned {type(result).__name__} instead of running: make it "
                "`async def` (a decorator without functools.wraps hides that it is async)"
            )

    def _thread_ended(self, loop: asyncio.AbstractEventLoop, lease: Lease, running: Future[None]) -> None:
        """In the thread of a handler that outlived its task, as it ends: finish its lease."""
        succeeded = running.exception() is None
        with suppress(RuntimeError):  # the loop has closed: the claim lapses by itself
            loop.call_soon_threadsafe(self._finish_outlived, lease, running, succeeded)

    def _finish_outlived(self, lease: Lease, running: Future[None], succeeded: bool) -> None:
        self._outliving.discard(running)
        self._leases.discard(lease)
        self._finish_later(lease, succeeded)

    def _finish_later(self, lease: Lease, succeeded: bool, *, again: bool = False) -> None:
        """Complete or release `lease`'s key in a task of its own, which a stop waits for."""
        finishing = asyncio.create_task(lease.finish(succeeded=succeeded, again=again))
        self._finishing.add(finishing)
        finishing.add_done_callback(self._finishing.discard)

    def _failed(self, spec: JobSpec, envelope: Envelope, exc: BaseException, delivery: Delivery) -> Outgoing:
        """A retry through the delay tiers, or a dead letter, with the error recorded."""
        now = self.app.clock()
        # A copy: the handler's JobContext is a view of the envelope it ran with.
        envelope = replace(
            envelope, errors=keep_recent([*envelope.errors, _job_error(envelope.attempt, exc, now)])
        )
        try:
            decision: Decision = decide(spec.policy, exc, envelope.attempt, envelope.max_attempts, now)
        except Exception as broken:  # the job type's own backoff function raised
            detail = f"{describe(exc)} (and its retry policy failed: {broken!r})"
            decision = GiveUp("permanent", detail)
        if isinstance(decision, GiveUp):
            return self._dead(delivery, decision.reason, decision.detail, envelope=envelope)
        retry = replace(envelope, attempt=envelope.attempt + 1, run_at=decision.run_at)
        body = codec.encode(self._envelope, retry.to_avro())
        if len(body) > self.settings.queue_bytes:  # (only another producer's errors take that room)
            detail = f"its retry, {len(body):,} bytes, is too large for a queue: {describe(exc)}"
            return self._dead(delivery, "permanent", detail, envelope=envelope)
        log.info(
            "job %s (%s on %s) failed attempt %d, retrying at %s: %r",
            envelope.id, envelope.type, envelope.queue, envelope.attempt, iso_ms(decision.run_at), exc,
        )  # fmt: skip
        self._count("retried", delivery)
        delay_s = (decision.run_at - now) / 1000
        return Outgoing(retry.queue, body, _key(retry, delivery), delay_s if delay_s > 0 else None)

    def _dead(
        self,
        delivery: Delivery,
        reason: str,
        detail: str,
        *,
        envelope: Envelope | None = None,
        raw: bytes | None = None,
    ) -> Outgoing:
        if raw is not None:
            raw, cut = cut_raw(raw, self.settings.queue_bytes)
            detail += cut
        if len(detail) > DETAIL_CHARS:  # an exception's message can be any size; a record cannot
            detail = detail[: DETAIL_CHARS - 1] + "…"
        job = f"job {envelope.id} ({envelope.type})" if envelope else "a message"
        log.warning("dead-lettering %s from %s: %s: %s", job, delivery.queue, reason, detail)
        self._count("dead_lettered", delivery)
        letter = DeadLetter(
            reason=reason, detail=detail, queue=delivery.queue, at=self.app.clock(),
            partition=delivery.partition, offset=delivery.offset,
            consumer_group=self.settings.group, envelope=envelope, raw=raw,
        )  # fmt: skip
        body = codec.encode(self._dead_letter, letter.to_avro())
        return Outgoing(dlq_name(delivery.queue), body, delivery.key)


def _job_error(attempt: int, exc: BaseException, now: int) -> JobError:
    # Each part cut to TRACEBACK_PART_CHARS: a message of 2,000 characters (an HTTP error's
    # body, an SQL statement) filled the whole traceback, and pushed out every frame.
    parts = traceback.TracebackException.from_exception(exc, limit=-8).format()
    whole = "".join(
        part if len(part) <= TRACEBACK_PART_CHARS else f"{part[:TRACEBACK_PART_CHARS]}...\n" for part in parts
    )
    trace = utf8(whole[-TRACEBACK_CHARS:])
    return JobError(attempt, now, type(exc).__qualname__, message_of(exc)[:TRACEBACK_CHARS], trace)


def _in_a_thread(
    func: Callable[[Any, JobContext], Any], payload: Any, ctx: JobContext, clock: Interruptible | None
) -> Any:
    """`func(payload, ctx)`, interruptible by `clock` if it has one, with a StopIteration it
    lets out (`next()` on an empty iterator, say) as a RuntimeError, as Python makes one out of
    an `async def` handler, and a GeneratorExit or KeyboardInterrupt carried in `_Raised`: an
    asyncio future refuses to hold a StopIteration, so the await never returned and the job was
    never settled; a GeneratorExit ended the awaiting task, and a KeyboardInterrupt the worker."""
    if clock is None:
        return _calling(func, payload, ctx)
    clock.enter()
    try:
        # (A call of a built-in, the first place after the return that takes an exception from
        # another thread: one that comes after it is known to have come too late.)
        clock.returned.append(_calling(func, payload, ctx))
        return clock.returned[0]
    finally:
        clock.leave()


class _Raised(Exception):
    """A GeneratorExit or KeyboardInterrupt that a plain handler let out of its thread, carried
    to the worker in this (see `_in_a_thread`): the job's failure, as in an `async def` handler.
    (Only the handler raises a KeyboardInterrupt in a worker's thread: no signal reaches it.)"""

    def __init__(self, raised: BaseException) -> None:
        super().__init__(raised)
        self.raised = raised


def _calling(func: Callable[[Any, JobContext], Any], payload: Any, ctx: JobContext) -> Any:
    try:
        return func(payload, ctx)
    except StopIteration as exc:  # (as Python makes one out of a coroutine)
        raise RuntimeError(f"the handler raised {type(exc).__name__}: {exc}") from exc
    except (GeneratorExit, KeyboardInterrupt) as exc:
        raise _Raised(exc) from None


async def _take_back_stray_cancels(task: asyncio.Task[Any] | None, before: int, envelope: Envelope) -> None:
    """Withdraw the cancel requests made of `task` since it had `before` of them, unless a stop
    cut it off, saying so; for a handler that ended without a CancelledError. They are its
    own, left by a timeout helper that cancels its task and turns the CancelledError into a
    TimeoutError without `uncancel()` (async-timeout before 4.0.3, on Python 3.11). Left, they
    read as a stop: the job was neither failed nor settled, and its worker task ended, until
    none was left. One not delivered yet (made in the handler's last step) is taken here: it
    would land at the worker's next await."""
    if task is None or cut_off(task) or (stray := task.cancelling() - before) <= 0:
        return
    for _ in range(stray):
        task.uncancel()
    log.warning(
        "%s left its task cancelled, as a timeout helper that does not uncancel it does "
        "(async-timeout before 4.0.3, on Python 3.11): taken back", _job(envelope),
    )  # fmt: skip
    if getattr(task, "_must_cancel", False):
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            if cut_off(task):  # (a stop came meanwhile)
                raise


def _wrapped(running: Future[None]) -> asyncio.Future[None]:
    """An asyncio future of a thread's `running`, whose outcome is its thread's business (see
    `_thread_ended`): a failure it ends with is not also "Future exception was never retrieved"."""
    wrapped = asyncio.wrap_future(running)
    wrapped.add_done_callback(lambda done: done.cancelled() or done.exception())
    return wrapped


def _key(envelope: Envelope, delivery: Delivery) -> str | bytes | None:
    """The key a job goes on with: its envelope's, or else the record key it came with (a
    producer in another language may set only that one), as it came."""
    return envelope.key if envelope.key is not None else delivery.key


def _returned(delivery: Delivery) -> str:
    return (
        f"it came back to {delivery.queue} {delivery.returns} times without an outcome: each time "
        "the worker holding it stopped first (killed, out of memory, a crash outside Python), "
        "lost its connection to the broker or could not publish its outcome; dead-lettered so "
        "that it stops doing that again"
    )


def _job(envelope: Envelope) -> str:
    return f"job {envelope.id} ({envelope.type} on {envelope.queue})"


def _resolve(app: Bridge, schema_of: Any) -> dict[str, tuple[JobSpec, Schema]]:
    """Each handler with its job type's schema; every missing type reported at once."""
    jobs: dict[str, tuple[JobSpec, Schema]] = {}
    missing = []
    for name, spec in app.jobs.items():
        try:
            jobs[name] = (spec, schema_of(name))
        except UnknownJobType:
            missing.append(name)
    problems = [problem for spec in app.jobs.values() for problem in spec.problems()]
    if problems:
        raise ConfigError("; ".join(problems))
    if missing:
        raise UnknownJobType(f"no schema for {', '.join(missing)} in the registry ({app.settings.registry})")
    return jobs


def _settle(future: asyncio.Future[Exception | None], result: Exception | None) -> None:
    if not future.done():
        future.set_result(result)
