"""`python -m bench.delays`: what bridge's delays and retries cost, per broker.

Three measurements on each broker, each under a prefix (and so delay tiers) of its own:

delayed backlog memory
    A delayed job must wait in the broker, not in the worker: Celery keeps every ETA job in
    worker memory (about 7.8 KB each, measured on this machine) and Dramatiq keeps delayed
    messages in its worker too (about 1.35 KB each). A `bridge consume` process is started on
    an empty prefix and its RSS read once it has settled (idle); then --backlog jobs delayed by
    one hour are enqueued (1000 publishes in flight) and its RSS is read again after 5 s. A
    second process, started after the backlog is in place, is read after 5 s too: on Kafka its
    forwarder meets the whole backlog at once when it joins. The growth over idle should stay
    under 20 MB whatever the backlog. Nothing ever consumes this prefix in burst mode (that
    would wait an hour); its queues and topics are deleted at the end.
delay precision
    --precision-n jobs with delays drawn uniformly from 0 to --max-delay seconds, default
    tiers, consumed by `consume()` in this process at bridge's default concurrency (a job less
    than one tier early waits in the worker, holding a slot). Each job records when its
    handler started; lateness = start - run_at, run_at being the wall clock at its enqueue
    plus its delay (the payload carries the job's index). Target: p99 at most 1 s, shown also
    for delays shorter than the shortest tier and the rest. A job that starts more than 10 ms
    before run_at (clock noise) ran EARLY, which is a bug. One job without delay and one with a
    1 s delay run first, so that Kafka's group joins are not counted as lateness.
retry throughput
    --n jobs whose handler raises on attempt 1 with `backoff=fixed(0)`, so the retry goes
    straight back to the queue: jobs per second from the first handler start to the last
    success, next to --n jobs that succeed at once on the same broker in the same run. The
    queue holds all jobs before consuming starts; the consumer runs until the last success, as
    the daemon does (not in burst mode, whose drain checks are not what a retry costs), at
    --concurrency. The ratio of the two rates is what a failure costs.

Numbers on a small machine, where the brokers share the cores, are noisy: compare rows of one
run. The RabbitMQ queues, exchanges and Kafka topics (and groups) of every prefix are deleted
at the end, even when a measurement fails.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

from bench.common import JOB_TYPE, SCHEMAS, Clock, timeout_for
from bridge import Bridge, BridgeError, JobContext, dev
from bridge.names import tier_queue
from bridge.policy import DEFAULT_TIERS_S, fixed
from bridge.transports.base import dlq_name

BROKERS = ("rabbitmq", "kafka")
TIERS = "1s,5s,30s,2m,10m,1h,6h"
IN_FLIGHT = 1000
BACKLOG_DELAY_S = 3600.0
TARGET_GROWTH_MB = 20.0
TARGET_P99_MS = 1000.0
EARLY_TOLERANCE_MS = 10.0
CELERY_KB_PER_JOB = 7.8
DRAMATIQ_KB_PER_JOB = 1.35
SETTLE_MIN_S = 3.0  # idle RSS: at least this long after the consumer said it is consuming ...
SETTLE_WINDOW_S = 2.0  # ... and unchanged (within SETTLE_SPREAD_KB) over the last this long
SETTLE_SPREAD_KB = 256
SETTLE_MAX_S = 20.0
BACKLOG_RUN_S = 5.0
SAMPLE_S = 0.5
READY_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0
CLEANUP_TIMEOUT_S = 120.0
ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A measurement could not complete: its number would be wrong."""


# -- the app that the consumer process of the memory measurement runs -------------------------


async def never_due(payload: dict[str, Any], ctx: JobContext) -> None:
    """The backlog's handler: its jobs are due in an hour, long after the measurement."""


# `python -m bridge consume --app bench.delays:app --broker ... --prefix ... --queues ...`
app = Bridge(registry=str(SCHEMAS))
app.job(JOB_TYPE, queue="bench-delays")(never_due)


