"""Where a keyed job's time goes: the event loop's CPU per job, without keys and with them.

For each broker, one queue of N keyed no-op jobs and one of N without keys, consumed four
ways in turn:

    no keys            the job alone
    keys in memory     plus the claim protocol (the memory store: no I/O, no waiting)
    memory, waiting    plus waiting for the claim and the completion: the memory store behind
                       the same per-tick batch as SQLite, so each job waits as it does there
    keys in sqlite     plus SQLite's statements

What is timed is the CPU time of the event loop's thread (`time.thread_time`) from the first
handler call to the last, per job. The loop is busy nearly all the time in every case, so its CPU
is what limits the rate; and it is steadier than the rate on this machine, whose speed swings
within minutes. The differences between neighbouring columns are what the protocol, the waiting
and SQLite's statements each cost a job, next to what the SQLite target allows a key
(`bench.idempotency`: keys may cost under 30% of the no-key rate, so 43% more time per job).

    python -m bench.keycost [--n 30000] [--broker kafka|rabbitmq|all] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import BenchError, bench_app, fresh, timeout_for
from bench.idempotency import DEFAULT_CONCURRENCY, allowed_us, drop, publish
from bench.throughput import BROKERS, _positive, broker_urls
from bridge import JobContext
from bridge.errors import BridgeError
from bridge.idempotency import Claim, Store
from bridge.idempotency.batch import TickBatch
from bridge.idempotency.memory import MemoryStore

WAYS = ("no keys", "keys in memory", "memory, waiting", "keys in sqlite")
DEFAULT_JOBS = 30000


class WaitingMemoryStore(MemoryStore):
    """The memory store, each claim and completion first waiting for its loop tick's batch."""

    def __init__(self) -> None:
        super().__init__()
        self._tick: TickBatch[None] = TickBatch(self._send, send_now=lambda batch: [None] * len(batch))

    async def _send(self, batch: list[None]) -> list[None]:
        return [None] * len(batch)

    async def claim(self, key: str, job_id: str, lease_s: float) -> Claim:
        await self._tick.call(None)
        return await super().claim(key, job_id, lease_s)

    async def complete(self, key: str, token: str, job_id: str, window_s: float) -> bool:
        await self._tick.call(None)
        return await super().complete(key, token, job_id, window_s)


class LoopClock:
    """A no-op handler that notes the loop thread's CPU time at the first job and at the last."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.calls = 0
        self.first_s = self.last_s = 0.0

    async def handler(self, payload: dict[str, Any], ctx: JobContext) -> None:
        self.calls += 1
        if self.calls == 1:
            self.first_s = time.thread_time()
        elif self.calls == self.jobs:
            self.last_s = time.thread_time()

    def per_job_us(self) -> float:
        return (self.last_s - self.first_s) / (self.jobs - 1) * 1e6


async def loop_us(broker: str, queue: str, jobs: int, concurrency: int, store: str | Store | None) -> float:
    """Consume `queue` (`jobs` jobs) with `store`; the loop's CPU µs per job."""
    clock = LoopClock(jobs)
    settings = {"idempotency": store} if isinstance(store, str) else {}
    app = bench_app(broker, queue, concurrency=concurrency, handler=clock.handler, **settings)
    if isinstance(store, MemoryStore):
        given = store

        async def the_store() -> Store:
            return given

        app.idempotency_store = the_store  # type: ignore[method-assign]
    async with app:
        stats = await asyncio.wait_for(app.consume(burst=True), timeout_for(jobs))
    if stats.processed != jobs or clock.calls != jobs or stats.dead_lettered or stats.duplicates:
        detail = f"{stats.summary()}, {clock.calls} handler runs"
        raise BenchError(f"consume of {queue}: {detail}; expected {jobs} settled and run, no duplicates")
    return clock.per_job_us()


def measure(broker: str, url: str, sqlite: str, jobs: int, concurrency: int) -> list[float]:
    """One round on `broker`: the loop's µs per job each of the four ways."""
    stores: list[str | Store | None] = [None, "memory://", WaitingMemoryStore(), sqlite]
    queues = [fresh(f"{broker}-{n}") for n in range(len(stores))]  # a RabbitMQ queue is read once
    try:
        for queue, store in zip(queues, stores, strict=True):
            asyncio.run(publish(url, queue, jobs, keyed=store is not None))
        return [
            asyncio.run(loop_us(url, queue, jobs, concurrency, store))
            for queue, store in zip(queues, stores, strict=True)
        ]
    finally:
        drop(broker, url, queues)


def report(broker: str, rounds: list[list[float]]) -> list[str]:
    """The rounds, their medians, and what each step adds next to what the target allows."""
    lines = [f"{broker:<8} " + "".join(f"{way:>17}" for way in WAYS)]
    lines += [f"{'':<8} " + "".join(f"{us:>14.1f} µs" for us in one) for one in rounds]
    median = [statistics.median(column) for column in zip(*rounds, strict=True)]
    plain, memory, waiting, sqlite = median
    lines.append(
        f"{broker:<8} medians: the target lets a key add {allowed_us(plain):.1f} µs to a {plain:.1f} µs job; "
        f"the protocol adds {memory - plain:.1f}, waiting {waiting - memory:.1f}, "
        f"SQLite's statements {sqlite - waiting:.1f}: {sqlite - plain:.1f} µs in all"
    )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.keycost",
        description="The event loop's CPU per job without keys, and with keys three ways, per broker.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n", type=_positive, default=DEFAULT_JOBS, help="jobs per measurement")
    parser.add_argument("--broker", choices=[*BROKERS, "all"], default="all", help="which brokers to measure")
    parser.add_argument(
        "--concurrency", type=_positive, default=DEFAULT_CONCURRENCY, help="consume concurrency"
    )
    parser.add_argument("--repeat", type=_positive, default=2, help="rounds; the summary uses medians")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.n < 2:
        sys.exit("bench: --n must be at least 2 (the clock runs from the first job to the last)")
    wanted = list(BROKERS) if args.broker == "all" else [args.broker]
    urls = broker_urls(wanted)
    print(f"bench: the event loop's CPU per no-op job, {args.n:,} jobs, concurrency {args.concurrency}")
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        try:
            for broker in wanted:
                sqlite = f"sqlite:///{Path(folder) / f'{broker}.db'}"
                one = (broker, urls[broker], sqlite, args.n, args.concurrency)
                rounds = [measure(*one) for _ in range(args.repeat)]
                lines += report(broker, rounds)
        except (BenchError, BridgeError) as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
