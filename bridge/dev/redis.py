"""Redis from Debian's `redis-server` package: a server of our own, on loopback only.

Not Debian's service: ours reads a configuration written to its own folder under the data
folder, keeps its append-only file and pid file there, and runs as the caller (like the Kafka
broker, and unlike the `redis` user, it can reach a private home folder).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bridge.dev._common import ServiceStatus, data_root, env_port, is_root
from bridge.dev._proc import (
    Log,
    apt_install,
    file_lock,
    find_program,
    last_line,
    port_accepts,
    process_cmdline,
    run,
    tail,
    terminate,
    wait_for,
)
from bridge.errors import DevError

DEFAULT_PORT: Final = 6379
PORT_VAR: Final = "BRIDGE_DEV_REDIS_PORT"
START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 30.0

# Settings shared with docker-compose.yml (a test compares them): every write goes to the
# append-only file, which is flushed once a second, so a crash loses at most a second of keys.
REDIS_SETTINGS: Final[dict[str, str]] = {"appendonly": "yes", "appendfsync": "everysec"}

# PING as a RESP array; a server that is ready answers the simple string PONG. One still
# loading its data, or refusing us (protected mode, a password), answers an error instead.
_PING: Final = b"*1\r\n$4\r\nPING\r\n"
_PONG: Final = b"+PONG\r\n"


@dataclass(frozen=True)
class _Layout:
    """Where one server keeps its files (its data too: the `dir` setting)."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "redis.conf"

    @property
    def pid_file(self) -> Path:
        return self.root / "redis.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "redis.log"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


def port() -> int:
    """The Redis port."""
    return env_port(PORT_VAR, DEFAULT_PORT)


def url() -> str:
    """The Redis URL bridge takes in BRIDGE_IDEMPOTENCY."""
    return _url(port())


def redis_conf(redis_port: int, folder: Path) -> dict[str, str]:
    """The whole configuration of a loopback-only server keeping its files in `folder`."""
    return {
        "bind": "127.0.0.1",
        "port": str(redis_port),
        "protected-mode": "yes",
        "daemonize": "yes",
        "pidfile": str(folder / "redis.pid"),
        "logfile": str(folder / "redis.log"),
        "dir": str(folder),
        # Keep the command line, which names this file, so the pid can be checked as ours.
        "set-proc-title": "no",
        **REDIS_SETTINGS,
    }


def up(log: Log = print) -> ServiceStatus:
    """Install Redis and start our server unless one already answers PING."""
    redis_port = port()
    if _pong(redis_port):
        return _status(redis_port, True, "already up")
    started = time.monotonic()
    layout = _layout(redis_port)
    # One `up` at a time, each holding the lock until its server answers: a server that has
    # just started listens before it writes its pid file, and would pass for a stranger's.
    with file_lock(layout.lock, timeout_s=900, log=log):
        if _pong(redis_port):
            return _status(redis_port, True, "already up")
        if _our_pid(layout) is None:
            _require_free(redis_port)
            _start(_ensure_installed(log), layout, redis_port, log)
        _wait_ready(redis_port, layout)
    return _status(redis_port, True, f"started in {time.monotonic() - started:.1f}s")


def down(log: Log = print) -> ServiceStatus:
    """Stop the server `up` started (it flushes its files); a server started otherwise is left alone."""
    redis_port = port()
    layout = _layout(redis_port)
    pid = _our_pid(layout)
    if pid is None:
        if _pong(redis_port):
            return _status(redis_port, True, "left alone: not started by bridge dev")
        return _status(redis_port, False, "not running")
    log(f"redis: stopping pid {pid}")
    started = time.monotonic()
    # SIGTERM is Redis's SHUTDOWN: the append-only file is flushed and the pid file removed.
    terminate(pid, str(layout.conf), timeout_s=STOP_TIMEOUT_S)
    return _status(redis_port, False, f"stopped in {time.monotonic() - started:.1f}s")


def status() -> ServiceStatus:
    """Whether Redis answers PING on the port, without changing anything."""
    redis_port = port()
    if _pong(redis_port):
        return _status(redis_port, True, "up")
    layout = _layout(redis_port)
    pid = _our_pid(layout)
    if pid is not None:
        return _status(redis_port, False, f"pid {pid} does not answer yet; see {layout.log_file}")
    return _status(redis_port, False, "not running")