# -- names, apps, publishing -----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A prefix of its own: its delay tiers, one job queue, one consumer group."""

    url: str
    prefix: str

    @classmethod
    def fresh(cls, url: str) -> Run:
        return cls(url, f"bench{uuid.uuid4().hex[:8]}")

    @property
    def queue(self) -> str:
        return f"{self.prefix}-q"

    @property
    def group(self) -> str:
        return f"{self.prefix}-g"

    @property
    def tiers(self) -> list[str]:
        return [tier_queue(self.prefix, tier_s) for tier_s in DEFAULT_TIERS_S]

    def app(self, concurrency: int = 16) -> Bridge:
        """A Bridge on this prefix with the default tiers; register its handler before use."""
        return Bridge(
            broker=self.url, registry=str(SCHEMAS), prefix=self.prefix, group=self.group,
            concurrency=concurrency, delay_tiers=TIERS, partitions=3,
        )  # fmt: skip


async def apply_topology(run: Run) -> None:
    """Create the run's queue, its dead-letter queue and its delay tiers."""
    async with run.app() as bridge:
        await bridge.apply_topology([run.queue])


async def publish_all(jobs: Iterable[Callable[[], Awaitable[object]]], in_flight: int = IN_FLIGHT) -> float:
    """Run every publish, at most `in_flight` at once; seconds taken. Raises the first failure."""
    slots = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task[object]] = set()
    failures: list[BaseException] = []

    def done(task: asyncio.Task[object]) -> None:
        tasks.discard(task)
        slots.release()
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]

    started = time.monotonic()
    for job in jobs:
        await slots.acquire()
        if failures:
            break
        task: asyncio.Task[object] = asyncio.ensure_future(job())
        tasks.add(task)
        task.add_done_callback(done)
    if tasks:
        await asyncio.wait(set(tasks))
    if failures:
        raise BenchError(f"a publish failed: {failures[0]!r}")
    return time.monotonic() - started


# -- 1. delayed backlog memory ---------------------------------------------------------------


def rss_kb(pid: int, field_name: str = "VmRSS") -> int:
    """A memory figure of process `pid` from /proc/<pid>/status, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise BenchError(f"no {field_name} for process {pid}")


class ConsumerProcess:
    """`python -m bridge consume` of one run's queue, in a process of its own, its log in a file."""

    def __init__(self, run: Run) -> None:
        self.log: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 -- closed by stop()
        command = [
            sys.executable, "-m", "bridge", "consume", "--app", "bench.delays:app",
            "--broker", run.url, "--prefix", run.prefix, "--group", run.group, "--queues", run.queue,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.ready_at = 0.0

    def __enter__(self) -> ConsumerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self) -> None:
        """Return once the process logged that it is consuming; raise if it died or never did."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "consuming " not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"bridge consume did not start:\n{self.output()[-2000:]}")
            time.sleep(0.1)
        self.ready_at = time.monotonic()

    def rss_kb(self) -> int:
        if self.process.poll() is not None:
            raise BenchError(f"bridge consume exited ({self.process.returncode}):\n{self.output()[-2000:]}")
        return rss_kb(self.process.pid)

    def settled_rss_kb(self) -> int:
        """RSS once it stopped moving: SETTLE_MIN_S after ready and flat for SETTLE_WINDOW_S."""
        samples: list[tuple[float, int]] = []
        while True:
            now = time.monotonic()
            samples.append((now, self.rss_kb()))
            window = [kb for at, kb in samples if at >= now - SETTLE_WINDOW_S]
            flat = max(window) - min(window) <= SETTLE_SPREAD_KB and samples[0][0] <= now - SETTLE_WINDOW_S
            if (now - self.ready_at >= SETTLE_MIN_S and flat) or now - self.ready_at >= SETTLE_MAX_S:
                return samples[-1][1]
            time.sleep(SAMPLE_S)

    def rss_after_kb(self, seconds: float, since: float) -> tuple[int, int]:
        """(RSS, highest RSS seen) at `seconds` after the monotonic time `since`."""
        highest = 0
        while True:
            current = self.rss_kb()
            highest = max(highest, current)
            if time.monotonic() >= since + seconds:
                return current, highest
            time.sleep(SAMPLE_S)

    def stop(self) -> None:
        """SIGTERM, then wait; SIGKILL only if it does not exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@dataclass
