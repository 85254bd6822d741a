"""Store calls made while the event loop is busy, sent together when it comes round.

A commit (SQLite) or a network round trip (Redis) costs more than the statements or commands
in it, so a store hands every call that one tick of the loop brings to `send` at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import Any, Generic, TypeVar

# A batch that `send_now` sends waits for more requests while loop passes keep adding to it,
# for at most this many passes, so that jobs arriving a few per pass share a commit. SQLite's
# batches grew from 11 statements to 16 on Kafka and from 5 to 7 on RabbitMQ (whose deliveries
# come about three at a time), and a keyed Kafka job took 35 µs of the loop instead of 37
# (`python -m bench.keycost --n 60000`); on RabbitMQ the change was lost in the noise.
MAX_PASSES = 3

Request = TypeVar("Request")
Pending = list[tuple[Request, asyncio.Future[Any]]]


class TickBatch(Generic[Request]):
    """Requests gathered per loop tick and sent in one go.

    `send` gets one batch's requests and returns a reply for each: a value, or an exception
    for a request that failed alone. A `send` that raises fails the whole batch. With `lock`,
    a batch is taken only once the lock is held, so requests made meanwhile go out together.

    `send_now` is `send` for a store whose sends never wait (SQLite): a batch whose lock is
    free goes out from a plain callback, with no task to create and step through, once a loop
    pass has added nothing to it (or after MAX_PASSES passes).
    """

    def __init__(
        self,
        send: Callable[[list[Request]], Awaitable[list[Any]]],
        lock: asyncio.Lock | None = None,
        send_now: Callable[[list[Request]], list[Any]] | None = None,
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
        """Send the batch, unless it grew since the last pass and may wait another one."""
        if len(self._pending) > seen and passes < MAX_PASSES:
            asyncio.get_running_loop().call_soon(self._flush_when_whole, len(self._pending), passes + 1)
            return
        self._flush_now()

    def _flush_now(self) -> None:
        if self._lock is not None and self._lock.locked():  # wait for its holder, then send
            asyncio.create_task(self._flush())  # noqa: RUF006 -- as in `call`
            return
        assert self._send_now is not None
        batch, self._pending = self._pending, []
        replies: list[Any]
        try:
            replies = self._send_now([request for request, _ in batch])
        except Exception as exc:  # every caller must hear of it
            replies = [exc] * len(batch)
        _answer(batch, replies)

    async def _flush(self) -> None:
        async with self._lock or nullcontext():
            batch, self._pending = self._pending, []
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


def _answer(batch: Pending[Any], replies: list[Any]) -> None:
    """Settle each request's future with its reply."""
    if len(replies) != len(batch):  # a bug in `send`: its callers must not wait for good
        replies = [RuntimeError(f"{len(replies)} replies to {len(batch)} requests")] * len(batch)
    for (_, done), reply in zip(batch, replies, strict=True):
        if done.done():
            continue  # its caller was cancelled
        if isinstance(reply, BaseException):
            done.set_exception(reply)
        else:
            done.set_result(reply)
