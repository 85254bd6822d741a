"""PostgreSQL from Debian's `postgresql` package: a cluster of our own, on loopback only.

Not Debian's `main` cluster: ours has its own folder, its own socket folder (Debian's,
/var/run/postgresql, is made at boot and may be missing) and the `bridge` role and database
of `url()`. The server refuses to run as root, so as root it runs as Debian's `postgres` user;
otherwise it runs as the caller, from the same programs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import struct
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
    wait_for,
)
from bridge.errors import DevError

DEFAULT_PORT: Final = 5432
PORT_VAR: Final = "BRIDGE_DEV_PG_PORT"
START_TIMEOUT_S: Final = 60.0
# How long `up` waits for the processes of a server that was killed to let go of its shared
# memory (`_wait_for_old_backends`): they exit within a second of finding it gone.
BACKENDS_GONE_S: Final = 10.0
STOP_TIMEOUT_S: Final = 60.0

# The login of url(); docker-compose.yml sets the same (a test compares them).
USER: Final = "bridge"
PASSWORD: Final = "bridge"
DATABASE: Final = "bridge"
# UTF-8 whatever the machine's locale, and the C collation: text sorts by bytes everywhere.
INITDB_ARGS: Final = ("--encoding=UTF8", "--locale=C")

SERVER_USER: Final = "postgres"
# Where root's clusters go when the postgres user cannot reach root's data folder.
SYSTEM_DATA_ROOT: Final = Path("/var/lib/bridge")
DEBIAN_CONF: Final = Path("/etc/postgresql")
# Debian installs each major version's programs in a folder of its own: <PG_LIB>/<major>/bin.
PG_LIB: Final = Path("/usr/lib/postgresql")

# SSLRequest: a PostgreSQL server answers it with one byte, S or N, before any login.
_SSL_REQUEST: Final = struct.pack("!ii", 8, 80877103)

_MANUAL_START = """\
# Set to manual by `bridge dev up`: bridge's own cluster uses this port. Set it back to
# auto only after moving one of them to another port.
#   auto: automatically start the cluster
#   manual: manual startup with pg_ctlcluster/postgresql@.service only
#   disabled: refuse to start cluster
manual
"""


@dataclass(frozen=True)
class _Layout:
    """Where our cluster keeps its files; data, run and logs belong to the server's user."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs / "postgres.log"

    @property
    def setup_sql(self) -> Path:
        return self.root / "setup.sql"


@dataclass(frozen=True)
class _DebianCluster:
    version: str
    name: str
    online: bool

    def __str__(self) -> str:
        return f"{self.version}/{self.name}"


def port() -> int:
    """The PostgreSQL port."""
    return env_port(PORT_VAR, DEFAULT_PORT)


def url() -> str:
    """The database URL bridge takes in BRIDGE_IDEMPOTENCY."""
    return _url(port())


def postgresql_conf(pg_port: int, socket_dir: Path) -> dict[str, str]:
    """The whole of our postgresql.conf; every other setting keeps PostgreSQL's default."""
    return {
        "listen_addresses": "127.0.0.1",
        "port": str(pg_port),
        "unix_socket_directories": str(socket_dir),
        "password_encryption": "scram-sha-256",
        "timezone": "UTC",
    }


def pg_hba_conf() -> str:
    """Who may log in how: the server's own user on our socket, everyone else with a password."""
    return "\n".join(
        [
            "# written by `bridge dev up`",
            "local all all peer",
            "host all all 127.0.0.1/32 scram-sha-256",
            "",
        ]
    )


