"""Stopping a handler that runs past its job type's `timeout_s`.

An `async def` handler is cancelled at its limit. A plain one runs in a thread, which cannot be
cancelled: as Dramatiq does, the limit raises an exception in that thread, which Python delivers
between bytecodes. A thread inside a long C call (`time.sleep`, a blocking read) takes it only
once the call returns; until then its job holds its slot, and its idempotency key stays claimed.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import Coroutine
from typing import Any

from bridge.errors import TimeLimitExceeded
from bridge.transports.base import cut_off


class TimeUp(BaseException):
    """Raised in a plain handler's thread at its limit. A BaseException, so that a handler's
    `except Exception` lets it through, as it lets an async handler's cancellation through."""


def past(limit_s: float) -> TimeLimitExceeded:
    return TimeLimitExceeded(f"the handler ran past its time limit, timeout_s={limit_s:g}, and was stopped")


async def within(limit_s: float, running: Coroutine[Any, Any, Any]) -> None:
    """Await an async handler's `running`, cancelled at `limit_s`: TimeLimitExceeded then, also
    when the handler turned its cancellation into another error (chained to it)."""
    timer = asyncio.timeout(limit_s)
    try:
        async with timer:
            await running
    except Exception as exc:  # (a stop's cancellation is no Exception: it goes on as it came)
        if timer.expired():
            raise past(limit_s) from exc
        raise
    except asyncio.CancelledError as exc:
        # The limit's, let through because the handler left a cancel request of its own on
        # the task (see the worker's `_take_back_stray_cancels`, which then withdraws it); a stop's
        # goes on as it came.
        if timer.expired() and not cut_off(asyncio.current_task()):
            raise past(limit_s) from exc
        raise


class Interruptible:
    """A plain handler's run in a worker thread, which `interrupt` stops (from the event loop).

    The lock keeps the exception from landing outside the handler: in the thread pool's own
    code it would end the pool's thread. One that comes too late for the handler is withdrawn
    as the handler returns (or, raised on its way out, known by `returned`), and one that comes
    before it started keeps it from starting.
    """

    __slots__ = ("_lock", "_thread", "interrupted", "returned")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: int | None = None
        self.interrupted = False
        self.returned: list[Any] = []  # what the handler returned, once it has

    def enter(self) -> None:
        """In the thread, before the handler starts."""
        with self._lock:
            if self.interrupted:  # its time ran out while it waited for a thread
                raise TimeUp
            self._thread = threading.get_ident()

    def leave(self) -> None:
        """In the thread, as the handler ends."""
        with self._lock:
            if self.interrupted and self._thread is not None:
                _raise_in(self._thread, None)  # (withdrawn if still pending: nothing left to stop)
            self._thread = None

    def interrupt(self) -> None:
        with self._lock:
            self.interrupted = True
            if self._thread is not None:
                _raise_in(self._thread, TimeUp)


def _raise_in(thread: int, exc: type[BaseException] | None) -> None:
    """Have `thread` raise `exc` at its next bytecode (None: withdraw one still pending)."""
    # (None goes as NULL, which withdraws; ctypes.py_object(None) would be Python's None.)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), exc and ctypes.py_object(exc))
