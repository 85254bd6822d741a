"""A test session ends, with its result, even when a thread would hold up the process's exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_a_session_whose_thread_holds_up_its_exit_ends_anyway_saying_so(tmp_path: Path) -> None:
    # Given a test that passes but leaves a thread (not a daemon) waiting for good, as a call
    # into a client library that never returns does,
    # When its session ends, Then the process exits once the wait is over (1 s here), with
    # status 1 and a line naming the thread. (Python waited for the thread for good.)
    test = tmp_path / "test_stuck.py"
    test.write_text(
        "import threading\n\n\ndef test_leaves_a_thread_waiting():\n"
        "    threading.Thread(target=threading.Event().wait, name='stuck-call').start()\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q", str(test)],
        cwd=REPO, env={**os.environ, "BRIDGE_TEST_EXIT_WAIT_S": "1"},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert "1 passed" in done.stdout, done.stdout
    assert done.returncode == 1
    assert "threads still running: stuck-call. Exiting without them" in done.stderr, done.stderr
