"""Claims and dedupe holds whose callers gave up (cancelled), undone in the background."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from bridge.errors import StoreError

if TYPE_CHECKING:
    from bridge.idempotency import Store

log = logging.getLogger("bridge.idempotency")
WAIT_S = 2.0  # how long closing a store waits for these releases


class GivenUp:
    """Releases of claims, and ends of dedupe holds, whose callers were cancelled (a stop's
    grace period ending, an enqueue's timeout) while the claim or hold was out, or about to go
    out with its batch. Landed, such a claim kept the key from the job's copy, for nobody,
    until its lease ended; such a hold kept every enqueue of the key waiting for a publish that
    never came, for PUBLISH_HOLD_S. A release names its claim's token, and a hold's end its job
    id, so one that never landed changes nothing; it goes in a later batch than what it undoes,
    so it comes after it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._running: set[asyncio.Task[None]] = set()

    def release(self, key: str, token: str) -> None:
        self._undo(self._store.release(key, token), f"release the claim on {key!r}")

    def forget(self, key: str, job_id: str) -> None:
        self._undo(self._store.forget(key, job_id), f"end the dedupe hold on {key!r}")

    def _undo(self, undoing: Awaitable[None], what: str) -> None:
        running = asyncio.get_running_loop().create_task(self._undo_or_log(undoing, what))
        self._running.add(running)
        running.add_done_callback(self._running.discard)

    async def _undo_or_log(self, undoing: Awaitable[None], what: str) -> None:
        try:
            await undoing
        except StoreError as exc:  # the key frees itself when the lease or hold ends
            log.warning("could not %s of a caller that was cancelled: %s", what, exc)

    async def wait(self) -> None:
        """For the store's `close`: give the releases under way WAIT_S to finish."""
        if self._running:
            await asyncio.wait(self._running, timeout=WAIT_S)
