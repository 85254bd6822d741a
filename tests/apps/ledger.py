"""An app for process-level tests: every run of a job is appended to a ledger file.

Configured by environment, since `bridge consume` imports it by name:
LEDGER_FILE (path), LEDGER_QUEUE (queue name).
Each run writes `start <job id>` before and `done <job id>` after the handler's work.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from bridge import Bridge, JobContext

app = Bridge(registry=str(Path(__file__).resolve().parent.parent / "schemas"))
LEDGER = os.environ.get("LEDGER_FILE", os.devnull)


def record(line: str) -> None:
    # One write() of a whole line on an O_APPEND file: lines never interleave, even if killed.
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@app.job("test.Echo", queue=os.environ.get("LEDGER_QUEUE", "ledger"))
async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
    record(f"start {ctx.job_id}")
    if payload["sleep_ms"]:
        await asyncio.sleep(payload["sleep_ms"] / 1000)
    record(f"done {ctx.job_id}")
