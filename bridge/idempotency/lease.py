"""A worker's hold on one idempotency key while its job runs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from bridge.errors import LeaseLost, Permanent, StoreError
from bridge.idempotency import Store
from bridge.idempotency.outage import Outage

log = logging.getLogger("bridge.idempotency")


@dataclass(eq=False, slots=True)
class Lease:
    """A claimed key: renewed while the handler runs, then completed or released."""

    store: Store
    key: str
    token: str
    job_id: str
    lease_s: float
    window_s: float
    outage: Outage  # completing or releasing the key waits out the store's outages
    completed: bool = field(default=False)  # by the handler's inbox transaction
    inbox_open: bool = field(default=False)  # that transaction is open
    # The key's completion or release is under way: a renewal that finds the claim gone then
    # says nothing, since the key is being done (or the completion says itself that the claim
    # was lost). A renewal round takes the leases of the jobs running when it starts, so its
    # renewal of a job that finishes meanwhile may reach the store after the completion.
    ending: bool = field(default=False)
    # Its handler's thread runs on after its task was cancelled: the key is finished when the
    # thread ends (Worker._in_thread), and renewed until then.
    outlived: bool = field(default=False)
    # The store's own error that ended the inbox transaction (it could not open, complete or
    # commit): an outage, not the job's failure. The job waits for the store, as a claim does.
    unavailable: StoreError | None = field(default=None)

    async def renew(self) -> None:
        """Push the lease's end `lease_s` further out; a lost claim is logged."""
        if self.ending:
            return  # there is no claim left to renew, or there will not be
        try:
            # (`ending` again: the job may have finished while the renewal waited for the store.)
            if not await self.store.extend(self.key, self.token, self.lease_s) and not self.ending:
                log.warning("job %s lost its claim on %r: another worker may run it", self.job_id, self.key)
        except StoreError as exc:
            log.error("job %s could not renew its claim on %r: %s", self.job_id, self.key, exc)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """The inbox (see `Store.transaction`); the key is done once it commits.

        Used twice, it raises `Permanent`: a mistake in the handler, which every retry repeats.
        """
        if self.completed:
            raise Permanent("ctx.transaction() can be used once per job: its commit completes the key")
        if self.inbox_open:  # (waiting for the connection it holds would wait for good)
            raise Permanent("ctx.transaction() inside ctx.transaction(): the first one is still open")
        self.inbox_open = True
        handler_raised = False
        try:
            async with self.store.transaction(self.key, self.token, self.job_id, self.window_s) as handle:
                try:
                    yield handle
                except BaseException:
                    handler_raised = True
                    raise
                self.ending = True  # the key completes, and the transaction commits, next
        except BaseException as exc:
            self.ending = False  # nothing completed: a claim still held is renewed as before
            if isinstance(exc, StoreError) and not isinstance(exc, LeaseLost) and not handler_raised:
                self.unavailable = exc
            raise
        finally:
            self.inbox_open = False
        self.completed = True

    async def finish(self, succeeded: bool, *, again: bool = False) -> None:
        """Mark the key done (the job succeeded) or give it back (it will be retried).

        `again`: a first try was cut off, and may have landed; a completion that then finds
        the key done already says nothing.
        """
        if self.completed:
            return
        self.ending = True
        record = (self._complete_again if again else self._complete) if succeeded else self._release
        try:
            await record()
        except StoreError as exc:  # wait for the store, beside the worker's other keyed jobs
            if succeeded:  # (the first try may have landed, its answer lost: no false alarm)
                record = self._complete_again
            try:
                await self.outage.retry(exc, record)
            except StoreError as last:  # it waited GIVE_UP_S
                # The outcome stands; the key frees itself when the lease ends.
                log.error("job %s: could not record its key %r: %s", self.job_id, self.key, last)

    async def _complete(self) -> None:
        if not await self.store.complete(self.key, self.token, self.job_id, self.window_s):
            log.warning(
                "job %s succeeded after its claim on %r ended: another worker may have run it too",
                self.job_id, self.key,
            )  # fmt: skip

    async def _complete_again(self) -> None:
        await self.store.complete(self.key, self.token, self.job_id, self.window_s)

    async def _release(self) -> None:
        await self.store.release(self.key, self.token)
