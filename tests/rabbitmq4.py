"""A RabbitMQ 4 beside the local RabbitMQ 3.10, for `make pytest-rabbitmq4`.

    python -m tests.rabbitmq4 up | down | ctl ARGS... | pytest ARGS...

Debian 12, which this machine runs, packages RabbitMQ 3.10.8; Debian 13 (trixie) packages 4.0.5,
whose Erlang 27 needs a newer C library than Debian 12's. So RabbitMQ 4 runs in a chroot of a
minimal Debian 13 made with debootstrap from the same Debian mirror, on its own ports, all bound
to loopback: AMQP 5673, HTTP API 15673, Erlang distribution 25673 and epmd 4370. RabbitMQ 4
changed what services see (quorum queues drop a message that comes back a 21st time), so the
RabbitMQ tests run on both. Building the chroot takes about a minute here, once; it is kept in
bridge's data folder. Needs root (chroot, mount), as `bridge dev up` does for RabbitMQ 3.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from bridge.dev._common import data_root, is_root
from bridge.dev._proc import apt_install, find_program, last_line, run, wait_for
from bridge.dev.rabbitmq import OPEN_FILES, _speaks_amqp
from bridge.errors import DevError

ROOT = data_root() / "rabbitmq4"
MIRROR = "http://deb.debian.org/debian"
SUITE = "trixie"
AMQP_PORT, API_PORT = 5673, 15673
URL = f"amqp://guest:guest@127.0.0.1:{AMQP_PORT}/"
API = f"http://127.0.0.1:{API_PORT}/api"
START_TIMEOUT_S = 90.0
# For every RabbitMQ command in the chroot: the node, and its epmd apart from the local one's.
ENV = {
    "HOME": "/var/lib/rabbitmq",
    "ERL_EPMD_PORT": "4370",
    "ERL_EPMD_ADDRESS": "127.0.0.1",
    "RABBITMQ_NODENAME": "rabbit4@localhost",
}
CONFIG = {
    "etc/rabbitmq/rabbitmq.conf": f"""\
listeners.tcp.default = 127.0.0.1:{AMQP_PORT}
management.tcp.ip = 127.0.0.1
management.tcp.port = {API_PORT}
""",
    # Room for every quorum queue's open files, as `bridge dev up` gives RabbitMQ 3 (see OPEN_FILES).
    "etc/rabbitmq/rabbitmq-env.conf": f"""\
DIST_PORT=25673
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {{127,0,0,1}}"
CTL_ERL_ARGS="-kernel inet_dist_use_interface {{127,0,0,1}}"
ulimit -n {OPEN_FILES} 2>/dev/null || ulimit -n "$(ulimit -Hn)"
""",
    "etc/rabbitmq/enabled_plugins": "[rabbitmq_management].\n",
}


def up() -> None:
    """Build the chroot if it is not there, and start RabbitMQ 4 in it unless it answers with
    this configuration (one an older `up` started, it restarts)."""
    if _speaks_amqp(AMQP_PORT) and (_configured() or not is_root()):
        return
    if not is_root():
        raise DevError("RabbitMQ 4 runs in a chroot, which needs root: run it with sudo")
    if _speaks_amqp(AMQP_PORT):
        print("rabbitmq4: restarting RabbitMQ 4 with a new configuration")
        down()
    if not (ROOT / "usr/sbin/rabbitmq-server").exists():
        _build()
    for path, text in CONFIG.items():
        (ROOT / path).write_text(text)
    _mount_proc(ROOT)
    started = _in_root(["rabbitmq-server", "-detached"], timeout_s=60)
    if started.returncode != 0:
        raise DevError(f"RabbitMQ 4 did not start: {last_line(started)}; see {ROOT}/var/log/rabbitmq")
    if not wait_for(lambda: _speaks_amqp(AMQP_PORT), timeout_s=START_TIMEOUT_S, every_s=1.0):
        raise DevError(
            f"RabbitMQ 4 did not answer within {START_TIMEOUT_S:.0f} s; see {ROOT}/var/log/rabbitmq"
        )
    booted = _in_root(["rabbitmqctl", "-q", "await_startup", "--timeout", "60"], timeout_s=90)
    if booted.returncode != 0:  # (the HTTP API starts with the node's plugins, after AMQP)
        raise DevError(f"RabbitMQ 4 did not finish starting: {last_line(booted)}")


def _configured() -> bool:
    """Whether the chroot's configuration files hold CONFIG."""
    return all((ROOT / path).is_file() and (ROOT / path).read_text() == text for path, text in CONFIG.items())


