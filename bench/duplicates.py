"""What a duplicate costs a store, against a job whose key is new.

For each store (SQLite in a temporary folder, the local PostgreSQL and Redis of `bridge dev
up`), in one run and with no broker: N new keys claimed and completed, as N keyed jobs do,
then N claims of keys that are done, as N duplicates of them do, --concurrency at a time.
Each line gives both rates and the CPU per key of this process, and the ratio of the rates:
above 1 when a duplicate is cheaper than a new job. The medians over --repeat rounds; the ratio
is the median of each round's own ratio (its two rates measured back to back).

    python -m bench.duplicates [--n 4000] [--concurrency 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from bench.throughput import _positive, broker_urls
from bridge.errors import BridgeError
from bridge.idempotency import Claimed, Done, Store, open_store

DEFAULT_KEYS = 4000
DEFAULT_CONCURRENCY = 16
WINDOW_S = 600.0  # a done key's window: longer than any run


async def timed(
    keys: list[str], concurrency: int, step: Callable[[str], Awaitable[None]]
) -> tuple[float, float]:
    """Keys per second and µs of this process's CPU per key, for `step` on each key."""
    slots = asyncio.Semaphore(concurrency)

    async def one(key: str) -> None:
        async with slots:
            await step(key)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(key) for key in keys))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(keys) / wall, cpu / len(keys) * 1e6


async def measure(url: str, n: int, concurrency: int) -> tuple[float, float, float, float]:
    """(new keys/s, µs per new key, duplicates/s, µs per duplicate) for the store at `url`."""
    store: Store = open_store(url)
    keys = [f"bench:{uuid.uuid4().hex}" for _ in range(n)]

    async def new_job(key: str) -> None:
        claim = await store.claim(key, "job-1", 30)
        assert isinstance(claim, Claimed), claim
        await store.complete(key, claim.token, "job-1", WINDOW_S)

    async def duplicate(key: str) -> None:
        claim = await store.claim(key, "job-2", 30)
        assert isinstance(claim, Done), claim

    try:
        await store.claim(f"bench:{uuid.uuid4().hex}", "warm-up", 1)  # connections and tables
        return (*await timed(keys, concurrency, new_job), *await timed(keys, concurrency, duplicate))
    finally:
        await store.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.duplicates",
        description="What a duplicate costs each idempotency store, against a new key.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n", type=_positive, default=DEFAULT_KEYS, help="keys per measurement")
    parser.add_argument("--concurrency", type=_positive, default=DEFAULT_CONCURRENCY, help="claims at once")
    parser.add_argument("--repeat", type=_positive, default=3, help="rounds; the lines show medians")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"bench: {args.n:,} keys per measurement, {args.concurrency} at once, {args.repeat} rounds")
    with tempfile.TemporaryDirectory() as folder:
        try:
            urls = broker_urls(["postgres", "redis"])
            stores = {"sqlite": f"sqlite:///{Path(folder) / 'keys.db'}", **urls}
            for name, url in stores.items():
                rounds = [asyncio.run(measure(url, args.n, args.concurrency)) for _ in range(args.repeat)]
                columns = zip(*rounds, strict=True)
                new_rate, new_us, dup_rate, dup_us = (statistics.median(column) for column in columns)
                ratio = statistics.median(dup / new for new, _, dup, _ in rounds)
                print(
                    f"{name:8}  new keys {new_rate:7,.0f}/s ({new_us:5.1f} µs CPU each)   duplicates "
                    f"{dup_rate:7,.0f}/s ({dup_us:5.1f} µs)   ratio {ratio:.2f}"
                )
        except BridgeError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
