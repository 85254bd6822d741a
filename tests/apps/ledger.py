"""An app for process-level tests: every run of a job is appended to a ledger file.

Configured by environment, since `bridge consume` imports it by name:
LEDGER_FILE (path), LEDGER_QUEUE (queue name), LEDGER_FAIL_ONCE (if set, jobs whose n ends in
0, 1 or 2 fail their first attempt), LEDGER_KILL (n values, comma-separated: every run of a job
with one of them kills its process with SIGKILL once it has written `start`). Each run writes
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


@app.job("test.Echo", queue=os.environ.get("LEDGER_QUEUE", "ledger"), backoff=fixed(0.2))
async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
    record(f"start {ctx.job_id} {ctx.attempt}")
    if payload["n"] in KILL:
        os.kill(os.getpid(), signal.SIGKILL)
    if payload["sleep_ms"]:
        await asyncio.sleep(payload["sleep_ms"] / 1000)
    if FAIL_ONCE and payload["n"] % 10 < 3 and ctx.attempt == 1:
        raise RuntimeError("fails once")
    record(f"done {ctx.job_id} {ctx.attempt}")
