"""`Bridge`: where handlers register, jobs are enqueued and the daemon starts.

Nothing connects at import: a Bridge only records handlers until it is first used, and then it
opens one transport per event loop (the sync API runs coroutines on a private loop thread).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from contextlib import suppress
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from bridge import codec
from bridge.config import MAX_CONCURRENCY, Settings
from bridge.dlq import DeadLetters
from bridge.envelope import LONGEST_S, MAX_INT, Envelope, now_ms, uuid7
from bridge.errors import ConfigError, JobTooLarge, PublishUnconfirmed, StoreError, utf8
from bridge.idempotency import DEFAULT_LEASE_S, DEFAULT_WINDOW_S, Store, default_url, enqueue_key, open_store
from bridge.idempotency.sql import SqlStore
from bridge.jobs import Handler, JobSpec
from bridge.keys import Keys
from bridge.names import name_problem
from bridge.policy import DEFAULT_BACKOFF, DEFAULT_MAX_ATTEMPTS, Backoff, RetryPolicy
from bridge.registry import ENVELOPE, Registry, open_registry
from bridge.transports import Outgoing, Transport, open_transport
from bridge.transports.base import PUBLISH_TIMEOUT_S, tier_names
from bridge.transports.memory import MemoryTransport
from bridge.worker import Stats, Worker

log = logging.getLogger("bridge.app")

DEFAULT_QUEUE = "default"
# How long a dedupe enqueue holds its key while its publish is out (a publish gives up after
# PUBLISH_TIMEOUT_S), and how often an enqueue of the same key looks whether it was confirmed.
PUBLISH_HOLD_S = 2 * PUBLISH_TIMEOUT_S
PUBLISH_POLL_S = 0.05
H = TypeVar("H", bound=Handler)
T = TypeVar("T")


class Bridge:
    """A job application: handlers by job type, and the broker and registry they use."""

    def __init__(self, broker: str | None = None, registry: str | None = None, **settings: Any) -> None:
        self._overrides: dict[str, Any] = {"broker": broker, "registry": registry, **settings}
        self._settings: Settings | None = None
        self._registry: Registry | None = None
        self.jobs: dict[str, JobSpec] = {}
        self._transports: dict[asyncio.AbstractEventLoop, Transport] = {}
        self._opening: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._connecting = threading.Lock()
        self._memory: MemoryTransport | None = None
        self.clock: Callable[[], int] = now_ms  # epoch ms; tests may replace it
        self._portal: _Portal | None = None
        self._stores: dict[asyncio.AbstractEventLoop, Store] = {}
        self._memory_store: Store | None = None
        self._confirming: set[asyncio.Future[None]] = set()  # dedupe publishes being recorded
        self._warned_closed_loops = False
        self.stats: Stats | None = None  # of the running or the last consume()

    # -- configuration -----------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """Settings, resolved on first use from arguments, environment and bridge.toml."""
        if self._settings is None:
            self._settings = Settings.load(self._overrides)
        return self._settings

    def configure(self, **overrides: Any) -> None:
        """Override settings (the CLI's flags) before the app is first used."""
        if self._transports:
            raise ConfigError("configure() must come before the first enqueue or consume")
        self._overrides.update({k: v for k, v in overrides.items() if v is not None})
        self._settings = self._registry = None

    @property
    def registry(self) -> Registry:
        """The schema registry, opened on first use."""
        if self._registry is None:
            self._registry = open_registry(self.settings.registry, self.settings.schemas)
        return self._registry

    def job(
        self,
        type: str,
        *,
        queue: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff = DEFAULT_BACKOFF,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        give_up_on: type[BaseException] | tuple[type[BaseException], ...] = (),
        idempotency_ttl_s: float | timedelta = DEFAULT_WINDOW_S,
        idempotency_lease_s: float | timedelta = DEFAULT_LEASE_S,
        timeout_s: float | timedelta | None = None,
    ) -> Callable[[H], H]:
        """Register the decorated `(payload, ctx)` function, sync or async, as `type`'s handler.

        A failing job runs again up to `max_attempts` times in all, `backoff` apart (a tenacity
        wait, or a function of the attempt returning seconds), if its exception is one of
        `retry_on` and none of `give_up_on`; the handler may also raise `Retry(delay_s=...)` or
        `Permanent(reason)`. Problems with these settings are reported together at start.

        Jobs enqueued with an idempotency key succeed once per key within `idempotency_ttl_s`
        (from the success); a worker holds a key for `idempotency_lease_s`, renewed while the
        handler runs, so a key held by a worker that died frees itself after that long.

        A run that takes longer than `timeout_s` is stopped, and fails with TimeLimitExceeded:
        an `async def` handler is cancelled; a plain one gets the exception raised in its thread,
        which Python can do only between bytecodes (a thread in a long C call, `time.sleep` or a
        blocking read, takes it once the call returns; its job's slot and key stay held until
        then). None, the default: no limit.
        """

        for name, text in (("type", type), ("queue", queue)):
            if text is not None and not (isinstance(text, str) and text):
                raise ConfigError(f"app.job({name}=...) must be a name, not {text!r}")

        def register(func: H) -> H:
            if type in self.jobs:
                raise ConfigError(f"job type {type!r} already has a handler")
            policy = RetryPolicy(max_attempts, backoff, _classes(retry_on), _classes(give_up_on))
            is_async = _is_async(func)
            self.jobs[type] = JobSpec(
                type, queue or DEFAULT_QUEUE, func, is_async, policy,
                _seconds(idempotency_ttl_s), _seconds(idempotency_lease_s),
                None if timeout_s is None else _seconds(timeout_s),
            )  # fmt: skip
            return func

        return register

    def queues(self) -> list[str]:
        """The queues this app's handlers run on."""
        return sorted({spec.queue for spec in self.jobs.values()})

    # -- enqueue ---------------------------------------------------------------------------

    async def enqueue_async(
        self,
        type: str,
        payload: Mapping[str, Any],
        *,
        queue: str | None = None,
        key: str | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_attempts: int | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        ttl: float | timedelta | None = None,
        expires_at: datetime | None = None,
        dedupe: bool = False,
    ) -> str:
        """Validate and publish a job; return its id once the broker acknowledged it.

        `delay` (seconds or a timedelta) or `at` (an aware datetime) hold the job in the
        broker's delay tiers until then; `ttl` or `expires_at` dead-letter it as `expired` if
        it has not started by then. With `dedupe`, a job whose `idempotency_key` was enqueued
        within its type's window is not published again: the earlier job's id is returned.
        """
        if dedupe and idempotency_key is None:
            raise ConfigError("dedupe=True needs an idempotency_key")
        _check_options(queue, key, idempotency_key, headers, max_attempts)
        if not self.registry.ready_to_write(type):
            # A registry's answers, asked off the event loop: asked on it, a registry slow to
            # answer held up every task of the caller's loop, up to 41 s. (Only then: a thread
            # hop for schemas in hand let concurrent enqueues publish in any order.)
            await asyncio.to_thread(self._schemas_for, type)
        now = self.clock()
        run_at = _moment(delay, at, now, "delay", "at")
        ends_at = _moment(ttl, expires_at, now, "ttl", "expires_at")
        if ends_at is not None and ends_at <= max(now, run_at or now):  # (it could never run)
            expiry = "ttl" if ttl is not None else "expires_at"
            if run_at is None or run_at <= now:  # (it was dead-lettered `expired`, unrun)
                later = "a ttl of 1 ms or more" if ttl is not None else "an expires_at after now"
                raise ConfigError(f"the job would expire ({expiry}=) before it could start: give {later}")
            raise ConfigError(
                f"the job would expire ({expiry}=) no later than it may start "
                f"({'delay' if delay is not None else 'at'}=): expire it after that"
            )
        envelope = self.build_envelope(
            type,
            payload,
            queue=queue,
            key=key,
            idempotency_key=idempotency_key,
            headers=headers,
            max_attempts=max_attempts,
            run_at=run_at,
            expires_at=ends_at,
            created_at=now,
        )
        if problem := name_problem(envelope.queue):  # (on Kafka a `.dlq.done` one hid a letter)
            raise ConfigError(problem)
        body = codec.encode(self.registry.schema(ENVELOPE), envelope.to_avro())
        if len(body) > self.settings.max_message_bytes:
            raise JobTooLarge(
                f"a {type} job of {len(body):,} bytes is over max_message_bytes "
                f"({self.settings.max_message_bytes:,}): raise it, or pass a reference to the data"
            )
        delay_s = (envelope.run_at - now) / 1000 if envelope.run_at and envelope.run_at > now else None
        outgoing = Outgoing(envelope.queue, body, envelope.key, delay_s)
        if dedupe:
            assert idempotency_key is not None
            return await self._publish_once(envelope, enqueue_key(type, idempotency_key), outgoing)
        await (await self.transport()).publish(outgoing)
        return envelope.id

    def _schemas_for(self, type: str) -> None:
        """Have the registry find (or register) what a job of `type` is written with."""
        self.registry.writer(type)
        self.registry.schema(ENVELOPE)

    async def _publish_once(self, envelope: Envelope, key: str, outgoing: Outgoing) -> str:
        """Publish unless `key` was enqueued within the window; the id of the job that was.

        An enqueue whose key another one is publishing right now waits for that publish: it
        returns that job's id once the broker confirmed it, and publishes its own if it failed
        (or if its publisher died: the key's hold ends after PUBLISH_HOLD_S).
        """
        spec = self.jobs.get(envelope.type)
        if spec is not None and (problems := spec.problems()):  # (a worker reports them at start)
            raise ConfigError("; ".join(problems))
        store, transport = await self.idempotency_store(), await self.transport()  # (connected first)
        while (earlier := await store.remember(key, envelope.id, PUBLISH_HOLD_S)) is not None:
            if earlier.confirmed:
                return earlier.job_id
            await asyncio.sleep(PUBLISH_POLL_S)
        # The publish, and the key's record of how it ended, go on if this caller gives up (a
        # timeout around the enqueue, a request cancelled): given up while the publish was out,
        # the hold was removed, and the next enqueue of the key published the job again.
        window_s = spec.idempotency_ttl_s if spec else DEFAULT_WINDOW_S
        publishing = asyncio.ensure_future(
            _publish_recorded(transport, store, key, outgoing, envelope.id, window_s)
        )
        self._confirming.add(publishing)
        publishing.add_done_callback(self._confirming.discard)
        await asyncio.shield(publishing)
        return envelope.id

    def enqueue(self, type: str, payload: Mapping[str, Any], **options: Any) -> str:
        """`enqueue_async` for sync code: blocks until the broker acknowledged the job."""
        return self._run_sync(self.enqueue_async(type, payload, **options))

    def build_envelope(
        self,
        type: str,
        payload: Mapping[str, Any],
        *,
        queue: str | None = None,
        key: str | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_attempts: int | None = None,
        run_at: int | None = None,
        expires_at: int | None = None,
        created_at: int | None = None,
    ) -> Envelope:
        """A new job's envelope, its payload validated against the type's schema."""
        schema = self.registry.writer(type)
        record = dict(payload) if isinstance(payload, Mapping) else payload  # else: refused below
        body = codec.encode_validated(schema, record)
        spec = self.jobs.get(type)
        created = self.clock() if created_at is None else created_at
        return Envelope(
            id=uuid7(created), type=type, payload=body,
            queue=queue or (spec.queue if spec else DEFAULT_QUEUE), created_at=created,
            key=key, idempotency_key=idempotency_key, max_attempts=max_attempts,
            headers=dict(headers or {}), origin=self.settings.origin,
            run_at=run_at, expires_at=expires_at,
        )  # fmt: skip

    # -- running ---------------------------------------------------------------------------

    async def consume(
        self,
        queues: Sequence[str] | None = None,
        *,
        concurrency: int | None = None,
        burst: bool = False,
        stop: asyncio.Event | None = None,
    ) -> Stats:
        """Run this app's handlers until `stop` is set (or, with `burst`, the queues drain)."""

        if isinstance(queues, str):  # one queue's name, not its letters
            queues = [queues]
        settings = self.settings
        if concurrency is not None:
            if type(concurrency) is not int or not 1 <= concurrency <= MAX_CONCURRENCY:  # (not True)
                raise ConfigError(
                    f"concurrency= must be a whole number from 1 to {MAX_CONCURRENCY:,}, not {concurrency!r}"
                )
            settings = replace(settings, concurrency=concurrency)
        queues = self._job_queues(queues or self.queues())
        worker = Worker(self, await self.transport(), settings)
        self.stats = worker.stats
        await worker.run(queues, stop or asyncio.Event(), burst=burst)
        return worker.stats

    async def apply_topology(
        self, queues: Sequence[str] | None = None, *, dry_run: bool = False
    ) -> list[str]:
        """Create the queues of this app (or `queues`) and their dead-letter queues."""
        names = self._job_queues(queues or self.queues())
        if not names:
            raise ConfigError("no queues: register handlers with @app.job or pass --queues")
        return await (await self.transport()).apply_topology(names, dry_run=dry_run)

    def _job_queues(self, queues: Sequence[str]) -> list[str]:
        """`queues`, each once (a name given twice failed Kafka's subscribe with a traceback),
        unless one is named as a delay tier is (bridge's own, never a job queue), or is no name
        for a job queue."""
        tiers = [name for name in queues if tier_names(self.settings.prefix).fullmatch(name)]
        if tiers:
            raise ConfigError(
                f"queue {', '.join(tiers)} is named as a delay tier is (<prefix>.delay.<time>, or"
                " <prefix>.delay itself): give it another name"
            )
        problems = [problem for name in queues if (problem := name_problem(name))]
        if problems:
            raise ConfigError("; ".join(problems))
        return list(dict.fromkeys(queues))

    def dead_letters(self, queue: str) -> DeadLetters:
        """The dead-letter queue of `queue`: list, show, replay and purge its letters."""
        return DeadLetters(self, queue)

    def idempotency_keys(self, job_type: str) -> Keys:
        """The idempotency keys of `job_type` in this app's store: show and forget them."""
        return Keys(self, job_type)

    async def transport(self) -> Transport:
        """This event loop's transport, connected on first use."""
        loop = asyncio.get_running_loop()
        transport = self._transports.get(loop)
        if transport is None:
            self._let_go_of_closed_loops()
            # One connect per loop, however many first calls come at once (each made its own
            # transport, and all but the last were never closed).
            async with self._opening.setdefault(loop, asyncio.Lock()):
                transport = self._transports.get(loop)
                if transport is None:
                    transport = self._new_transport()
                    await transport.connect()
                    self._transports[loop] = transport
        return transport

    async def idempotency_store(self, *, concurrency: int | None = None) -> Store:
        """This event loop's idempotency store, opened on first use (see `bridge.idempotency`),
        with room for `concurrency` inbox transactions at once (the settings' by default)."""
        loop = asyncio.get_running_loop()
        store = self._stores.get(loop)
        if store is None:
            self._let_go_of_closed_loops()
            url = self.settings.idempotency
            if url is None and self.settings.require_broker().startswith("memory://"):
                url = "memory://"  # users' unit tests: nothing written to disk
            if url == "memory://":
                with self._connecting:  # shared by every loop, like the in-memory broker
                    self._memory_store = self._memory_store or open_store(url)
                store = self._memory_store
            else:
                # (`consume(concurrency=...)`'s: with the settings', PostgreSQL's pool held fewer
                # connections than inbox transactions could be open, and keys' batches waited.)
                pool_size = max(concurrency or 0, self.settings.concurrency)
                store = open_store(url or default_url(), pool_size=pool_size)
            self._stores[loop] = store
        elif concurrency is not None and isinstance(store, SqlStore):
            await store.make_room(concurrency)  # (opened earlier: by a dedupe enqueue, say)
        return store

    def _let_go_of_closed_loops(self) -> None:
        """Drop the transports and stores of event loops that closed without `aclose()`
        (`asyncio.run(app.enqueue_async(...))`, again and again): they can be closed no more,
        and each one kept would hold its connections (on Kafka, a client and its threads)."""
        closed = [loop for loop in (*self._transports, *self._stores) if loop.is_closed()]
        for loop in closed:
            self._transports.pop(loop, None)
            self._stores.pop(loop, None)
        if closed and not self._warned_closed_loops:
            self._warned_closed_loops = True
            log.warning(
                "this app was used on an event loop that closed without `async with app` (or "
                "`await app.aclose()`): its connections were dropped, not closed. Use `async with "
                "app:` inside asyncio.run(), or the sync app.enqueue()"
            )

    def _new_transport(self) -> Transport:
        if self.settings.require_broker().startswith("memory://"):
            with self._connecting:  # one shared in-memory broker per app, whatever the loop
                tiers = self.settings.delay_tiers
                self._memory = self._memory or MemoryTransport(
                    lambda: self.clock(), tiers, self.settings.prefix
                )
            return self._memory
        return open_transport(self.settings)

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Bridge:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close this loop's transport and store, and the registry's connections."""
        if self._registry is not None:
            self._registry.close()
            self._registry = None  # opened again if used again
        transport = self._transports.pop(asyncio.get_running_loop(), None)
        if transport is not None:
            await transport.close()
        loop = asyncio.get_running_loop()
        # (a copy first: the sync API's thread may add to the set meanwhile)
        if confirming := [task for task in list(self._confirming) if task.get_loop() is loop]:
            await asyncio.wait(confirming)  # (each ends once its store answers or fails: see _confirm)
        store = self._stores.pop(loop, None)
        if store is not None and store is not self._memory_store:
            await store.close()

    def close(self) -> None:
        """Close the sync API's transport and its loop thread."""
        if self._portal is not None and self._portal.pid != os.getpid():
            # (a forked child's: the parent's loop thread, which closing waited for, is not here)
            self._portal = None
        if self._portal is not None:
            self._portal.run(self.aclose())
            self._portal.stop()
            self._portal = None

    def _run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._connecting:
            # (A forked child, a gunicorn worker say, has the parent's portal but not its thread.)
            if self._portal is None or self._portal.pid != os.getpid():
                self._portal = _Portal()
        return self._portal.run(coro)


class _Portal:
    """An event loop on a daemon thread, so sync code can call the async API."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bridge-sync", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


def _moment(
    after: float | timedelta | None, at: datetime | None, now: int, after_name: str, at_name: str
) -> int | None:
    """`after` (seconds or timedelta from now) or `at` (aware datetime) as epoch ms."""
    if after is not None and at is not None:
        raise ConfigError(f"give {after_name}= or {at_name}=, not both")
    if isinstance(after, timedelta):
        after = after.total_seconds()
    if after is not None:
        if not isinstance(after, (int, float)) or isinstance(after, bool):
            raise ConfigError(f"{after_name}= must be seconds (a number) or a timedelta, not {after!r}")
        if not -LONGEST_S <= after <= LONGEST_S:  # (NaN too)
            shown = f"{after:g}" if isinstance(after, float) or abs(after) < 2**1000 else "a larger number"
            raise ConfigError(f"{after_name}= must be seconds up to 100 years, not {shown}")
        return now + int(after * 1000)
    if at is None:
        return None
    if not isinstance(at, datetime):
        raise ConfigError(f"{at_name}= needs a timezone-aware datetime, not {at!r}")
    if at.utcoffset() is None:  # (a tzinfo may give none)
        raise ConfigError(f"{at_name}= needs a timezone-aware datetime, e.g. datetime.now(UTC)")
    moment = int(at.timestamp() * 1000)
    if not -LONGEST_S <= (moment - now) / 1000 <= LONGEST_S:  # (as for after=: the envelope holds it)
        raise ConfigError(f"{at_name}= must be within 100 years of now, not {at.isoformat()}")
    return moment


async def _publish_recorded(
    transport: Transport, store: Store, key: str, outgoing: Outgoing, job_id: str, window_s: float
) -> None:
    """Publish the job enqueued under `key` with dedupe, and record that it was, or that it
    was not (the next enqueue of the key must publish). One the broker may still take (not
    confirmed in time) keeps its hold, which ends by itself after PUBLISH_HOLD_S."""
    try:
        await transport.publish(outgoing)
    except PublishUnconfirmed:
        raise
    except BaseException:
        with suppress(StoreError):  # (it would hide why; the hold then ends by itself)
            await store.forget(key, job_id)
        raise
    await _confirm(store, key, job_id, window_s)


async def _confirm(store: Store, key: str, job_id: str, window_s: float) -> None:
    """Tell the store that `job_id`, enqueued under `key`, was published: a store that does not
    answer is asked three more times, 3.5 s in all, and then the key's hold ends by itself."""
    for wait_s in (0.5, 1.0, 2.0, None):
        try:
            if not await store.confirm(key, job_id, window_s):
                log.warning(
                    "job %s was enqueued after its key's hold of %g s ended: another enqueue of the "
                    "key may have published it again", job_id, PUBLISH_HOLD_S,
                )  # fmt: skip
            return
        except StoreError as exc:
            if wait_s is None:
                log.warning("job %s was enqueued, but its key could not be confirmed: %s", job_id, exc)
                return
            await asyncio.sleep(wait_s)


def _check_options(
    queue: object, key: object, idempotency_key: object, headers: object, max_attempts: object
) -> None:
    """Refuse what an envelope cannot carry, with a line that names it (it was a traceback
    from deep in the Avro writer, or, for max_attempts, taken as something else)."""
    if headers is not None and not isinstance(headers, Mapping):
        raise ConfigError(f"headers= must be a mapping of strings to strings, not {headers!r}")
    texts = {"queue": queue, "key": key, "idempotency_key": idempotency_key}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or utf8(name) != name:
            raise ConfigError(f"headers= must be a mapping of strings to strings; a key is {name!r}")
        if value is None:  # (None is no text, but leaves the other options out)
            raise ConfigError(f"headers[{name!r}]= must be a string (UTF-8 text), not None")
        texts[f"headers[{name!r}]"] = value
    for name, value in texts.items():
        if value is not None and (not isinstance(value, str) or utf8(value) != value):
            raise ConfigError(f"{name}= must be a string (UTF-8 text), not {value!r}")
    if queue == "":  # (it went to the type's queue, or `default`, unsaid)
        raise ConfigError("queue= must name a queue, or be left out for the job type's own")
    if max_attempts is None:
        return
    if (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= MAX_INT
    ):
        raise ConfigError(f"max_attempts= must be a whole number from 1 to {MAX_INT:,}, not {max_attempts!r}")


def _seconds(value: Any) -> Any:
    """Seconds from a number or a timedelta (as `delay=` takes); anything else is left for
    `JobSpec.problems` to report at start."""
    return value.total_seconds() if isinstance(value, timedelta) else value


def _classes(value: object) -> tuple[Any, ...]:
    """`retry_on=` or `give_up_on=` as a tuple: one exception class is a tuple of one. (Any
    other mistake is reported at start, with the job types' other problems.)"""
    return tuple(value) if isinstance(value, (tuple, list, set, frozenset)) else (value,)


def _is_async(func: Callable[..., Any]) -> bool:
    """Whether calling `func` gives a coroutine to await: an `async def` function, an object
    whose `__call__` is one, or a plain decorator's wrapper of one (functools.wraps)."""
    called = type(func).__call__  # (an instance's, for a class that defines it)
    return any(inspect.iscoroutinefunction(f) for f in (func, called, inspect.unwrap(func)))
