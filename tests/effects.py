"""Tables of effects in each idempotency store's own database, read with the vendors' clients."""

from __future__ import annotations

import sqlite3
import uuid
from collections import Counter

import psycopg
import redis


def new_table(store_url: str) -> str:
    """Create an empty table (a Redis list needs nothing) with no unique constraint; its name."""
    table = f"effects_{uuid.uuid4().hex[:12]}"
    create = f"CREATE TABLE {table} (key TEXT NOT NULL, job_id TEXT NOT NULL)"
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite://")) as db:
            db.execute(create)
    elif store_url.startswith("postgres"):
        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute(create)
    return table


def effects(store_url: str, table: str) -> Counter[str]:
    """How many effects each key had."""
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite://")) as db:
            return Counter(key for (key,) in db.execute(f"SELECT key FROM {table}"))
    if store_url.startswith("postgres"):
        with psycopg.connect(store_url) as conn:
            return Counter(key for (key,) in conn.execute(f"SELECT key FROM {table}"))
    client = redis.Redis.from_url(store_url, decode_responses=True)
    try:
        return Counter(str(item).split()[0] for item in client.lrange(table, 0, -1))
    finally:
        client.close()
