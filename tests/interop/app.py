"""The app that `bridge consume` runs in the interop tests: every run of a job is one JSON line.

Configured like tests/apps/ledger.py, by LEDGER_FILE and LEDGER_QUEUE, so that
`tests.processes.consumer` starts it when given `--app tests.interop.app:app`. A line holds what
the handler was given: the job's id, queue, key, attempt, headers and created_at (milliseconds
since the epoch, as the producer wrote it), and the decoded payload.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bridge import Bridge, JobContext
from tests.apps import append_line

app = Bridge(registry=str(Path(__file__).resolve().parent.parent / "schemas"))
LEDGER = os.environ.get("LEDGER_FILE", os.devnull)


@app.job("test.Echo", queue=os.environ.get("LEDGER_QUEUE", "interop"))
async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
    given = {"id": ctx.job_id, "queue": ctx.queue, "key": ctx.key, "attempt": ctx.attempt}
    given["created_at"] = ctx.created_at_ms  # ms since the epoch, as the producer wrote it
    append_line(LEDGER, json.dumps({**given, "headers": dict(ctx.headers), "payload": payload}))


def runs(ledger: Path) -> list[dict[str, Any]]:
    """Every run the app appended to `ledger`, oldest first."""
    if not ledger.exists():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines()]
