"""A test session's end deletes what it and sessions ended made, never what a running one uses."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from tests import names
from tests.brokerio import _quoted, delete_test_objects, rabbitmq_api, topics_made_elsewhere
from tests.conftest import REPO

# A session in a process of its own: registered as pytest_configure does, then running on.
RUNNING = "from tests import names; names.register(); print(names.TAG, flush=True); input()"


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """More sessions beside the real ones; their tags: this one (a tag of its own), one running,
    one gone (its process ended), one killed whose pid another process has since (its mark
    holds a live pid, unlocked), and one whose mark is nowhere to be seen."""
    monkeypatch.setattr(names, "TAG", secrets.token_hex(2))
    monkeypatch.setattr(names, "_MARK", None)  # (the real session's stays open, and locked)
    names.register()  # (as pytest_configure does; another tag if that one is taken)
    running = subprocess.Popen(
        [sys.executable, "-c", RUNNING], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    pid_holder = subprocess.Popen(["sleep", "600"])
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    assert running.stdout is not None
    tags = {"this": names.TAG, "running": running.stdout.readline().strip()}
    assert (names.SESSIONS / tags["running"]).is_file(), "the running session did not register"
    for session, pid in (("gone", gone.stdout.strip()), ("pid reused", str(pid_holder.pid))):
        tags[session] = unused_tag(tags.values())
        with (names.SESSIONS / tags[session]).open("x") as mark:
            mark.write(pid)
    tags["unmarked"] = unused_tag(tags.values())
    try:
        yield tags
    finally:
        names.unregister()
        for process in (running, pid_holder):
            process.kill()
            process.communicate()  # (and its pipes closed)
        for session in ("running", "gone", "pid reused"):
            (names.SESSIONS / tags[session]).unlink(missing_ok=True)


def unused_tag(taken: Iterable[str]) -> str:
    """A tag no session has, nor one of `taken`."""
    while (tag := secrets.token_hex(2)) in taken or (names.SESSIONS / tag).exists():
        pass
    return tag


def test_names_carry_their_sessions_tag_and_only_test_names_are_taken(sessions: dict[str, str]) -> None:
    assert names.tag_of(names.queue()) == sessions["this"]
    assert names.tag_of(names.prefix() + ".delay.1s") == sessions["this"]
    assert names.tag_of(f"t-{sessions['running']}0123456789ab-other.dlq") == sessions["running"]
    assert names.tag_of("bridge.jobs") is None
    assert names.tag_of("payments") is None
    assert names.tag_of("t-short") is None


def test_a_sessions_end_spares_a_running_sessions_queues_and_topics(
    sessions: dict[str, str], brokers: dict[str, str]
) -> None:
    # Given topics and queues of this session, of a running one, of one gone, and one no test made,
    # When this session's end deletes its objects,
    # Then the running session's and the one no test made are left; and the gone session's mark.
    marked = ("this", "running", "gone")
    made = {session: a_name_of(sessions[session]) for session in marked}
    made["no test"] = f"not-a-test-{secrets.token_hex(6)}"
    assert left_after_a_sessions_end(brokers, made) == {"running", "no test"}
    marks = {session for session in marked if (names.SESSIONS / sessions[session]).exists()}
    assert marks == {"this", "running"}


def test_a_sessions_end_deletes_those_of_a_session_killed_whose_pid_another_process_has_since(
    sessions: dict[str, str], brokers: dict[str, str]
) -> None:
    # Given a topic and queue of a session killed, whose mark holds a pid the system has given to
    # another process since (sessions of a day wrap the pids around),
    # When this session's end deletes its objects,
    # Then they are deleted, and its mark.
    made = {"pid reused": a_name_of(sessions["pid reused"])}
    assert left_after_a_sessions_end(brokers, made) == set()
    assert not (names.SESSIONS / sessions["pid reused"]).exists()


def test_a_sessions_end_spares_the_queues_and_topics_of_a_tag_with_no_mark(
    sessions: dict[str, str], brokers: dict[str, str]
) -> None:
    # Given a topic and queue whose tag has no mark (a session whose mark is gone: a cleaned /tmp),
    # When this session's end deletes its objects,
    # Then they are left: a session is taken for ended only when its mark says so.
    made = {"unmarked": a_name_of(sessions["unmarked"])}
    assert left_after_a_sessions_end(brokers, made) == {"unmarked"}


def test_the_sessions_folder_and_marks_let_every_users_sessions_in(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given no sessions folder yet, and a umask that lets no other user in (077),
    # When a session registers,
    # Then the folder is writable by all and sticky, as /tmp is, and the mark readable by all
    # (another user's session tries its lock).
    monkeypatch.setattr(names, "SESSIONS", tmp_path / "sessions")
    monkeypatch.setattr(names, "TAG", secrets.token_hex(2))
    monkeypatch.setattr(names, "_MARK", None)
    umask = os.umask(0o077)
    try:
        names.register()
    finally:
        os.umask(umask)
    try:
        assert stat.S_IMODE(names.SESSIONS.stat().st_mode) == 0o1777
        assert stat.S_IMODE((names.SESSIONS / names.TAG).stat().st_mode) == 0o644
    finally:
        names.unregister()


def a_name_of(tag: str) -> str:
    """A queue (or topic) name, as the session tagged `tag` makes them."""
    return f"t-{tag}{secrets.token_hex(6)}"


def test_a_mark_being_made_is_not_taken_for_an_ended_sessions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given unlocked marks with no pid yet: one just made (its session is about to lock it), and
    # one made a minute ago (its session was killed before it could),
    # When a session's end looks for the sessions that have ended,
    # Then it takes the old one for ended, and removes it, not the new one.
    monkeypatch.setattr(names, "SESSIONS", tmp_path)
    (tmp_path / "0001").touch()
    (tmp_path / "0002").touch()
    os.utime(tmp_path / "0002", (time.time() - 60, time.time() - 60))
    with names.ended_sessions() as ended:
        assert ended == {"0002"}
    assert [mark.name for mark in tmp_path.iterdir()] == ["0001"]


def left_after_a_sessions_end(brokers: dict[str, str], made: dict[str, str]) -> set[str]:
    """Of `made` (a name by session), whose topic and queue of that name this session's end
    leaves (deleted after)."""
    kafka = brokers["kafka"].partition("://")[2]
    topics_made_elsewhere(kafka, list(made.values()))
    for name in made.values():
        rabbitmq_api(f"queues/%2F/{_quoted(name)}", "PUT", {"durable": False, "auto_delete": False})
    try:
        delete_test_objects(brokers)
        topics = AdminClient({"bootstrap.servers": kafka}).list_topics(timeout=10).topics
        queues = {queue["name"] for queue in rabbitmq_api("queues/%2F")}
        left = {session for session, name in made.items() if name in topics}
        assert {session for session, name in made.items() if name in queues} == left
        return left
    finally:
        delete_left(kafka, set(made.values()))


def delete_left(kafka: str, made: set[str]) -> None:
    admin = AdminClient({"bootstrap.servers": kafka})  # (kept: its futures fail once it is freed)
    for future in admin.delete_topics(list(made)).values():
        future.exception()  # (a topic deleted already is fine)
    for queue in made & {queue["name"] for queue in rabbitmq_api("queues/%2F")}:
        rabbitmq_api(f"queues/%2F/{_quoted(queue)}", "DELETE")
