"""RabbitMQ through aio-pika; the only module that imports it.

Topology: a durable direct exchange `<prefix>.jobs`; each queue is a quorum queue bound to it
by its own name, and so is its dead-letter queue `<queue>.dlq`. A delay tier is a fanout
exchange `<prefix>.delay.<tier>` and its quorum queue `<prefix>.delay.<tier>.wait`, whose
messages expire after the tier's time into the direct exchange `<prefix>.delay.due`, where each
job queue is bound by its name too. What no queue takes there (its queue was deleted) goes to
that exchange's alternate exchange and queue, `<prefix>.delay.dlq`, for the `dlq` commands
(`bridge dlq list <prefix>.delay`). Without it, at-least-once dead-lettering kept such a job in
its tier, and 32 of them stopped everything else in the tier, for every queue.

Publishing: one channel with publisher confirms; every publish is mandatory, so a message that
no queue takes comes back and raises instead of being confirmed into the void. Many publishes
may be in flight at once; each returns when its own confirm arrives.

Consuming: on a connection of its own (see `consume`), a channel with a prefetch of twice the
concurrency unless set, manual ack only after the outcome (and anything it publishes) is
confirmed. A message that came back (its `x-delivery-count`) is taken and run alone: see
`_take_returns`. Deliveries come from aiormq, under aio-pika: building aio-pika's message
object cost more than everything bridge does for a no-op job. The connections are robust:
after a drop each reconnects and reopens its channel, and the consumers are started again on
it; deliveries of the dead channel are redelivered by the broker.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import re
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
import pamqp.constants
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import DeliveredMessage

from bridge.config import MAX_PREFETCH, Settings
from bridge.errors import PublishError, PublishRefused, PublishUnconfirmed, TransportError, safe_url
from bridge.logs import REPEAT_WINDOW_S, Repeats
from bridge.names import is_dead_letters, job_queue_of, tier_queue
from bridge.policy import tier_for
from bridge.transports import amqp_frames
from bridge.transports.base import (
    PUBLISH_TIMEOUT_S,
    BurstWait,
    Decide,
    Delivery,
    InFlight,
    Outgoing,
    Process,
    SweepStopped,
    cancelled_here,
    dlq_name,
    tier_names,
    unheard,
)

log = logging.getLogger("bridge.rabbitmq")
# While RabbitMQ is unreachable, aio-pika logs each reconnect attempt (two lines a second, at
# RECONNECT_INTERVAL_S): one of each kind per window goes out, with a count of those held back.
reconnects = Repeats(REPEAT_WINDOW_S)
logging.getLogger("aio_pika.robust_connection").addFilter(reconnects)


def _quiet_channel_restore(record: logging.LogRecord) -> bool:
    """aio-pika's ERROR line for each robust channel that tries to reopen itself on the
    connection that just dropped, kept at DEBUG: it happens at every drop, and the connection
    reopens its channels once it is back (aio-pika issue 305). It fails as closed, or, when
    the server closed the connection, as having no transport."""
    if not (isinstance(record.args, tuple) and len(record.args) == 3):
        return True
    callback, kind, error = record.args  # ("Callback %r error: %s: %s")
    closed = kind == "RuntimeError" and str(error).endswith(" closed")
    closed |= kind == "ChannelInvalidStateError" and str(error) == "No active transport in channel"
    if closed and "RobustChannel._on_close" in repr(callback):
        return _debug(record)
    return True


def _no_traceback_for_a_drop(record: logging.LogRecord) -> bool:
    """aiormq's lines about a dropped connection, without what says nothing more:
    - its warning that its reader stopped, without the traceback when the cause is the network
      (a reset, a close) or the server's Connection.Close (its ERROR line just before names the
      code and the reason); a malformed frame, or a protocol error, keeps it;
    - its ERROR line for each failed connect, kept at DEBUG: aio-pika's reconnect warning says
      the same (held back by `reconnects`), and a first connect's failure is bridge's to report.
    """
    if record.msg == "error when creating transport: %r":
        return _debug(record)
    error = record.exc_info[1] if record.exc_info else None
    dropped = type(error) is aiormq.exceptions.AMQPConnectionError and isinstance(
        error.__cause__, OSError | asyncio.IncompleteReadError
    )
    if dropped or type(error) is aiormq.exceptions.ConnectionClosed:
        record.msg, record.args = f"{record.getMessage()}: {error}", ()  # (no % in `error` read as a format)
        record.exc_info, record.exc_text = None, None
    return True


def _debug(record: logging.LogRecord) -> bool:
    """`record`, made a DEBUG one: logged only where its logger logs DEBUG."""
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


logging.getLogger("aio_pika.tools").addFilter(_quiet_channel_restore)
logging.getLogger("aiormq.connection").addFilter(_no_traceback_for_a_drop)
T = TypeVar("T")
QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
# The job and dead-letter queues bridge creates. RabbitMQ 4 gives a quorum queue a delivery
# limit of 20 unless told otherwise: a message that comes back unsettled for the 21st time is
# dropped, or dead-lettered where the queue has a dead-letter exchange, which these do not.
# Every `bridge dlq list` takes the dead letters it shows and gives them back, so the 22nd
# list of a dead-letter queue would find it empty. With a limit no message reaches, RabbitMQ
# counts returns (`x-delivery-count`) but drops nothing, and the worker dead-letters a job that
# keeps coming back (the `delivery_limit` setting) with a reason instead.
UNLIMITED = {**QUORUM, "x-delivery-limit": 2**31 - 1}
MAX_NAME_BYTES = 255  # an AMQP short string: the longest queue name there can be
REPLY_TO = "amq.rabbitmq.reply-to"  # the direct reply-to pseudo-queue (and its replies' names)
AMQP_NAME = pamqp.constants.DOMAIN_REGEX["queue-name"]  # what aiormq's frames take as a queue's name
# What a passive declaration of a name that is no queue bridge may use answers.
NO_QUEUE = (
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelLockedResource,
    aiormq.exceptions.ChannelAccessRefused,
)
# What aiormq raises when a channel or its connection is closed, or closes, under a call:
# an AMQP error (the broker's close), a reset socket, or a RuntimeError saying "closed".
GONE = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)
DEFAULT_LIMIT_FROM = 4  # RabbitMQ's major version that brought the default limit
CONNECT_TIMEOUT_S = 10.0
# How long a publisher that found no due exchange (a topology an older bridge made) waits before
# it tries again to bind a queue there, unless it publishes a delayed job (see `_bind_by_name`).
DUE_LOOK_S = 30.0
# How long close() waits for RabbitMQ to close the publish channel. In a memory or disk alarm
# nothing more is sent on a connection that published (aiormq waits for the unblock), and
# closing the connection closes the channel anyway.
CHANNEL_CLOSE_TIMEOUT_S = 1.0
DRAIN_CHECK_S = 0.1
RECONNECT_INTERVAL_S = 1.0
RECONNECT_POLL_S = 0.05  # an enqueue's pause between publishes the lost connection took
# Deliveries held per slot, unless the `prefetch` setting says otherwise (Dramatiq's default;
# Celery's is 4). With one per slot, every slot that finished waited a round trip to the
# broker for its next job, and keyed jobs, which finish a batch at a time when their store's
# commit comes back, left the loop idle a fifth of the time: 6,300 to 6,700 keyed jobs/s, and
# 7,500 to 8,100 with two per slot (no keys: 6,900 to 8,500, and 7,800 to 8,900). A delivery
# waiting for a slot when consume stops is not started: it goes back to the queue.
PREFETCH_PER_SLOT = 2
# How long settling a delivery tries again a publish (a retry, delay or dead letter) that
# RabbitMQ refuses, or that fails in another way that may pass (its channel closed under it, a
# look at its queue on a lost connection): a queue at its length limit may drain, a quorum
# queue may elect a leader, a channel reopens. Then a refusal stops the consumer, and the
# delivery is left unsettled; any other failure gives the delivery back to run again. (A
# publish on a lost connection does not fail: aio-pika waits for the connection to be back.)
SETTLE_PATIENCE_S = 10.0
SETTLE_WAIT_MAX_S = 2.0
# How RabbitMQ (3.8 to 4.2) words the closing of a channel over a message larger than it takes.
TOO_LARGE = re.compile(r"message size (\d+) is larger than (?:configured )?max size (\d+)")
# How it names the exchange when it closes a channel over a publish to one that does not exist
# (404) or that the user may not write to (403). (AMQP names cannot hold a quote.)
EXCHANGE_NAMED = re.compile(r"exchange '([^']*)' in vhost")
# How long close() waits for RabbitMQ to confirm the publishes still out (or waiting for a
# reconnect), as Kafka's close waits for its acknowledgements; then they fail.
CLOSE_FLUSH_S = 10.0
# How RabbitMQ (3.8.15 to 4.2) words the closing of a channel whose delivery waited too long.
ACK_TIMEOUT = re.compile(r"delivery acknowledgement on channel \d+ timed out\. Timeout value used: (\d+) ms")


class RabbitTransport:
    """A robust connection with a confirming publish channel and, while consuming, another
    connection with a consume channel."""

    name = "rabbitmq"

    def __init__(self, url: str, settings: Settings) -> None:
        amqp_frames.install()  # (a property another producer wrote could block a queue for good)
        self.url = url
        self.settings = settings
        self.exchange_name = f"{settings.prefix}.jobs"
        self._tiers = {tier_s: tier_queue(settings.prefix, tier_s) for tier_s in settings.delay_tiers}
        self._waits = [wait_queue(tier) for tier in self._tiers.values()]  # (the tiers' queues)
        self._tier_names = tier_names(settings.prefix)
        self._due = f"{settings.prefix}.delay.due"
        self._unrouted = dlq_name(f"{settings.prefix}.delay")
        self._existing: set[str] = set()  # queues seen to exist (a look binds nothing)
        self._bound: set[str] = set()  # queues bound by this process, or tried: ready to publish to
        self._jobs_bound: set[str] = set()  # bound to the jobs exchange, maybe not to the due one
        self._due_look_at = 0.0  # (monotonic) when to try again a bind to a due exchange not there
        self._refused: set[tuple[str, str]] = set()  # (queue, exchange) binds refused, told once
        self._lookup = asyncio.Lock()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        # The jobs exchange was not there at connect: declared before the first publish. (Not
        # at connect: a look with a mistyped prefix left an exchange behind, and a producer whose
        # user may not configure could not connect at all.)
        self._exchange_missing = False
        # Every publish gets its own message id: aiormq matches a returned (unroutable) publish
        # to its confirmation by message id, so a shared one would fail the wrong publish and
        # confirm the returned one. The id names the publish; the job id is in the envelope.
        self._publisher = os.urandom(6).hex()
        self._publishes = itertools.count()
        self._publishing: set[asyncio.Timeout] = set()  # the deadlines of enqueues not yet confirmed
        self._all_confirmed = asyncio.Event()  # set while `_publishing` is empty
        self._all_confirmed.set()
        self._closing = False
        # RabbitMQ's max_message_size, once it refused a message over it: larger ones are refused
        # here, since each refusal closes the publish channel under the publishes beside it.
        self._max_message_size: int | None = None

    async def connect(self) -> None:
        with _mapped(
            f"cannot reach RabbitMQ at {safe_url(self.url)}; is it running? (`bridge dev up` starts one)"
        ):
            self._connection = await self._open_connection("publish")
            self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._exchange_missing = not await self._exchange_exists()
        self._closing = False

    @asynccontextmanager
    async def _own_channel(self) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        """An aiormq channel of its own on the publish connection, closed after: RabbitMQ closes
        the channel of a call it refuses (a passive declaration of what does not exist, a bind
        it does not allow), and that must not be the publish channel."""
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            yield await channel.get_underlay_channel()
        finally:
            with _ignored():
                await channel.close()

    async def _exchange_exists(self) -> bool:
        """Whether the jobs exchange exists: a passive declaration, which needs no permission,
        on a channel of its own (RabbitMQ closes the channel that asked for one that does not)."""
        async with self._own_channel() as channel:
            try:
                await channel.exchange_declare(self.exchange_name, passive=True)
                return True
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False

    async def _declare_exchange_once(self) -> None:
        """Declare the jobs exchange if it was missing at connect (under `_lookup`)."""
        if not self._exchange_missing:
            return
        assert self._connection is not None
        try:
            async with self._connection.channel() as channel:
                await self._declare_exchange(channel)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise PublishError(
                f"RabbitMQ has no exchange {self.exchange_name}, and refused this user its declaration:"
                f" run `bridge topology apply` as a user that may configure it ({exc})",
                retriable=False,
            ) from exc
        except GONE as exc:
            raise TransportError(f"RabbitMQ did not declare exchange {self.exchange_name} ({exc!r})") from exc
        self._exchange_missing = False

    async def _open_connection(self, role: str) -> AbstractRobustConnection:
        """A connection, or a TransportError that says what RabbitMQ refused, if it answered.

        Named for its `role` and process, as RabbitMQ's management UI and `rabbitmqctl
        list_connections client_properties` show it: `bridge publish host:pid`, unless the
        URL names its connections itself (`?name=`, which aiormq reads).
        """
        url, parts = self.url, urlsplit(self.url)
        if parts.scheme == "amqps" and (problem := await asyncio.to_thread(_tls_problem, parts.query)):
            raise TransportError(f"RabbitMQ at {safe_url(self.url)}: {problem}", retriable=False)
        if "name" not in dict(parse_qsl(parts.query)):
            name = urlencode({"name": f"bridge {role} {socket.gethostname()}:{os.getpid()}"}, quote_via=quote)
            url = urlunsplit(parts._replace(query=f"{parts.query}&{name}".lstrip("&")))
        try:
            connection = await aio_pika.connect_robust(
                url, timeout=CONNECT_TIMEOUT_S, reconnect_interval=RECONNECT_INTERVAL_S
            )
            # (aio-pika says when a connection drops and each failed try, but not when it is back)
            connection.reconnect_callbacks.add(
                lambda _: log.info("the %s connection to RabbitMQ is back", role)
            )
            return connection
        except aiormq.exceptions.ProbableAuthenticationError as exc:
            raise TransportError(
                f"RabbitMQ at {safe_url(self.url)} refused the login: check the user and password"
                f" in the URL ({exc.args[0] if exc.args else exc!r})",
                retriable=False,
            ) from exc
        except aiormq.exceptions.InvalidFrameError as exc:
            if "Connection.Close" not in str(exc):
                raise
            # It closed instead of opening the virtual host; aiormq drops the reason it gave.
            vhost = unquote(urlsplit(self.url).path.removeprefix("/")) or "/"
            raise TransportError(
                f"RabbitMQ at {safe_url(self.url)} would not open virtual host {vhost!r} for this"
                " user: does it exist, may the user use it, and is it below its connection limit"
                " (a worker holds two)?",
                retriable=False,
            ) from exc

    async def _declare_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(self.exchange_name, aio_pika.ExchangeType.DIRECT, durable=True)

    async def close(self) -> None:
        self._closing = True
        if self._publishing:  # they end, confirmed or failed, by CLOSE_FLUSH_S from now
            ends = asyncio.get_running_loop().time() + CLOSE_FLUSH_S
            for deadline in self._publishing:
                if (when := deadline.when()) is None or when > ends:
                    deadline.reschedule(ends)
            await self._all_confirmed.wait()
        if self._channel is not None:
            with _ignored():
                async with asyncio.timeout(CHANNEL_CLOSE_TIMEOUT_S):
                    await self._channel.close()
        if self._connection is not None:
            await self._connection.close()
            # aio-pika runs close callbacks in tasks of their own: let them finish on this loop.
            await asyncio.sleep(0.01)
        self._connection = self._channel = None

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, message: Outgoing) -> None:
        """Publish `message`, or raise PublishError if RabbitMQ has not confirmed it within
        PUBLISH_TIMEOUT_S (while it is unreachable, or blocks publishers in a memory or disk
        alarm), as Kafka's `message.timeout.ms` does: an enqueue fails rather than waits for good.

        A worker settling a delivery publishes through `_publish_patiently`, without the bound:
        it waits for the broker, holding the delivery's slot meanwhile.
        """
        # A job put straight in a tier, delayed, would come back under the tier's name, which no
        # queue is bound by (see `missing`); not delayed, no queue is bound by that name either.
        if self._tier_names.fullmatch(message.queue):
            raise PublishError(
                f"RabbitMQ queue {message.queue} is a delay tier, not a queue: enqueue the job to its"
                " own queue",
                retriable=False,
            )
        if self._closing:
            raise PublishError(
                f"cannot publish to {message.queue}: the RabbitMQ transport is closed", retriable=False
            )
        failed: list[PublishError] = []
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S) as deadline:
                self._publishing.add(deadline)  # (close() may end it sooner)
                self._all_confirmed.clear()
                try:
                    await self._publish_when_connected(message, failed)
                finally:
                    self._publishing.discard(deadline)
                    if not self._publishing:
                        self._all_confirmed.set()
        except TimeoutError as exc:
            if not deadline.expired():
                raise  # another wait inside it timed out, and says which
            last = f" (last: {failed[-1]})" if failed else ""
            if self._closing:
                raise PublishUnconfirmed(
                    f"the RabbitMQ transport closed before RabbitMQ confirmed the publish to"
                    f" {message.queue}{last}: it may still be published",
                    retriable=False,
                ) from (failed[-1] if failed else exc)
            raise PublishUnconfirmed(
                f"RabbitMQ did not confirm the publish to {message.queue} within {PUBLISH_TIMEOUT_S:g} s"
                f"{last}: is it reachable, and not blocking publishers (a memory or disk alarm)? It"
                " may still be published once RabbitMQ takes it"
            ) from (failed[-1] if failed else exc)

    async def _publish_when_connected(self, message: Outgoing, failed: list[PublishError]) -> None:
        """Publish once the connection and its publish channel are up; a publish the lost
        connection took with it goes again once they are back, each failure added to `failed`.
        (At least once: one whose confirm was lost may arrive twice, as from Celery, which
        publishes again after a connection error.)
        """
        channel = self._channel  # (the one to wait on, even if close() lets go of it meanwhile)
        assert channel is not None, "publish() before connect()"
        while True:
            try:
                await self._publish(message, once=channel)
                return
            except PublishError as exc:
                if not exc.retriable or isinstance(exc, PublishRefused):
                    raise
                failed.append(exc)
            await asyncio.sleep(RECONNECT_POLL_S)  # (the channel may not know yet that it is lost)

    async def _publish(self, message: Outgoing, once: AbstractRobustChannel | None = None) -> None:
        """Publish `message` (once `once` is ready, if given), confirmed."""
        try:
            if once is not None:
                await once.ready()
            await self._publish_confirmed(message)
        except asyncio.CancelledError as exc:
            if cancelled_here():
                raise
            raise _found_stuck(f"publish to {message.queue} not confirmed") from exc

    async def _publish_confirmed(self, message: Outgoing) -> None:
        assert self._channel is not None, "publish() before connect()"
        if self._max_message_size is not None and len(message.body) > self._max_message_size:
            raise self._too_large(message, self._max_message_size)
        # The queue must exist now, and be bound: a tier takes any job, which would go to the
        # delayed jobs' dead-letter queue when its time comes. (One look and one bind per queue;
        # see `_require_queue`.)
        tier_s = tier_for(message.delay_s, tuple(self._tiers)) if message.delay_s else None
        await self._require_queue(message.queue, delayed=tier_s is not None)
        exchange = self.exchange_name
        if tier_s is not None:  # shorter than every tier: straight to the queue (see `tier_for`)
            exchange = self._tiers[tier_s]
        try:
            # aiormq directly: aio-pika's Message costs more than the rest of a publish. Not
            # waiting for the frame to be written (wait=False) saves a task switch per publish,
            # a fifth of its time; the broker's confirm, awaited here, is what counts.
            channel = await self._channel.get_underlay_channel()
            confirmation = await channel.basic_publish(
                message.body,
                exchange=exchange,
                routing_key=message.queue,
                properties=self._properties(),
                mandatory=True,
                wait=False,
            )  # type: ignore[call-arg]  # aiormq's Channel takes `wait`; its abstract base omits it
        except aiormq.exceptions.PublishError as exc:  # returned: no queue took it
            bound = f"queue {message.queue!r}" if tier_s is None else "queue"
            raise PublishError(
                f"no {bound} is bound to {exchange}: run `bridge topology apply`", retriable=False
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:  # nacked: a queue it was routed to refused it
            into = message.queue if tier_s is None else f"delay tier {exchange}"
            raise PublishRefused(
                f"RabbitMQ refused the publish to {into}: is it at a length limit (a max-length "
                f"policy with reject-publish), or without a quorum? ({exc.frame!r})"
            ) from exc
        except (aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelNotFoundEntity) as exc:
            # RabbitMQ closes the channel over a publish to an exchange that is gone (404) or
            # that the user may not write to (403), and every publish in flight on it fails with
            # that one's error: only those to the exchange it names are refused; the others
            # go again. (Retried, a refused one left its delivery unacknowledged for good,
            # holding a prefetch slot.)
            named = EXCHANGE_NAMED.search(str(exc))
            if named is not None and named[1] != exchange:
                raise PublishError(f"publish to {message.queue} not confirmed: {exc!r}") from exc
            if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
                raise PublishError(
                    f"RabbitMQ has no exchange {exchange}: run `bridge topology apply`", retriable=False
                ) from exc
            raise PublishError(
                f"RabbitMQ refused this user a publish to exchange {exchange}: grant it write"
                f" permission there (rabbitmqctl set_permissions): {exc}",
                retriable=False,
            ) from exc
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            # RabbitMQ closes the channel over a message larger than it takes, and every
            # publish in flight on it fails with this one error: only the large one is refused.
            # (Those sent on the channel before it were taken, but their confirms are lost: they
            # go again, and arrive twice. Larger ones are refused here from now on.)
            too_large = TOO_LARGE.search(str(exc))
            if too_large is None or int(too_large[1]) != len(message.body):
                raise PublishError(f"publish to {message.queue} not confirmed: {exc!r}") from exc
            self._max_message_size = int(too_large[2])
            raise self._too_large(message, self._max_message_size) from exc
        except GONE as exc:
            raise PublishError(f"publish to {message.queue} not confirmed: {exc!r}") from exc
        if not isinstance(confirmation, aiormq.spec.Basic.Ack):  # (aiormq raises for a nack)
            raise PublishRefused(f"RabbitMQ refused the publish to {message.queue}: {confirmation!r}")

    def _too_large(self, message: Outgoing, limit: int) -> PublishError:
        return PublishError(
            f"RabbitMQ refused a job of {len(message.body):,} bytes for {message.queue}: over"
            f" its max_message_size ({limit:,} bytes). Raise that in rabbitmq.conf above"
            " max_message_bytes plus 256 KiB (the errors of its attempts), or lower"
            " max_message_bytes",
            retriable=False,
        )

    def _properties(self) -> aiormq.spec.Basic.Properties:
        """Persistent, with a message id of its own (see `__init__`)."""
        message_id = f"{self._publisher}-{next(self._publishes)}"
        return aiormq.spec.Basic.Properties(delivery_mode=2, message_id=message_id)

    def held(self, delivery: Delivery) -> bool:
        return not delivery.handle.channel.is_closed  # (a closed channel's deliveries go back)

    async def missing(self, queues: Collection[str]) -> list[str]:
        """Those of `queues` that no job can go to: queues that do not exist, dead-letter queues
        and delay tiers' names (those of tiers other settings made too). A look: it binds nothing.

        A job from another producer may name any queue as its own, where its retries and
        delays go. One sent to a tier comes back from it under the tier's name, which no queue
        is bound by: it would end in the delayed jobs' dead-letter queue.
        """
        absent = await self._absent(queues)
        return [n for n in queues if n in absent or is_dead_letters(n) or self._tier_names.fullmatch(n)]

    async def _absent(self, queues: Collection[str]) -> list[str]:
        """Those of `queues` that do not exist, after a look at any not seen before."""
        async with self._lookup:  # one look per queue, however many publishes wait on it
            for name in queues:
                if name not in self._existing and await self._queue_exists(name):
                    self._existing.add(name)
        return [name for name in queues if name not in self._existing]

    async def _require_queue(self, name: str, *, delayed: bool = False) -> None:
        """Raise PublishError unless queue `name` exists; on the first publish to it, bind it
        (see `_bind_by_name`), and on a `delayed` one through a tier, to the due exchange."""
        waits = not delayed and time.monotonic() < self._due_look_at  # (see `_bind_by_name`)
        if name in self._bound or (name in self._jobs_bound and waits):
            return
        try:
            exists = not await self._absent([name])
            async with self._lookup:  # one bind per queue, however many publishes wait on it
                if exists and name not in self._bound:
                    await self._declare_exchange_once()
                    exists = await self._bind_by_name(name, delayed=delayed)
                    if not exists:
                        self._existing.discard(name)
        except TransportError as exc:  # (no answer: what a publish raises, retriable as it is)
            raise PublishError(str(exc), retriable=exc.retriable) from exc
        if not exists:
            raise PublishError(
                f"RabbitMQ queue {name} does not exist: run `bridge topology apply`", retriable=False
            )

    async def _bind_by_name(self, name: str, *, delayed: bool = False) -> bool:
        """Bind existing queue `name` by its name to the jobs exchange and, a job queue, to the
        due exchange, as `bridge topology apply` binds it (and as Celery declares a queue before
        it first sends to it); False if RabbitMQ says there is no such queue after all (one
        deleted since it was seen).

        Made by another service, a queue may have no such bindings: a job sent to it through the
        jobs exchange would come back unroutable, and one through a tier would go to the delayed
        jobs' dead-letter queue when due. With the due exchange missing (a topology an older
        bridge made, whose tiers send their jobs to the jobs exchange), that binding is tried
        again at each `delayed` publish, and DUE_LOOK_S on for others: once `bridge topology
        apply` makes it, no queue it did not name must stay unbound, and the first job delayed
        after it would go to the delayed jobs' dead-letter queue. A delay tier is never bound
        so: what it sends back under its own name would come back to it, round and round.
        """
        if self._tier_names.fullmatch(name):
            self._bound.add(name)
            return True
        if name not in self._jobs_bound:
            missing = await self._bind(name, self.exchange_name)
            if missing == "queue":
                return False
            if missing is None:  # (with the jobs exchange gone, the publish that follows says so)
                self._jobs_bound.add(name)
        if is_dead_letters(name):  # (no delayed job goes to one)
            if name in self._jobs_bound:
                self._bound.add(name)
            return True
        if not delayed and time.monotonic() < self._due_look_at:
            return True
        missing = await self._bind(name, self._due)
        if missing == "queue":
            self._jobs_bound.discard(name)
            return False
        if missing == "exchange":
            self._due_look_at = time.monotonic() + DUE_LOOK_S
        elif name in self._jobs_bound:
            self._bound.add(name)
        return True

    async def _bind(self, name: str, exchange: str) -> str | None:
        """Bind existing queue `name` to `exchange` by its name (a binding there already stays
        as it is); what RabbitMQ says is missing, "queue" or "exchange", if it says so.

        A user that may not bind (it needs read permission on the exchange and write on the
        queue) is warned once, and goes on as before.
        """
        try:
            async with self._own_channel() as channel:
                await channel.queue_bind(name, exchange, routing_key=name)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            return "queue" if " no queue " in str(exc) else "exchange"
        except aiormq.exceptions.ChannelAccessRefused as exc:
            if (name, exchange) not in self._refused:
                self._refused.add((name, exchange))
                gone = "go nowhere" if exchange == self.exchange_name else f"go to {self._unrouted} when due"
                log.warning(
                    "could not bind queue %s to %s (%s): if it is not bound there by its name, jobs"
                    " sent to it %s; `bridge topology apply --queues %s` binds it",
                    name, exchange, exc, gone, name,
                )  # fmt: skip
        except GONE as exc:
            raise TransportError(f"RabbitMQ did not bind queue {name} ({exc!r})") from exc
        return None

    async def settle(self, delivery: Delivery, publish: Sequence[Outgoing] = ()) -> bool:
        incoming: DeliveredMessage = delivery.handle
        assert incoming.delivery_tag is not None  # (None only on returned messages)
        try:
            for message in publish:
                # (confirmed before the original is acked; not once its channel closed, as a
                # publish that waits for a lost connection may see: see Worker._let_go)
                if not await self._publish_patiently(message, lambda: self.held(delivery)):
                    log.warning(
                        "a delivery from %s went back to RabbitMQ while its outcome waited to be"
                        " published: its next run decides it", delivery.queue,
                    )  # fmt: skip
                    return False
        except TransportError as exc:
            if exc.retriable:  # (else the worker stops, and its channel closes)
                # Left unacknowledged on a channel that lives on, it would hold a prefetch
                # slot until RabbitMQ's consumer_timeout (30 min) gave it back.
                with _ignored():  # (its channel gone, the broker gives it back anyway)
                    await incoming.channel.basic_nack(incoming.delivery_tag, requeue=True)
            raise
        try:
            await incoming.channel.basic_ack(incoming.delivery_tag)
        except (*GONE, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and cancelled_here():
                raise  # (else aiormq's: see `_found_stuck`)
            # The channel it came on is gone: the broker delivers it again (at least once).
            log.warning("ack lost for a delivery from %s (%r); it will be redelivered", delivery.queue, exc)
            return False  # (not settled: its next run counts it)
        return True

    async def _publish_patiently(self, message: Outgoing, held: Callable[[], bool]) -> bool:
        """Publish, trying again for up to SETTLE_PATIENCE_S after the first failure that may
        pass (see SETTLE_PATIENCE_S): a publish that waited out an alarm, or a lost connection,
        did not fail. Whether it went out: not once the delivery it settles is no longer `held`.

        Still refused then, it raises a PublishRefused that is not retriable: the consumer
        stops, and the delivery comes back once the queue takes publishes again.
        """
        wait_s, deadline = 0.1, None
        while True:
            if not held():
                return False
            try:
                await self._publish(message)
                return True
            except TransportError as exc:
                if not exc.retriable:
                    raise
                deadline = deadline or time.monotonic() + SETTLE_PATIENCE_S
                if time.monotonic() + wait_s > deadline:
                    if isinstance(exc, PublishRefused):
                        last = f"{exc}; refused for {SETTLE_PATIENCE_S:g} s"
                        raise PublishRefused(last, retriable=False) from exc
                    raise
                log.warning("%s; trying again in %.1f s", exc, wait_s)
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, SETTLE_WAIT_MAX_S)

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
        assert self._connection is not None, "consume() before connect()"
        # A connection of its own, as RabbitMQ advises: in a memory or disk alarm it stops
        # reading from a connection that publishes, and the acks and cancels sent on it would
        # wait with the publish. Apart, a worker acknowledges what needs no publish, and stops
        # when asked, alarm or not.
        with _mapped(f"cannot reach RabbitMQ at {safe_url(self.url)} to consume"):
            connection = await self._open_connection("consume")
        try:
            await self._consume_on(connection, queues, process, concurrency, stop, burst, grace_s)
        finally:
            with _ignored():
                await connection.close()

    async def _consume_on(
        self,
        connection: AbstractRobustConnection,
        queues: Sequence[str],
        process: Process,
        concurrency: int,
        stop: asyncio.Event,
        burst: bool,
        grace_s: float,
    ) -> None:
        channel = await connection.channel(publisher_confirms=False)
        channel.close_callbacks.add(lambda _, exc: _explain_close(queues, exc))
        # (Settings check prefetch >= concurrency; `max` covers a `consume(concurrency=...)` above
        # it, and `min` AMQP's limit, which twice a large concurrency may pass.)
        prefetch = max(self.settings.prefetch or PREFETCH_PER_SLOT * concurrency, concurrency)
        prefetch = min(prefetch, MAX_PREFETCH)
        await channel.set_qos(prefetch_count=prefetch)
        inflight = InFlight(process, concurrency)
        held = Held()
        arrivals = [0]
        started: set[asyncio.Task[None]] = set()  # each delivery's (the loop keeps no strong reference)

        async def run(delivery: Delivery) -> None:
            held.add()
            try:
                if delivery.returns:  # it may be what stopped the process that held it last
                    held.came_back.set()
                    await inflight.run_alone(delivery)
                else:
                    await inflight.run(delivery)
            finally:
                held.drop()

        def start(delivery: Delivery) -> asyncio.Task[None]:
            task = asyncio.create_task(run(delivery))
            started.add(task)
            task.add_done_callback(started.discard)
            return task

        def on_message_from(name: str) -> Callable[[DeliveredMessage], Coroutine[Any, Any, None]]:
            async def on_message(message: DeliveredMessage) -> None:
                arrivals[0] += 1
                # In a task of bridge's own, not in aiormq's: aiormq cancels its consumer tasks
                # when the connection or the channel closes, which ended running handlers
                # midway. Left to finish (its ack lost), a delivery comes back, as promised.
                start(_delivery(message, name))

            return on_message

        # (queue, the aiormq channel it is consumed on, consumer tag): the current channel's.
        consumers: list[tuple[str, aiormq.abc.AbstractChannel, str]] = []
        cancelled: list[str] = []

        def on_cancel(frame: aiormq.spec.Basic.Cancel) -> None:
            """The broker ended a consumer (its queue was deleted): stop, and say so."""
            cancelled.extend(name for name, _, tag in consumers if tag == frame.consumer_tag)
            if cancelled:
                stop.set()

        async def subscribe(_: object = None) -> None:
            await subscribe_on(await channel.get_underlay_channel())

        async def subscribe_on(underlay: aiormq.abc.AbstractChannel) -> None:
            underlay.on_consumer_cancel_callbacks.add(on_cancel)
            consumers.clear()
            for name in queues:
                # Known before it is asked for: a queue deleted at once may have its cancel
                # read before the consume's reply reaches this code, which then missed it and
                # consumed nothing, for good (1 CI run in 3).
                tag = f"bridge.{uuid.uuid4().hex}"
                consumers.append((name, underlay, tag))
                try:
                    await underlay.basic_consume(name, on_message_from(name), consumer_tag=tag)
                except aiormq.exceptions.ChannelNotFoundEntity:  # deleted, maybe while the
                    consumers.pop()  # connection was down: stop, and say so (after a reconnect
                    cancelled.append(name)  # the worker went on, consuming nothing, for good)
                    stop.set()
                    return

        async def unsubscribe() -> None:
            channel.reopen_callbacks.discard(subscribe)
            # On the channel they were made on: the robust channel's own would first wait for a
            # lost connection to come back. Within CHANNEL_CLOSE_TIMEOUT_S in all: on a network
            # that stalled, a stop waited for the client to find the connection stuck (a
            # minute and more), starting prefetched jobs meanwhile, past its grace period.
            with _ignored():
                async with asyncio.timeout(CHANNEL_CLOSE_TIMEOUT_S):
                    for _, underlay, tag in consumers:
                        with _ignored():
                            await underlay.basic_cancel(tag)
            consumers.clear()

        try:
            # The delay tiers too, as on Kafka: a job that needs a missing one would stop the
            # worker later, mid-run, and a burst consume could not count what waits in it.
            for name in [*queues, *self._waits]:
                await self._require_existing(channel, name)
            due_missing = False
            for name in queues:  # (so that delayed jobs for them, from any producer, come back)
                try:
                    due_missing |= await self._bind(name, self._due) == "exchange"
                except TransportError as exc:  # (a publish binds it too; another producer's does not)
                    log.warning("%s: delayed jobs for it may go to %s until it is", exc, self._unrouted)
            await self._warn_of_a_broken_delay_path(due_missing)
            if kept := await self._count(self._unrouted):
                log.warning(
                    "%d delayed jobs wait in %s: their queue was gone when they were due; `bridge dlq"
                    " list %s` lists them, and a replay puts them back once their queue is made again",
                    kept, self._unrouted, job_queue_of(self._unrouted),
                )  # fmt: skip
            while not stop.is_set():
                await self._take_returns(channel, queues, start, stop)
                if stop.is_set():
                    break  # (subscribing now would take deliveries only to give them back, counted)
                held.came_back.clear()
                await self._on_channel(channel, stop, subscribe_on)
                channel.reopen_callbacks.add(subscribe)  # after a reconnect: consume on the new channel
                await self._wait(channel, queues, inflight, lambda: arrivals[0], stop, burst, held.came_back)
                if not held.came_back.is_set():
                    break  # stopped, or drained
                # A message came back (another consumer, or this one's last channel, stopped
                # holding it): take no more until every message held now is settled (those
                # that came back one at a time, last), then take the rest of them one by one.
                await unsubscribe()
                await _either(held.none(), stop.wait())
            if cancelled:
                raise TransportError(
                    f"RabbitMQ ended the consumer of {', '.join(cancelled)}; was it deleted? "
                    "Run `bridge topology apply`", retriable=False,
                )  # fmt: skip
        finally:
            await unsubscribe()
            late = await inflight.finish(grace_s)
            if late:
                log.warning("%d jobs did not finish within %ss; they will run again", late, grace_s)
            with _ignored():
                async with asyncio.timeout(CHANNEL_CLOSE_TIMEOUT_S):
                    await channel.close()

    async def _take_returns(
        self,
        channel: AbstractChannel,
        queues: Sequence[str],
        start: Callable[[Delivery], asyncio.Task[None]],
        stop: asyncio.Event,
    ) -> None:
        """Take the messages that came back to each queue one at a time, each run alone.

        RabbitMQ counts a return (`x-delivery-count`) for every message a channel held unacked
        when it died, not only for the one whose job killed its process. Taken with a prefetch,
        the messages that came back would all be held again beside that job, counted with it
        each time it kills again, and dead-lettered with it at the `delivery_limit`. Taken one
        by one (`basic.get`), each runs with nothing else held: the next return counts only the
        one that ran. A quorum queue gives back what came back before anything else, so the
        first message that did not come back ends the look at its queue; it runs as usual.
        """
        for name in queues:
            while (message := await self._get(channel, name, stop)) is not None:
                delivery = _delivery(message, name)
                running = start(delivery)
                if not delivery.returns:
                    break
                await _either(asyncio.wait([running]), stop.wait())  # (on stop, `finish` waits for it)

    async def _get(self, channel: AbstractChannel, name: str, stop: asyncio.Event) -> DeliveredMessage | None:
        """The message at the head of queue `name`, taken unacked; None if it is empty, or on stop."""
        message = await self._on_channel(channel, stop, lambda on: on.basic_get(name, no_ack=False))
        if message is None or isinstance(message.delivery, aiormq.spec.Basic.GetEmpty):
            return None
        return message

    async def _on_channel(
        self,
        channel: AbstractChannel,
        stop: asyncio.Event,
        call: Callable[[aiormq.abc.AbstractChannel], Coroutine[Any, Any, T]],
    ) -> T | None:
        """`call` on the robust `channel`'s current aiormq channel, tried again while its
        connection is down (aio-pika restores both); None on `stop`, which cuts `call` short
        too (on a network that stalled, a stop during a subscribe waited for the client to find
        the connection stuck)."""
        while not stop.is_set():
            try:
                # (A robust channel waits here while its connection is down: for good, but for `stop`.)
                underlay = await _unless(stop, channel.get_underlay_channel())
                if underlay is None:
                    return None
                return await _unless(stop, call(underlay))
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                raise TransportError(
                    f"a RabbitMQ queue is gone ({exc}): run `bridge topology apply`", retriable=False
                ) from exc
            except (*GONE, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and cancelled_here():
                    raise  # (else aiormq's, as it closed a connection it found stuck)
                log.debug("RabbitMQ channel not back yet: %r", exc)
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RECONNECT_INTERVAL_S)
        return None

    async def _existing_queue(self, channel: AbstractChannel, name: str) -> AbstractQueue:
        with _mapped(f"RabbitMQ queue {name} does not exist: run `bridge topology apply`", retriable=False):
            return await channel.declare_queue(name, passive=True)

    async def _warn_of_a_broken_delay_path(self, due_missing: bool) -> None:
        """Warn when what the tiers hand due jobs to is gone: the due exchange, or the queue of
        jobs whose own queue is gone. (Deleted: the tiers' `.wait` queues exist, so this is no
        older topology.) RabbitMQ then keeps each due job in its tier and tries it again, and
        with 32 kept, every job behind them in the tier waits too, for every queue, silently."""
        missing = [f"exchange {self._due}"] if due_missing else []
        try:
            async with self._own_channel() as channel:
                await channel.queue_declare(self._unrouted, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            missing.append(f"queue {self._unrouted}")
        except GONE:  # (no answer: no evidence either way)
            pass
        if missing:
            log.warning(
                "RabbitMQ has no %s: delayed jobs and retries that come due wait in their tier, and"
                " hold back the tier's other jobs, until `bridge topology apply` makes it again",
                " nor ".join(missing),
            )

    async def _require_existing(self, channel: AbstractChannel, name: str) -> None:
        """TransportError unless queue `name` exists. Asked on the aiormq channel: a robust
        channel keeps what was declared on it, and declares it again at every reconnect, so a
        queue deleted while the connection was down failed every reconnect, for good, and
        the worker consumed none of its queues, saying nothing but aio-pika's retries."""
        with _mapped(f"RabbitMQ queue {name} does not exist: run `bridge topology apply`", retriable=False):
            await (await channel.get_underlay_channel()).queue_declare(name, passive=True)

    async def _wait(
        self,
        channel: AbstractChannel,
        queues: Sequence[str],
        inflight: InFlight,
        arrivals: Callable[[], int],
        stop: asyncio.Event,
        burst: bool,
        came_back: asyncio.Event,
    ) -> None:
        """Until `stop` or `came_back` is set, or, with `burst`, the queues are drained."""
        if not burst:
            await _either(stop.wait(), came_back.wait())
            return
        waiting = [*queues, *self._waits]  # delayed and retried jobs count too
        quiet = 0
        said = BurstWait(self.settings.prefix)
        while not stop.is_set() and not came_back.is_set():
            # Drained after two looks in a row that find nothing ready, nothing running and
            # nothing arrived. One is not enough: a message can leave a tier and be delivered
            # to us while we count, and its delivery is only seen running by the next look.
            seen = arrivals()
            ready = None if inflight else await self._ready(channel, waiting, stop)
            if ready and any(ready[len(queues) :]) and not any(ready[: len(queues)]):
                said.delayed(f"{sum(ready):,} delayed jobs")
            empty = ready is not None and not any(ready)
            quiet = quiet + 1 if empty and not inflight and arrivals() == seen else 0
            if quiet >= 2:
                return
            with suppress(TimeoutError):
                await asyncio.wait_for(_either(stop.wait(), came_back.wait()), DRAIN_CHECK_S)

    async def _ready(
        self, channel: AbstractChannel, queues: Sequence[str], stop: asyncio.Event
    ) -> list[int] | None:
        """Messages ready in each of `queues`, once the connection is back if it is being
        restored; None on stop."""

        async def count(on: aiormq.abc.AbstractChannel) -> list[int]:
            # Straight to aiormq: aio-pika's robust channel answers a repeated passive declare
            # from its cache, with the count of the first one.
            return [(await on.queue_declare(name, passive=True)).message_count or 0 for name in queues]

        return await self._on_channel(channel, stop, count)

    # -- dead-letter tools -----------------------------------------------------------------

    async def browse(self, queue: str) -> list[bytes]:
        bodies: list[bytes] = []

        async def keep(body: bytes, key: str | bytes | None) -> None:
            bodies.append(body)

        await self.sweep(queue, keep)
        return bodies

    async def sweep(self, queue: str, decide: Decide, removed: Callable[[], None] = unheard) -> int:
        assert self._connection is not None, "sweep() before connect()"
        # Messages are taken unacked, and those kept are put back at the end, so each one is
        # offered exactly once per sweep. (Taken until none is left: a quorum queue's count in
        # a passive declare can leave out messages another channel's close is putting back.)
        # They are taken on a connection of their own: on the publish connection, a reconnect
        # that a replay's publish waited out took the letter's channel with it, so the letter
        # went back to its queue, its replay published, to be replayed again.
        connection = await self._open_connection("dlq")
        count, kept = 0, None
        try:
            channel = await connection.channel()
            declared = await self._existing_queue(channel, queue)
            while (message := await _taken(declared, queue)) is not None:
                try:
                    publish = await decide(message.body, None)
                except SweepStopped:
                    kept = message  # (put back below, with those kept before it)
                    break
                if publish is None:
                    kept = message
                    continue
                for outgoing in publish:
                    await self.publish(outgoing)  # confirmed before the original is acked
                with _lost(
                    f"lost the connection to RabbitMQ after a replay from {queue} was published:"
                    " the letter stays there, and a replay would publish it again"
                ):
                    await message.ack()
                count += 1
                removed()
            if kept is not None:
                # Put back by this channel before it closes, so that the queue has them back
                # before the next sweep's first get. Left to the channel's close, a quorum queue
                # took them back when it saw the channel gone, which under load came after the
                # next sweep (on a channel of its own) had found the queue empty.
                with _lost(f"lost the connection to RabbitMQ while going through {queue}"):
                    await kept.nack(multiple=True, requeue=True)
        finally:
            with _ignored():
                await connection.close()
        return count

    # -- topology --------------------------------------------------------------------------

    async def apply_topology(self, queues: Sequence[str], *, dry_run: bool = False) -> list[str]:
        assert self._connection is not None, "apply_topology() before connect()"
        names = [name for queue in queues for name in (queue, dlq_name(queue))]
        plan = [f"rabbitmq: exchange {self.exchange_name} (direct, durable)"]
        existing = [name for name in names if await self._queue_exists(name)]
        for name in names:
            if name not in existing:
                plan.append(f"rabbitmq: quorum queue {name} create, bound by {name!r}")
                continue
            plan.append(f"rabbitmq: queue {name} exists, kept as it is, bound by {name!r}")
            if await self._drops_returns(name):
                plan.append(_default_limit(name))
        if await self._queue_exists(self._unrouted):
            existing.append(self._unrouted)
        state = "exists" if self._unrouted in existing else "create"
        plan += [
            f"rabbitmq: exchange {self._due} (direct, durable), where each job queue is bound by its"
            " name too: delay tiers send their jobs there when due, and what no queue takes goes on"
            f" to {self._unrouted}",
            f"rabbitmq: quorum queue {self._unrouted} {state}, for delayed jobs whose queue was gone"
            f" when they were due (`bridge dlq list {self.settings.prefix}.delay`)",
        ]  # fmt: skip
        if state == "exists" and await self._drops_returns(self._unrouted):  # (made by hand, say)
            plan.append(_default_limit(self._unrouted))
        older: list[str] = []  # tiers' queues of an older bridge, which send their jobs to the jobs exchange
        for tier_s, tier in self._tiers.items():
            state = "exists" if await self._queue_exists(wait_queue(tier)) else "create"
            plan.append(
                f"rabbitmq: delay tier {tier} {state} (fanout exchange, quorum queue {wait_queue(tier)},"
                f" ttl {tier_s:g} s)"
            )
            if await self._queue_exists(tier):
                older.append(tier)
                plan.append(
                    f"rabbitmq: queue {tier} (an older bridge's tier) unbound from its exchange: the"
                    " jobs in it still go back to their queues when due; delete it once it is empty"
                )
        if not dry_run:
            with _mapped("could not apply the RabbitMQ topology", retriable=False):
                await self._declare(names, existing, older)
            self._exchange_missing = False
            self._existing.update(names)
            self._jobs_bound.update(names)
            self._bound.update(names)
        return plan

    async def _queue_exists(self, name: str) -> bool:
        """Whether queue `name` exists and is one bridge may use. A job from another producer
        may name anything: a name longer than AMQP allows, or another connection's exclusive
        queue (RESOURCE_LOCKED) or one bridge's user may not touch (ACCESS_REFUSED), is none;
        so is the direct reply-to pseudo-queue, which a passive declaration takes but nothing
        can be bound to."""
        if len(name.encode()) > MAX_NAME_BYTES or name.startswith(REPLY_TO) or not AMQP_NAME.fullmatch(name):
            return False  # (a name pamqp refuses was a ValueError, which no caller expected)
        return await self._declares(name, NO_QUEUE, passive=True)

    async def _drops_returns(self, name: str) -> bool:
        """Whether existing queue `name` drops what comes back to it a 21st time: a quorum queue
        without a delivery limit of its own, on a RabbitMQ with a default one.

        Declaring it as a plain quorum queue succeeds only if it has no other arguments (a
        mismatch is refused with PRECONDITION_FAILED and changes nothing). A policy may have
        lifted the limit since; RabbitMQ says so only over its HTTP API.
        """
        if self._major_version() < DEFAULT_LIMIT_FROM:
            return False
        refused = aiormq.exceptions.ChannelPreconditionFailed
        return await self._declares(name, refused, durable=True, arguments=QUORUM)

    async def _count(self, name: str) -> int:
        """How many messages are ready in queue `name`, as far as a look tells: 0 if there is no
        such queue, or no answer. On a channel of its own (a look at a missing queue closes its
        channel)."""
        try:
            async with self._own_channel() as channel:
                return (await channel.queue_declare(name, passive=True)).message_count or 0
        except GONE as exc:  # (a missing queue's 404 too)
            log.debug("no count of queue %s: %r", name, exc)
            return 0

    async def _declares(
        self, name: str, refused: type[Exception] | tuple[type[Exception], ...], **how: Any
    ) -> bool:
        """Whether RabbitMQ takes a declaration of queue `name` made `how`, or answers `refused`.

        On a channel of its own: a refused declaration closes its channel. No answer (the
        connection lost) is a TransportError that may be retried.
        """
        try:
            async with self._own_channel() as channel:
                try:
                    await channel.queue_declare(name, **how)
                    return True
                except refused:
                    return False
        except GONE as exc:
            raise TransportError(f"RabbitMQ did not say whether queue {name} exists ({exc!r})") from exc

    def _major_version(self) -> int:
        """The major version RabbitMQ gave when the connection opened (0 if it did not say)."""
        assert self._connection is not None and self._connection.transport is not None
        version = self._connection.transport.connection.server_properties.get("version")
        major = str(version or "").partition(".")[0]
        return int(major) if major.isdigit() else 0

    async def _declare(self, names: Sequence[str], existing: Collection[str], older: Collection[str]) -> None:
        """Declare the exchanges, the tiers and the queues in `names`, each bound by its name (a
        job queue to the due exchange too), and unbind the `older` tiers' queues.

        A job or dead-letter queue that exists is bound as it is, whatever its type and
        arguments: bridge needs nothing of it but the binding, and one made by another service
        (a classic queue, say) would refuse a declaration with others (PRECONDITION_FAILED).
        """
        assert self._connection is not None
        async with self._connection.channel() as channel:
            exchange = await self._declare_exchange(channel)
            due = await self._declare_due(channel, existing)
            for name in names:
                if name in existing:
                    queue = await channel.declare_queue(name, passive=True)
                else:
                    queue = await channel.declare_queue(name, durable=True, arguments=UNLIMITED)
                await queue.bind(exchange, routing_key=name)
                if not is_dead_letters(name):
                    await queue.bind(due, routing_key=name)
            for tier_s, tier in self._tiers.items():
                await self._declare_tier(channel, tier, tier_s)
            for tier in older:  # (after its successor is bound: no delay finds the tier unbound)
                underlay = await channel.get_underlay_channel()
                await underlay.queue_unbind(tier, tier, routing_key=tier)

    async def _declare_due(self, channel: AbstractChannel, existing: Collection[str]) -> AbstractExchange:
        """The exchange expired delayed jobs go to, and its alternate exchange and queue (kept as
        it is if it is in `existing`, as a dead-letter queue is)."""
        unrouted = await channel.declare_exchange(self._unrouted, aio_pika.ExchangeType.FANOUT, durable=True)
        if self._unrouted in existing:
            queue = await channel.declare_queue(self._unrouted, passive=True)
        else:
            queue = await channel.declare_queue(self._unrouted, durable=True, arguments=UNLIMITED)
        await queue.bind(unrouted)
        arguments: dict[str, Any] = {"alternate-exchange": self._unrouted}
        return await channel.declare_exchange(
            self._due, aio_pika.ExchangeType.DIRECT, durable=True, arguments=arguments
        )

    async def _declare_tier(self, channel: AbstractChannel, tier: str, tier_s: float) -> None:
        # Every message of a tier has the same TTL, so messages expire head-first, in order; an
        # expired one is dead-lettered to the due exchange under the routing key it was
        # published with: the queue it is for. At-least-once dead-lettering needs reject-publish.
        # What no queue takes there goes to its alternate exchange: at-least-once, a message
        # RabbitMQ could not route stayed in the tier, retried now and then, and with 32 of
        # them held (its dead-letter worker's prefetch), nothing else left the tier.
        exchange = await channel.declare_exchange(tier, aio_pika.ExchangeType.FANOUT, durable=True)
        arguments: dict[str, Any] = {
            **QUORUM,
            "x-message-ttl": round(tier_s * 1000),
            "x-dead-letter-exchange": self._due,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        queue = await channel.declare_queue(wait_queue(tier), durable=True, arguments=arguments)
        await queue.bind(exchange)


def wait_queue(tier: str) -> str:
    """The quorum queue in which the jobs of delay tier `tier` (its exchange's name) wait."""
    return f"{tier}.wait"


def _default_limit(name: str) -> str:
    """The plan's line for an existing queue that RabbitMQ's default delivery limit applies to."""
    pattern, definition = f"'^{re.escape(name)}$'", """'{"delivery-limit":-1}'"""
    policy = f"rabbitmqctl set_policy {name}-keep {pattern} {definition} --apply-to quorum_queues"
    return (
        f"rabbitmq: queue {name} was made without a delivery limit, so RabbitMQ 4 drops a message "
        f"that comes back to it unsettled a 21st time (each `bridge dlq list` of a dead-letter queue "
        f"counts); unless a policy already lifts it: {policy}"
    )


class Held:
    """The deliveries a consumer holds, from their arrival until they are settled (or left), and
    whether one that came back arrived while it was subscribed."""

    def __init__(self) -> None:
        self._count = 0
        self._none = asyncio.Event()
        self._none.set()
        self.came_back = asyncio.Event()

    def add(self) -> None:
        self._count += 1
        self._none.clear()

    def drop(self) -> None:
        self._count -= 1
        if not self._count:
            self._none.set()

    async def none(self) -> None:
        await self._none.wait()


async def _taken(queue: AbstractQueue, name: str) -> AbstractIncomingMessage | None:
    """The next message of `queue`, unacknowledged; None when none is left."""
    with _lost(f"lost the connection to RabbitMQ while going through {name}"):
        return await queue.get(no_ack=False, fail=False)


async def _either(*waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of `waits` is done; cancel the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _unless(stop: asyncio.Event, waiting: Coroutine[Any, Any, T]) -> T | None:
    """What `waiting` returns, or None (and `waiting` cancelled) if `stop` is set first."""
    task = asyncio.ensure_future(waiting)
    await _either(asyncio.wait([task]), stop.wait())
    if not task.done():
        task.cancel()
        return None
    return task.result()


def _explain_close(queues: Sequence[str], exc: BaseException | None) -> None:
    """Say what to change when RabbitMQ closed the consuming channel over a delivery held too long.

    RabbitMQ gives a delivery `consumer_timeout` (30 minutes by default) to be acknowledged,
    counted from its delivery: its job's run, and any wait for a slot before it (in the
    prefetch, or behind running jobs while one that came back waits to run alone). Then it
    closes the channel (PRECONDITION_FAILED), which reopens by itself, and every delivery it
    held comes back counted, to run again: a job that always takes longer runs again and again
    until it is dead-lettered as `delivery_limit`.
    """
    if not isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return
    timed_out = ACK_TIMEOUT.search(str(exc))
    if timed_out is None:
        return
    log.error(
        "RabbitMQ closed the channel consuming %s: a delivery went unacknowledged longer than "
        "consumer_timeout (%s ms), running or waiting for a slot, and every job the channel "
        "held will run again. Raise consumer_timeout in rabbitmq.conf above your longest job "
        "(on RabbitMQ 3.12 and later, a consumer-timeout policy on these queues does too); "
        "for jobs that run for minutes, set prefetch to the concurrency",
        ", ".join(queues), timed_out.group(1),
    )  # fmt: skip


def _tls_problem(query: str) -> str | None:
    """What is wrong with the TLS files an amqps URL names, tried as aiormq uses them: a failure
    under aio-pika's connect was a broker that could not be reached, and a cadata= that is no
    base64 was retried for good, silently (aiormq reads it before connecting)."""
    options = dict(parse_qsl(query, keep_blank_values=True))  # (an empty one is "" to aiormq too)
    try:
        cadata = base64.b64decode(options["cadata"]) if options.get("cadata") else None
    except ValueError as exc:  # (binascii.Error)
        return f"its cadata= is no base64 (of DER certificates): {exc}"
    try:  # (the three at once, as aiormq does: an empty one beside another is a path too)
        context = ssl.create_default_context(
            cafile=options.get("cafile"), capath=options.get("capath"), cadata=cadata
        )
    except (OSError, ValueError) as exc:  # (ssl.SSLError is an OSError)
        given = " ".join(f"{name}=" for name in ("cafile", "capath", "cadata") if name in options)
        return f"its {given} cannot be used: {exc}"
    if options.get("certfile"):  # (the key as given: an empty keyfile= is a path to aiormq)
        try:
            context.load_cert_chain(options["certfile"], options.get("keyfile"))
        except (OSError, ValueError) as exc:
            also = " and keyfile=" if "keyfile" in options else ""
            return f"its certfile={also} cannot be used: {exc}"
    if options.get("keyfile") and not options.get("certfile"):
        return "its keyfile= goes with a certfile= (the client certificate)"
    return None


def _delivery(message: DeliveredMessage, queue: str) -> Delivery:
    redelivered = bool(message.redelivered)
    returns = _returns(message) if redelivered else 0
    return Delivery(message.body, queue, redelivered=redelivered, returns=returns, handle=message)


def _returns(message: DeliveredMessage) -> int:
    """How many times a quorum queue took `message` back unsettled (its `x-delivery-count`).

    Every return counts: a worker killed or out of memory, a channel or connection closed
    with the message unacknowledged. A classic queue does not count (no header: 0).
    """
    count = (message.header.properties.headers or {}).get("x-delivery-count")
    return count if isinstance(count, int) else 0


@contextmanager
def _mapped(what: str, *, retriable: bool = True) -> Iterator[None]:
    """Translate aio-pika's and the socket's errors into TransportError at one place."""
    try:
        yield
    except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
        raise TransportError(f"{what} ({exc!r})", retriable=retriable) from exc


@contextmanager
def _lost(what: str) -> Iterator[None]:
    """A channel or connection closed under a call, as a TransportError that says `what`."""
    try:
        yield
    except GONE as exc:
        raise TransportError(f"{what} ({exc!r})") from exc


def _found_stuck(what: str) -> PublishError:
    """What a CancelledError that no one asked this task for is: aiormq cancels the calls that
    wait on a connection it finds stuck (no heartbeat for three intervals; a network that drops
    packets). A retriable PublishError saying `what`. (Taken for a stop, a worker's retry went
    unpublished, its delivery unacknowledged on a channel that lived on, for 30 minutes; an
    enqueue raised CancelledError instead of waiting for the connection to come back.) Caught
    in place, not by a context manager: the ack and publish of every job go through here."""
    return PublishError(f"{what}: the connection to RabbitMQ was found stuck, and closed")


@contextmanager
def _ignored() -> Iterator[None]:
    """For best-effort cleanup on a channel that may already be gone (and a call that aiormq
    cancelled as it closed a connection it found stuck: not a cancellation of this task)."""
    try:
        yield
    except (TimeoutError, aiormq.exceptions.AMQPError, OSError, RuntimeError):
        pass
    except asyncio.CancelledError:
        if cancelled_here():
            raise
