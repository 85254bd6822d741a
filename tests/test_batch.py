"""How a store's per-tick batch gathers requests (bridge/idempotency/batch.py), on a real loop."""

from __future__ import annotations

import asyncio

from bridge.idempotency.batch import MAX_PASSES, TickBatch
from tests.conftest import run


def sent_now() -> tuple[TickBatch[int], list[list[int]]]:
    """A batch whose sends never wait (SQLite's kind), and the batches it sent."""
    sent: list[list[int]] = []

    def send_now(requests: list[int]) -> list[int]:
        sent.append(requests)
        return requests

    async def send(requests: list[int]) -> list[int]:
        raise AssertionError("a batch with send_now and no lock never sends from a task")

    return TickBatch(send, send_now=send_now), sent


def test_requests_made_before_the_loop_goes_idle_share_one_send() -> None:
    # Given a request, and a chain of callbacks that each schedule the next, the last one
    # making a second request (as RabbitMQ deliveries reach their jobs a few loop passes apart),
    # When the first request's batch would go out, Then it waits while the loop has callbacks
    # ready, and both requests go out in one send.
    batch, sent = sent_now()

    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        second: list[asyncio.Future[int]] = []

        def step(left: int) -> None:
            if left:
                loop.call_soon(step, left - 1)
            else:
                second.append(asyncio.ensure_future(batch.call(2)))

        loop.call_soon(step, 5)
        first = await batch.call(1)
        while not second:  # (only if the first went out alone)
            await asyncio.sleep(0)
        return [first, await second[0]]

    assert run(scenario()) == [1, 2]
    assert sent == [[1, 2]]


def test_a_loop_that_is_never_idle_still_sends_within_max_passes() -> None:
    # Given a callback that schedules itself again forever (a loop that is never idle),
    # When a request is made, Then its batch goes out after at most MAX_PASSES loop passes.
    batch, sent = sent_now()

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        passes = [0]

        def spin() -> None:
            passes[0] += 1
            loop.call_soon(spin)

        loop.call_soon(spin)
        await batch.call(1)
        return passes[0]

    assert run(scenario(), timeout=5) <= MAX_PASSES + 1
    assert sent == [[1]]