class Memory:
    """RSS of `bridge consume` idle and with a backlog of delayed jobs waiting in the tiers."""

    jobs: int
    enqueue_s: float = 0.0
    idle_kb: int = 0
    running_kb: int = 0  # the process that was idle, BACKLOG_RUN_S after the backlog was in
    running_peak_kb: int = 0
    fresh_kb: int = 0  # a second process started on the backlog, BACKLOG_RUN_S after it was ready
    fresh_peak_kb: int = 0

    @property
    def growth_kb(self) -> int:
        """The worse of the two backlog readings, over idle."""
        return max(self.running_kb, self.fresh_kb) - self.idle_kb


def measure_memory(run: Run, jobs: int) -> Memory:
    """Idle RSS on the empty prefix, then RSS with `jobs` one-hour jobs in its tiers."""
    memory = Memory(jobs)
    asyncio.run(apply_topology(run))
    with ConsumerProcess(run) as consumer:
        consumer.wait_ready()
        memory.idle_kb = consumer.settled_rss_kb()
        memory.enqueue_s = asyncio.run(enqueue_backlog(run, jobs))
        memory.running_kb, memory.running_peak_kb = consumer.rss_after_kb(BACKLOG_RUN_S, time.monotonic())
    with ConsumerProcess(run) as consumer:
        consumer.wait_ready()
        memory.fresh_kb, memory.fresh_peak_kb = consumer.rss_after_kb(BACKLOG_RUN_S, consumer.ready_at)
    return memory


async def enqueue_backlog(run: Run, jobs: int) -> float:
    """Enqueue `jobs` jobs delayed by BACKLOG_DELAY_S; seconds taken."""
    async with run.app() as bridge:
        await bridge.transport()  # connected before the clock starts

        def publish(n: int) -> Callable[[], Awaitable[object]]:
            return lambda: bridge.enqueue_async(JOB_TYPE, {"n": n}, queue=run.queue, delay=BACKLOG_DELAY_S)

        return await publish_all(publish(n) for n in range(jobs))


# -- 2. delay precision ----------------------------------------------------------------------


@dataclass(frozen=True)
class Late:
    """One delayed job: its delay and how late (negative: early) its handler started, in ms."""

    delay_ms: int
    late_ms: float


@dataclass
class Precision:
    """The lateness of each delayed job's first start."""

    jobs: int
    max_delay_s: float
    concurrency: int
    samples: list[Late] = field(default_factory=list)
    duplicates: int = 0
    hops: int = 0  # deliveries that arrived early and went back to a tier

    @property
    def early(self) -> list[Late]:
        return sorted((s for s in self.samples if s.late_ms < -EARLY_TOLERANCE_MS), key=lambda s: s.late_ms)

    @property
    def worst(self) -> list[Late]:
        return sorted(self.samples, key=lambda s: -s.late_ms)[:5]

    @property
    def missing(self) -> int:
        return self.jobs - len(self.samples)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def measure_precision(run: Run, jobs: int, max_delay_s: float, concurrency: int) -> Precision:
    """Enqueue `jobs` jobs delayed 0 to `max_delay_s` while consuming; record each start's lateness.

    Job `n` (its payload) is due at `run_at[n]`: the wall clock just before its enqueue_async
    call, plus its delay. Bridge reads its own clock a moment later, so a job that starts on
    time is never counted early; created_at is no reference, being read after bridge's run_at
    (another thread holding the GIL in between makes that gap several ms).
    """
    result = Precision(jobs, max_delay_s, concurrency)
    rng = random.Random(1)
    delays_ms = [round(rng.uniform(0, max_delay_s * 1000)) for _ in range(jobs)]
    run_at = [0.0] * jobs
    warm_ups: set[str] = set()
    lateness: dict[str, Late] = {}  # job id -> its first run
    warmed, finished = asyncio.Event(), asyncio.Event()
    bridge = run.app(concurrency)

    @bridge.job(JOB_TYPE, queue=run.queue)
    async def record(payload: dict[str, Any], ctx: JobContext) -> None:
        started = time.time()
        if not warmed.is_set():  # nothing measured is enqueued before the warm-up ran
            warm_ups.add(ctx.job_id)
            if len(warm_ups) >= 2:
                warmed.set()
            return
        if ctx.job_id in lateness or ctx.job_id in warm_ups:
            result.duplicates += 1
            return
        n = payload["n"]
        lateness[ctx.job_id] = Late(delays_ms[n], (started - run_at[n]) * 1000)
        if len(lateness) >= jobs:
            finished.set()

    def enqueue(n: int) -> Callable[[], Awaitable[object]]:
        async def publish() -> object:
            run_at[n] = time.time() + delays_ms[n] / 1000
            return await bridge.enqueue_async(JOB_TYPE, {"n": n}, delay=delays_ms[n] / 1000)

        return publish

    stop = asyncio.Event()
    async with bridge:
        await bridge.apply_topology()
        consuming = asyncio.create_task(bridge.consume(stop=stop))
        try:
            await bridge.enqueue_async(JOB_TYPE, {"n": 0})
            await bridge.enqueue_async(JOB_TYPE, {"n": 0}, delay=1.0)
            await _until(warmed, 60.0, consuming, "the warm-up jobs did not run")
            await publish_all(enqueue(n) for n in range(jobs))
            # No raise on time-out: the lateness of the jobs that ran is still shown; those that
            # never ran (`Precision.missing`) fail the run in `run_broker` and the verdict.
            await _until(finished, max_delay_s + 60.0, consuming, "")
        finally:
            stop.set()
            stats = await consuming
    result.samples = list(lateness.values())
    result.hops = stats.delayed
    return result