def _ensure_installed(log: Log) -> str:
    """Path of redis-server, installing the Debian package first if needed."""
    server = find_program("redis-server")
    if server is None:
        if not is_root():
            raise DevError(
                "Redis is not installed: run `sudo apt-get install redis-server`"
                " (or start Redis yourself and set BRIDGE_IDEMPOTENCY)"
            )
        apt_install(["redis-server"], log)
        _disable_debian_service(log)
        server = find_program("redis-server")
        if server is None:
            raise DevError("redis-server is missing: run `sudo apt-get install --reinstall redis-server`")
    return server


def _disable_debian_service(log: Log) -> None:
    """Stop the service the package just enabled, and keep it from starting at boot.

    Where an init system runs, the package starts its own server on 127.0.0.1:6379 (with
    Debian's configuration: no append-only file) and ours could not take the port. Both tools
    work with systemd and without; each may find nothing to do.
    """
    log("redis: disabling Debian's redis-server service (bridge dev runs its own server)")
    run(["update-rc.d", "redis-server", "disable"], timeout_s=60)
    run(["invoke-rc.d", "redis-server", "stop"], timeout_s=60)


def _require_free(redis_port: int) -> None:
    if port_accepts(redis_port):
        raise DevError(
            f"port {redis_port} is in use by another program (not a Redis server); stop it or set {PORT_VAR}"
        )


def _start(server: str, layout: _Layout, redis_port: int, log: Log) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    settings = redis_conf(redis_port, layout.root)
    layout.conf.write_text(
        "".join(["# written by `bridge dev up`\n", *(f"{k} {_quote(v)}\n" for k, v in settings.items())])
    )
    # A pid file left by a killed server would name a pid that may be reused by now.
    layout.pid_file.unlink(missing_ok=True)
    log(f"redis: starting on 127.0.0.1:{redis_port} (log {layout.log_file})")
    # The configuration is checked before the server forks into the background, so a bad one
    # fails here; the background server writes its pid file once it listens.
    result = run([server, str(layout.conf)], timeout_s=30)
    if result.returncode != 0:
        raise DevError(f"`redis-server {layout.conf}` failed: {last_line(result)}")


def _quote(value: str) -> str:
    # Redis reads double-quoted values with backslash escapes: keep paths with spaces intact.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wait_ready(redis_port: int, layout: _Layout) -> None:
    def ready() -> bool:
        if _pong(redis_port):
            return True
        pid = _pid_in_file(layout)
        if pid is not None and str(layout.conf) not in process_cmdline(pid):
            raise DevError(f"Redis exited while starting; see {layout.log_file}: {tail(layout.log_file)}")
        return False

    if not wait_for(ready, timeout_s=START_TIMEOUT_S, every_s=0.1):
        raise DevError(
            f"Redis did not answer PING on 127.0.0.1:{redis_port} within {START_TIMEOUT_S:.0f}s;"
            f" see {layout.log_file}: {tail(layout.log_file)}"
        )


def _pong(redis_port: int, timeout_s: float = 2.0) -> bool:
    """True when a Redis server answers PING with PONG on the port."""
    try:
        with socket.create_connection(("127.0.0.1", redis_port), timeout=timeout_s) as sock:
            sock.sendall(_PING)
            reply = _read(sock, len(_PONG))
    except OSError:
        return False
    return reply == _PONG


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _our_pid(layout: _Layout) -> int | None:
    """The pid in the pid file, if that process is still our server."""
    pid = _pid_in_file(layout)
    return pid if pid is not None and str(layout.conf) in process_cmdline(pid) else None


def _pid_in_file(layout: _Layout) -> int | None:
    # None too while the server is still writing the file.
    try:
        return int(layout.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _layout(redis_port: int) -> _Layout:
    # One folder per port, so a second server on another port never shares files.
    name = "redis" if redis_port == DEFAULT_PORT else f"redis-{redis_port}"
    return _Layout(data_root() / "dev" / name)


def _url(redis_port: int) -> str:
    return f"redis://127.0.0.1:{redis_port}/0"


def _status(redis_port: int, running: bool, detail: str) -> ServiceStatus:
    return ServiceStatus("redis", _url(redis_port), running, detail)
