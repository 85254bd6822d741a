"""Billing jobs: charge a customer's card for an invoice.

bridge topology apply --app consumers.billing:app
bridge enqueue billing.ChargeCard '{"invoice_id": "inv-1", "customer_id": "cus-1",
    "amount_cents": 1999, "card_token": "tok_visa"}' --app consumers.billing:app
bridge consume --app consumers.billing:app
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from bridge import Bridge, JobContext, Permanent

log = logging.getLogger("consumers.billing")

# Broker from BRIDGE_BROKER (or bridge.toml); job types from BRIDGE_REGISTRY when it is set (a
# registry URL, with BRIDGE_SCHEMAS), else from the schemas beside this package.
SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
app = Bridge(registry=os.environ.get("BRIDGE_REGISTRY") or str(SCHEMAS))


@app.job("billing.ChargeCard", queue="billing")
async def charge_card(payload: dict[str, Any], ctx: JobContext) -> None:
    """Charge the card; a real service would call its payment provider here."""
    if payload["amount_cents"] <= 0:
        raise Permanent(f"invoice {payload['invoice_id']}: amount must be positive")
    log.debug(
        "charged %s %s to %s for %s (job %s, attempt %s)",
        payload["amount_cents"], payload["currency"], payload["customer_id"],
        payload["invoice_id"], ctx.job_id, ctx.attempt,
    )  # fmt: skip
