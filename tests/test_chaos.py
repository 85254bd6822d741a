"""The network between bridge consume and a real broker failing: a proxy of the test's own
stands between them and cuts every connection for a while (a partition, or a restart seen from
the client's side)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bridge import Bridge, JobContext
from bridge.errors import TransportError
from bridge.transports.kafka import transport as kafka_transport
from tests.conftest import SCHEMAS, run
from tests.processes import publish
from tests.proxy import kafka_behind_proxy


# The producer of a wedged transaction cannot be destroyed while its call is stuck: it lives on,
# connecting to the proxy until the process ends, and the proxy's loop closes with one of its
# connections still being accepted (a ResourceWarning about the proxy's socket, not bridge's).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_consumer_cut_off_from_kafka_for_15_s_drains_the_queue_once_kafka_is_reachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a Kafka of its own that clients reach only through a proxy (the address it
    # advertises), and a burst consumer at work on 600 jobs (sessions of 30 s),
    # When the proxy cuts every connection after 100 runs and refuses new ones for 15 s,
    # Then the consumer drains the queue once Kafka is reachable again (every job run and
    # committed), and a second burst consume finds nothing left. (A transaction out at the
    # cut often waited for good in librdkafka's send_offsets_to_transaction for the group
    # coordinator that went away, past its own timeout: nothing more was committed, and the
    # consumer could not even stop.)
    monkeypatch.setattr(kafka_transport, "RESTART_AFTER_S", 0.5)
    with kafka_behind_proxy(tmp_path / "kafka") as proxy:
        queue = f"q-{uuid.uuid4().hex[:8]}"
        ids = run(publish(proxy.url, queue, 600, sleep_ms=5), timeout=90)
        settings: dict[str, Any] = {"group": f"g-{uuid.uuid4().hex[:8]}", "session_timeout_s": 30}
        app = Bridge(broker=proxy.url, registry=str(SCHEMAS), concurrency=8, **settings)
        runs: Counter[str] = Counter()
        cut = asyncio.Event()

        @app.job("test.Echo", queue=queue)
        async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
            if len(runs) >= 100 and not cut.is_set():
                cut.set()
                proxy.cut(15.0)
            await asyncio.sleep(payload["sleep_ms"] / 1000)
            runs[ctx.job_id] += 1

        async def scenario() -> None:
            async with app:
                await asyncio.wait_for(app.consume(burst=True), 150)  # drained: all committed
                again = await asyncio.wait_for(app.consume(burst=True), 60)
                assert again.processed == 0, again.summary()

        with caplog.at_level(logging.INFO, logger="bridge.kafka"):
            run(scenario(), timeout=240)
    assert cut.is_set()
    assert set(runs) == set(ids)


def test_a_topic_looked_up_while_kafka_is_unreachable_fails_to_be_tried_again(tmp_path: Path) -> None:
    # Given a transport connected to a Kafka of its own through a proxy,
    # When the proxy cuts it off and a topic it has not seen yet is looked up (for a tier
    # record's queue made after it started, say), Then the look fails as an error to try again:
    # the round ends, and the next one starts once Kafka is back. (librdkafka calls an
    # unreachable Kafka no retriable error: the forward, or the outcome, that waited on the
    # look stopped `bridge consume` for good.)
    with kafka_behind_proxy(tmp_path / "kafka") as proxy:
        app = Bridge(broker=proxy.url, registry=str(SCHEMAS))

        async def scenario() -> None:
            async with app:
                transport = await app.transport()
                proxy.cut(60.0)
                with pytest.raises(TransportError) as failed:
                    await transport.missing([f"q-{uuid.uuid4().hex[:8]}"])
                assert failed.value.retriable, failed.value

        run(scenario(), timeout=60)
