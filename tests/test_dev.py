"""`bridge dev`: docker-compose.yml matches the native services; `up` is idempotent and never hangs.

`down` of the shared services is not tested here: other tests use them. The crash test runs
stores of its own, on other ports.
"""

from __future__ import annotations

import http.server
import importlib
import importlib.util
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from bridge import dev
from bridge.dev import _proc, apicurio, compose, kafka, postgres, rabbitmq, redis
from bridge.dev._common import ServiceStatus
from bridge.errors import DevError

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"

# Kafka settings that name addresses, and so differ between a container network and loopback.
ADDRESS_BOUND = {
    "KAFKA_LISTENERS",
    "KAFKA_ADVERTISED_LISTENERS",
    "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
    "KAFKA_CONTROLLER_QUORUM_VOTERS",
}


def quiet(_: str) -> None:
    """A `log` that drops progress lines."""


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return services


def env_name(setting: str) -> str:
    """The apache/kafka image's variable for a broker setting (`.` -> `_`, `_` -> `__`, `-` -> `___`)."""
    return "KAFKA_" + setting.upper().replace("_", "__").replace(".", "_").replace("-", "___")


def unset_defaults(value: str) -> str:
    """What compose makes of `${VAR:-default}` when VAR is not set."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def test_compose_kafka_has_exactly_the_native_settings() -> None:
    # Given the kafka service of docker-compose.yml
    env = compose_services()["kafka"]["environment"]
    # Then each shared setting has the native broker's value
    for setting, value in kafka.KAFKA_SETTINGS.items():
        assert env.get(env_name(setting)) == value, setting
    # And it sets nothing beyond them but the address-bound settings
    expected = {env_name(setting) for setting in kafka.KAFKA_SETTINGS} | ADDRESS_BOUND
    assert set(env) == expected


def test_compose_runs_the_native_kafka_version() -> None:
    assert compose_services()["kafka"]["image"] == f"apache/kafka:{kafka.KAFKA_VERSION}"


def test_compose_postgres_has_the_native_login() -> None:
    # Given the postgres service of docker-compose.yml
    env = compose_services()["postgres"]["environment"]
    # Then it makes the role, password and database of the native URL, with the same initdb options
    assert env == {
        "POSTGRES_USER": postgres.USER,
        "POSTGRES_PASSWORD": postgres.PASSWORD,
        "POSTGRES_DB": postgres.DATABASE,
        "POSTGRES_INITDB_ARGS": " ".join(postgres.INITDB_ARGS),
    }


def test_compose_redis_has_exactly_the_native_settings() -> None:
    # Given the redis service of docker-compose.yml
    command = compose_services()["redis"]["command"]
    # Then its flags are the native server's shared settings, and nothing else
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert flags == {f"--{setting}": value for setting, value in redis.REDIS_SETTINGS.items()}


def apicurio_env_name(setting: str) -> str:
    """The variable Quarkus reads for a property (`.` and `-` -> `_`, upper case)."""
    return setting.upper().replace(".", "_").replace("-", "_")


def test_compose_apicurio_has_exactly_the_native_settings() -> None:
    # Given the apicurio service of docker-compose.yml
    env = compose_services()["apicurio"]["environment"]
    # Then it sets the native registry's shared settings, and nothing else
    assert env == {apicurio_env_name(setting): value for setting, value in apicurio.APICURIO_SETTINGS.items()}


def test_the_apicurio_archive_unpacks_on_a_python_without_tar_filters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a Python without tarfile's filters (Debian 12's 3.11.2), Then the registry's archive
    # still unpacks, and one with a member that would land outside its folder is refused.
    # (extractall(filter=...) raised TypeError, and `make demo` failed at every run.)
    monkeypatch.delattr(tarfile, "data_filter")

    def archive(name: str) -> tarfile.TarFile:
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w:gz") as tar:
            member = tarfile.TarInfo(name)
            member.size = 3
            tar.addfile(member, io.BytesIO(b"jar"))
        data.seek(0)
        return tarfile.open(fileobj=data)

    apicurio._extract(archive("app/quarkus-run.jar"), tmp_path)
    assert (tmp_path / "app" / "quarkus-run.jar").read_bytes() == b"jar"
    with pytest.raises(DevError, match=re.escape("refusing '../outside' in the Apicurio Registry archive")):
        apicurio._extract(archive("../outside"), tmp_path / "app")


def test_compose_runs_the_native_apicurio_version() -> None:
    image = compose_services()["apicurio"]["image"]
    assert image == f"apicurio/apicurio-registry:{apicurio.APICURIO_VERSION}"


def test_compose_publishes_the_native_ports_on_loopback_only() -> None:
    # Given the services of docker-compose.yml, with no port overrides set
    services = compose_services()
    kafka_ports = [unset_defaults(port) for port in services["kafka"]["ports"]]
    rabbit_ports = [unset_defaults(port) for port in services["rabbitmq"]["ports"]]
    postgres_ports = [unset_defaults(port) for port in services["postgres"]["ports"]]
    redis_ports = [unset_defaults(port) for port in services["redis"]["ports"]]
    apicurio_ports = [unset_defaults(port) for port in services["apicurio"]["ports"]]
    advertised = unset_defaults(services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"])
    # Then they are published on 127.0.0.1 at the native ports
    assert kafka_ports == [f"127.0.0.1:{kafka.DEFAULT_PORT}:29092"]
    assert rabbit_ports == [
        f"127.0.0.1:{rabbitmq.DEFAULT_PORT}:5672",
        f"127.0.0.1:{rabbitmq.MANAGEMENT_PORT}:15672",
    ]
    assert postgres_ports == [f"127.0.0.1:{postgres.DEFAULT_PORT}:5432"]
    assert redis_ports == [f"127.0.0.1:{redis.DEFAULT_PORT}:6379"]
    assert apicurio_ports == [f"127.0.0.1:{apicurio.DEFAULT_PORT}:8080"]
    # And host clients are sent back to the published address, not to the container's
    assert f"HOST://127.0.0.1:{kafka.DEFAULT_PORT}" in advertised.split(",")


def test_native_kafka_listens_on_loopback_only() -> None:
    props = kafka.server_properties(kafka.DEFAULT_PORT, Path("/unused"))
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert kafka.KAFKA_SETTINGS.items() <= props.items()


def test_two_rabbitmq_ups_at_once_start_the_node_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given RabbitMQ down, and a node that takes a while to start (the steps that install,
    # configure and start it stand in for Debian's, which the shared node must not go through),
    # When two `up` runs begin at once (as `make test`'s test sessions may),
    # Then one starts the node, and the other waits for it and finds it up.
    monkeypatch.setenv("BRIDGE_DATA", str(tmp_path))  # (where the lock is)
    answers = threading.Event()
    starts: list[str] = []
    looked, both_looked = set[int](), threading.Barrier(2)

    def speaks_amqp(_: int) -> bool:
        up = answers.is_set()
        if threading.get_ident() not in looked:  # each `up` looks first outside the lock:
            looked.add(threading.get_ident())  # both find the node down before either goes on
            both_looked.wait(5)
        return up

    def start(ctl: str) -> None:
        starts.append(ctl)
        time.sleep(0.3)  # (the other `up` looks again meanwhile, or waits for the lock)

    for name, stand_in in {
        "_speaks_amqp": speaks_amqp,
        "port_accepts": lambda _: False,
        "_ensure_installed": lambda _, __: "rabbitmqctl",
        "_require_root": lambda: None,
        "_write_config": lambda _: False,
        "_enable_management": lambda _: None,
        "_node_running": lambda _: answers.is_set(),
        "_start": start,
        "_wait_ready": lambda _, __: answers.set(),
    }.items():
        monkeypatch.setattr(rabbitmq, name, stand_in)
    with ThreadPoolExecutor(2) as pool:
        details = sorted(s.detail.partition(" in ")[0] for s in pool.map(lambda _: rabbitmq.up(quiet), "ab"))
    assert starts == ["rabbitmqctl"]
    assert details == ["already up", "started"]


@pytest.mark.parametrize("service", [kafka, apicurio], ids=["kafka", "apicurio"])
def test_a_second_up_finds_the_first_s_jvm_answering(
    service: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given the service down, and a second `up` that begins while the first starts it and
    # cannot read the started process's command line (empty, as /proc once gave on a machine
    # under load), so does not know the process for its own (the steps that reach the JVM
    # stand in, as for RabbitMQ above),
    # When both run, Then the process starts once, and the second finds it answering. (The
    # second took the listening port for a stranger's: "port ... is in use by another program".)
    monkeypatch.setenv("BRIDGE_DATA", str(tmp_path))  # (where the lock is)
    listening, answering, second_waits = threading.Event(), threading.Event(), threading.Event()
    pool = ThreadPoolExecutor(1)
    seconds: list[Future[ServiceStatus]] = []

    def second_log(line: str) -> None:
        if line.startswith("waiting for another `bridge dev` run"):
            second_waits.set()

    def start(*_: Any) -> int:
        seconds.append(pool.submit(service.up, second_log))
        assert second_waits.wait(60), "the second `up` did not wait for the first's lock"
        listening.set()
        return 4242

    for name, stand_in in {
        "_our_pid": lambda _: None,
        "port_accepts": lambda _: listening.is_set(),
        "_answers": lambda *_, **__: answering.is_set(),
        "_start": start,
        "_wait_ready": lambda *_: answering.set(),
    }.items():
        monkeypatch.setattr(service, name, stand_in)
    with pool:
        started = service.up(quiet)
        second = seconds[0].result(timeout=60)
    assert started.detail.startswith("started in")
    assert second.running and second.detail == "already up"


def test_rabbitmq_up_restarts_a_node_an_older_up_configured_and_then_leaves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given, as root, a node that answers, configured by an older `up` (its rabbitmq-env.conf
    # without the open-files limit; stand-ins: the shared node must not restart),
    # When `up` runs, Then it writes this configuration and restarts the node with it;
    # And when `up` runs again, the node is left as it is.
    # (It was "already up", with 1,024 open files: too few for some 300 quorum queues.)
    monkeypatch.setenv("BRIDGE_DATA", str(tmp_path))  # (where the lock is)
    monkeypatch.setattr(rabbitmq, "CONF_DIR", tmp_path)
    (tmp_path / "rabbitmq.conf").write_text(rabbitmq.rabbitmq_conf(rabbitmq.port()))
    older = rabbitmq._ENV_CONF.partition("# Room for")[0]
    (tmp_path / "rabbitmq-env.conf").write_text(older)
    (tmp_path / "enabled_plugins").write_text("[rabbitmq_management].\n")
    steps: list[str] = []
    for name, stand_in in {
        "is_root": lambda: True,
        "find_program": lambda _: "rabbitmqctl",
        "_speaks_amqp": lambda _: True,
        "port_accepts": lambda _: True,
        "_node_running": lambda _: True,
        "_shutdown": lambda _: steps.append("shutdown"),
        "_start": lambda _: steps.append("start"),
        "_wait_ready": lambda _, __: None,
    }.items():
        monkeypatch.setattr(rabbitmq, name, stand_in)
    restarted = rabbitmq.up(quiet)
    assert (restarted.running, restarted.detail.partition(" in ")[0], steps) == (
        True,
        "started",
        ["shutdown", "start"],
    )
    assert (tmp_path / "rabbitmq-env.conf").read_text() == rabbitmq._ENV_CONF
    assert f"ulimit -n {rabbitmq.OPEN_FILES}" in rabbitmq._ENV_CONF
    left = rabbitmq.up(quiet)
    assert (left.detail, steps) == ("already up", ["shutdown", "start"])


def test_native_rabbitmq_listens_on_loopback_only() -> None:
    conf = rabbitmq.rabbitmq_conf(rabbitmq.DEFAULT_PORT)
    assert "listeners.tcp.default = 127.0.0.1:5672" in conf
    assert "management.tcp.ip = 127.0.0.1" in conf


def test_native_postgres_listens_on_loopback_only_and_asks_passwords() -> None:
    conf = postgres.postgresql_conf(postgres.DEFAULT_PORT, Path("/unused/run"))
    assert conf["listen_addresses"] == "127.0.0.1"
    assert conf["port"] == "5432"
    # Over TCP only 127.0.0.1 is let in, and only with a SCRAM password
    hba = [line.split() for line in postgres.pg_hba_conf().splitlines() if line and line[0] != "#"]
    tcp = [line for line in hba if line[0] == "host"]
    assert tcp == [["host", "all", "all", "127.0.0.1/32", "scram-sha-256"]]


def test_native_redis_listens_on_loopback_only() -> None:
    conf = redis.redis_conf(redis.DEFAULT_PORT, Path("/unused"))
    assert (conf["bind"], conf["port"], conf["protected-mode"]) == ("127.0.0.1", "6379", "yes")
    assert redis.REDIS_SETTINGS.items() <= conf.items()


def test_native_apicurio_listens_on_loopback_only() -> None:
    props = apicurio.system_properties(apicurio.DEFAULT_PORT)
    assert (props["quarkus.http.host"], props["quarkus.http.port"]) == ("127.0.0.1", "8081")
    assert props["quarkus.management.host"] == "127.0.0.1"
    assert apicurio.APICURIO_SETTINGS.items() <= props.items()


@pytest.mark.brokers
def test_up_again_reports_already_up(brokers: dict[str, str]) -> None:
    # Given the brokers the session brought up
    # When up runs again
    again = dev.up(log=quiet)
    # Then it starts nothing and reports the same URLs
    assert [(s.name, s.url, s.running, s.detail) for s in again] == [
        ("kafka", brokers["kafka"], True, "already up"),
        ("rabbitmq", brokers["rabbitmq"], True, "already up"),
        ("postgres", brokers["postgres"], True, "already up"),
        ("redis", brokers["redis"], True, "already up"),
        ("apicurio", brokers["apicurio"], True, "already up"),
    ]


@pytest.mark.brokers
def test_status_says_running(brokers: dict[str, str]) -> None:
    # Given the brokers the session brought up
    # When asking for their status
    statuses = dev.status()
    # Then each answers on its URL
    assert [(s.name, s.url, s.running) for s in statuses] == [
        ("kafka", brokers["kafka"], True),
        ("rabbitmq", brokers["rabbitmq"], True),
        ("postgres", brokers["postgres"], True),
        ("redis", brokers["redis"], True),
        ("apicurio", brokers["apicurio"], True),
    ]


@pytest.mark.brokers
def test_postgres_url_logs_in_as_bridge(brokers: dict[str, str]) -> None:
    # Given the PostgreSQL the session brought up
    url = brokers["postgres"]
    assert url == "postgresql://bridge:bridge@127.0.0.1:5432/bridge"
    # When a client logs in with its URL, password and all
    # Then the session is bridge's, in bridge's database
    assert postgres_login(url) == "bridge|bridge"


@pytest.mark.brokers
def test_redis_url_answers_ping(brokers: dict[str, str]) -> None:
    # Given the Redis the session brought up
    url = brokers["redis"]
    assert url == "redis://127.0.0.1:6379/0"
    # When PING is sent to its URL's address
    # Then it answers PONG
    assert redis_ping(url) == b"+PONG\r\n"


@pytest.mark.slow
@pytest.mark.parametrize("store", [postgres, redis], ids=["postgres", "redis"])
def test_up_recovers_after_kill_9(store: Any, own_instance: Path) -> None:
    # Given a store of our own (own port and data folder), killed with everything it started
    store.up(log=quiet)
    pids = server_pids(store, own_instance)
    os.kill(pids[0], signal.SIGKILL)
    for pid in pids[1:]:
        # PostgreSQL's children exit by themselves once the postmaster is gone; one may be
        # gone already, which is what this wants.
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not store.status().running
    # When up runs at once, with its pid files left behind and the pids maybe still zombies
    again = store.up(log=quiet)
    # Then it starts again
    assert again.running
    assert again.detail.startswith("started in")
    assert store.down(log=quiet).detail.startswith("stopped in")


@pytest.mark.parametrize(
    ("service", "port_var", "what"),
    [
        ("kafka", kafka.PORT_VAR, "not a Kafka broker"),
        ("rabbitmq", rabbitmq.PORT_VAR, "not an AMQP broker"),
        ("postgres", postgres.PORT_VAR, "not a PostgreSQL server"),
        ("redis", redis.PORT_VAR, "not a Redis server"),
        ("apicurio", apicurio.PORT_VAR, "not a schema registry"),
    ],
)
def test_port_held_by_another_program_fails_fast(
    service: str, port_var: str, what: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a plain TCP listener, not a broker, on the port bridge dev is told to use
    monkeypatch.setattr(compose, "engine_available", lambda: False)
    monkeypatch.setenv("BRIDGE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BRIDGE_CACHE", str(tmp_path / "cache"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        monkeypatch.setenv(port_var, str(port))
        started = time.monotonic()
        # When up is asked for that broker
        with pytest.raises(DevError, match=rf"port {port} is in use by another program \({what}\)"):
            dev.up([service], log=quiet)
    # Then it says so within seconds instead of waiting for a broker that never answers
    assert time.monotonic() - started < 15


def test_a_started_process_counts_as_running_until_it_exits(tmp_path: Path) -> None:
    # Given a process started as `bridge dev up` starts a server, with a marker in its argv
    marker = str(tmp_path / "marker.conf")
    argv = [sys.executable, "-c", "import time; time.sleep(60)", marker]
    pid = _proc.spawn_detached(argv, log_file=tmp_path / "out.log")
    try:
        # Then it is running, and running it stays while its command line is not consulted
        assert not _proc.exited(pid, marker)
        assert not _proc.exited(pid, "a marker its command line lacks")
    finally:
        # When it is killed
        os.kill(pid, signal.SIGKILL)
    # Then it has exited, and stays so once reaped
    assert _proc.wait_for(lambda: _proc.exited(pid, marker), timeout_s=10, every_s=0.05)
    assert _proc.exited(pid, marker)


def test_a_process_started_elsewhere_is_known_by_its_command_line() -> None:
    # Given a process that is not our child (our own, here), the marker is all there is to go by
    assert not _proc.exited(os.getpid(), "pytest")
    assert _proc.exited(os.getpid(), "a marker its command line lacks")


def test_two_apt_installs_at_once_take_turns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given package lists too old to install from until `apt-get update` has run, and apt-get
    # failing at once on the lists' lock while another apt-get holds it (what `update` does; a
    # stand-in for apt-get, which the machine's packages must not go through),
    # When two `up`s install at once (`make test`'s sessions on a fresh machine),
    # Then both install. (The second's update failed beside the first's, and so did its retry.)
    monkeypatch.setattr(_proc, "APT_LOCK", tmp_path / "apt.lock")
    guard, running, updated = threading.Lock(), [0], threading.Event()

    def apt_get(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        with guard:
            if running[0] and argv[1] == "update":
                return subprocess.CompletedProcess(
                    argv, 100, "", "E: Could not get lock /var/lib/apt/lists/lock"
                )
            running[0] += 1
        try:
            time.sleep(0.2)
            if argv[1] == "update":
                updated.set()
            ok = updated.is_set()
            return subprocess.CompletedProcess(argv, 0 if ok else 100, "", "" if ok else "E: 404  Not Found")
        finally:
            with guard:
                running[0] -= 1

    monkeypatch.setattr(_proc, "run", apt_get)
    with ThreadPoolExecutor(2) as pool:
        installs = [
            pool.submit(_proc.apt_install, [package], quiet) for package in ("postgresql", "redis-server")
        ]
        for install in installs:
            install.result(timeout=30)


def test_unknown_service_is_refused() -> None:
    with pytest.raises(DevError, match="unknown service 'kafak'"):
        dev.status(["kafak"])


def postgres_login(url: str) -> str:
    """`current_user|current_database()` of a session opened with `url`: psycopg, else psql."""
    query = "SELECT current_user || '|' || current_database()"
    if importlib.util.find_spec("psycopg") is not None:
        psycopg = importlib.import_module("psycopg")
        with psycopg.connect(url, connect_timeout=5) as conn:
            return str(conn.execute(query).fetchone()[0])
    # psql's own URL parsing, password included; the server refuses a wrong one.
    done = subprocess.run(
        ["psql", "-X", "-At", "-d", url, "-c", query], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def redis_ping(url: str) -> bytes:
    """The raw reply to PING at a redis:// URL's host and port."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "", parts.port or 6379), timeout=5) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        return sock.recv(64)