def up(log: Log = print) -> ServiceStatus:
    """Install PostgreSQL and start our cluster unless the bridge login already works."""
    pg_port = port()
    if _speaks_postgres(pg_port):
        if _login_works(pg_port):
            return _status(pg_port, True, "already up")
    elif port_accepts(pg_port):
        # Ours answers the protocol as soon as it listens, even while it recovers.
        raise _port_taken(pg_port, "another program (not a PostgreSQL server)")
    started = time.monotonic()
    # One `up` at a time, from the install on (`make test` runs four test sessions, each starting
    # what is down): the package's programs are there before its postinst has made the postgres
    # user and Debian's cluster, and another `up`'s server answers before its login exists, and
    # would pass for a stranger's. So the port is looked at again only under the lock.
    with file_lock(_lock_file(pg_port), timeout_s=900, log=log):
        if _answers(pg_port):
            return _status(pg_port, True, "already up")
        newest = _ensure_installed(log)  # (first: _layout, as root, asks the postgres user it makes)
        layout = _layout(pg_port)
        bin_dir = _cluster_bin_dir(layout) or newest
        pid = _our_pid(layout)
        if pid is None:
            _make_room(pg_port, log)
            _start(layout, bin_dir, pg_port, log)
        else:
            _wait_until_accepting(layout, bin_dir, pg_port, pid, log)
        _create_login(layout, bin_dir, pg_port)
        if not wait_for(lambda: _answers(pg_port), timeout_s=20):
            raise DevError(
                f"PostgreSQL runs but the bridge login fails on 127.0.0.1:{pg_port}; see {layout.log_file}"
            )
    return _status(pg_port, True, f"started in {time.monotonic() - started:.1f}s")


def down(log: Log = print) -> ServiceStatus:
    """Stop the cluster `up` started (fast: open sessions are ended); its data is kept."""
    pg_port = port()
    layout = _layout(pg_port)
    pid = _our_pid(layout)
    if pid is None:
        if _speaks_postgres(pg_port):
            return _status(pg_port, True, "left alone: not started by bridge dev")
        return _status(pg_port, False, "not running")
    bin_dir = _cluster_bin_dir(layout)  # (a running cluster has its PG_VERSION)
    pg_ctl = _newest("pg_ctl") if bin_dir is None else bin_dir / "pg_ctl"
    if pg_ctl is None:
        raise DevError(f"pg_ctl is missing, so pid {pid} cannot be stopped: reinstall postgresql")
    log(f"postgres: stopping pid {pid}")
    started = time.monotonic()
    argv = [str(pg_ctl), "stop", "-D", str(layout.data), "-m", "fast", "-s", "-t", f"{STOP_TIMEOUT_S:.0f}"]
    result = run(_as_server(argv), timeout_s=STOP_TIMEOUT_S + 30)
    if result.returncode != 0 and _our_pid(layout) is not None:
        raise DevError(f"`pg_ctl stop` failed: {last_line(result)}")
    return _status(pg_port, False, f"stopped in {time.monotonic() - started:.1f}s")


def status() -> ServiceStatus:
    """Whether the bridge login works on the port, without changing anything."""
    pg_port = port()
    if _speaks_postgres(pg_port):
        if _login_works(pg_port):
            return _status(pg_port, True, "up")
        return _status(pg_port, False, "a PostgreSQL server answers but the bridge login fails")
    layout = _layout(pg_port)
    pid = _our_pid(layout)
    if pid is not None:
        return _status(pg_port, False, f"pid {pid} does not answer yet; see {layout.log_file}")
    return _status(pg_port, False, "not running")


def _ensure_installed(log: Log) -> Path:
    """The folder of the newest PostgreSQL server programs, installing Debian's package if needed."""
    pg_ctl = _newest("pg_ctl")
    if pg_ctl is None:
        if not is_root():
            raise DevError(
                "PostgreSQL is not installed: run `sudo apt-get install postgresql`"
                " (or start PostgreSQL yourself and set BRIDGE_IDEMPOTENCY)"
            )
        apt_install(["postgresql"], log)
        pg_ctl = _newest("pg_ctl")
        if pg_ctl is None:
            raise DevError("pg_ctl is missing: run `sudo apt-get install --reinstall postgresql`")
    return pg_ctl.parent


def _cluster_bin_dir(layout: _Layout) -> Path | None:
    """The programs of our cluster's major version, None while there is no cluster.

    Not the newest installed: a server refuses a data folder of another major version.
    """
    try:
        major = (layout.data / "PG_VERSION").read_text().strip()
    except OSError:
        return None
    bin_dir = PG_LIB / major / "bin"
    if not (bin_dir / "pg_ctl").is_file():
        raise DevError(
            f"the cluster in {layout.data} is PostgreSQL {major}, whose programs are not installed:"
            f" run `sudo apt-get install postgresql-{major}`"
        )
    return bin_dir


def _newest(program: str) -> Path | None:
    """A program of the newest PostgreSQL version installed (Debian keeps each in its own folder)."""
    found = [path for path in PG_LIB.glob(f"*/bin/{program}") if _version(path)]
    return max(found, key=_version, default=None)


