"""Store calls made while the event loop is busy, sent together when it comes round.

A commit (SQLite) or a network round trip (Redis) costs more than the statements or commands
in it, so a store hands every call that one tick of the loop brings to `send` at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import Any, Generic, TypeVar

# A batch that `send_now` sends waits, a loop pass at a time, while the loop has other
# callbacks ready to run (or the last pass added to it), for at most this many passes: so every
# job that the loop is about to reach shares the commit. Waiting only for passes that added to
# the batch, at most three, gave SQLite commits of 7 statements on RabbitMQ, whose deliveries
# come about three at a time; waiting while other callbacks were ready gave 15, and a keyed
# RabbitMQ job took 121 µs of the loop instead of 142 to 144 (`python -m bench.keycost --broker
# rabbitmq --n 20000`). On Kafka, whose batches were already whole (16 statements, as many as
# jobs run at once), it made no difference.
MAX_PASSES = 16

Request = TypeVar("Request")
Pending = list[tuple[Request, asyncio.Future[Any]]]


class TickBatch(Generic[Request]):
    """Requests gathered per loop tick and sent in one go.

    `send` gets one batch's requests and returns a reply for each: a value, or an exception
    for a request that failed alone. A `send` that raises fails the whole batch. With `lock`,
    a batch is taken only once the lock is held, so requests made meanwhile go out together.

    `send_now` is `send` for a store whose sends seldom wait (SQLite): a batch whose lock is
    free goes out from a plain callback, with no task to create and step through, once the loop
    has nothing else ready to run (or after MAX_PASSES passes). It returns None for a batch it
    cannot send without waiting, which then goes to `send` in a task.
    """

    def __init__(
        self,
        send: Callable[[list[Request]], Awaitable[list[Any]]],
        lock: asyncio.Lock | None = None,
        send_now: Callable[[list[Request]], list[Any] | None] | None = None,
    ) -> None:
        self._send = send
        self._send_now = send_now
        self._lock = lock
        self._pending: Pending[Request] = []

    async def call(self, request: Request) -> Any:
        """The reply to `request` once its batch was sent (raised, if it is an exception)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._pending.append((request, done))
        if len(self._pending) == 1:  # the first of a batch sends it
            if self._send_now is not None:
                loop.call_soon(self._flush_when_whole, 1, 1)
            else:
                asyncio.create_task(self._flush())  # noqa: RUF006 -- it settles every future it takes
        return await done

    def _flush_when_whole(self, seen: int, passes: int) -> None:
        """Send the batch, unless the loop has more to run first that may add to it."""
        loop = asyncio.get_running_loop()
        if passes < MAX_PASSES and (len(self._pending) > seen or _busy(loop)):
            loop.call_soon(self._flush_when_whole, len(self._pending), passes + 1)
            return
        self._flush_now()

    def _flush_now(self) -> None:
        if self._lock is not None and self._lock.locked():  # wait for its holder, then send
            asyncio.create_task(self._flush())  # noqa: RUF006 -- as in `call`
            return
        assert self._send_now is not None
        batch = self._take()
        if not batch:
            return
        replies: list[Any] | None
        try:
            replies = self._send_now([request for request, _ in batch])
        except Exception as exc:  # every caller must hear of it
            replies = [exc] * len(batch)
        if replies is None:  # it would have to wait
            asyncio.create_task(self._flush(batch))  # noqa: RUF006 -- as in `call`
            return
        _answer(batch, replies)

    async def _flush(self, batch: Pending[Request] | None = None) -> None:
        """Send `batch`, or what was asked since the last one, once the lock is free."""
        async with self._lock or nullcontext():
            batch = batch or self._take()
            if not batch:
                return
            replies: list[Any]
            try:
                replies = await self._send([request for request, _ in batch])
            except Exception as exc:  # every caller must hear of it
                replies = [exc] * len(batch)
            except BaseException:
                for _, done in batch:
                    done.cancel()
                raise
        _answer(batch, replies)

    def _take(self) -> Pending[Request]:
        """The batch to send: what was asked since the last, but what its caller gave up on
        meanwhile (a cancelled claim would hold its key, unknown to anyone, for its lease)."""
        batch, self._pending = self._pending, []
        return [(request, done) for request, done in batch if not done.done()]


def _busy(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether other callbacks are ready to run on `loop` (asyncio's own loops keep them in
    `_ready`; there is no public way to ask). Another loop counts as never busy, so a batch
    waits only while it grows, as before.
    """
    return bool(getattr(loop, "_ready", None))


def _answer(batch: Pending[Any], replies: list[Any]) -> None:
    """Settle each request's future with its reply."""
    if len(replies) != len(batch):  # a bug in `send`: its callers must not wait for good
        replies = [RuntimeError(f"{len(replies)} replies to {len(batch)} requests")] * len(batch)
    for (_, done), reply in zip(batch, replies, strict=True):
        if done.done():
            continue  # its caller was cancelled once the batch had gone out
        if isinstance(reply, BaseException):
            done.set_exception(reply)
        else:
            done.set_result(reply)
