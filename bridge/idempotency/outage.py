"""Waiting out an idempotency store that does not answer.

A keyed job whose store call fails (the server is down, the network is cut, SQLite's file is
locked past its busy timeout) waits where it is and tries again, as Karafka pauses a
partition with a growing back-off, rather than going round the delay tiers: every job would
otherwise be published again each second, out of order, with a line in the log each time.

The waits are shared by a worker's jobs, in rounds: 0.5 s, then 1, 2, 4 ... up to 30 s. When
a round ends, every waiting job tries again; the first to fail starts the next round and logs
one line, so the store sees a few calls a round and the log one line, however many jobs
wait. The waiting jobs keep their slots, so the worker takes no new work meanwhile (Kafka's
partitions pause, RabbitMQ stops at the prefetch); jobs without keys wait behind them too.
A job that has waited GIVE_UP_S gets the store's error and goes through the delay tiers, so
that no delivery stays unacknowledged for long (RabbitMQ closes a channel whose delivery waits
30 minutes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bridge.errors import StoreError

FIRST_WAIT_S = 0.5
MAX_WAIT_S = 30.0
GIVE_UP_S = 300.0

log = logging.getLogger("bridge.idempotency")
T = TypeVar("T")


class Outage:
    """The shared back-off of one worker's calls to its store."""

    first_s = FIRST_WAIT_S
    max_s = MAX_WAIT_S
    give_up_s = GIVE_UP_S

    def __init__(self) -> None:
        self.wait_s = 0.0  # the current round's wait; 0 while the store answers
        self._since: float | None = None  # time.monotonic() of the first failure
        self._until = 0.0  # when the current round ends

    async def retry(self, failure: StoreError, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()` again, after it failed with `failure`, until the store answers.

        (Callers make their first attempt themselves: a job's store calls cost nothing extra
        while the store answers.) Raises the last StoreError once `give_up_s` has passed.
        """
        first_failure = time.monotonic()
        self._failed(failure, first_failure)
        while True:
            await asyncio.sleep(max(0.0, self._until - time.monotonic()))
            try:
                result = await attempt()
            except StoreError as exc:
                now = time.monotonic()
                if now - first_failure >= self.give_up_s:
                    raise
                self._failed(exc, now)
                continue
            if self._since is not None:  # the first job through: the outage is over
                log.warning(
                    "the idempotency store answers again, after %.1f s", time.monotonic() - self._since
                )
                self._since, self.wait_s = None, 0.0
            return result

    def _failed(self, exc: StoreError, now: float) -> None:
        """Start the next round, unless one started since this attempt began."""
        if now < self._until:
            return  # another job's failure already started a round: wait for its end
        if self._since is not None and now - self._until > self.max_s:
            # Every job of the last outage gave up, and the store answered first tries since:
            # this is a new outage, whose waits start short again.
            self._since, self.wait_s = None, 0.0
        self.wait_s = min(self.wait_s * 2, self.max_s) if self.wait_s else self.first_s
        self._since = self._since or now
        self._until = now + self.wait_s
        log.error(
            "%s; keyed jobs wait (%.0f s so far) and try again in %.1f s",
            str(exc).rstrip("."), now - self._since, self.wait_s,
        )  # fmt: skip
