"""Idempotency keys under crashes: real `bridge consume` processes, brokers and stores."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from bridge import Bridge
from bridge.idempotency import run_key
from tests import names
from tests.conftest import REPO, SCHEMAS, run
from tests.effects import effects, new_table
from tests.processes import wait_until

TIERS = "1s,5s"


@pytest.fixture(params=["kafka", "rabbitmq"])
def real_broker(request: pytest.FixtureRequest, brokers: dict[str, str]) -> str:
    return brokers[request.param]


class Effects:
    """Consumers of the effects app on one queue, group, store and table, with their ledger."""

    def __init__(self, broker: str, store_url: str, tmp_path: Path, lease_s: float = 2.0) -> None:
        self.broker, self.store_url = broker, store_url
        self.queue = names.queue()
        # Delay tiers (and on Kafka their forwarder group) of its own: a burst run waits for
        # every job in its prefix's tiers, which a consumer left over elsewhere may be holding.
        self.prefix = names.prefix()
        self.group = f"g-{uuid.uuid4().hex[:12]}"
        self.table = new_table(store_url)
        self.ledger = tmp_path / "ledger"
        self.log = tmp_path / "consumers.log"
        self.lease_s = lease_s

    def create(self) -> None:
        """Create the queue and its topology."""

        async def scenario() -> None:
            async with self.app() as app:
                await app.apply_topology([self.queue])

        run(scenario())

    def app(self) -> Bridge:
        return Bridge(broker=self.broker, registry=str(SCHEMAS), prefix=self.prefix, delay_tiers=TIERS)

    def publish(self, keys: list[str], copies: int = 1, sleep_ms: int = 0) -> None:
        """Enqueue `copies` jobs for each key (the copies have their own job ids)."""

        async def scenario() -> None:
            async with self.app() as app:
                await app.apply_topology([self.queue])
                jobs = [(n, key) for _ in range(copies) for n, key in enumerate(keys)]
                for start in range(0, len(jobs), 500):
                    await asyncio.gather(*(
                        app.enqueue_async(
                            "test.Echo", {"n": n, "sleep_ms": sleep_ms}, queue=self.queue, idempotency_key=key
                        )
                        for n, key in jobs[start : start + 500]
                    ))  # fmt: skip

        run(scenario(), timeout=120)

    def consumer(self, *flags: str, **faults: str) -> subprocess.Popen[str]:
        env = {
            **os.environ, "BRIDGE_BROKER": self.broker, "BRIDGE_GROUP": self.group,
            "BRIDGE_PREFIX": self.prefix, "BRIDGE_DELAY_TIERS": TIERS,
            "BRIDGE_IDEMPOTENCY": self.store_url, "EFFECTS_QUEUE": self.queue, "EFFECTS_TABLE": self.table,
            "EFFECTS_LEASE_S": str(self.lease_s), "EFFECTS_LEDGER": str(self.ledger),
            **{f"EFFECTS_{name.upper()}": value for name, value in faults.items()},
        }  # fmt: skip
        command = [sys.executable, "-m", "bridge", "consume", "--app", "tests.apps.effects:app", *flags]
        with self.log.open("a") as log:
            return subprocess.Popen(
                command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True
            )

    def drain(self) -> None:
        """Run a `--burst` consumer until every queue, tier and retry is empty."""
        process = self.consumer("--burst")
        try:
            code = process.wait(timeout=180)
        finally:
            kill(process)
        assert code == 0, self.output()

    def starts(self, pid: int | None = None) -> list[tuple[str, str, float, int]]:
        """(job id, key, time, pid) of every run so far, of one process if `pid` is given."""
        if not self.ledger.exists():
            return []
        text = self.ledger.read_text()
        lines = text[: text.rfind("\n") + 1].splitlines()  # a line being written is not complete yet
        rows = [line.split()[1:] for line in lines if line.startswith("start ")]
        runs = [(job, key, float(at), int(by)) for job, key, at, by in rows]
        return [r for r in runs if pid is None or r[3] == pid]

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def kill(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait(timeout=30)


@pytest.mark.slow
def test_a_duplicate_storm_with_a_consumer_killed_over_and_over_has_one_effect_per_key(
    real_broker: str, store_url: str, tmp_path: Path
) -> None:
    # Given 5,000 keys or more, each published 3 times, and two consumers of one group,
    # When one of them is killed with SIGKILL after every 50 runs it makes, three times (restarted
    # after the first two), the other is stopped, and a last consumer drains what is left,
    # Then every key had exactly one effect (a row written in the inbox transaction, in a table
    # with no unique constraint).
    storm = Effects(real_broker, store_url, tmp_path)
    storm.create()
    # The keys go out in waves of 1,000 (3,000 jobs of 20 ms, four at a time per consumer: a
    # few seconds), the next one whenever the last has had its effects: a restarted victim, a
    # Python process that must start and join, may take longer than a wave on a loaded machine,
    # and it must find jobs to die among. (PostgreSQL and Redis outlive a test: keys of its own.)
    keys: list[str] = []

    def drained() -> bool:
        return len(effects(store_url, storm.table)) == len(keys)

    def next_wave() -> None:
        wave = [f"{storm.queue}-{n}" for n in range(len(keys), len(keys) + 1000)]
        storm.publish(wave, copies=3, sleep_ms=20)
        keys.extend(wave)

    steady, victim = storm.consumer("--concurrency", "4"), storm.consumer("--concurrency", "4")
    kills = 0
    try:
        for restarts in (2, 1, 0):
            pid = victim.pid
            while len(storm.starts(pid)) < 50 and len(keys) < 12_000:
                if drained():
                    next_wave()
                wait_until(
                    lambda: len(storm.starts(pid)) >= 50 or drained(),  # noqa: B023
                    120, f"50 runs by consumer {pid}",
                )  # fmt: skip
            kill(victim)
            if len(storm.starts(pid)) >= 50:
                kills += 1
            if restarts:  # (the last one killed is not restarted: the drain below takes over)
                victim = storm.consumer("--concurrency", "4")
        while len(keys) < 5000:
            next_wave()
        steady.terminate()
        assert steady.wait(timeout=60) == 0, storm.output()
    finally:
        kill(steady)
        kill(victim)
    assert kills == 3, f"the victims were killed mid-run {kills} times in {len(keys)} keys"
    storm.drain()
    counts = effects(store_url, storm.table)
    assert set(counts) == set(keys), f"{len(set(keys) - set(counts))} keys never had their effect"
    assert max(counts.values()) == 1, {key: n for key, n in counts.items() if n > 1}


def test_a_key_held_by_a_killed_worker_frees_when_its_lease_ends(real_broker: str, tmp_path: Path) -> None:
    # Given a worker that claimed a key (lease 3 s) and hangs in the handler,
    # When it is killed with SIGKILL and another worker consumes,
    # Then the other runs the job only after the lease ended, and it has one effect. (The lease
    # counts from the claim, made before the handler starts, or from its last renewal.)
    db = tmp_path / "keys.db"
    jobs = Effects(real_broker, f"sqlite:///{db}", tmp_path, lease_s=3.0)
    key = f"{jobs.queue}-lease"
    jobs.publish([key])
    hung = jobs.consumer(hang="1")
    try:
        wait_until(lambda: len(jobs.starts()) == 1, 60, "the first worker to start the job")
    finally:
        kill(hung)
    with closing(sqlite3.connect(db)) as store:
        [(lease_end_ms,)] = store.execute(
            "SELECT expires_at FROM bridge_idempotency WHERE name = ?", (run_key("test.Echo", key),)
        ).fetchall()
    jobs.drain()
    (_, _, first_at, _), (_, _, second_at, by) = jobs.starts()
    assert by != hung.pid
    assert lease_end_ms / 1000 >= first_at + 2.0  # (a lease of 3 s, claimed just before the start)
    assert second_at >= lease_end_ms / 1000 - 0.001  # (the ledger's times are rounded to the ms)
    assert effects(jobs.store_url, jobs.table) == {key: 1}


@pytest.mark.parametrize("crash", ["in_transaction", "after_commit"])
def test_a_crash_in_the_inbox_leaves_the_write_exactly_once(
    real_broker: str, brokers: dict[str, str], crash: str, tmp_path: Path
) -> None:
    # Given a job whose handler writes a row in its inbox transaction (PostgreSQL),
    # When its worker is killed inside the transaction, or after the commit and before the
    # acknowledgement, and another worker consumes,
    # Then the row exists once: written again after a crash inside, not again after a commit.
    jobs = Effects(real_broker, brokers["postgres"], tmp_path)
    key = f"{jobs.queue}-inbox"
    jobs.publish([key])
    crashing = jobs.consumer(crash=crash)
    assert crashing.wait(timeout=60) == -9, jobs.output()
    jobs.drain()
    assert effects(jobs.store_url, jobs.table) == {key: 1}
    assert len(jobs.starts()) == (2 if crash == "in_transaction" else 1)
