"""`python -m bench.throughput` (`make bench`): bridge against the raw clients it is built on.

Bridge adds job semantics (an Avro envelope, decoding, dispatch, dead letters, offsets settled
only after the outcome) on top of aio-pika and confluent-kafka. This measures what that costs:
in one invocation, on each broker, N no-op jobs go through bridge and through a raw baseline
that moves the same bytes, each on a fresh queue or topic made by bridge's own topology under a
prefix of the round's own (RabbitMQ: a quorum queue bound to `<prefix>.jobs`; Kafka: a topic
with 3 partitions). It prints the rates and their ratio, next to the targets of the issue.

consume: jobs settled per second, timed from the first delivery to the last settle, so that
    connecting and Kafka's group join are not counted. The queue already holds N jobs.
    - RabbitMQ raw: an aio-pika consumer acking each message (no decoding), with the prefetch
      of bridge's consumer at --concurrency (twice it).
    - Kafka raw: confluent-kafka `consume(500)` batches; each envelope decoded with fastavro,
      a no-op call, `store_offsets` per record; librdkafka commits the stored offsets.
    - bridge: `await app.consume(burst=True)` with an `async def` no-op handler at
      --concurrency; the rate comes from the returned Stats.
publish: confirmed publishes per second, from the first publish to the last acknowledgement.
    - RabbitMQ raw: aio-pika with publisher confirms, each confirm awaited in turn, then 1000 in
      flight (windows of 1000 awaited together); persistent and mandatory, as bridge publishes.
    - Kafka raw: an idempotent confluent-kafka producer (acks=all), 1000 in flight, every
      delivery report of a window served before the next (the baseline of bridge's ratio); and,
      on a topic of its own, with no window and `flush()` at the end (shown, not a baseline).
    - bridge: `enqueue_async` (validate, build and encode the envelope, publish) 1000 in flight.
    Every publisher sends one message elsewhere (the queue's dead-letter queue) before its clock
    starts, so that no first publish pays for setting up the connection or producer.

The publish measurements fill the queues that the consume measurements then drain. Each
measurement runs in its own `asyncio.run`. The RabbitMQ queues and Kafka topics, and the
prefix's exchange and delay tiers, are deleted at the end of each round. Numbers on a small
machine, where the brokers share the cores, are noisy: compare rows of the same run, not runs,
and use `--repeat` (rounds of every measurement, raw and bridge interleaved; the table shows
median rates, and the median of the rounds' ratios) before drawing a conclusion from one ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version

from bench import kafka, rabbitmq
from bench.common import (
    IN_FLIGHT,
    BenchError,
    Timing,
    bridge_consume,
    bridge_publish,
    envelope_bodies,
    fresh,
    fresh_prefix,
)
from bridge import BridgeError, dev

DEFAULT_JOBS = 20_000
# 16 (bridge's own default) was clearly slower on RabbitMQ in a sweep of 16 to 256 on two cores;
# 64 to 256 were within noise on both brokers. The raw RabbitMQ consumer's prefetch follows it.
DEFAULT_CONCURRENCY = 64
BROKERS = ("rabbitmq", "kafka")
TIMED_OUT = "bench: a measurement did not finish in time (jobs lost, or a broker stalled); no numbers"


@dataclass
class Row:
    """One measurement (its rate in each round), with the baseline and target it is judged against."""

    broker: str
    kind: str  # "consume" or "publish"
    label: str
    rates: list[float] = field(default_factory=list)
    baseline: Row | None = None
    min_ratio: float | None = None
    min_rate: float | None = None

    @property
    def rate(self) -> float:
        """Jobs per second: the median over the rounds."""
        return statistics.median(self.rates)

    @property
    def ratio(self) -> float | None:
        """This rate over the baseline's: the median of each round's ratio.

        Each round's pair is measured minutes apart at most, while this machine's speed drifts
        between rounds; a ratio of the two medians could pair a fast round with a slow one.
        """
        if self.baseline is None or 0 in self.baseline.rates:
            return None
        pairs = zip(self.rates, self.baseline.rates, strict=True)  # every round measures both
        return statistics.median(ours / theirs for ours, theirs in pairs)

    def verdict(self) -> str:
        """`(target >= X)`, with `MISSED` when the measurement falls short of it.

        A ratio is judged as printed, to two decimals: run-to-run noise is far larger than that.
        """
        if self.min_ratio is not None and self.ratio is not None:
            met, target = round(self.ratio, 2) >= self.min_ratio, f"{self.min_ratio:.2f}"
        elif self.min_rate is not None:
            met, target = self.rate >= self.min_rate, f"{self.min_rate:,.0f} jobs/s"
        else:
            return ""
        return f"(target >= {target}{'' if met else ': MISSED'})"


Report = Callable[[Row, Timing], None]


class Table:
    """The rows of a run; a row measured again in a later round gets one more rate."""

    def __init__(self, report: Report) -> None:
        self.rows: dict[tuple[str, str, str], Row] = {}
        self._report = report

    def add(
        self,
        broker: str,
        kind: str,
        label: str,
        timing: Timing,
        *,
        baseline: Row | None = None,
        min_ratio: float | None = None,
        min_rate: float | None = None,
    ) -> Row:
        """Record a measurement and what it is judged against; return its row."""
        row = self.rows.setdefault(
            (broker, kind, label), Row(broker, kind, label, [], baseline, min_ratio, min_rate)
        )
        row.rates.append(timing.rate)
        self._report(row, timing)
        return row


def run_rabbitmq(url: str, jobs: int, concurrency: int, table: Table) -> None:
    """Three publishes, each onto a fresh queue, then the raw and bridge consumes of two of them."""
    prefix = fresh_prefix()
    one_by_one, raw, ours = fresh("rabbitmq-raw1"), fresh("rabbitmq-raw"), fresh("rabbitmq-bridge")
    try:
        asyncio.run(rabbitmq.create_queues(url, [one_by_one, raw], prefix=prefix))  # bridge_publish: `ours`
        bodies = envelope_bodies(url, raw, jobs)

        timing = asyncio.run(rabbitmq.raw_publish(url, one_by_one, bodies, 1, prefix=prefix))
        table.add("rabbitmq", "publish", "raw aio-pika, confirm each in turn", timing)
        timing = asyncio.run(rabbitmq.raw_publish(url, raw, bodies, IN_FLIGHT, prefix=prefix))
        raw_publish = table.add("rabbitmq", "publish", f"raw aio-pika, {IN_FLIGHT} in flight", timing)
        timing = asyncio.run(bridge_publish(url, ours, jobs, prefix=prefix))
        label = f"bridge enqueue_async, {IN_FLIGHT} in flight"
        table.add("rabbitmq", "publish", label, timing, baseline=raw_publish, min_rate=5000)

        prefetch = rabbitmq.prefetch_for(concurrency)
        timing = asyncio.run(rabbitmq.raw_consume(url, raw, jobs, prefetch))
        label = f"raw aio-pika (prefetch {prefetch}, ack each)"
        raw_consume = table.add("rabbitmq", "consume", label, timing)
        timing = asyncio.run(bridge_consume(url, ours, jobs, concurrency, prefix=prefix))
        label = f"bridge consume (concurrency {concurrency}, prefetch {prefetch})"
        table.add("rabbitmq", "consume", label, timing, baseline=raw_consume, min_ratio=0.70)
    finally:
        asyncio.run(rabbitmq.delete_queues(url, [one_by_one, raw, ours]))
        asyncio.run(rabbitmq.delete_prefix(url, prefix))


def run_kafka(url: str, jobs: int, concurrency: int, table: Table) -> None:
    """Three publishes, each onto a fresh topic, then the raw and bridge consumes of two of them."""
    prefix = fresh_prefix()
    unbounded, raw, ours = fresh("kafka-raw-flush"), fresh("kafka-raw"), fresh("kafka-bridge")
    try:
        asyncio.run(kafka.create_topics(url, [unbounded, raw], prefix=prefix))  # bridge_publish: `ours`
        bodies = envelope_bodies(url, raw, jobs)

        timing = kafka.raw_publish(url, unbounded, bodies)
        table.add(
            "kafka", "publish", "raw confluent-kafka, no window, flush at the end (not the baseline)", timing
        )
        timing = kafka.raw_publish_windowed(url, raw, bodies, IN_FLIGHT)
        label = f"raw confluent-kafka, {IN_FLIGHT} in flight, each delivery awaited"
        raw_publish = table.add("kafka", "publish", label, timing)
        timing = asyncio.run(bridge_publish(url, ours, jobs, prefix=prefix))
        label = f"bridge enqueue_async, {IN_FLIGHT} in flight"
        table.add("kafka", "publish", label, timing, baseline=raw_publish)

        timing = kafka.raw_consume(url, raw, jobs)
        raw_consume = table.add("kafka", "consume", f"raw confluent-kafka batch loop ({kafka.BATCH})", timing)
        timing = asyncio.run(bridge_consume(url, ours, jobs, concurrency, prefix=prefix))
        label = f"bridge consume (concurrency {concurrency})"
        table.add("kafka", "consume", label, timing, baseline=raw_consume, min_ratio=0.50)
    finally:
        kafka.delete_topics(url, [unbounded, raw, ours, prefix])  # the prefix: its delay tiers


def render(rows: Sequence[Row]) -> list[str]:
    """The table: one line per row, consumes first, each broker's raw baseline above bridge's."""
    ordered = sorted(rows, key=lambda r: r.kind != "consume")  # stable: keeps the run's order
    width = max(len(r.label) for r in ordered)
    lines = []
    for row in ordered:
        line = f"{row.broker:<8} {row.kind:<8} {row.label:<{width}}  {row.rate:>8,.0f} jobs/s"
        if len(row.rates) > 1:
            line += f" (median; {min(row.rates):,.0f} to {max(row.rates):,.0f})"
        if row.ratio is not None:
            line += f"   ratio {row.ratio:.2f}"
        if row.verdict():
            line += f"  {row.verdict()}"
        lines.append(line)
    return lines


def broker_urls(wanted: Sequence[str]) -> dict[str, str]:
    """The URLs of the local brokers in `wanted`; exits saying what to do when one is down."""
    found = {s.name: s.url for s in dev.status(wanted) if s.running}
    missing = [name for name in wanted if name not in found]
    if missing:
        sys.exit(f"bench: {', '.join(missing)} not running; `bridge dev up` (or `make brokers`) starts it")
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description="Throughput of bridge against the raw aio-pika and confluent-kafka clients, per broker.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n", type=_positive, default=DEFAULT_JOBS, help="jobs per measurement")
    parser.add_argument("--broker", choices=[*BROKERS, "all"], default="all", help="which brokers to measure")
    parser.add_argument(
        "--concurrency", type=_positive, default=DEFAULT_CONCURRENCY, help="bridge consume's concurrency"
    )
    parser.add_argument(
        "--repeat", type=_positive, default=1, help="rounds of every measurement; the table shows medians"
    )
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = list(BROKERS) if args.broker == "all" else [args.broker]
    urls = broker_urls(wanted)
    rounds = f", median of {args.repeat} rounds" if args.repeat > 1 else ""
    print(
        f"bench: {args.n:,} no-op jobs per measurement{rounds}, bridge concurrency {args.concurrency}; "
        f"bridge {version('bridge-jobs')}, aio-pika {version('aio-pika')}, "
        f"confluent-kafka {version('confluent-kafka')}, Python {platform.python_version()}",
        flush=True,
    )

    def progress(row: Row, timing: Timing) -> None:
        print(f"  ... {row.broker} {row.kind} {row.label}: {timing.rate:,.0f} jobs/s", file=sys.stderr)

    runners = {"rabbitmq": run_rabbitmq, "kafka": run_kafka}
    table = Table(progress)
    try:
        for _ in range(args.repeat):
            for name in wanted:
                runners[name](urls[name], args.n, args.concurrency, table)
    except (BenchError, BridgeError) as exc:  # a broker went away mid-run, or jobs were lost
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(TIMED_OUT, file=sys.stderr)
        return 1
    print("\n".join(render(list(table.rows.values()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
