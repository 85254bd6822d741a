"""A test session's end deletes what it and sessions gone made, never what a running one uses."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient

from tests import names
from tests.brokerio import _quoted, delete_test_objects, rabbitmq_api, topics_made_elsewhere


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Three more sessions beside the real ones: this one (a tag of its own), one running (a
    live process's mark) and one gone (a mark whose process has ended); their tags. (In the real
    folder: one of its own would have every real session taken for gone, and its objects deleted.)"""
    monkeypatch.setattr(names, "TAG", secrets.token_hex(2))
    names.register()  # (this process's, as pytest_configure's is; another tag if that one is taken)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    tags = {"this": names.TAG}
    for session, pid in (("running", str(running.pid)), ("gone", gone.stdout.strip())):
        while (tag := secrets.token_hex(2)) in tags.values() or (names.SESSIONS / tag).exists():
            pass
        tags[session] = tag
        (names.SESSIONS / tag).write_text(pid)
    try:
        yield tags
    finally:
        names.unregister()
        for tag in (tags["running"], tags["gone"]):
            (names.SESSIONS / tag).unlink(missing_ok=True)
        running.kill()
        running.wait()


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
    made = {session: f"t-{tag}{secrets.token_hex(6)}" for session, tag in sessions.items()}
    made["no test"] = f"not-a-test-{secrets.token_hex(6)}"
    kafka = brokers["kafka"].partition("://")[2]
    topics_made_elsewhere(kafka, list(made.values()))
    for name in made.values():
        rabbitmq_api(f"queues/%2F/{_quoted(name)}", "PUT", {"durable": False, "auto_delete": False})
    try:
        delete_test_objects(brokers)
        topics = AdminClient({"bootstrap.servers": kafka}).list_topics(timeout=10).topics
        queues = {queue["name"] for queue in rabbitmq_api("queues/%2F")}
        left = {session for session, name in made.items() if name in topics}
        assert left == {"running", "no test"}
        assert {session for session, name in made.items() if name in queues} == left
        marks = {session for session, tag in sessions.items() if (names.SESSIONS / tag).exists()}
        assert marks == {"this", "running"}
    finally:
        admin = AdminClient({"bootstrap.servers": kafka})
        for future in admin.delete_topics([made["running"], made["no test"]]).values():
            future.exception()
        for name in (made["running"], made["no test"]):
            rabbitmq_api(f"queues/%2F/{_quoted(name)}", "DELETE")
