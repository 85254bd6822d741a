"""Run `bridge` as a real process: its one-shot commands, and `bridge consume` on the ledger
app, whose ledger it reads."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge import Bridge
from tests.brokerio import dead_letters
from tests.conftest import REPO, SCHEMAS, own_app


def bridge(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m bridge` from the repository, as a user would."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], cwd=REPO, env={**environ, **env},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("bridge: ") and "Traceback" not in done.stderr
    assert not lines[0].endswith("\\n"), lines[0]  # (a message's own newline, escaped into the line)
    for fragment in fragments:
        assert fragment in lines[0]


def consumer(
    broker: str, queue: str, ledger: Path, group: str, *flags: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start `python -m bridge consume` on the ledger app; the caller must wait for it.

    Its output goes to `<ledger>.log` (see `output`), so a test can watch it while it runs.
    """
    env = {
        **os.environ, "BRIDGE_BROKER": broker, "BRIDGE_GROUP": group,
        "LEDGER_FILE": str(ledger), "LEDGER_QUEUE": queue, **(env or {}),
    }  # fmt: skip
    command = [sys.executable, "-m", "bridge", "consume", "--app", "tests.apps.ledger:app", *flags]
    with log_of(ledger).open("a") as log:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)


def restart_until_drained(
    broker: str, queue: str, ledger: Path, group: str, env: dict[str, str], tries: int = 5
) -> tuple[list[int], str]:
    """Run `bridge consume --burst` again each time one exits, until one drains the queue (exits
    0) or `tries` have run; return the exit codes and the output."""
    codes: list[int] = []
    log = ""
    while 0 not in codes and len(codes) < tries:
        code, log = finish(consumer(broker, queue, ledger, group, "--burst", env=env), ledger, timeout=90)
        codes.append(code)
    return codes, log


def stop_while_three_run(process: subprocess.Popen[str], ledger: Path, gate: Path) -> None:
    """Send SIGTERM to a consumer of the ledger app (LEDGER_GATE=`gate`) once three jobs wait
    at the gate; open it once the signal has been handled, so those three finish after it."""
    wait_until(lambda: len(ledger_counts(ledger, "start")) == 3, 60, "three jobs started")
    process.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping" in output(ledger), 10, "the signal to be handled")
    gate.touch()


def assert_dead_lettered_for_coming_back(broker: str, queue: str, job: str, times: int) -> None:
    """`job` is the one dead letter of `queue`: `delivery_limit`, after coming back `times` times."""
    [letter] = dead_letters(own_app(broker), queue)
    assert letter.reason == "delivery_limit" and letter.envelope is not None
    assert letter.envelope.id == job and letter.envelope.attempt == 1
    assert f"it came back to {queue} {times} times without an outcome" in letter.detail


def log_of(ledger: Path) -> Path:
    """Where the consumers of `ledger` write their output."""
    return ledger.with_suffix(".log")


def output(ledger: Path) -> str:
    """Everything the consumers of `ledger` printed so far."""
    path = log_of(ledger)
    return path.read_text() if path.exists() else ""


def finish(process: subprocess.Popen[str], ledger: Path, timeout: float = 120) -> tuple[int, str]:
    """Wait for `process` (killing it past `timeout`); return its exit code and the output."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return process.returncode, output(ledger)


def ledger_counts(ledger: Path, event: str) -> Counter[str]:
    """How many times each job id logged `event` (start or done)."""
    if not ledger.exists():
        return Counter()
    lines = ledger.read_text().splitlines()
    return Counter(line.split()[1] for line in lines if line.startswith(f"{event} "))


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


async def publish(broker: str, queue: str, count: int, sleep_ms: int = 0, **settings: Any) -> list[str]:
    """Create `queue` and enqueue `count` test.Echo jobs on it; return their ids."""
    app = Bridge(broker=broker, registry=str(SCHEMAS), **settings)
    async with app:
        await app.apply_topology([queue])
        ids = []
        for start in range(0, count, 500):
            batch = [
                app.enqueue_async("test.Echo", {"n": n, "sleep_ms": sleep_ms}, queue=queue)
                for n in range(start, min(start + 500, count))
            ]
            ids += await asyncio.gather(*batch)
        return ids
