"""RabbitMQ from Debian's `rabbitmq-server` package, configured for loopback only.

Debian's wrappers run the server and `rabbitmqctl` as the `rabbitmq` user when called by root,
so everything here that changes the node needs root.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Final

from bridge.dev._common import ServiceStatus, data_root, env_port, is_root
from bridge.dev._proc import Log, apt_install, file_lock, find_program, last_line, port_accepts, run, wait_for
from bridge.errors import DevError

DEFAULT_PORT: Final = 5672
MANAGEMENT_PORT: Final = 15672
PORT_VAR: Final = "BRIDGE_DEV_AMQP_PORT"
START_TIMEOUT_S: Final = 90.0
CONF_DIR: Final = Path("/etc/rabbitmq")
# Every quorum queue holds files open (about three each here). With the shell's usual limit of
# 1,024, a node holding some 300 queues (a test run makes more) stopped accepting connections,
# and `rabbitmqctl` hung. Debian's systemd unit gives it 65,536, as RabbitMQ advises (see
# `_ENV_CONF`). `up` restarts a node that an older `up` configured without it.
OPEN_FILES: Final = 65536

# The node is named rabbit@localhost and its Erlang ports (epmd 4369, distribution 25672)
# are bound to loopback too: with the default rabbit@<hostname>, a host whose name resolves
# to 127.0.1.1 (Debian's habit) could not reach a loopback-only node.
_ENV_CONF = f"""\
# written by `bridge dev up`
NODENAME=rabbit@localhost
ERL_EPMD_ADDRESS=127.0.0.1
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {{127,0,0,1}}"
CTL_ERL_ARGS="-kernel inet_dist_use_interface {{127,0,0,1}}"
# Room for every quorum queue's open files (OPEN_FILES in bridge/dev/rabbitmq.py); where the
# hard limit is lower and may not be raised, up to it. Here, after Debian's `su rabbitmq`,
# whose pam_limits resets the limit `up`'s own process would pass on.
ulimit -n {OPEN_FILES} 2>/dev/null || ulimit -n "$(ulimit -Hn)"
"""

# AMQP 0-9-1 protocol header; a broker answers it with a Connection.Start method frame.
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
_CONNECTION_START = b"\x00\x0a\x00\x0a"


def port() -> int:
    """The AMQP port."""
    return env_port(PORT_VAR, DEFAULT_PORT)


def url() -> str:
    """The broker URL bridge takes in BRIDGE_BROKER."""
    return f"amqp://guest:guest@127.0.0.1:{port()}/"


def rabbitmq_conf(amqp_port: int) -> str:
    """The contents of /etc/rabbitmq/rabbitmq.conf for a loopback-only node."""
    return "\n".join(
        [
            "# written by `bridge dev up`",
            f"listeners.tcp.default = 127.0.0.1:{amqp_port}",
            "management.tcp.ip = 127.0.0.1",
            f"management.tcp.port = {MANAGEMENT_PORT}",
            "loopback_users.guest = true",
            "",
        ]
    )


def up(log: Log = print) -> ServiceStatus:
    """Install, configure and start RabbitMQ unless a broker already answers on the port; a
    node an older `up` configured is restarted with this one's configuration."""
    amqp_port = port()
    if _speaks_amqp(amqp_port) and not _outdated(amqp_port):
        return _status(amqp_port, True, "already up")
    # One `up` at a time (`make test` runs four test sessions, each starting what is down): the
    # second finds the node the first started.
    with file_lock(data_root() / "dev" / "rabbitmq.lock", timeout_s=900, log=log):
        if _speaks_amqp(amqp_port) and not _outdated(amqp_port):
            return _status(amqp_port, True, "already up")
        return _start_node(amqp_port, log)


def _outdated(amqp_port: int) -> bool:
    """Whether the node is ours, but configured by an older `up` (one that started it without
    room for its open files, say), and may be restarted (as root) to apply this one's."""
    if not (_our_config(amqp_port) and is_root()):
        return False
    return any(not path.is_file() or path.read_text() != text for path, text in _config(amqp_port).items())


def _start_node(amqp_port: int, log: Log) -> ServiceStatus:
    """Install, configure and start the node (under `up`'s lock)."""
    if port_accepts(amqp_port) and not _our_busy_node(amqp_port):
        raise DevError(
            f"port {amqp_port} is in use by another program (not an AMQP broker); stop it or set {PORT_VAR}"
        )
    started = time.monotonic()
    ctl = _ensure_installed(amqp_port, log)
    _require_root()
    changed = _write_config(amqp_port)
    _enable_management(log)
    running = _node_running(ctl)
    if running and changed:
        log("rabbitmq: restarting the node to apply the new configuration")
        _shutdown(ctl)
    if running and not changed:
        log("rabbitmq: the node runs but does not answer AMQP yet; waiting for it")
    else:
        log(f"rabbitmq: starting on 127.0.0.1:{amqp_port} (logs in /var/log/rabbitmq)")
        _start(ctl)
    _wait_ready(ctl, amqp_port)
    return _status(amqp_port, True, f"started in {time.monotonic() - started:.1f}s")


def down(log: Log = print) -> ServiceStatus:
    """Stop the node `up` configured (as root); a node configured some other way is left alone."""
    amqp_port = port()
    ctl = find_program("rabbitmqctl")
    ours = _our_config(amqp_port)
    if ours and ctl is not None and is_root() and _node_running(ctl):
        log("rabbitmq: stopping")
        started = time.monotonic()
        _shutdown(ctl)
        return _status(amqp_port, False, f"stopped in {time.monotonic() - started:.1f}s")
    if not _speaks_amqp(amqp_port):
        return _status(amqp_port, False, "not running")
    if ours and not is_root():
        return _status(amqp_port, True, "left alone: stopping it needs root (`sudo bridge dev down`)")
    return _status(amqp_port, True, "left alone: not started by bridge dev")