def down() -> None:
    """Stop RabbitMQ 4 and unmount its chroot's /proc."""
    if not ROOT.exists():
        return
    if _speaks_amqp(AMQP_PORT):
        _in_root(["rabbitmqctl", "-q", "shutdown"], timeout_s=120)
    _in_root(["epmd", "-kill"], timeout_s=30)
    if _mounted(ROOT / "proc"):
        run(["umount", str(ROOT / "proc")], timeout_s=30)


def ctl(args: list[str]) -> None:
    """`rabbitmqctl ARGS` on RabbitMQ 4 (replaces this process)."""
    env = [f"{name}={value}" for name, value in ENV.items()]
    os.execvp("chroot", ["chroot", str(ROOT), "env", *env, "rabbitmqctl", *args])


def pytest(args: list[str]) -> None:
    """`pytest ARGS` with RabbitMQ 4 as the tests' RabbitMQ (replaces this process)."""
    env = {
        **os.environ,
        "BRIDGE_TEST_RABBITMQ": URL,
        "BRIDGE_TEST_RABBITMQ_API": API,
        "BRIDGE_TEST_RABBITMQCTL": f"{sys.executable} -m tests.rabbitmq4 ctl",
    }
    os.execve(sys.executable, [sys.executable, "-m", "pytest", *args], env)


def _build() -> None:
    """Debian 13 with rabbitmq-server, in a folder that becomes ROOT only once complete."""
    print(f"rabbitmq4: building a Debian {SUITE} chroot with rabbitmq-server in {ROOT} (once)")
    if find_program("debootstrap") is None:
        apt_install(["debootstrap"], print)
    partial = ROOT.with_name(ROOT.name + ".partial")
    if _mounted(partial / "proc"):
        run(["umount", str(partial / "proc")], timeout_s=30)
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    made = run(["debootstrap", "--variant=minbase", SUITE, str(partial), MIRROR], timeout_s=1200)
    if made.returncode != 0:
        raise DevError(f"debootstrap of Debian {SUITE} failed: {last_line(made)}")
    shutil.copy("/etc/resolv.conf", partial / "etc/resolv.conf")
    # No service may start while packages install: a node on the default port would meet the local one.
    policy = partial / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    _mount_proc(partial)
    try:
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "rabbitmq-server"]):
            done = _in_root(argv, timeout_s=900, root=partial, env={"DEBIAN_FRONTEND": "noninteractive"})
            if done.returncode != 0:
                raise DevError(f"`{' '.join(argv)}` in the Debian {SUITE} chroot failed: {last_line(done)}")
    finally:
        run(["umount", str(partial / "proc")], timeout_s=30)
    partial.rename(ROOT)


def _in_root(
    argv: list[str], *, timeout_s: float, root: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside the chroot at `root`, with ENV (and `env`)."""
    values = [f"{name}={value}" for name, value in {**ENV, **(env or {})}.items()]
    return run(["chroot", str(root), "env", *values, *argv], timeout_s=timeout_s)


def _mount_proc(root: Path) -> None:
    if not _mounted(root / "proc"):
        mounted = run(["mount", "-t", "proc", "proc", str(root / "proc")], timeout_s=30)
        if mounted.returncode != 0:
            raise DevError(f"could not mount /proc in {root}: {last_line(mounted)}")


def _mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


def main(argv: list[str]) -> int:
    command, *args = argv or ["up"]
    if command == "ctl":
        ctl(args)
    if command not in ("up", "down", "pytest"):
        print("usage: python -m tests.rabbitmq4 up | down | ctl ARGS... | pytest ARGS...", file=sys.stderr)
        return 2
    try:
        if command == "down":
            down()
        else:
            up()
    except DevError as exc:
        print(f"rabbitmq4: {exc}", file=sys.stderr)
        return 1
    if command == "pytest":
        pytest(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
