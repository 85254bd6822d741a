"""The names of the queues, topics and prefixes tests make, each marked with its session's tag.

A session that ends deletes what it made, and what sessions no longer running left behind, but
never what a running one uses: `make test` runs sessions side by side on the one dev Kafka, and
a teammate may run a single test beside all of that at any time. (Before the tag, each session
deleted every test topic at its end, and tests of a session beside it failed on a topic or queue
gone from under them.)

A running session is a file in SESSIONS named by its tag and holding its pid.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import uuid
from pathlib import Path

SESSIONS = Path(tempfile.gettempdir()) / "bridge-test-sessions"
# A queue's name (`t-<tag><12 hex>`) or a prefix (`p<tag><8 hex>.`) begins with its tag; so did
# the names that tests made before the tag (`t-<12 hex>`, `p<8 hex>.`): theirs are taken for
# the tags of sessions long gone.
TEST_NAME = re.compile(r"^(?:t-(?P<queue>[0-9a-f]{4})[0-9a-f]{8}|p(?P<prefix>[0-9a-f]{4})[0-9a-f]{4,}\.)")
TAG = secrets.token_hex(2)


def queue() -> str:
    """A queue (or topic) name no other test uses."""
    return f"t-{TAG}{uuid.uuid4().hex[:12]}"


def prefix() -> str:
    """A prefix (of delay tiers and the exchange) no other test uses."""
    return f"p{TAG}{uuid.uuid4().hex[:8]}"


def tag_of(name: str) -> str | None:
    """The tag of the session that made `name`; None for a name no test makes."""
    found = TEST_NAME.match(name)
    return None if found is None else found["queue"] or found["prefix"]


def register() -> None:
    """Mark this process's session as running, under a tag no running session has."""
    global TAG
    SESSIONS.mkdir(parents=True, exist_ok=True)
    for other in SESSIONS.iterdir():  # (the marks of sessions killed, whose names are all gone)
        _running(other)
    while True:
        try:
            with (SESSIONS / TAG).open("x") as mark:
                mark.write(str(os.getpid()))
            return
        except FileExistsError:
            TAG = secrets.token_hex(2)


def unregister() -> None:
    if _pid(SESSIONS / TAG) == os.getpid():
        (SESSIONS / TAG).unlink(missing_ok=True)


def left_behind(name: str) -> bool:
    """Whether `name` is a test's, and its session (this one included) no longer needs it."""
    tag = tag_of(name)
    return tag is not None and (tag == TAG or not _running(SESSIONS / tag))


def _running(mark: Path) -> bool:
    pid = _pid(mark)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        mark.unlink(missing_ok=True)  # (a session killed before it could remove its mark)
        return False
    except PermissionError:  # (another user's, running)
        pass
    return True


def _pid(mark: Path) -> int | None:
    try:
        return int(mark.read_text())
    except (OSError, ValueError):  # (none, or one being written: taken as not running)
        return None
