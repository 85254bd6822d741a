"""The names of the queues, topics and prefixes tests make, each marked with its session's tag.

A session that ends deletes what it made, and what sessions no longer running left behind, but
never what a running one uses: `make test` runs sessions side by side on the one dev Kafka, and
a teammate may run a single test beside all of that at any time. (Before the tag, each session
deleted every test topic at its end, and tests of a session beside it failed on a topic or queue
gone from under them.)

A running session is a file in SESSIONS named by its tag, holding its pid (for people to read)
and locked (flock) by the session for as long as it runs. The kernel lets go of the lock when
the process ends, however it ends; a pid is no proof of life, as the system gives it to another
process sooner or later. Another session's objects are deleted only once its mark is found
unlocked. Those of a tag with no mark are left alone: they may be a running session's whose mark
is gone (a cleaned /tmp), and nothing deletes them after (a leak bounded by such accidents).
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

# A fixed folder, not one under TMPDIR or bridge's data folder: those differ by user and by how a
# session was started (sudo resets TMPDIR, libpam-tmpdir gives each user one of their own), and
# every session on this host's dev brokers must see the others' marks.
SESSIONS = Path("/tmp/bridge-test-sessions")
# Longer than a session takes from making its mark to locking it (see _ended).
STARTING_S = 10.0
# A queue's name (`t-<tag><12 hex>`) or a prefix (`p<tag><8 hex>.`) begins with its tag; so did
# the names that tests made before the tag (`t-<12 hex>`, `p<8 hex>.`): theirs read as tags with
# no mark, and are left alone.
TEST_NAME = re.compile(r"^(?:t-(?P<queue>[0-9a-f]{4})[0-9a-f]{8}|p(?P<prefix>[0-9a-f]{4})[0-9a-f]{4,}\.)")
TAG = secrets.token_hex(2)
_MARK: int | None = None  # (this session's mark, open and locked until unregister())


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
    global TAG, _MARK
    _make_folder()
    while True:
        try:
            mark = os.open(SESSIONS / TAG, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            TAG = secrets.token_hex(2)
    fcntl.flock(mark, fcntl.LOCK_EX)  # (waits only while another session tries it: _ended)
    os.fchmod(mark, 0o644)  # (whatever the umask: other users' sessions open it to try it)
    os.write(mark, str(os.getpid()).encode())
    _MARK = mark


def unregister() -> None:
    """Remove this session's mark (unless someone did, and a new session has its tag), then let
    go of its lock."""
    global _MARK
    if _MARK is None:
        return
    if _is_at(SESSIONS / TAG, os.fstat(_MARK)):
        (SESSIONS / TAG).unlink(missing_ok=True)
    os.close(_MARK)
    _MARK = None


@contextmanager
def ended_sessions() -> Iterator[set[str]]:
    """The tags of the sessions that have ended, whose objects the caller deletes in the block;
    their marks are removed after it, unless it raised (some may be left). Their marks stay
    there and locked meanwhile: no other session's end deletes the same, and no new session
    takes a tag whose old objects are being deleted."""
    ended: dict[str, int] = {}
    try:
        for mark in _marks():
            if (locked := _lock_if_ended(mark)) is not None:
                ended[mark.name] = locked
        yield set(ended)
        for tag in ended:
            # (another user's, in the sticky folder, stays: their sessions or root's remove it)
            with suppress(FileNotFoundError, PermissionError):
                (SESSIONS / tag).unlink()
    finally:
        for locked in ended.values():
            os.close(locked)


def left_behind(name: str, ended: set[str]) -> bool:
    """Whether `name` is a test's that no session needs: this session's, or one in `ended`."""
    tag = tag_of(name)
    return tag is not None and (tag == TAG or tag in ended)


def _make_folder() -> None:
    """SESSIONS, where every user's sessions can make their marks, sticky as /tmp is (none
    removes another user's)."""
    SESSIONS.mkdir(exist_ok=True)
    with suppress(PermissionError):  # (another user's: their sessions have set it)
        SESSIONS.chmod(0o1777)  # (each time, not just when made: mkdir's mode goes through the umask)


def _marks() -> list[Path]:
    try:
        return list(SESSIONS.iterdir())
    except FileNotFoundError:  # (a cleaned /tmp: no session is known to have ended)
        return []


def _lock_if_ended(mark: Path) -> int | None:
    """`mark` opened and locked if its session has ended; None if it runs, or may."""
    try:
        opened = os.open(mark, os.O_RDONLY)
    except OSError:  # (removed meanwhile, or unreadable)
        return None
    if _ended(mark, opened):
        return opened
    os.close(opened)
    return None


def _ended(mark: Path, opened: int) -> bool:
    try:
        fcntl.flock(opened, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # (its session holds it)
        return False
    # A session makes its mark, locks it, then writes its pid: a mark unlocked with no pid is
    # one being made, unless older than that takes (its session killed before it made anything).
    made = os.fstat(opened)
    started = made.st_size > 0 or time.time() - made.st_mtime > STARTING_S
    return started and _is_at(mark, made)  # (not a mark its session removed, its tag taken again)


def _is_at(mark: Path, file: os.stat_result) -> bool:
    """Whether `mark` still names `file`."""
    try:
        return os.path.samestat(file, mark.stat())
    except FileNotFoundError:
        return False