@pytest.fixture
def own_instance(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A free port for each store and a data folder the postgres user can reach, removed after."""
    # Not tmp_path: as root the server runs as postgres, which cannot enter pytest's 0700 folders.
    folder = Path(tempfile.mkdtemp(prefix="bridge-dev-test-"))
    folder.chmod(0o755)
    monkeypatch.setenv("BRIDGE_DATA", str(folder))
    for port_var in (postgres.PORT_VAR, redis.PORT_VAR):
        with socket.create_server(("127.0.0.1", 0)) as probe:
            monkeypatch.setenv(port_var, str(probe.getsockname()[1]))
    yield folder
    for store in (postgres, redis):
        store.down(log=quiet)
    shutil.rmtree(folder)


@pytest.mark.slow
def test_postgres_up_after_kill_9_waits_for_a_backend_that_lingers(own_instance: Path) -> None:
    # Given a PostgreSQL of our own whose postmaster was killed, and one of its backends still
    # holding its shared memory for 1.5 s more (stopped, then killed: as one slow to exit),
    # When up runs at once, Then it waits for that backend and starts the server. (pg_ctl
    # start failed at once: "pre-existing shared memory block ... is still in use".)
    postgres.up(log=quiet)
    main, lingering, *others = server_pids(postgres, own_instance)
    os.kill(lingering, signal.SIGSTOP)
    os.kill(main, signal.SIGKILL)
    for pid in others:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    threading.Timer(1.5, os.kill, (lingering, signal.SIGKILL)).start()
    again = postgres.up(log=quiet)
    assert again.running and postgres.status().running


@pytest.mark.slow
def test_postgres_up_waits_for_a_server_of_ours_that_takes_no_connections_yet(own_instance: Path) -> None:
    # Given our PostgreSQL running but refusing connections for now (a standby with hot standby
    # off, promoted a second after `up` says it waits: as a server recovering after a kill),
    # When up runs, Then it waits and makes the login. (It made the login at once, which failed:
    # "creating the bridge role and database failed: DETAIL:  Hot standby mode is disabled.";
    # for a server recovering, "the database system is starting up".)
    postgres.up(log=quiet)
    postgres.down(log=quiet)
    layout = postgres._layout(postgres.port())
    bin_dir = postgres._cluster_bin_dir(layout)
    assert bin_dir is not None
    pg_ctl = str(bin_dir / "pg_ctl")
    (layout.data / "standby.signal").touch()
    start = [pg_ctl, "start", "-D", str(layout.data), "-l", str(layout.log_file), "-s"]
    subprocess.run(postgres._as_server([*start, "-o", "-c hot_standby=off"]), check=True, timeout=60)
    assert _proc.wait_for(lambda: postgres._our_pid(layout) is not None, timeout_s=30)
    promote = [pg_ctl, "promote", "-D", str(layout.data)]
    promoting = threading.Timer(1.0, subprocess.run, (postgres._as_server(promote),))
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("postgres: waiting for pid"):
            promoting.start()

    started = postgres.up(log=log)
    assert promoting.ident is not None, f"up did not wait: {lines}"
    promoting.join()
    assert started.running and started.detail.startswith("started in")
    assert postgres._answers(postgres.port())


@pytest.mark.slow
def test_two_postgres_ups_at_once_start_the_server_once(
    own_instance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given PostgreSQL down, and a second `up` that begins while the first starts the server
    # and, if it may, looks at the port once the server answers but before the first has made
    # the bridge login (the test sessions of `make test` on a fresh machine),
    # When both run, Then the server starts once and both find the bridge login working. (The
    # second took the first's server for a stranger's: "port ... is in use by another
    # PostgreSQL server, where the bridge login fails".)
    real_start, real_clusters = postgres._start, postgres._debian_clusters
    first = threading.get_ident()
    second_looks, second_waits, server_runs = threading.Event(), threading.Event(), threading.Event()
    pool = ThreadPoolExecutor(1)
    seconds: list[Future[ServiceStatus]] = []

    def second_log(line: str) -> None:
        if line.startswith("waiting for another `bridge dev` run"):
            second_waits.set()
            second_looks.set()

    def clusters(pg_port: int) -> Any:
        if threading.get_ident() != first:  # the second `up`, making room on the port
            second_looks.set()
            assert server_runs.wait(60)
        return real_clusters(pg_port)

    def start(layout: Any, bin_dir: Path, pg_port: int, log: Any) -> None:
        seconds.append(pool.submit(postgres.up, second_log))
        assert second_looks.wait(60), "the second `up` neither looked at the port nor waited"
        real_start(layout, bin_dir, pg_port, log)
        server_runs.set()
        # (the login is made once the second has looked, or waits for the lock)
        assert _proc.wait_for(lambda: seconds[0].done() or second_waits.is_set(), timeout_s=60)

    monkeypatch.setattr(postgres, "_start", start)
    monkeypatch.setattr(postgres, "_debian_clusters", clusters)
    with pool:
        started = postgres.up(log=quiet)
        second = seconds[0].result(timeout=120)
    assert started.detail.startswith("started in")
    assert second.running and second.detail == "already up"
    assert postgres.status().running


@pytest.mark.slow
def test_a_second_postgres_up_waits_for_the_first_s_install(
    own_instance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given PostgreSQL down, and a second `up` that begins while the first installs the package
    # (whose programs are there before its postinst has made the postgres user and cluster),
    # When both run, Then the second looks at nothing until the first is done, and finds the
    # server up. (It went on beside the install, into a half-installed package.)
    real_install = postgres._ensure_installed
    first = threading.get_ident()
    installing, second_waits, second_arrived = threading.Event(), threading.Event(), threading.Event()
    beside: list[str] = []
    pool = ThreadPoolExecutor(1)
    seconds: list[Future[ServiceStatus]] = []

    def second_log(line: str) -> None:
        if line.startswith("waiting for another `bridge dev` run"):
            second_waits.set()

    def ensure_installed(log: Any) -> Path:
        if threading.get_ident() != first:
            second_arrived.set()
            if installing.is_set():
                beside.append("the second `up` looked at the install while the first installed")
            return real_install(log)
        installing.set()
        seconds.append(pool.submit(postgres.up, second_log))
        arrived = _proc.wait_for(lambda: second_waits.is_set() or second_arrived.is_set(), timeout_s=60)
        assert arrived, "the second `up` neither waited nor went on"
        installing.clear()
        return real_install(log)

    monkeypatch.setattr(postgres, "_ensure_installed", ensure_installed)
    with pool:
        started = postgres.up(log=quiet)
        second = seconds[0].result(timeout=120)
    assert beside == []
    assert started.detail.startswith("started in")
    assert second.running and second.detail == "already up"


@pytest.mark.slow
def test_two_redis_ups_at_once_start_the_server_once(
    own_instance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given Redis down, and a second `up` that begins while the first starts the server and,
    # if it may, looks for the server's pid once it listens but has not written its pid file
    # yet (Redis writes it after binding the port),
    # When both run, Then the server starts once and both find it answering. (The second took
    # it for a stranger's: "port ... is in use by another program (not a Redis server)".)
    real_start, real_our_pid = redis._start, redis._our_pid
    first = threading.get_ident()
    second_waits = threading.Event()
    pool = ThreadPoolExecutor(1)
    seconds: list[Future[ServiceStatus]] = []

    def second_log(line: str) -> None:
        if line.startswith("waiting for another `bridge dev` run"):
            second_waits.set()

    def our_pid(layout: Any) -> int | None:
        if threading.get_ident() == first:
            return real_our_pid(layout)
        # the second `up`: the server listens, and its pid file is not there yet
        assert _proc.wait_for(lambda: redis._pong(redis.port()), timeout_s=60)
        return None

    def start(server: str, layout: Any, redis_port: int, log: Any) -> None:
        seconds.append(pool.submit(redis.up, second_log))
        assert second_waits.wait(60), "the second `up` did not wait for the first's lock"
        real_start(server, layout, redis_port, log)

    monkeypatch.setattr(redis, "_start", start)
    monkeypatch.setattr(redis, "_our_pid", our_pid)
    with pool:
        started = redis.up(log=quiet)
        second = seconds[0].result(timeout=120)
    assert started.detail.startswith("started in")
    assert second.running and second.detail == "already up"


def server_pids(store: Any, folder: Path) -> list[int]:
    """The pids of a store's server under `folder`, the main process first."""
    if store is redis:
        return [int(next(folder.glob("dev/redis-*/redis.pid")).read_text())]
    main = int(next(folder.glob("dev/postgres-*/data/postmaster.pid")).read_text().split()[0])
    return [main, *children(main)]


def children(parent: int) -> list[int]:
    """The pids whose parent is `parent` (the fourth field of /proc/PID/stat)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def test_a_native_kafka_written_with_other_settings_is_told_apart(tmp_path: Path) -> None:
    # Given the configuration file `bridge dev up` writes today, and one of an older bridge
    # (a setting changed, one not there yet), Then only the older one differs, in those two:
    # `up` restarts a broker it started with them.
    layout = kafka._Layout(tmp_path)
    kafka._write_config(layout, kafka.DEFAULT_PORT, {})
    assert kafka.changed_settings(layout, kafka.DEFAULT_PORT) == []
    lines = layout.server_properties.read_text().splitlines()
    older = [line for line in lines if not line.startswith("group.min.session.timeout.ms=")]
    older = [line.replace("num.partitions=3", "num.partitions=1") for line in older]
    layout.server_properties.write_text("\n".join(older) + "\n")
    changed = kafka.changed_settings(layout, kafka.DEFAULT_PORT)
    assert changed == ["group.min.session.timeout.ms", "num.partitions"]


def test_compose_up_brings_its_own_containers_up_to_date_and_leaves_a_native_broker_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given Kafka answering as a native broker, RabbitMQ answering as a container of
    # docker-compose.yml, and Redis not answering,
    answering = {"kafka": True, "rabbitmq": True, "redis": False}
    statuses = {
        name: (lambda name=name: ServiceStatus(name, f"{name}://", answering[name], "")) for name in answering
    }
    monkeypatch.setattr(compose, "_STATUS", statuses)
    monkeypatch.setattr(compose, "running_here", lambda: {"rabbitmq"})
    calls: list[list[str]] = []
    monkeypatch.setattr(compose, "_compose", lambda args, log: calls.append(list(args)))
    # When `bridge dev up` runs with Docker,
    reported = compose.up(["kafka", "rabbitmq", "redis"], quiet)
    # Then compose is asked for RabbitMQ (it recreates a container whose settings changed, as
    # the native path restarts such a Kafka) and Redis, never for the native Kafka, and only
    # Redis is reported started. (A running container was skipped: it kept an older file's settings.)
    assert calls == [["up", "-d", "--wait", "rabbitmq", "redis"]]
    assert [(s.name, s.detail.split(" in ")[0]) for s in reported] == [
        ("kafka", "already up"), ("rabbitmq", "already up"), ("redis", "started with docker compose"),
    ]  # fmt: skip


def test_compose_down_removes_the_data_its_containers_held(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given compose's commands recorded instead of run,
    calls: list[list[str]] = []
    monkeypatch.setattr(compose, "_compose", lambda args, log: calls.append(list(args)))
    # When `bridge dev down` runs with Docker, for every service and then for one,
    compose.down(list(compose._STATUS), quiet)
    compose.down(["redis"], quiet)
    # Then the containers' anonymous volumes go with them (they were left on disk, never
    # mounted again), as README says: "`down` removes the containers and what they held".
    assert calls == [["down", "--volumes"], ["rm", "--stop", "--force", "--volumes", "redis"]]


def test_compose_rabbitmq_is_healthy_only_once_it_takes_connections() -> None:
    # Given the rabbitmq service's healthcheck, Then it checks RabbitMQ's ports take connections
    # (`rabbitmq-diagnostics ping` passes once the Erlang node runs, before they do, and the
    # consume service and `bridge dev up` went on against a closed port).
    [kind, command] = compose_services()["rabbitmq"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and "check_port_connectivity" in command and "ping" not in command


def test_compose_runs_the_rabbitmq_and_redis_versions_the_native_path_installs(
    brokers: dict[str, str],
) -> None:
    # Given the versions the native RabbitMQ and Redis report,
    import redis as redis_py

    from tests.brokerio import rabbitmq_api

    native_rabbitmq = rabbitmq_api("overview")["rabbitmq_version"]
    native_redis = redis_py.Redis.from_url(brokers["redis"]).info("server")["redis_version"]
    # Then docker-compose.yml runs the same ones (floating tags drifted to newer patches)
    services = compose_services()
    assert services["rabbitmq"]["image"] == f"rabbitmq:{native_rabbitmq}-management"
    assert services["redis"]["image"] == f"redis:{native_redis}"


def test_compose_uses_the_bridge_checkouts_file_not_the_current_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a user's own project with a docker-compose.yml, as the current folder
    (tmp_path / "docker-compose.yml").write_text("services: {}\n")
    monkeypatch.chdir(tmp_path)
    # Then `bridge dev` drives the bridge checkout's file, never the user's project
    assert compose.compose_file() == COMPOSE_FILE
    # And without a checkout around the module (a non-editable install) it says so
    monkeypatch.setattr(
        compose, "__file__", str(tmp_path / "site-packages" / "bridge" / "dev" / "compose.py")
    )
    with pytest.raises(DevError, match="needs an editable install of a bridge checkout"):
        compose.compose_file()


class _Subjects(http.server.BaseHTTPRequestHandler):
    """A registry that lists no subjects."""

    def do_GET(self) -> None:
        body = b"[]" if self.path == f"{apicurio.CCOMPAT_PATH}/subjects" else b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def test_apicurio_status_ignores_http_proxy_on_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a registry on loopback, and an http_proxy that answers nothing (no_proxy=localhost
    # does not cover 127.0.0.1)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        dead_proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, dead_proxy)
    monkeypatch.setenv("no_proxy", "localhost")
    monkeypatch.setattr(urllib.request, "_opener", None)  # (urlopen keeps the opener it built first)
    monkeypatch.setenv("BRIDGE_DATA", str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Subjects)
    monkeypatch.setenv(apicurio.PORT_VAR, str(server.server_address[1]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # When its status is asked for, Then it is up: asked directly, not through the proxy
        assert apicurio.status().running
    finally:
        server.shutdown()
        server.server_close()


def test_a_failed_maven_run_is_told_by_its_error_line() -> None:
    # Given Maven's output of a failed download, ending in a colour reset as Maven's always does
    output = "\n".join(
        [
            "\x1b[0m\x1b[0m[ERROR] Failed to execute goal copy: Could not find artifact x -> [Help 1]",
            "[ERROR] ",
            "[ERROR] To see the full stack trace of the errors, re-run Maven with the -e switch.",
            "[ERROR] Re-run Maven using the -X switch to enable full debug logging.",
            "[ERROR] For more information about the errors and possible solutions, please read:",
            "[ERROR] [Help 1] http://cwiki.apache.org/confluence/display/MAVEN/MojoExecutionException",
            "\x1b[0m\x1b[0m",
        ]
    )
    maven = subprocess.CompletedProcess(["mvn"], 1, stdout=output, stderr="")
    # Then the error message carries the line that says what went wrong
    assert (
        _proc.last_line(maven) == "[ERROR] Failed to execute goal copy: Could not find artifact x -> [Help 1]"
    )
    # And another program's last visible line is chosen, colour codes removed
    other = subprocess.CompletedProcess(
        ["x"], 1, stdout="", stderr="\x1b[31merror: no space left\x1b[0m\n\x1b[0m"
    )
    assert _proc.last_line(other) == "error: no space left"


def test_apicurio_download_ignores_a_pom_in_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a current folder with a pom.xml of its own (tests/interop/java, say)
    (tmp_path / "pom.xml").write_text("<project>not bridge's</project>\n")
    monkeypatch.chdir(tmp_path)
    argvs: list[list[str]] = []

    def maven(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        argvs.append(list(argv))
        return subprocess.CompletedProcess(argv, 1, stdout="[ERROR] offline", stderr="")

    monkeypatch.setattr(apicurio, "find_program", lambda _: "mvn")
    monkeypatch.setattr(apicurio, "run", maven)
    # When the registry is downloaded with Maven (here a run that fails at once)
    home = tmp_path / "cache"
    with pytest.raises(DevError, match="offline"):
        apicurio._download_registry(home, quiet)
    # Then Maven is pointed at a project of bridge's own, not at the current folder's
    [argv] = argvs
    pom = Path(argv[argv.index("-f") + 1])
    assert pom.parent == home
    assert "local.bridge" in pom.read_text()


def fake_postgres_install(lib: Path, *majors: str) -> None:
    """Debian's layout of installed PostgreSQL majors: <lib>/<major>/bin/pg_ctl."""
    for major in majors:
        (lib / major / "bin").mkdir(parents=True)
        (lib / major / "bin" / "pg_ctl").touch()


def test_postgres_starts_an_existing_cluster_with_its_own_major_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a cluster made by PostgreSQL 15, and 17 installed since (the steps that would reach
    # the real server stand in, as for RabbitMQ above)
    monkeypatch.setenv("BRIDGE_DATA", str(tmp_path))  # (where the lock is)
    lib = tmp_path / "lib"
    fake_postgres_install(lib, "15", "17")
    layout = postgres._Layout(tmp_path / "postgres")
    layout.data.mkdir(parents=True)
    (layout.data / "PG_VERSION").write_text("15\n")
    started: list[Path] = []
    monkeypatch.setattr(postgres, "PG_LIB", lib, raising=False)
    for name, stand_in in {
        "_speaks_postgres": lambda _: False,
        "port_accepts": lambda _: False,
        "_ensure_installed": lambda _: lib / "17" / "bin",
        "_layout": lambda _: layout,
        "_our_pid": lambda _: None,
        "_make_room": lambda _, __: None,
        "_start": lambda _, bin_dir, __, ___: started.append(bin_dir),
        "_create_login": lambda _, __, ___: None,
        "_answers": lambda _: bool(started),  # (once started)
    }.items():
        monkeypatch.setattr(postgres, name, stand_in)
    # When up starts it
    postgres.up(quiet)
    # Then with 15's programs, which can run its data
    assert started == [lib / "15" / "bin"]
    # And a cluster whose major is no longer installed is refused, naming the package to install
    started.clear()
    (layout.data / "PG_VERSION").write_text("16\n")
    with pytest.raises(DevError, match=re.escape("run `sudo apt-get install postgresql-16`")):
        postgres.up(quiet)


def test_rabbitmq_down_leaves_a_node_it_did_not_configure_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given, as root, a RabbitMQ node that answers (stand-ins: the shared node must not stop)
    shutdowns: list[str] = []
    monkeypatch.setattr(rabbitmq, "CONF_DIR", tmp_path)
    for name, stand_in in {
        "is_root": lambda: True,
        "find_program": lambda _: "rabbitmqctl",
        "_node_running": lambda _: True,
        "_speaks_amqp": lambda _: True,
        "_shutdown": shutdowns.append,
    }.items():
        monkeypatch.setattr(rabbitmq, name, stand_in)
    # When it runs with a configuration of the user's own, Then down leaves it running
    (tmp_path / "rabbitmq.conf").write_text("listeners.tcp.default = 5672\n")
    left = rabbitmq.down(quiet)
    assert (left.running, left.detail, shutdowns) == (True, "left alone: not started by bridge dev", [])
    # And when it runs with the configuration `up` writes, down stops it
    (tmp_path / "rabbitmq.conf").write_text(rabbitmq.rabbitmq_conf(rabbitmq.port()))
    assert not rabbitmq.down(quiet).running
    assert shutdowns == ["rabbitmqctl"]
