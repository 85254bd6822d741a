"""`python -m bench.returns`: what a message that came back costs on RabbitMQ.

RabbitMQ counts a return for every message a dead channel held, not only for the job that
killed its worker. So bridge takes the messages that came back one at a time (`basic.get`) and
runs each alone (`_take_returns` in bridge/transports/rabbitmq.py): a crash then counts only
the job that ran. This prices that. --n no-op jobs are consumed fresh, next to --n no-op jobs
that another channel took and gave back unsettled (as a worker killed with them in its
prefetch would), each queue drained by `consume(burst=True)` at --concurrency, from its first
job to its last settle; the two alternate --repeat times. There is no target: the ratio is
what the promise costs while messages come back.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import aio_pika

from bench import rabbitmq
from bench.common import (
    IN_FLIGHT,
    JOB_TYPE,
    BenchError,
    Timing,
    bench_app,
    bridge_consume,
    fresh,
    fresh_prefix,
    timed_windows,
    timeout_for,
)
from bench.throughput import TIMED_OUT, _positive, broker_urls
from bridge.errors import BridgeError

READY_POLL_S = 0.05


async def fill(url: str, queue: str, jobs: int, *, prefix: str) -> None:
    """Create `queue` and enqueue `jobs` no-op jobs onto it."""
    async with bench_app(url, queue, prefix=prefix) as app:
        await app.apply_topology()
        await timed_windows(jobs, IN_FLIGHT, lambda n: app.enqueue_async(JOB_TYPE, {"n": n}))


async def give_back(url: str, queue: str, jobs: int) -> None:
    """Take all `jobs` of `queue` on a connection of its own and close it, settling none: each
    comes back with an `x-delivery-count` of 1. Returns once they are all ready again."""
    taken = asyncio.Event()
    count = 0

    async def take(message: object) -> None:
        nonlocal count
        count += 1
        if count == jobs:
            taken.set()

    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=jobs)
        await (await channel.declare_queue(queue, passive=True)).consume(take)
        await asyncio.wait_for(taken.wait(), timeout_for(jobs))
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        while (await channel.declare_queue(queue, passive=True)).declaration_result.message_count < jobs:
            await asyncio.sleep(READY_POLL_S)


def measure(url: str, jobs: int, concurrency: int, *, came_back: bool) -> Timing:
    queue, prefix = fresh("rabbitmq-returns"), fresh_prefix()
    try:
        asyncio.run(fill(url, queue, jobs, prefix=prefix))
        if came_back:
            asyncio.run(give_back(url, queue, jobs))
        return asyncio.run(bridge_consume(url, queue, jobs, concurrency, prefix=prefix))
    finally:
        asyncio.run(rabbitmq.delete_queues(url, [queue]))
        asyncio.run(rabbitmq.delete_prefix(url, prefix))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.returns",
        description="Consume rate of RabbitMQ messages that came back, against fresh ones.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n", type=_positive, default=2000, help="jobs per measurement")
    parser.add_argument("--concurrency", type=_positive, default=16, help="concurrency of the consumer")
    parser.add_argument("--repeat", type=_positive, default=2, help="measurements of each kind, alternated")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    url = broker_urls(["rabbitmq"])["rabbitmq"]
    print(f"bench.returns: {args.n:,} no-op jobs per run, concurrency {args.concurrency}", flush=True)
    try:
        for _ in range(args.repeat):
            fresh_rate = measure(url, args.n, args.concurrency, came_back=False).rate
            print(f"rabbitmq consume  fresh      {fresh_rate:>8,.0f} jobs/s", flush=True)
            back_rate = measure(url, args.n, args.concurrency, came_back=True).rate
            ratio = back_rate / fresh_rate
            print(f"rabbitmq consume  came back  {back_rate:>8,.0f} jobs/s   ratio {ratio:.2f}", flush=True)
    except (BenchError, BridgeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(TIMED_OUT, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
