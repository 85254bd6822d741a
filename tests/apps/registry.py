"""An app with a handler for a type no registry has: `bridge consume` must refuse to start it."""

from __future__ import annotations

from typing import Any

from bridge import Bridge, JobContext

app = Bridge()


@app.job("tregistry.Unregistered", queue="t-registry-never")
async def never(payload: Any, ctx: JobContext) -> None:
    raise AssertionError("a type missing from the registry must stop the consumer before any job")
