"""What idempotency keys cost: bridge consume with a key on every job against no keys, per store.

For each broker and each store (SQLite in a temporary folder, the local PostgreSQL and Redis of
`bridge dev up`), in one run: N no-op jobs without keys, then N jobs each with its own key in
that store. Every keyed job claims its key and completes it: two store round trips per job.
The in-memory store comes first: no I/O and no waiting, so its row is what the claim protocol
itself costs. A store's ratio is the median, over the rounds, of its rate over the no-key rate
measured just before it.

Last, what the SQLite target leaves a key, per broker, next to what a key cannot do without: the
claim protocol (the memory store's time) and SQLite's own statements. Those are measured by
calling the store's transaction code straight, with no broker and no event loop: a claim and a
completion per key, each commit holding the claims of --concurrency keys and the completions of
the --concurrency before them (more per commit than a consumer gathers, so this is a floor).

    python -m bench.idempotency [--n 5000] [--broker kafka|rabbitmq|all] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import kafka, rabbitmq
from bench.common import (
    IN_FLIGHT,
    JOB_TYPE,
    BenchError,
    Timing,
    bench_app,
    fresh,
    fresh_prefix,
    timed_windows,
    timeout_for,
)
from bench.throughput import BROKERS, TIMED_OUT, Row, Table, _positive, broker_urls, render
from bridge.errors import BridgeError
from bridge.idempotency import new_token, run_key
from bridge.idempotency.sql import CLAIM, COMPLETE, _completion, now_ms
from bridge.idempotency.sqlite import SqliteStore

STORES = ("memory", "sqlite", "postgres", "redis")
SQLITE_MAX_COST = 0.30  # the target: keys on SQLite cost under 30% of the no-key rate
DEFAULT_JOBS = 5000
DEFAULT_CONCURRENCY = 16


async def publish(broker: str, queue: str, jobs: int, keyed: bool, *, prefix: str) -> None:
    """Create `queue` and put `jobs` no-op jobs on it, each with a key of its own if `keyed`."""
    async with bench_app(broker, queue, prefix=prefix) as app:
        await app.apply_topology()
        run = uuid.uuid4().hex  # keys never seen by an earlier run
        await timed_windows(
            jobs, IN_FLIGHT,
            lambda n: app.enqueue_async(JOB_TYPE, {"n": n}, idempotency_key=f"{run}-{n}" if keyed else None),
        )  # fmt: skip


async def consume(
    broker: str, queue: str, jobs: int, concurrency: int, store: str | None, *, prefix: str
) -> Timing:
    """`consume(burst=True)` of `queue`, from its first delivery to its last settle.

    With a store, the worker would open it at its first keyed claim, inside the timed window:
    the app's store is opened here first (the worker takes that one), and one key claimed, so
    that its connections and tables are ready before the clock starts (as bench.duplicates does).
    """
    settings: dict[str, Any] = {"idempotency": store} if store else {}
    async with bench_app(broker, queue, prefix=prefix, concurrency=concurrency, **settings) as app:
        if store:
            opened = await app.idempotency_store(concurrency=concurrency)
            await opened.claim(f"bench-warm-up:{uuid.uuid4().hex}", "warm-up", 1)
        stats = await asyncio.wait_for(app.consume(burst=True), timeout_for(jobs))
    if stats.processed != jobs or stats.dead_lettered or stats.duplicates or stats.delayed:
        raise BenchError(f"consume of {queue}: {stats.summary()}, expected {jobs} settled and run")
    return Timing(stats.processed, stats.last_s - stats.first_s)


def measure(broker: str, url: str, stores: dict[str, str], jobs: int, concurrency: int, table: Table) -> None:
    """For each store, the no-key rate and then the rate with keys in that store, on one broker.

    Each store's rate is judged against the no-key run just before it: this machine's speed
    drifts within minutes, so one baseline taken before all the stores would make the later
    ones look better or worse than they are. Every queue is deleted afterwards: quorum queues left
    behind keep costing RabbitMQ CPU, and made later rounds (and other benchmarks) slower.
    """
    prefix = fresh_prefix()
    queues: list[str] = []
    try:
        for name, store in stores.items():
            plain, keyed = fresh(f"{broker}-nokey"), fresh(f"{broker}-{name}")
            queues += [plain, keyed]
            asyncio.run(publish(url, plain, jobs, keyed=False, prefix=prefix))
            asyncio.run(publish(url, keyed, jobs, keyed=True, prefix=prefix))
            timing = asyncio.run(consume(url, plain, jobs, concurrency, None, prefix=prefix))
            baseline = table.add(broker, "consume", f"no keys, before {name}", timing)
            timing = asyncio.run(consume(url, keyed, jobs, concurrency, store, prefix=prefix))
            target = 1 - SQLITE_MAX_COST if name == "sqlite" else None
            table.add(broker, "consume", f"keys in {name}", timing, baseline=baseline, min_ratio=target)
    finally:
        drop(broker, url, queues, prefix)


def drop(broker: str, url: str, queues: Sequence[str], prefix: str) -> None:
    """Delete `queues` (topics on Kafka) that a measurement made, and its prefix's delay tiers."""
    if broker == "rabbitmq":
        asyncio.run(rabbitmq.delete_queues(url, queues))
        asyncio.run(rabbitmq.delete_prefix(url, prefix))
    else:
        kafka.delete_topics(url, [*queues, prefix])