def _version(program: Path) -> int:
    major = program.parent.parent.name
    return int(major) if major.isdigit() else 0


def _make_room(pg_port: int, log: Log) -> None:
    """Take Debian's own clusters off our port; anything else holding it is an error."""
    for cluster in _debian_clusters(pg_port):
        _retire(cluster, pg_port, log)
    if _speaks_postgres(pg_port):
        raise _port_taken(pg_port, "another PostgreSQL server, where the bridge login fails")
    if port_accepts(pg_port):
        raise _port_taken(pg_port, "another program (not a PostgreSQL server)")


def _port_taken(pg_port: int, by: str) -> DevError:
    return DevError(f"port {pg_port} is in use by {by}; stop it or set {PORT_VAR}")


def _debian_clusters(pg_port: int) -> list[_DebianCluster]:
    """Debian's clusters (pg_createcluster's, like the package's `main`) set to our port."""
    lsclusters = find_program("pg_lsclusters")
    if lsclusters is None:
        return []
    result = run([lsclusters, "--no-header"], timeout_s=30)
    # Ver Cluster Port Status Owner Data-directory Log-file
    rows = [line.split() for line in result.stdout.splitlines()]
    return [
        _DebianCluster(row[0], row[1], row[3].startswith("online"))
        for row in rows
        if len(row) >= 4 and row[2] == str(pg_port)
    ]


def _retire(cluster: _DebianCluster, pg_port: int, log: Log) -> None:
    """Stop a Debian cluster on our port and keep its init script from starting it again.

    The package makes a `main` cluster on 5432 and starts every cluster marked `auto` at boot
    (where an init system runs). Started first, it holds the port and ours cannot start;
    started after ours, it fails where `localhost` is only 127.0.0.1, but where `localhost`
    also names ::1 it takes [::1]:5432 and runs, and `localhost` URLs reach a server with no
    bridge role. Its data is kept; `pg_ctlcluster VERSION NAME start` runs it by hand.
    """
    if not is_root():
        if cluster.online:
            raise DevError(
                f"port {pg_port} is in use by Debian's PostgreSQL cluster {cluster}: stop it with"
                f" `sudo pg_ctlcluster {cluster.version} {cluster.name} stop`, or set {PORT_VAR}"
            )
        return
    start_conf = DEBIAN_CONF / cluster.version / cluster.name / "start.conf"
    if _start_mode(start_conf) == "auto":
        log(f"postgres: Debian's cluster {cluster} also uses port {pg_port}; making it start by hand only")
        start_conf.write_text(_MANUAL_START)
    if cluster.online:
        log(f"postgres: stopping Debian's cluster {cluster} (its data is kept) to free port {pg_port}")
        argv = [find_program("pg_ctlcluster") or "pg_ctlcluster", cluster.version, cluster.name, "stop"]
        result = run(argv, timeout_s=STOP_TIMEOUT_S + 30)
        if result.returncode != 0:
            raise DevError(f"`pg_ctlcluster {cluster.version} {cluster.name} stop`: {last_line(result)}")


def _start_mode(start_conf: Path) -> str:
    try:
        lines = start_conf.read_text().splitlines()
    except OSError:
        return "auto"  # what pg_ctlcluster assumes without the file
    settings = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return settings[-1] if settings else "auto"


def _start(layout: _Layout, bin_dir: Path, pg_port: int, log: Log) -> None:
    _make_folders(layout)
    if not (layout.data / "PG_VERSION").is_file():
        _initdb(layout, bin_dir, log)
    _write_config(layout, pg_port)
    _wait_for_old_backends(layout)
    _remove_stale_locks(layout, pg_port)
    log(f"postgres: starting on 127.0.0.1:{pg_port} (log {layout.log_file})")
    # -w: pg_ctl returns once the server accepts connections, or fails with its exit status.
    argv = [str(bin_dir / "pg_ctl"), "start", "-D", str(layout.data), "-l", str(layout.log_file), "-w", "-s"]
    result = run(_as_server([*argv, "-t", f"{START_TIMEOUT_S:.0f}"]), timeout_s=START_TIMEOUT_S + 30)
    if result.returncode != 0:
        detail = tail(layout.log_file) or last_line(result)
        raise DevError(f"PostgreSQL did not start; see {layout.log_file}: {detail}")