def status() -> ServiceStatus:
    """Whether an AMQP broker answers on the port, without changing anything."""
    amqp_port = port()
    running = _speaks_amqp(amqp_port)
    return _status(amqp_port, running, "up" if running else "not running")


def _require_root() -> None:
    if not is_root():
        raise DevError(
            "starting rabbitmq-server needs root: run `sudo bridge dev up`"
            " (or start RabbitMQ yourself and set BRIDGE_BROKER)"
        )


def _ensure_installed(amqp_port: int, log: Log) -> str:
    """Path of rabbitmqctl, installing the Debian package first if needed."""
    if find_program("rabbitmq-server") is None:
        if not is_root():
            raise DevError(
                "rabbitmq-server is not installed: run `sudo apt-get install rabbitmq-server`"
                " (or start RabbitMQ yourself and set BRIDGE_BROKER)"
            )
        # Configured first: where the init system starts the service on install,
        # it then starts bound to loopback.
        _write_config(amqp_port)
        apt_install(["rabbitmq-server"], log)
    ctl = find_program("rabbitmqctl")
    if ctl is None:
        raise DevError("rabbitmqctl is missing: run `sudo apt-get install --reinstall rabbitmq-server`")
    return ctl


def _our_busy_node(amqp_port: int) -> bool:
    """Whether the port belongs to the node configured here, running but slow to answer AMQP.

    A busy node can take seconds to answer the protocol header; it is ours only if our
    configuration already names this port (a node on another port must not be restarted).
    """
    ctl = find_program("rabbitmqctl")
    return _our_config(amqp_port) and ctl is not None and _node_running(ctl)


def _our_config(amqp_port: int) -> bool:
    """Whether /etc/rabbitmq holds the configuration `up` writes for this port.

    The node has no pid file or data folder of ours: it is Debian's, started with Debian's
    wrappers, and the node `rabbitmqctl` reaches is the one these files configure. A user's
    own RabbitMQ has files of its own, and must not be stopped.
    """
    try:
        return (CONF_DIR / "rabbitmq.conf").read_text() == rabbitmq_conf(amqp_port)
    except OSError:  # missing, or not readable without root
        return False


def _write_config(amqp_port: int) -> bool:
    """Write the configuration files; True when one changed."""
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    changed = False
    for path, text in _config(amqp_port).items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            changed = True
    return changed


def _config(amqp_port: int) -> dict[Path, str]:
    """The configuration files `up` writes, and their contents."""
    return {CONF_DIR / "rabbitmq.conf": rabbitmq_conf(amqp_port), CONF_DIR / "rabbitmq-env.conf": _ENV_CONF}


def _enable_management(log: Log) -> None:
    enabled = CONF_DIR / "enabled_plugins"
    if enabled.is_file() and "rabbitmq_management" in enabled.read_text():
        return
    plugins = find_program("rabbitmq-plugins") or "rabbitmq-plugins"
    log("rabbitmq: enabling the management plugin")
    result = run([plugins, "enable", "--offline", "rabbitmq_management"], timeout_s=60)
    if result.returncode != 0:
        raise DevError(f"`rabbitmq-plugins enable rabbitmq_management` failed: {last_line(result)}")


def _start(ctl: str) -> None:
    server = str(Path(ctl).with_name("rabbitmq-server"))
    result = run([server, "-detached"], timeout_s=60)
    if result.returncode != 0:
        raise DevError(f"`rabbitmq-server -detached` failed: {last_line(result)}; see /var/log/rabbitmq")


def _wait_ready(ctl: str, amqp_port: int) -> None:
    # await_startup fails at once while the node has not registered with epmd yet, so retry it.
    def booted() -> bool:
        return run([ctl, "-q", "await_startup", "--timeout", "10"], timeout_s=20).returncode == 0

    deadline = time.monotonic() + START_TIMEOUT_S
    if not wait_for(booted, timeout_s=START_TIMEOUT_S, every_s=1.0):
        raise DevError(f"RabbitMQ did not start within {START_TIMEOUT_S:.0f}s; see /var/log/rabbitmq")
    left = max(deadline - time.monotonic(), 5.0)
    if not wait_for(lambda: _speaks_amqp(amqp_port), timeout_s=left):
        raise DevError(
            f"RabbitMQ started but does not answer AMQP on 127.0.0.1:{amqp_port};"
            " see /etc/rabbitmq/rabbitmq.conf and /var/log/rabbitmq"
        )


def _node_running(ctl: str) -> bool:
    return run([ctl, "-q", "ping"], timeout_s=30).returncode == 0


def _shutdown(ctl: str) -> None:
    result = run([ctl, "-q", "shutdown"], timeout_s=120)
    if result.returncode != 0 and _node_running(ctl):
        raise DevError(f"`rabbitmqctl shutdown` failed: {last_line(result)}")


def _speaks_amqp(amqp_port: int, timeout_s: float = 2.0) -> bool:
    """True when an AMQP 0-9-1 broker answers the protocol header on the port."""
    try:
        with socket.create_connection(("127.0.0.1", amqp_port), timeout=timeout_s) as sock:
            sock.sendall(_AMQP_HEADER)
            reply = _read(sock, 11)
    except OSError:
        return False
    # Frame type 1 (method) on channel 0, then class 10 method 10 after the 4-byte size.
    return reply[:3] == b"\x01\x00\x00" and reply[7:11] == _CONNECTION_START


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _status(amqp_port: int, running: bool, detail: str) -> ServiceStatus:
    return ServiceStatus("rabbitmq", f"amqp://guest:guest@127.0.0.1:{amqp_port}/", running, detail)
