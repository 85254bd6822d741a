"""`bridge consume` as a real process: SIGKILL mid-run loses nothing; SIGTERM is graceful."""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bridge import Bridge
from tests import names
from tests.brokerio import envelopes_in
from tests.conftest import SCHEMAS, run
from tests.processes import (
    consumer,
    finish,
    ledger_counts,
    output,
    publish,
    stop_while_three_run,
    wait_until,
)


@pytest.fixture(params=["kafka", "rabbitmq"])
def real_broker(request: pytest.FixtureRequest, brokers: dict[str, str]) -> str:
    return brokers[request.param]


@pytest.fixture
def group() -> str:
    return f"g-{uuid.uuid4().hex[:12]}"


def test_sigkill_mid_run_loses_no_job(real_broker: str, queue: str, group: str, tmp_path: Path) -> None:
    # Given 2,000 jobs and a consumer that is killed with SIGKILL part-way through,
    # When a second consumer drains the queue,
    # Then every job id appears in the ledger as done at least once.
    ledger = tmp_path / "ledger"
    ids = run(publish(real_broker, queue, 2000, sleep_ms=2))
    assert_in_topic(real_broker, queue, ids)
    # After 400 jobs its jobs slow down (128 a second), so the kill comes with most jobs left
    # however late this test sees the 400, while jobs still run and settle.
    slow = {"LEDGER_SLOW_AFTER": "400"}
    first = consumer(real_broker, queue, ledger, group, "--concurrency", "32", env=slow)
    try:
        wait_until(lambda: len(ledger_counts(ledger, "done")) >= 400, 60, "400 jobs done")
    finally:
        first.kill()
        finish(first, ledger)
    done_before_restart = ledger_counts(ledger, "done")
    assert len(done_before_restart) < len(ids), "the kill came too late to test anything"

    code, log = finish(consumer(real_broker, queue, ledger, group, "--burst"), ledger)
    assert code == 0, log
    done = ledger_counts(ledger, "done")
    assert set(ids) <= set(done), f"{len(set(ids) - set(done))} jobs lost"
    assert set(done) <= set(ids)


def test_sigterm_lets_in_flight_jobs_finish(real_broker: str, queue: str, group: str, tmp_path: Path) -> None:
    # Given six jobs and a consumer running three at a time,
    # When it gets SIGTERM while the first three run,
    # Then those three finish, no other starts, the process exits 0,
    # and a second consumer runs only the other three.
    ledger, gate = tmp_path / "ledger", tmp_path / "gate"
    ids = run(publish(real_broker, queue, 6, sleep_ms=500))
    process = consumer(
        real_broker, queue, ledger, group, "--concurrency", "3", "--grace", "20",
        env={"LEDGER_GATE": str(gate)},
    )  # fmt: skip
    stop_while_three_run(process, ledger, gate)
    code, log = finish(process, ledger, timeout=30)
    assert code == 0, log
    started, done = ledger_counts(ledger, "start"), ledger_counts(ledger, "done")
    assert len(started) == 3 and set(done) == set(started)

    code, log = finish(consumer(real_broker, queue, ledger, group, "--burst"), ledger)
    assert code == 0, log
    assert ledger_counts(ledger, "done") == {job_id: 1 for job_id in ids}


def test_second_signal_exits_at_once_and_jobs_come_back(
    real_broker: str, queue: str, group: str, tmp_path: Path
) -> None:
    # Given two 10 s jobs running, When SIGTERM arrives twice,
    # Then the process exits at once with 128 + SIGTERM, and both jobs run again later (one
    # after the other: either may have been what stopped the process).
    ledger = tmp_path / "ledger"
    slow = run(publish(real_broker, queue, 2, sleep_ms=10_000))
    process = consumer(real_broker, queue, ledger, group, "--concurrency", "2")
    wait_until(lambda: len(ledger_counts(ledger, "start")) == 2, 60, "two jobs started")
    process.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping" in output(ledger), 10, "the first signal to be handled")
    process.send_signal(signal.SIGTERM)
    code, _ = finish(process, ledger, timeout=5)
    assert code == 128 + signal.SIGTERM
    assert not ledger_counts(ledger, "done")

    restarted = consumer(real_broker, queue, ledger, group, "--concurrency", "2")
    try:
        wait_until(lambda: ledger_counts(ledger, "start") == {job_id: 2 for job_id in slow}, 60, "both again")
    finally:
        restarted.kill()
        finish(restarted, ledger)


def test_sigkill_during_retries_and_delay_hops_loses_no_job(
    real_broker: str, queue: str, group: str, tmp_path: Path
) -> None:
    # Given 2,000 jobs of which 30% fail their first attempt (and so go through a delay tier),
    # When the consumer is killed with SIGKILL three times part-way and restarted,
    # Then every job ends done, none is lost and none is dead-lettered.
    ledger = tmp_path / "ledger"
    prefix = names.prefix()
    settings = {"prefix": prefix, "delay_tiers": "1s"}
    env = {"BRIDGE_PREFIX": prefix, "BRIDGE_DELAY_TIERS": "1s", "LEDGER_FAIL_ONCE": "1"}
    ids = run(publish(real_broker, queue, 2000, sleep_ms=2, **settings))
    assert_in_topic(real_broker, queue, ids, **settings)
    for kill in range(1, 4):
        # Each slows down after 350 jobs of its own (as in the test above).
        slow = {**env, "LEDGER_SLOW_AFTER": "350"}
        process = consumer(real_broker, queue, ledger, group, "--concurrency", "32", env=slow)
        target = 350 * kill
        try:
            wait_until(lambda: len(ledger_counts(ledger, "done")) >= target, 60, f"{target} done")  # noqa: B023
        finally:
            process.kill()
            finish(process, ledger)
    assert len(ledger_counts(ledger, "done")) < len(ids), "the kills came too late to test anything"

    code, log = finish(consumer(real_broker, queue, ledger, group, "--burst", env=env), ledger)
    assert code == 0, log
    done = ledger_counts(ledger, "done")
    assert set(done) == set(ids), f"{len(set(ids) - set(done))} jobs lost"
    retried = {line.split()[1] for line in ledger.read_text().splitlines() if line.endswith(" 2")}
    assert len(retried) >= 500  # the failing 30% really went through the delay tier
    assert "dead-lettering" not in log
    if real_broker.startswith("kafka"):
        # Retries and forwarding commit with their offsets in one transaction: whatever the
        # kills interrupted was aborted, so no job is in its queue twice at the same attempt.
        envelopes = envelopes_in(Bridge(broker=real_broker, registry=str(SCHEMAS), **settings), queue)
        copies = Counter((envelope["id"], envelope["attempt"]) for envelope in envelopes)
        assert len(copies) == len(ids) + len(retried)
        assert max(copies.values()) == 1, [key for key, n in copies.items() if n > 1][:5]


def assert_in_topic(broker: str, queue: str, ids: list[str], **settings: Any) -> None:
    """On Kafka, where reading leaves them in place: every job the broker acknowledged is there.

    So a job missing at the end was lost by consuming, not by publishing.
    """
    if broker.startswith("kafka"):
        app = Bridge(broker=broker, registry=str(SCHEMAS), **settings)
        held = [envelope["id"] for envelope in envelopes_in(app, queue)]
        assert sorted(held) == sorted(ids), f"{len(set(ids) - set(held))} acknowledged jobs not in {queue}"
