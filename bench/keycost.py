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

Last, per broker, the cores that keyed jobs in SQLite would need at the target's rate, however
the work were spread over threads or processes: the CPU per job of the loop, of this process's
other threads and of the broker (a local process, found by its port) with keys in memory, plus
SQLite's own CPU per key. When that is more than the machine has, no design that keeps SQLite's
statements as they are can meet the target here.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import cpu
from bench.common import BenchError, bench_app, fresh, fresh_prefix, timeout_for
from bench.idempotency import DEFAULT_CONCURRENCY, SQLITE_MAX_COST, allowed_us, drop, publish, sqlite_alone_us
from bench.throughput import BROKERS, TIMED_OUT, _positive, broker_urls
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


@dataclass(frozen=True)
class Sample:
    """Clocks read in the handler: wall, the loop thread's CPU, this process's, the broker's."""

    wall_s: float
    loop_s: float
    process_s: float
    broker_s: float | None

    @classmethod
    def now(cls, broker_pid: int | None) -> Sample:
        broker_s = cpu.cpu_s(broker_pid) if broker_pid is not None else None
        return cls(time.monotonic(), time.thread_time(), time.process_time(), broker_s)


@dataclass(frozen=True)
class Usage:
    """Per job, between the first handler call and the last: CPU µs of each part, and the rate."""

    loop_us: float  # the event loop's thread
    others_us: float  # this process's other threads (librdkafka's, the Kafka poller, ...)
    broker_us: float | None  # the broker's process, when it is local
    rate: float  # jobs/s by the wall clock

    @classmethod
    def between(cls, first: Sample, last: Sample, jobs: int) -> Usage:
        per_job_us = 1e6 / jobs
        broker = None
        if first.broker_s is not None and last.broker_s is not None:
            broker = (last.broker_s - first.broker_s) * per_job_us
        loop = (last.loop_s - first.loop_s) * per_job_us
        others = (last.process_s - first.process_s) * per_job_us - loop
        return cls(loop, others, broker, jobs / max(last.wall_s - first.wall_s, 1e-9))


class LoopClock:
    """A no-op handler that reads the clocks (`Sample`) at the first job and at the last."""

    def __init__(self, jobs: int, broker_pid: int | None) -> None:
        self.jobs = jobs
        self.broker_pid = broker_pid
        self.calls = 0
        self.first: Sample | None = None
        self.last: Sample | None = None

    async def handler(self, payload: dict[str, Any], ctx: JobContext) -> None:
        self.calls += 1
        if self.calls == 1:
            self.first = Sample.now(self.broker_pid)
        elif self.calls == self.jobs:
            self.last = Sample.now(self.broker_pid)

    def usage(self) -> Usage:
        assert self.first is not None and self.last is not None
        return Usage.between(self.first, self.last, self.jobs - 1)


async def consume(
    broker: str, queue: str, jobs: int, concurrency: int, store: str | Store | None, *, prefix: str
) -> Usage:
    """Consume `queue` (`jobs` jobs) with `store`; what each job cost."""
    clock = LoopClock(jobs, cpu.listener_pid(urlsplit(broker).port or 0))
    settings = {"idempotency": store} if isinstance(store, str) else {}
    app = bench_app(broker, queue, prefix=prefix, concurrency=concurrency, handler=clock.handler, **settings)
    if isinstance(store, MemoryStore):
        given = store

        async def the_store(concurrency: int | None = None) -> Store:
            return given

        app.idempotency_store = the_store  # type: ignore[method-assign]
    async with app:
        stats = await asyncio.wait_for(app.consume(burst=True), timeout_for(jobs))
    if stats.processed != jobs or clock.calls != jobs or stats.dead_lettered or stats.duplicates:
        detail = f"{stats.summary()}, {clock.calls} handler runs"
        raise BenchError(f"consume of {queue}: {detail}; expected {jobs} settled and run, no duplicates")
    return clock.usage()


