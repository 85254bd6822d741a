"""RabbitMQ-specific behaviour: the consumer survives a dropped connection."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

from bridge import Bridge, JobContext
from tests.conftest import SCHEMAS, run
from tests.processes import publish


def test_consumer_reconnects_after_the_broker_drops_its_connections(
    brokers: dict[str, str], queue: str
) -> None:
    # Given 300 jobs, When RabbitMQ closes every client connection part-way through,
    # Then the consumer reconnects, and every job still runs (some perhaps twice: at least once).
    ids = run(publish(brokers["rabbitmq"], queue, 300))
    app = Bridge(broker=brokers["rabbitmq"], registry=str(SCHEMAS), concurrency=8)
    done: set[str] = set()
    dropped = asyncio.Event()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        if len(done) >= 100 and not dropped.is_set():
            dropped.set()
            command = ["rabbitmqctl", "-q", "close_all_connections", "test: dropped connection"]
            await asyncio.to_thread(subprocess.run, command, check=True, capture_output=True)
        await asyncio.sleep(0.002)
        done.add(ctx.job_id)

    async def scenario() -> None:
        async with app:
            await app.consume(burst=True)

    run(scenario(), timeout=120)
    assert dropped.is_set()
    assert set(ids) <= done
