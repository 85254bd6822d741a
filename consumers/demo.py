"""`make demo`: the billing job end to end on the real local Kafka and RabbitMQ.

For each broker: apply the topology, enqueue 1,000 billing.ChargeCard jobs (each publish
acknowledged by the broker) with an idempotency key per invoice, enqueue the first 100 again (a
caller retrying), run `bridge consume --burst` until the queue is drained, and print how many
jobs ran, how many were duplicates (their key done, in the default SQLite store) and how fast.
Exits 1, saying what differed, unless on each broker 1,000 jobs ran, 100 were duplicates and
none was dead-lettered: `make demo` is CI's check of the quickstart.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid

from bridge import dev
from consumers.billing import app as billing

JOBS = 1000
RESENT = 100
APP = "consumers.billing:app"
# `bridge consume`'s last line (bridge.worker.Stats.summary). The consumer runs in a process of
# its own, as a user runs it, so its counters reach the demo only as this text.
SUMMARY = re.compile(
    r"(?P<settled>\d+) settled \((?P<retried>\d+) retried, (?P<delayed>\d+) delayed, "
    r"(?P<dead_lettered>\d+) dead-lettered, (?P<duplicates>\d+) duplicates\)"
)


async def enqueue_all(broker: str) -> float:
    """Enqueue JOBS charges, then RESENT of them again, 200 publishes in flight; return jobs/s."""
    billing.configure(broker=broker)
    await billing.transport()  # connect first: the rate is of publishing, not of connecting
    window = asyncio.Semaphore(200)
    run = uuid.uuid4().hex[:8]  # keys of this run only: a second demo charges again

    async def charge(n: int) -> str:
        payload = {
            "invoice_id": f"inv-{n}", "customer_id": f"cus-{n % 37}", "amount_cents": 500 + n,
            "currency": "EUR", "card_token": f"tok_{uuid.uuid4().hex[:8]}", "description": None,
        }  # fmt: skip
        async with window:
            key = f"{run}:inv-{n}"
            return await billing.enqueue_async("billing.ChargeCard", payload, idempotency_key=key)

    started = time.perf_counter()
    await asyncio.gather(*(charge(n) for n in [*range(JOBS), *range(RESENT)]))
    rate = (JOBS + RESENT) / (time.perf_counter() - started)
    await billing.aclose()
    return rate


def bridge(*args: str, broker: str) -> str:
    """Run the `bridge` command as a user would; return its output."""
    env = {**os.environ, "BRIDGE_BROKER": broker}
    done = subprocess.run(
        [sys.executable, "-m", "bridge", *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"demo: `bridge {' '.join(args)}` failed:\n{done.stderr}")
    return done.stdout


def differences(summary: str) -> list[str]:
    """What in `bridge consume`'s summary differs from the quickstart's promise ([]: nothing).

    A settled delivery ran to success, or was retried, delayed, dead-lettered or a duplicate:
    the jobs that ran are the settled ones less the others.
    """
    found = SUMMARY.search(summary)
    if found is None:
        return [f"no counts in `bridge consume`'s output {summary.strip()!r}"]
    n = {name: int(value) for name, value in found.groupdict().items()}
    ran = n["settled"] - n["retried"] - n["delayed"] - n["dead_lettered"] - n["duplicates"]
    promised = {"jobs ran": (ran, JOBS), "duplicates": (n["duplicates"], RESENT)}
    promised["dead-lettered"] = (n["dead_lettered"], 0)
    return [f"{what} {got} (expected {wanted})" for what, (got, wanted) in promised.items() if got != wanted]


def main() -> None:
    urls = {s.name: s.url for s in dev.status(dev.BROKERS) if s.running}
    if len(urls) < len(dev.BROKERS):
        sys.exit("demo: the local brokers are not running; `make demo` starts them with `bridge dev up`")
    failures: list[str] = []
    for name in ("kafka", "rabbitmq"):
        broker = urls[name]
        bridge("topology", "apply", "--app", APP, broker=broker)
        publish_rate = asyncio.run(enqueue_all(broker))
        summary = bridge("consume", "--app", APP, "--burst", "--concurrency", "64", broker=broker)
        enqueued = f"enqueued {JOBS} jobs and {RESENT} again at {publish_rate:,.0f}/s (confirmed)"
        print(f"{name:9} {enqueued}; {summary.strip()}", flush=True)
        if wrong := differences(summary):
            failures.append(f"{name}: {', '.join(wrong)}")
    if failures:
        sys.exit(f"demo: not as the quickstart promises: {'; '.join(failures)}")


if __name__ == "__main__":
    main()
