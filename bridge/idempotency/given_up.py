"""Claims whose callers gave up (a stop's grace period ended), released in the background."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bridge.errors import StoreError

log = logging.getLogger("bridge.idempotency")
WAIT_S = 2.0  # how long closing a store waits for these releases


class GivenUp:
    """Releases of claims whose callers were cancelled while the claim was out, or about to go
    out with its batch. Landed, such a claim kept the key from the job's copy, for nobody,
    until its lease ended. A release names its claim's token, so one for a claim that never
    landed changes nothing; it goes in a later batch than its claim, so it comes after it."""

    def __init__(self, release: Callable[[str, str], Awaitable[None]]) -> None:
        self._release = release
        self._running: set[asyncio.Task[None]] = set()

    def release(self, key: str, token: str) -> None:
        running = asyncio.get_running_loop().create_task(self._release_or_log(key, token))
        self._running.add(running)
        running.add_done_callback(self._running.discard)

    async def _release_or_log(self, key: str, token: str) -> None:
        try:
            await self._release(key, token)
        except StoreError as exc:  # the key frees itself when the lease ends
            log.warning("could not release the claim on %r of a job that was cancelled: %s", key, exc)

    async def wait(self) -> None:
        """For the store's `close`: give the releases under way WAIT_S to finish."""
        if self._running:
            await asyncio.wait(self._running, timeout=WAIT_S)