def measure(broker: str, url: str, sqlite: str, jobs: int, concurrency: int) -> list[Usage]:
    """One round on `broker`: what a job costs each of the four ways."""
    stores: list[str | Store | None] = [None, "memory://", WaitingMemoryStore(), sqlite]
    queues = [fresh(f"{broker}-{n}") for n in range(len(stores))]  # a RabbitMQ queue is read once
    prefix = fresh_prefix()
    try:
        for queue, store in zip(queues, stores, strict=True):
            asyncio.run(publish(url, queue, jobs, keyed=store is not None, prefix=prefix))
        return [
            asyncio.run(consume(url, queue, jobs, concurrency, store, prefix=prefix))
            for queue, store in zip(queues, stores, strict=True)
        ]
    finally:
        drop(broker, url, queues, prefix)


def report(broker: str, rounds: list[list[Usage]], sqlite_cpu_us: float) -> list[str]:
    """The rounds, their medians, what each step adds next to what the target allows, and the
    cores that the target's rate needs at the least.
    """
    lines = [f"{broker:<8} " + "".join(f"{way:>17}" for way in WAYS)]
    lines += [f"{'':<8} " + "".join(f"{usage.loop_us:>14.1f} µs" for usage in one) for one in rounds]
    plain, memory, waiting, sqlite = [_median(column) for column in zip(*rounds, strict=True)]
    lines.append(
        f"{broker:<8} medians: the target lets a key add {allowed_us(plain.loop_us):.1f} µs to a "
        f"{plain.loop_us:.1f} µs job; the protocol adds {memory.loop_us - plain.loop_us:.1f}, "
        f"waiting {waiting.loop_us - memory.loop_us:.1f}, SQLite's statements "
        f"{sqlite.loop_us - waiting.loop_us:.1f}: {sqlite.loop_us - plain.loop_us:.1f} µs in all"
    )
    return [*lines, *budget(broker, plain, memory, sqlite_cpu_us)]


def budget(broker: str, plain: Usage, memory: Usage, sqlite_cpu_us: float) -> list[str]:
    """The CPU that keyed jobs in SQLite need at the target's rate, wherever SQLite's statements run.

    A floor: the loop does at least the memory store's work per keyed job (the claim protocol
    with no I/O), the process's other threads and the broker at least what they did then, and
    SQLite's statements cost at least their CPU when called straight with no loop (`sqlite
    alone`). Moving them to a thread or a process of their own would add to that, never take away.
    """
    rate = (1 - SQLITE_MAX_COST) * plain.rate
    broker_us = memory.broker_us if memory.broker_us is not None else 0.0
    parts = {
        "the loop": memory.loop_us,
        "other threads": memory.others_us,
        "the broker": broker_us,
        "SQLite's statements": sqlite_cpu_us,
    }
    needs = {name: rate * us / 1e6 for name, us in parts.items()}
    detail = ", ".join(f"{name} {cores:.2f}" for name, cores in needs.items())
    unmeasured = "" if memory.broker_us is not None else " (not counting the broker: not a local process)"
    return [
        f"{broker:<8} CPU per job, µs       loop  other threads  broker   jobs/s",
        *(
            f"{'':<8} {way:<16} {usage.loop_us:>8.1f} {usage.others_us:>14.1f} "
            f"{usage.broker_us if usage.broker_us is not None else float('nan'):>7.1f} {usage.rate:>8,.0f}"
            for way, usage in (("no keys", plain), ("keys in memory", memory))
        ),
        f"{broker:<8} at the target's {rate:,.0f} jobs/s (70% of no keys) keys in SQLite need at least "
        f"{sum(needs.values()):.2f} cores{unmeasured}: {detail} (SQLite alone: {sqlite_cpu_us:.1f} µs "
        f"of CPU per key); the loop can use one core, and this machine has {cpu.cores()}",
    ]


def _median(usages: Sequence[Usage]) -> Usage:
    brokers = [u.broker_us for u in usages if u.broker_us is not None]
    return Usage(
        statistics.median(u.loop_us for u in usages),
        statistics.median(u.others_us for u in usages),
        statistics.median(brokers) if len(brokers) == len(usages) else None,
        statistics.median(u.rate for u in usages),
    )


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
                alone = f"sqlite:///{Path(folder) / f'{broker}-alone.db'}"
                sqlite_cpu_us = sqlite_alone_us(alone, args.n, args.concurrency, clock=time.process_time)
                lines += report(broker, rounds, sqlite_cpu_us)
        except (BenchError, BridgeError) as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        except TimeoutError:
            print(TIMED_OUT, file=sys.stderr)
            return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