def allowed_us(job_us: float) -> float:
    """What the SQLite target lets a key add to a job of `job_us`: 30% of the rate is 43% more time."""
    return job_us * SQLITE_MAX_COST / (1 - SQLITE_MAX_COST)


def costs(rows: Sequence[Row]) -> list[str]:
    """What keys cost in each store: a share of the no-key rate, and the time a key adds to a job.

    The share depends on what a job without a key costs (about 15 µs of the loop on Kafka, ten
    times that on RabbitMQ); the time added is the store's and the protocol's own cost.
    """
    return [
        f"{row.broker:<8} {row.label:<16} costs {1 - row.ratio:.0%} of the no-key rate, "
        f"{added_us(row):,.0f} µs more per job"
        for row in rows
        if row.ratio is not None
    ]


def added_us(row: Row) -> float:
    """How much longer a keyed job takes than one without: the median of each round's difference."""
    assert row.baseline is not None
    pairs = zip(row.rates, row.baseline.rates, strict=True)
    return statistics.median(1e6 / ours - 1e6 / theirs for ours, theirs in pairs)


def sqlite_alone_us(
    url: str, keys: int, per_commit: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """SQLite's own time per key, in µs: its claim and its completion, with no broker and no loop.

    By the wall clock, or by `clock` (time.process_time: its CPU, without the waits for the disk).
    """

    async def run() -> float:
        store = SqliteStore(url)
        try:
            prefix, lease_ms = uuid.uuid4().hex, 60_000
            names = [run_key(JOB_TYPE, f"{prefix}-{n}") for n in range(keys)]
            claimed: list[tuple[str, str]] = []
            start = clock()
            for first in range(0, keys + per_commit, per_commit):
                now, job_id = now_ms(), uuid.uuid4().hex
                claiming = [(name, new_token()) for name in names[first : first + per_commit]]
                results = store._commit_now(
                    [(CLAIM, (name, job_id, token, now + lease_ms, now)) for name, token in claiming]
                    + [(COMPLETE, _completion(name, token, job_id, 86_400.0, now)) for name, token in claimed]
                )
                if any(result != [()] for result in results):  # each one changed its key's row
                    raise BenchError(f"sqlite alone: a claim or completion did not take effect: {results}")
                claimed = claiming
            return (clock() - start) / keys * 1e6
        finally:
            await store.close()

    return asyncio.run(run())


def allowances(rows: Sequence[Row], sqlite_us: float) -> list[str]:
    """Per broker, the time the SQLite target lets a key add to a job, and what a key needs anyway.

    A job's time comes from the median no-key rate, while a ratio pairs each round's two rates:
    when the rounds differ a lot, the two can disagree about whether the target was met.
    """
    lines = [
        f"sqlite alone: {sqlite_us:,.1f} µs per key (its claim and its completion; no broker, no event loop)"
    ]
    by_label = {(row.broker, row.label): row for row in rows}
    for broker in dict.fromkeys(row.broker for row in rows):
        sqlite, memory = by_label[broker, "keys in sqlite"], by_label[broker, "keys in memory"]
        assert sqlite.baseline is not None
        job_us = 1e6 / sqlite.baseline.rate
        lines.append(
            f"{broker:<8} a job without a key takes {job_us:,.0f} µs; the target lets a key add "
            f"{allowed_us(job_us):,.0f} µs; the claim protocol takes {added_us(memory):,.0f} µs in memory, "
            f"and SQLite alone {sqlite_us:,.0f} µs more"
        )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.idempotency",
        description="bridge consume with idempotency keys in each store, against no keys, per broker.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n", type=_positive, default=DEFAULT_JOBS, help="jobs per measurement")
    parser.add_argument("--broker", choices=[*BROKERS, "all"], default="all", help="which brokers to measure")
    parser.add_argument(
        "--concurrency", type=_positive, default=DEFAULT_CONCURRENCY, help="consume concurrency"
    )
    parser.add_argument("--repeat", type=_positive, default=1, help="rounds; the table shows medians")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = list(BROKERS) if args.broker == "all" else [args.broker]
    urls = broker_urls([*wanted, "postgres", "redis"])
    print(
        f"bench: {args.n:,} no-op jobs per measurement, concurrency {args.concurrency}; "
        f"bridge {version('bridge-jobs')}, psycopg {version('psycopg')}, redis-py {version('redis')}, "
        f"Python {platform.python_version()}",
        flush=True,
    )

    def progress(row: Row, timing: Timing) -> None:
        print(f"  ... {row.broker} {row.label}: {timing.rate:,.0f} jobs/s", file=sys.stderr)

    table = Table(progress)
    sqlite_us: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        sqlite = f"sqlite:///{Path(folder) / 'keys.db'}"
        alone = f"sqlite:///{Path(folder) / 'alone.db'}"
        stores = {
            "memory": "memory://",  # no I/O: what the claim protocol itself costs
            "sqlite": sqlite,
            "postgres": urls["postgres"],
            "redis": urls["redis"],
        }
        try:
            for _ in range(args.repeat):
                for broker in wanted:
                    measure(broker, urls[broker], stores, args.n, args.concurrency, table)
                sqlite_us.append(sqlite_alone_us(alone, args.n, args.concurrency))
        except (BenchError, BridgeError) as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        except TimeoutError:
            print(TIMED_OUT, file=sys.stderr)
            return 1
    rows = list(table.rows.values())
    print("\n".join([*render(rows), "", *costs(rows), "", *allowances(rows, statistics.median(sqlite_us))]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