def _wait_until_accepting(layout: _Layout, bin_dir: Path, pg_port: int, pid: int, log: Log) -> None:
    """Wait, up to START_TIMEOUT_S, for a server of ours that runs but may not take connections
    yet: one recovering after an `up` or a host that was killed, started by another, say. (The
    login was made at once and failed: "the database system is starting up".)"""
    argv = [str(bin_dir / "pg_isready"), "-q", "-h", str(layout.socket_dir), "-p", str(pg_port)]
    if run(argv, timeout_s=30).returncode == 0:
        return
    log(f"postgres: waiting for pid {pid} to accept connections (log {layout.log_file})")
    if not wait_for(lambda: run(argv, timeout_s=30).returncode == 0, timeout_s=START_TIMEOUT_S):
        detail = tail(layout.log_file)
        raise DevError(
            f"PostgreSQL pid {pid} runs but took no connections in {START_TIMEOUT_S:.0f} s; "
            f"see {layout.log_file}: {detail}"
        )


def _wait_for_old_backends(layout: _Layout) -> None:
    """Wait, up to BACKENDS_GONE_S, for the processes of a killed server to let go of its shared
    memory segment (named in the postmaster.pid it left). Its backends exit by themselves once
    they find it gone, and one killed a moment ago may not have exited yet: until the last
    has, a new server refuses to start ("pre-existing shared memory block is still in use").
    One that lingers longer is left to that error, which says what to do."""
    segment = _segment(layout.data / "postmaster.pid")
    deadline = time.monotonic() + BACKENDS_GONE_S
    while segment is not None and _attached(segment) and time.monotonic() < deadline:
        time.sleep(0.05)


def _segment(pid_file: Path) -> int | None:
    """The id of the System V shared memory segment a postmaster.pid names (its seventh line:
    the key, then the id), if any."""
    try:
        fields = pid_file.read_text().splitlines()[6].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _attached(segment: int) -> bool:
    """Whether a process is still attached to System V shared memory segment `segment`."""
    try:
        rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    except OSError:
        return False  # (then pg_ctl finds out)
    # Columns: key shmid perms size cpid lpid nattch ...
    return any(int(row.split()[1]) == segment and int(row.split()[6]) > 0 for row in rows)


def _remove_stale_locks(layout: _Layout, pg_port: int) -> None:
    """Remove the lock files a killed server left; called only when none of ours runs.

    They name the dead server's pid, which stays a zombie until init reaps it (a container's
    init may never do so), and PostgreSQL takes a zombie for a live server and refuses to
    start. A backend of the dead server that lingers still stops the new one: that check is
    on the shared memory segment, keyed by the data folder, not on these files.
    """
    for lock in (layout.data / "postmaster.pid", layout.socket_dir / f".s.PGSQL.{pg_port}.lock"):
        lock.unlink(missing_ok=True)


def _make_folders(layout: _Layout) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    for folder in (layout.socket_dir, layout.logs):
        folder.mkdir(exist_ok=True)
        _give_to_server(folder)


def _initdb(layout: _Layout, bin_dir: Path, log: Log) -> None:
    log(f"postgres: creating a cluster in {layout.data}")
    # Made aside and renamed into place: an interrupted initdb never passes for a cluster.
    partial = layout.root / "data.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o700)
    _give_to_server(partial)
    argv = [str(bin_dir / "initdb"), "-D", str(partial), *INITDB_ARGS, "--no-instructions"]
    result = run(_as_server(argv), timeout_s=120)
    if result.returncode != 0:
        raise DevError(f"initdb in {partial} failed: {last_line(result)}")
    partial.rename(layout.data)


def _write_config(layout: _Layout, pg_port: int) -> None:
    settings = postgresql_conf(pg_port, layout.socket_dir)
    lines = [f"{key} = {_quote(value)}" for key, value in settings.items()]
    texts = {
        layout.data / "postgresql.conf": "\n".join(["# written by `bridge dev up`", *lines, ""]),
        layout.data / "pg_hba.conf": pg_hba_conf(),
    }
    for path, text in texts.items():
        path.write_text(text)
        _give_to_server(path)


def _quote(value: str) -> str:
    # postgresql.conf strings are single-quoted, a quote inside doubled: paths stay intact.
    return "'" + value.replace("'", "''") + "'"


