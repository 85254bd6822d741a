"""Processes, ports, packages and locks for `bridge dev`; every wait here has a deadline."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from bridge.errors import DevError

Log = Callable[[str], None]

# apt is the machine's, so its lock is too (not in a data folder BRIDGE_DATA may move).
APT_LOCK = Path("/var/lib/bridge/apt.lock")

# Colour and cursor codes: Maven ends its output with a reset (ESC [0m) even with colours off.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# Maven's advice after every failure, the same whatever went wrong, and headings (ending in a
# colon) of the lines that follow them.
_ERROR_BOILERPLATE = re.compile(r"re-run Maven|\[Help \d+\] http|:$", re.IGNORECASE)


def run(
    argv: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing its output; a timeout becomes a DevError."""
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=None if env is None else {**os.environ, **env},
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DevError(f"`{' '.join(argv)}` did not finish within {timeout_s:.0f}s") from None


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    """The most telling line of a failed command, colours removed: the first Maven-style
    `[ERROR]` (or `[FATAL]`) line that says what went wrong, else the last non-empty line."""
    text = _ANSI_ESCAPE.sub("", result.stderr + result.stdout)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    tagged = [line for line in lines if line.startswith(("[ERROR]", "[FATAL]"))]
    errors = [
        line for line in tagged if line not in ("[ERROR]", "[FATAL]") and not _ERROR_BOILERPLATE.search(line)
    ]
    if errors:
        return errors[0]
    return lines[-1] if lines else f"exit status {result.returncode}"


def find_program(name: str) -> str | None:
    """Locate a program, also in the sbin folders a non-root PATH often lacks."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def apt_install(packages: Sequence[str], log: Log) -> None:
    """Install Debian packages as root, refreshing the package lists only when needed.

    One of bridge's at a time (`make test`'s sessions may install at once): apt-get can
    wait for dpkg's lock, but `apt-get update` fails at once on the lists' lock another holds.
    """
    # Waiting on dpkg's lock (instead of failing) lets this run beside another program's apt-get.
    argv = ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=300", *packages]
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    with file_lock(APT_LOCK, timeout_s=1800, log=log):
        log(f"installing {' '.join(packages)} with apt-get")
        result = run(argv, timeout_s=900, env=env)
        if result.returncode != 0:
            log("apt-get install failed; running apt-get update and trying again")
            update = run(["apt-get", "update"], timeout_s=600, env=env)
            result = run(argv, timeout_s=900, env=env)
            if result.returncode != 0 and update.returncode != 0:
                raise DevError(
                    f"`apt-get install {' '.join(packages)}` failed: {last_line(result)}"
                    f" (and `apt-get update`: {last_line(update)})"
                )
    if result.returncode != 0:
        raise DevError(f"`apt-get install {' '.join(packages)}` failed: {last_line(result)}")


def port_accepts(port: int, timeout_s: float = 1.0) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def process_cmdline(pid: int) -> str:
    """The command line of a live process, or "" when it is gone or a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        # Reap it if it is our own exited child, so it does not linger as a zombie.
        os.waitpid(pid, os.WNOHANG)
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def exited(pid: int, marker: str) -> bool:
    """True once process `pid`, started with `marker` on its command line, has ended.

    A child of ours is asked with waitpid, which is exact (and reaps it). Its command line is
    not proof: on a fresh machine under load, `bridge dev up` once read Kafka's without the
    marker a second into its start, and gave up on a broker that went on to serve.
    """
    try:
        ended, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not ours: an earlier `bridge dev up` started it
        return marker not in process_cmdline(pid)
    return ended == pid


def spawn_detached(argv: Sequence[str], *, log_file: Path) -> int:
    """Start a long-lived process in its own session, output appended to `log_file`."""
    # posix_spawn rather than Popen: a Popen object dropped while its child still runs
    # warns (ResourceWarning), and this child is meant to outlive us.
    program = shutil.which(argv[0]) or argv[0]
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_file), flags, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    return os.posix_spawn(program, list(argv), dict(os.environ), file_actions=actions, setsid=True)


def terminate(pid: int, marker: str, *, timeout_s: float) -> None:
    """Stop a process politely, then by force once `timeout_s` has passed."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if wait_for(lambda: marker not in process_cmdline(pid), timeout_s=timeout_s):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: marker not in process_cmdline(pid), timeout_s=10)


def wait_for(check: Callable[[], bool], *, timeout_s: float, every_s: float = 0.5) -> bool:
    """Poll `check` until it is true (True) or the deadline passes (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every_s)


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def file_lock(path: Path, *, timeout_s: float, log: Log) -> Iterator[None]:
    """Hold an exclusive lock on `path`, so two `bridge dev` runs do not race."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        if not _try_lock(handle.fileno()):
            log(f"waiting for another `bridge dev` run to finish (lock {path})")
            if not wait_for(lambda: _try_lock(handle.fileno()), timeout_s=timeout_s):
                raise DevError(f"another `bridge dev` run holds {path}; wait for it or end it")
        yield


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True
