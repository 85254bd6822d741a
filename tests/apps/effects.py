"""An app whose jobs have an effect in the idempotency store's own database (the inbox).

Configured by environment, since `bridge consume` imports it by name: EFFECTS_QUEUE,
EFFECTS_TABLE (a table, or a Redis list, that the test created), EFFECTS_LEASE_S, and
EFFECTS_LEDGER (a file where every run appends `start <job id> <key> <epoch s> <pid>`). The store is
BRIDGE_IDEMPOTENCY. Faults to inject: EFFECTS_HANG (handlers never finish),
EFFECTS_CRASH=in_transaction|after_commit (SIGKILL this process at that point).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from bridge import Bridge, JobContext
from bridge.policy import fixed
from tests.apps import append_line

app = Bridge(registry=str(Path(__file__).resolve().parent.parent / "schemas"))
TABLE = os.environ.get("EFFECTS_TABLE", "effects")
LEDGER = os.environ.get("EFFECTS_LEDGER", os.devnull)
CRASH = os.environ.get("EFFECTS_CRASH", "")
HANG = bool(os.environ.get("EFFECTS_HANG"))


def record(line: str) -> None:
    append_line(LEDGER, line)


async def write_effect(url: str, db: Any, table: str, key: str, job_id: str) -> None:
    """Append one row (or list item) for this run through the handle of the store at `url`."""
    if url.startswith("sqlite"):
        db.execute(f"INSERT INTO {table} (key, job_id) VALUES (?, ?)", (key, job_id))
    elif url.startswith("postgres"):
        await db.execute(f"INSERT INTO {table} (key, job_id) VALUES (%s, %s)", (key, job_id))
    else:
        db.call("RPUSH", table, f"{key} {job_id}")


@app.job(
    "test.Echo",
    queue=os.environ.get("EFFECTS_QUEUE", "effects"),
    backoff=fixed(0.2),
    idempotency_lease_s=float(os.environ.get("EFFECTS_LEASE_S", "60")),
)
async def effect(payload: dict[str, Any], ctx: JobContext) -> None:
    assert ctx.idempotency_key is not None
    record(f"start {ctx.job_id} {ctx.idempotency_key} {time.time():.3f} {os.getpid()}")
    if HANG:
        await asyncio.Event().wait()
    await asyncio.sleep(payload["sleep_ms"] / 1000)
    async with ctx.transaction() as db:
        await write_effect(app.settings.idempotency or "", db, TABLE, ctx.idempotency_key, ctx.job_id)
        if CRASH == "in_transaction":
            os.kill(os.getpid(), signal.SIGKILL)
    if CRASH == "after_commit":
        os.kill(os.getpid(), signal.SIGKILL)