def _create_login(layout: _Layout, bin_dir: Path, pg_port: int) -> None:
    """Make the role and database of url() if missing, and (re)set the role's password."""
    layout.setup_sql.write_text(_setup_sql())
    # Over our socket as the server's own user, the cluster's superuser (peer login).
    argv = [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(layout.socket_dir)]
    argv += ["-p", str(pg_port), "-U", _server_user(), "-d", "postgres", "-f", str(layout.setup_sql)]
    result = run(_as_server(argv), timeout_s=60)
    if result.returncode != 0:
        raise DevError(f"creating the {USER} role and database failed: {last_line(result)}")


def _setup_sql() -> str:
    # CREATE DATABASE cannot run inside a DO block, so psql's \gexec runs whichever is missing.
    return "\n".join(
        [
            "-- written by `bridge dev up`",
            f"SELECT 'CREATE ROLE {USER}' WHERE NOT EXISTS"
            f" (SELECT FROM pg_roles WHERE rolname = '{USER}') \\gexec",
            f"ALTER ROLE {USER} LOGIN PASSWORD '{PASSWORD}';",
            f"SELECT 'CREATE DATABASE {DATABASE} OWNER {USER}' WHERE NOT EXISTS"
            f" (SELECT FROM pg_database WHERE datname = '{DATABASE}') \\gexec",
            "",
        ]
    )


def _answers(pg_port: int) -> bool:
    """True when PostgreSQL answers on the port and the bridge login works."""
    return _speaks_postgres(pg_port) and _login_works(pg_port)


def _login_works(pg_port: int) -> bool:
    """Whether url() logs in; without psql (Docker only, say) a server that answers will do."""
    psql = _newest("psql")
    if psql is None:
        return True
    argv = [str(psql), "-X", "-q", "-At", "-h", "127.0.0.1", "-p", str(pg_port), "-U", USER, "-d", DATABASE]
    env = {"PGPASSWORD": PASSWORD, "PGCONNECT_TIMEOUT": "5"}
    return run([*argv, "-c", "SELECT 1"], timeout_s=15, env=env).returncode == 0


def _speaks_postgres(pg_port: int, timeout_s: float = 2.0) -> bool:
    """True when a PostgreSQL server answers an SSLRequest on the port (no login needed)."""
    try:
        with socket.create_connection(("127.0.0.1", pg_port), timeout=timeout_s) as sock:
            sock.sendall(_SSL_REQUEST)
            reply = sock.recv(1)
    except OSError:
        return False
    return reply in (b"S", b"N")


def _our_pid(layout: _Layout) -> int | None:
    """The postmaster's pid from its own pid file, if that process is still our server."""
    try:
        pid = int((layout.data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if str(layout.data) in process_cmdline(pid) else None


def _lock_file(pg_port: int) -> Path:
    # Not in _layout's folder, which, as root, is known only once the postgres user exists.
    return data_root() / "dev" / f"{_name(pg_port)}.lock"


def _layout(pg_port: int) -> _Layout:
    # One folder per port, so a second cluster on another port never shares files.
    name = _name(pg_port)
    folder = data_root() / "dev"
    if is_root() and not _server_can_reach(folder):
        # Root's home is private (0700 on Debian), and the server runs as postgres.
        folder = SYSTEM_DATA_ROOT / "dev"
    return _Layout(folder / name)


def _name(pg_port: int) -> str:
    return "postgres" if pg_port == DEFAULT_PORT else f"postgres-{pg_port}"


def _server_can_reach(folder: Path) -> bool:
    # The folders still to be made get mkdir's usual 0755; the deepest existing one decides.
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    probe = ["runuser", "-u", SERVER_USER, "--", "test", "-x", str(existing)]
    return run(probe, timeout_s=10).returncode == 0


def _as_server(argv: list[str]) -> list[str]:
    """The command run as the server's user: postgres when we are root, else ourselves."""
    return ["runuser", "-u", SERVER_USER, "--", *argv] if is_root() else argv


def _server_user() -> str:
    return SERVER_USER if is_root() else pwd.getpwuid(os.geteuid()).pw_name


def _give_to_server(path: Path) -> None:
    if is_root():
        owner = pwd.getpwnam(SERVER_USER)
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _url(pg_port: int) -> str:
    return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{pg_port}/{DATABASE}"


def _status(pg_port: int, running: bool, detail: str) -> ServiceStatus:
    return ServiceStatus("postgres", _url(pg_port), running, detail)
