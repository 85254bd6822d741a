"""An app for process-level tests: every run of a job is appended to a ledger file.

Configured by environment, since `bridge consume` imports it by name:
LEDGER_FILE (path), LEDGER_QUEUE (queue name), LEDGER_FAIL_ONCE (if set, jobs whose n ends in
0, 1 or 2 fail their first attempt), LEDGER_KILL (n values, comma-separated: every run of a job
with one of them kills its process with SIGKILL once it has written `start`), LEDGER_SLOW_AFTER
(n: once this process has written n `done` lines, every later run takes SLOW_S longer, so that
a test that kills the process after about n jobs has seconds to do it, not milliseconds, while
jobs still run and settle), LEDGER_GATE (a path: every run waits, after `start`, until that
file exists, so that a test can act while it knows which jobs are running). Each run writes
`start <job id> <attempt>` before and `done <job id> <attempt>` after the handler's work.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from bridge import Bridge, JobContext
from bridge.policy import fixed
from tests.apps import append_line

app = Bridge(registry=str(Path(__file__).resolve().parent.parent / "schemas"))
LEDGER = os.environ.get("LEDGER_FILE", os.devnull)


def record(line: str) -> None:
    append_line(LEDGER, line)


FAIL_ONCE = bool(os.environ.get("LEDGER_FAIL_ONCE"))
KILL = {int(n) for n in os.environ.get("LEDGER_KILL", "").split(",") if n}
SLOW_AFTER = int(os.environ.get("LEDGER_SLOW_AFTER", "0"))
SLOW_S = 0.25
GATE = os.environ.get("LEDGER_GATE")
done_here = 0  # `done` lines this process wrote


@app.job("test.Echo", queue=os.environ.get("LEDGER_QUEUE", "ledger"), backoff=fixed(0.2))
async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
    global done_here
    record(f"start {ctx.job_id} {ctx.attempt}")
    if payload["n"] in KILL:
        os.kill(os.getpid(), signal.SIGKILL)
    while GATE and not os.path.exists(GATE):
        await asyncio.sleep(0.02)
    if SLOW_AFTER and done_here >= SLOW_AFTER:
        await asyncio.sleep(SLOW_S)
    if payload["sleep_ms"]:
        await asyncio.sleep(payload["sleep_ms"] / 1000)
    if FAIL_ONCE and payload["n"] % 10 < 3 and ctx.attempt == 1:
        raise RuntimeError("fails once")
    record(f"done {ctx.job_id} {ctx.attempt}")
    done_here += 1