async def _until(event: asyncio.Event, timeout_s: float, consuming: asyncio.Task[Any], what: str) -> None:
    """Wait up to `timeout_s` for `event`; raise if the consumer died first, or (with `what`) on timeout."""
    waiter = asyncio.create_task(event.wait())
    await asyncio.wait({waiter, consuming}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if event.is_set():
        return
    if consuming.done():
        consuming.result()  # raises what stopped it
        raise BenchError("consume() returned before the jobs ran")
    if what:
        raise BenchError(what)


# -- 3. retry throughput ---------------------------------------------------------------------


class FirstAttemptFails(Exception):
    """Raised by the retry measurement's handler on a job's first attempt."""


@dataclass(frozen=True)
class Throughput:
    jobs: int
    seconds: float
    retried: int

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0


async def fill(run: Run, jobs: int) -> None:
    """The run's topology, and `jobs` jobs in its queue."""
    async with run.app() as bridge:
        await bridge.apply_topology([run.queue])

        def publish(n: int) -> Callable[[], Awaitable[object]]:
            return lambda: bridge.enqueue_async(JOB_TYPE, {"n": n}, queue=run.queue)

        await publish_all(publish(n) for n in range(jobs))


async def drain(run: Run, jobs: int, concurrency: int, *, fail_first: bool) -> Throughput:
    """Consume the filled queue until the last job succeeded: first handler start to last success.

    The consumer runs as the daemon does, until stopped, not in burst mode: a burst run also
    checks, whenever the queue looks idle for a moment, whether every queue and tier is drained,
    and that check is not what a retry costs.
    """
    clock, stop = Clock(), asyncio.Event()
    bridge = run.app(concurrency)

    @bridge.job(JOB_TYPE, queue=run.queue, max_attempts=3, backoff=fixed(0))
    async def handle(payload: dict[str, Any], ctx: JobContext) -> None:
        clock.started()
        if fail_first and ctx.attempt == 1:
            raise FirstAttemptFails(f"job {payload['n']}")
        clock.settled()
        if clock.count >= jobs:
            stop.set()

    async with bridge:
        consuming = asyncio.create_task(bridge.consume(stop=stop))
        try:
            await _until(stop, timeout_for(2 * jobs), consuming, "")
        finally:
            stop.set()
            stats = await consuming
    if clock.count != jobs or stats.dead_lettered or stats.retried != (jobs if fail_first else 0):
        raise BenchError(
            f"retry drain of {run.queue}: {clock.count} of {jobs} succeeded, {stats.retried} retried, "
            f"{stats.dead_lettered} dead-lettered"
        )
    return Throughput(jobs, clock.last_s - clock.first_s, stats.retried)


def measure_retries(ok: Run, flaky: Run, jobs: int, concurrency: int) -> tuple[Throughput, Throughput]:
    """The no-failure rate, then the fail-once rate, each on a queue filled beforehand."""
    asyncio.run(fill(ok, jobs))
    plain = asyncio.run(drain(ok, jobs, concurrency, fail_first=False))
    asyncio.run(fill(flaky, jobs))
    retried = asyncio.run(drain(flaky, jobs, concurrency, fail_first=True))
    return plain, retried


# -- clean-up --------------------------------------------------------------------------------


async def delete_rabbitmq(run: Run) -> tuple[int, int]:
    """Delete the run's queues and exchanges; (queues deleted, messages they still held)."""
    import aio_pika
    import aiormq

    queues, held = 0, 0
    async with await aio_pika.connect(run.url, timeout=CONNECT_TIMEOUT_S) as connection:
        for name in [run.queue, dlq_name(run.queue), *run.tiers]:
            channel = await connection.channel()  # a failed passive declare closes its channel
            try:
                declared = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue
            held += declared.declaration_result.message_count or 0
            await channel.queue_delete(name, if_unused=False, if_empty=False)  # quorum refuses if_*
            queues += 1
            await channel.close()
        for name in [f"{run.prefix}.jobs", *run.tiers]:
            channel = await connection.channel()
            try:
                await channel.declare_exchange(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue
            await channel.exchange_delete(name)
            await channel.close()
    return queues, held


def delete_kafka(run: Run) -> tuple[int, int]:
    """Delete the run's topics and consumer groups; (topics deleted, records they held)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger("bench.delays.kafka")  # librdkafka's notices would go to stderr
    quiet.setLevel(logging.ERROR)
    common: dict[str, Any] = {"bootstrap.servers": run.url.partition("://")[2].rstrip("/"), "logger": quiet}
    admin = AdminClient(common)
    existing = admin.list_topics(timeout=10).topics
    # Every topic of the prefix (queue, .dlq, .dlq.done, tiers): the prefix is this run's alone.
    topics = sorted(t for t in existing if t.startswith((f"{run.prefix}.", f"{run.prefix}-")))
    peek = Consumer({**common, "group.id": f"{run.prefix}-peek"})
    held = 0
    for topic in (t for t in run.tiers if t in existing):
        for partition in existing[topic].partitions:
            low, high = peek.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            held += high - low
    peek.close()
    for future in admin.delete_topics(topics, operation_timeout=30).values() if topics else ():
        future.result()
    groups = admin.delete_consumer_groups([run.group, f"{run.prefix}.delay"], request_timeout=10)
    for future in groups.values():
        with suppress(KafkaException):  # never joined, or already gone
            future.result()
    return len(topics), held


def delete(run: Run, broker: str) -> str:
    """Delete what `run` made; one line saying what went."""
    try:
        if broker == "rabbitmq":
            queues, held = asyncio.run(asyncio.wait_for(delete_rabbitmq(run), CLEANUP_TIMEOUT_S))
            return f"deleted {queues} queues of {run.prefix} ({held:,} messages in them)"
        topics, held = delete_kafka(run)
        return f"deleted {topics} topics of {run.prefix} ({held:,} records in its tiers)"
    except Exception as exc:  # clean-up must not hide the measurement's own error
        return f"could NOT delete {run.prefix}: {exc!r}"


# -- the run and its table -------------------------------------------------------------------


@dataclass
class Results:
    broker: str
    memory: Memory | None = None
    precision: Precision | None = None
    retries: tuple[Throughput, Throughput] | None = None
    errors: list[str] = field(default_factory=list)
    cleanup: list[str] = field(default_factory=list)


def run_broker(broker: str, url: str, args: argparse.Namespace) -> Results:
    """The three measurements on one broker; each one's failure is reported, not fatal."""
    results = Results(broker)
    runs = {name: Run.fresh(url) for name in ("backlog", "precision", "ok", "flaky")}

    def attempt(what: str, measure: Callable[[], None]) -> None:
        progress(f"{broker}: {what} ...")
        try:
            measure()
        except (BenchError, BridgeError, OSError, TimeoutError) as exc:
            results.errors.append(f"{what}: {exc!r}")

    try:
        if args.backlog:

            def memory() -> None:
                results.memory = measure_memory(runs["backlog"], args.backlog)

            attempt("delayed backlog memory", memory)
        if args.precision_n:

            def precision() -> None:
                measured = asyncio.run(
                    measure_precision(
                        runs["precision"], args.precision_n, args.max_delay, args.precision_concurrency
                    )
                )
                results.precision = measured
                if measured.missing:  # a job that never ran is a failure, not a sample left out
                    results.errors.append(
                        f"delay precision: {measured.missing} of {measured.jobs} jobs never ran"
                    )

            attempt("delay precision", precision)
        if args.n:

            def retries() -> None:
                results.retries = measure_retries(runs["ok"], runs["flaky"], args.n, args.concurrency)

            attempt("retry throughput", retries)
    finally:
        results.cleanup = [delete(run, broker) for run in runs.values()]
    return results


def render(results: Results) -> list[str]:
    lines = [f"== {results.broker}"]
    if results.memory:
        lines += render_memory(results.memory)
    if results.precision:
        lines += render_precision(results.precision)
    if results.retries:
        lines += render_retries(*results.retries)
    lines += [f"  FAILED {error}" for error in results.errors]
    lines += [f"  clean-up: {line}" for line in results.cleanup]
    return lines


def _mb(kb: int) -> str:
    return f"{kb / 1024:7.1f} MB"


def _signed_mb(kb: int) -> str:
    return f"{kb / 1024:+.1f} MB"


def render_memory(m: Memory) -> list[str]:
    growth_mb = m.growth_kb / 1024
    per_job = m.growth_kb * 1024 / m.jobs  # bytes
    verdict = "met" if growth_mb < TARGET_GROWTH_MB else "MISSED"
    celery_mb, dramatiq_mb = CELERY_KB_PER_JOB * m.jobs / 1024, DRAMATIQ_KB_PER_JOB * m.jobs / 1024
    return [
        f"  delayed backlog memory: {m.jobs:,} jobs delayed 1 h (enqueued in {m.enqueue_s:.1f} s, "
        f"{m.jobs / m.enqueue_s:,.0f}/s), RSS of `bridge consume`",
        f"    idle on the empty prefix (settled)            {_mb(m.idle_kb)}",
        f"    same process, {BACKLOG_RUN_S:g} s after the backlog was in    {_mb(m.running_kb)}  "
        f"({_signed_mb(m.running_kb - m.idle_kb)}; peak {_mb(m.running_peak_kb).strip()})",
        f"    new process started on the backlog, at {BACKLOG_RUN_S:g} s   {_mb(m.fresh_kb)}  "
        f"({_signed_mb(m.fresh_kb - m.idle_kb)}; peak {_mb(m.fresh_peak_kb).strip()})",
        f"    backlog RSS - idle RSS (worse of the two)     {growth_mb:+7.1f} MB  = {per_job:,.1f} bytes/job"
        f"   (target < {TARGET_GROWTH_MB:g} MB: {verdict})",
        f"    reference, same backlog: Celery ~{CELERY_KB_PER_JOB} KB/job = {celery_mb:,.0f} MB; "
        f"Dramatiq ~{DRAMATIQ_KB_PER_JOB} KB/job = {dramatiq_mb:,.0f} MB",
    ]


def render_precision(p: Precision) -> list[str]:
    lines = [
        f"  delay precision: {p.jobs:,} jobs delayed uniformly 0-{p.max_delay_s:g} s, tiers {TIERS}, "
        f"concurrency {p.concurrency}; lateness = handler start - (enqueue time + delay)"
    ]
    shortest_ms = min(DEFAULT_TIERS_S) * 1000
    groups = [
        ("all jobs", p.samples),
        (f"delay < {shortest_ms:g} ms (shortest tier)", [s for s in p.samples if s.delay_ms < shortest_ms]),
        (f"delay >= {shortest_ms:g} ms", [s for s in p.samples if s.delay_ms >= shortest_ms]),
    ]
    for label, samples in groups:
        if samples:
            lines.append(f"    {label:<32} {len(samples):>5} jobs  {_spread([s.late_ms for s in samples])}")
    if p.missing:
        verdict = f"MISSED ({p.missing} of {p.jobs} jobs never ran)"
    else:
        p99 = percentile([s.late_ms for s in p.samples], 99)
        verdict = "met" if p99 <= TARGET_P99_MS else "MISSED"
    lines.append(f"    target p99 <= {TARGET_P99_MS:,.0f} ms: {verdict}")
    if p.samples:
        worst = ", ".join(f"{s.delay_ms / 1000:.2f} s -> {s.late_ms:,.0f}" for s in p.worst)
        lines.append(f"    latest (delay -> ms late): {worst}")
    early = p.early
    shown = ", ".join(f"{s.delay_ms / 1000:.2f} s -> {s.late_ms:,.0f}" for s in early[:10])
    lines.append(
        f"    ran EARLY (> {EARLY_TOLERANCE_MS:g} ms before run_at): {len(early)}"
        + (f"  <- BUG; delay -> ms: {shown}" if early else "")
    )
    lines.append(f"    tier hops (arrived early, sent back to a tier): {p.hops:,}; ran twice: {p.duplicates}")
    if p.missing:
        lines.append(f"    MISSING: {p.missing} jobs had not run {p.max_delay_s + 60:g} s after enqueueing")
    return lines


def _spread(late_ms: Sequence[float]) -> str:
    return (
        f"p50 {percentile(late_ms, 50):>6,.0f} ms  p99 {percentile(late_ms, 99):>6,.0f} ms  "
        f"max {max(late_ms):>6,.0f} ms  min {min(late_ms):>+7.1f} ms"
    )


def render_retries(plain: Throughput, retried: Throughput) -> list[str]:
    return [
        f"  retry throughput: {plain.jobs:,} jobs, first handler start to last success",
        f"    no failures                            {plain.rate:>8,.0f} jobs/s  ({plain.seconds:.2f} s)",
        f"    fail once, retried at once (fixed(0))  {retried.rate:>8,.0f} jobs/s  ({retried.seconds:.2f} s, "
        f"{retried.retried:,} retries; {retried.rate / plain.rate:.2f}x the no-failure rate)",
    ]


def progress(text: str) -> None:
    print(f"  ... {text}", file=sys.stderr, flush=True)


def broker_urls(wanted: Sequence[str]) -> dict[str, str]:
    """The URLs of the local brokers in `wanted`; exits saying what to do when one is down."""
    found = {s.name: s.url for s in dev.status(wanted) if s.running}
    missing = [name for name in wanted if name not in found]
    if missing:
        sys.exit(f"bench: {', '.join(missing)} not running; `bridge dev up` starts it")
    return found


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.delays",
        description="Delayed-backlog memory, delay precision and retry throughput of bridge, per broker.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--broker", choices=[*BROKERS, "all"], default="all")
    parser.add_argument("--backlog", type=_count, default=100_000, help="jobs delayed 1 h (0: skip)")
    parser.add_argument("--precision-n", type=_count, default=1000, help="delayed jobs timed (0: skip)")
    parser.add_argument(
        "--max-delay", type=float, default=30.0, help="longest delay of the precision jobs, s"
    )
    parser.add_argument(
        "--precision-concurrency", type=int, default=16, help="concurrency of the precision consumer"
    )
    parser.add_argument("--n", type=_count, default=10_000, help="jobs per retry-throughput run (0: skip)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrency of the retry consumers")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = list(BROKERS) if args.broker == "all" else [args.broker]
    urls = broker_urls(wanted)
    print(
        f"bench.delays: backlog {args.backlog:,}, "
        f"precision {args.precision_n:,} jobs over 0-{args.max_delay:g} s, "
        f"retries {args.n:,} jobs; bridge {version('bridge-jobs')}, aio-pika {version('aio-pika')}, "
        f"confluent-kafka {version('confluent-kafka')}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    failed = False
    for broker in wanted:
        results = run_broker(broker, urls[broker], args)
        failed = failed or bool(results.errors)
        print("\n".join(render(results)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
