"""A single-node Kafka broker (KRaft) run from Maven Central jars, on loopback only.

The jars are resolved once with Maven into the cache folder; the broker's data, configuration,
logs and pid file live in one folder per port under the data folder.
"""

from __future__ import annotations

import base64
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from bridge.dev._common import ServiceStatus, cache_root, data_root, env_port
from bridge.dev._proc import (
    Log,
    exited,
    file_lock,
    find_program,
    last_line,
    port_accepts,
    process_cmdline,
    run,
    spawn_detached,
    tail,
    terminate,
    wait_for,
)
from bridge.errors import DevError

KAFKA_VERSION: Final = "4.2.1"
# The log4j2 version kafka-clients 4.2.1 itself declares; the POM lacks the slf4j binding
# that Kafka's release tarball adds, so we add it (slf4j 1.7, hence log4j-slf4j-impl).
LOG4J_VERSION: Final = "2.25.4"
DEPENDENCY_PLUGIN: Final = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

DEFAULT_PORT: Final = 9092
PORT_VAR: Final = "BRIDGE_DEV_KAFKA_PORT"
START_TIMEOUT_S: Final = 90.0
STOP_TIMEOUT_S: Final = 60.0

# Broker settings shared with docker-compose.yml (a test compares them); the address-bound
# ones (listeners, quorum voters, log.dirs) differ between the two and are set apart.
KAFKA_SETTINGS: Final[dict[str, str]] = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    # One node: every internal topic must make do with a single replica.
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "10",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "10",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    # A process killed mid-transaction holds back read_committed consumers of what it wrote, and
    # the committed offsets of its group, until the coordinator aborts the transaction: checked
    # every second once it timed out, not every 10 s (Kafka's default).
    "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
    # A consumer may ask for a session of 3 s (Kafka's floor is 6 s): the tests do, so the group
    # notices a consumer they killed sooner. bridge's own default session is 10 s.
    "group.min.session.timeout.ms": "3000",
    # No point waiting for more members to join a group on a laptop.
    "group.initial.rebalance.delay.ms": "0",
    # bridge creates its topics with `bridge topology apply`; a typo must not create one.
    "auto.create.topics.enable": "false",
    "num.partitions": "3",
}

_LOG4J2 = """\
status = warn
# Kafka logs its own shutdown; log4j's hook would stop logging halfway through it.
shutdownHook = disable
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
"""

# Kafka's own start script uses these G1 settings; the heap is capped for a laptop.
_JVM_FLAGS: Final = (
    "-Xms256m",
    "-Xmx1g",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)


@dataclass(frozen=True)
class _Layout:
    """Where one broker keeps its files."""

    root: Path

    @property
    def log_dir(self) -> Path:
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def server_log(self) -> Path:
        return self.logs / "server.log"

    @property
    def out_file(self) -> Path:
        return self.logs / "kafka.out"

    @property
    def server_properties(self) -> Path:
        return self.root / "server.properties"

    @property
    def log4j(self) -> Path:
        return self.root / "log4j2.properties"

    @property
    def pid_file(self) -> Path:
        return self.root / "kafka.pid"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


def port() -> int:
    """The client port (the controller takes the next one)."""
    return env_port(PORT_VAR, DEFAULT_PORT, span=2)


def url() -> str:
    """The broker URL bridge takes in BRIDGE_BROKER."""
    return f"kafka://127.0.0.1:{port()}"


def server_properties(client_port: int, log_dir: Path) -> dict[str, str]:
    """The full broker configuration for a loopback-only node on `client_port`."""
    controller = client_port + 1
    return {
        **KAFKA_SETTINGS,
        "listeners": f"PLAINTEXT://127.0.0.1:{client_port},CONTROLLER://127.0.0.1:{controller}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{client_port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        # A static quorum: nothing about the port is written into the formatted storage.
        "controller.quorum.voters": f"1@127.0.0.1:{controller}",
        "log.dirs": str(log_dir),
    }


def up(log: Log = print) -> ServiceStatus:
    """Start the broker unless one already answers; wait until it serves metadata.

    A broker this started earlier with other settings (an older bridge's) is restarted with
    today's, as `docker compose up` recreates a container whose configuration changed: the
    tests rely on them.
    """
    client_port = port()
    layout = _layout(client_port)
    if _up_to_date(layout, client_port):
        return _status(client_port, True, "already up")
    started = time.monotonic()
    # One `up` at a time, each holding the lock until its broker answers: a second `up` then
    # finds the first's broker answering, even where it cannot read the broker's command line
    # (a machine under load once gave an empty one), and does not take it for a stranger's.
    with file_lock(layout.lock, timeout_s=900, log=log):
        if _up_to_date(layout, client_port):
            return _status(client_port, True, "already up")
        pid = _our_pid(layout)
        if pid is not None and (changed := changed_settings(layout, client_port)):
            log(f"kafka: restarting pid {pid}: these settings changed since it started: {', '.join(changed)}")
            terminate(pid, str(layout.server_properties), timeout_s=STOP_TIMEOUT_S)
            pid = None
        if pid is None:
            _require_free(client_port)
            pid = _start(layout, client_port, log)
        _wait_ready(client_port, pid, layout)
    return _status(client_port, True, f"started in {time.monotonic() - started:.1f}s")


def _up_to_date(layout: _Layout, client_port: int) -> bool:
    """Whether a broker answers that `up` leaves as it is: any but one of ours that an older
    `up` started with other settings."""
    ours = _our_pid(layout) is not None
    return _answers(client_port) and not (ours and changed_settings(layout, client_port))


def down(log: Log = print) -> ServiceStatus:
    """Stop the broker `up` started; a broker started some other way is left alone."""
    client_port = port()
    layout = _layout(client_port)
    pid = _our_pid(layout)
    if pid is None:
        if _answers(client_port):
            return _status(client_port, True, "left alone: not started by bridge dev")
        return _status(client_port, False, "not running")
    log(f"kafka: stopping pid {pid}")
    started = time.monotonic()
    terminate(pid, str(layout.server_properties), timeout_s=STOP_TIMEOUT_S)
    layout.pid_file.unlink(missing_ok=True)
    return _status(client_port, False, f"stopped in {time.monotonic() - started:.1f}s")


def status() -> ServiceStatus:
    """Whether a broker answers on the port, without changing anything."""
    client_port = port()
    if _answers(client_port):
        return _status(client_port, True, "up")
    layout = _layout(client_port)
    pid = _our_pid(layout)
    if pid is not None:
        return _status(client_port, False, f"pid {pid} does not answer yet; see {layout.server_log}")
    return _status(client_port, False, "not running")


def ensure_jars(log: Log = print) -> Path:
    """The folder of Kafka's runtime jars, downloaded with Maven on first use."""
    home = cache_root() / f"kafka-{KAFKA_VERSION}"
    lib, marker, pom = home / "lib", home / "complete", _pom()
    if _cached(marker, lib, pom):
        return lib
    with file_lock(home / ".lock", timeout_s=900, log=log):
        if not _cached(marker, lib, pom):
            _download(home, pom, log)
    return lib


def _cached(marker: Path, lib: Path, pom: str) -> bool:
    # The marker holds the POM it was made from, so a version bump downloads again.
    return lib.is_dir() and marker.is_file() and marker.read_text() == pom


def _download(home: Path, pom: str, log: Log) -> None:
    mvn = find_program("mvn")
    if mvn is None:
        raise DevError("Maven is not installed: run `sudo apt-get install maven` (needed once)")
    log(f"kafka: downloading Kafka {KAFKA_VERSION} jars with Maven into {home} (first run only)")
    partial, lib, marker = home / "lib.partial", home / "lib", home / "complete"
    marker.unlink(missing_ok=True)
    for folder in (partial, lib):
        shutil.rmtree(folder, ignore_errors=True)
    (home / "pom.xml").write_text(pom)
    argv = [mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(home / "pom.xml")]
    goal = [f"{DEPENDENCY_PLUGIN}:copy-dependencies", "-DincludeScope=runtime"]
    result = run([*argv, *goal, f"-DoutputDirectory={partial}"], timeout_s=900)
    if result.returncode != 0 or not any(partial.glob("kafka_2.13-*.jar")):
        raise DevError(f"Maven could not download Kafka {KAFKA_VERSION}: {last_line(result)}")
    # Renamed into place, then marked: an interrupted download is never mistaken for a cache.
    partial.rename(lib)
    marker.write_text(pom)


def _pom() -> str:
    log4j = [
        f"<dependency><groupId>org.apache.logging.log4j</groupId><artifactId>{artifact}</artifactId>"
        f"<version>{LOG4J_VERSION}</version></dependency>"
        for artifact in ("log4j-slf4j-impl", "log4j-api", "log4j-core")
    ]
    return "\n".join(
        [
            '<project xmlns="http://maven.apache.org/POM/4.0.0">',
            "<modelVersion>4.0.0</modelVersion>",
            "<groupId>local.bridge</groupId><artifactId>kafka-dev</artifactId>",
            "<version>1</version><packaging>pom</packaging>",
            "<dependencies>",
            "<dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>"
            f"<version>{KAFKA_VERSION}</version></dependency>",
            *log4j,
            "</dependencies>",
            "</project>",
            "",
        ]
    )


def _start(layout: _Layout, client_port: int, log: Log, settings: Mapping[str, str] | None = None) -> int:
    """Start a broker on `client_port` with its files in `layout`, `settings` over the defaults."""
    java = find_program("java")
    if java is None:
        raise DevError("Java is not installed: run `sudo apt-get install openjdk-17-jre-headless`")
    lib = ensure_jars(log)
    _write_config(layout, client_port, settings or {})
    classpath = ["-cp", f"{lib}/*", f"-Dlog4j2.configurationFile={layout.log4j}"]
    classpath.append(f"-Dkafka.logs.dir={layout.logs}")
    _format_storage(layout, [java, "-Xmx256m", *classpath], log)
    log(f"kafka: starting on 127.0.0.1:{client_port} (log {layout.server_log})")
    argv = [java, *_JVM_FLAGS, *classpath, "kafka.Kafka", str(layout.server_properties)]
    pid = spawn_detached(argv, log_file=layout.out_file)
    layout.pid_file.write_text(f"{pid}\n")
    return pid


def _write_config(layout: _Layout, client_port: int, settings: Mapping[str, str]) -> None:
    layout.logs.mkdir(parents=True, exist_ok=True)
    props = {**server_properties(client_port, layout.log_dir), **settings}
    text = "".join(f"{key}={_escape(value)}\n" for key, value in props.items())
    layout.server_properties.write_text(text, encoding="latin-1")
    layout.log4j.write_text(_LOG4J2)


def changed_settings(layout: _Layout, client_port: int) -> list[str]:
    """The settings in which the broker's configuration file differs from what `up` writes now."""
    try:
        lines = layout.server_properties.read_text(encoding="latin-1").splitlines()
    except OSError:
        return []
    written = dict(line.split("=", 1) for line in lines if "=" in line)
    wanted = {key: _escape(value) for key, value in server_properties(client_port, layout.log_dir).items()}
    return sorted(key for key in written.keys() | wanted.keys() if written.get(key) != wanted.get(key))


def _escape(value: str) -> str:
    # Kafka reads properties files as ISO-8859-1 with backslash escapes: keep paths intact.
    escaped = value.replace("\\", "\\\\")
    return "".join(ch if ord(ch) < 128 else f"\\u{ord(ch):04x}" for ch in escaped)


def _format_storage(layout: _Layout, java: list[str], log: Log) -> None:
    if (layout.log_dir / "meta.properties").is_file():
        return
    log(f"kafka: formatting storage in {layout.log_dir}")
    tool = ["kafka.tools.StorageTool", "format", "-t", _cluster_id()]
    result = run([*java, *tool, "-c", str(layout.server_properties)], timeout_s=120)
    if result.returncode != 0:
        raise DevError(f"formatting Kafka storage in {layout.log_dir} failed: {last_line(result)}")


def _cluster_id() -> str:
    # What `StorageTool random-uuid` prints (Kafka's Uuid.toString), without a JVM start;
    # Kafka never hands out ids starting with "-" since they read as command-line flags.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _wait_ready(client_port: int, pid: int, layout: _Layout) -> None:
    def ready() -> bool:
        if exited(pid, str(layout.server_properties)):
            detail = tail(layout.server_log) or tail(layout.out_file)
            raise DevError(f"Kafka exited while starting; see {layout.server_log}: {detail}")
        return _answers(client_port, timeout_s=2.0)

    if not wait_for(ready, timeout_s=START_TIMEOUT_S):
        raise DevError(
            f"Kafka did not answer on 127.0.0.1:{client_port} within {START_TIMEOUT_S:.0f}s;"
            f" see {layout.server_log}"
        )


def _require_free(client_port: int) -> None:
    if port_accepts(client_port):
        raise DevError(
            f"port {client_port} is in use by another program (not a Kafka broker); stop it or set {PORT_VAR}"
        )
    if port_accepts(client_port + 1):
        raise DevError(
            f"port {client_port + 1} (Kafka's controller port, {PORT_VAR} + 1) is in use"
            f" by another program; stop it or set {PORT_VAR}"
        )


def _answers(client_port: int, timeout_s: float = 3.0) -> bool:
    """True when a Kafka broker serves a metadata request on the port."""
    if not port_accepts(client_port):
        return False
    # log_level 0 keeps librdkafka from printing connection errors while we probe.
    config: dict[str, str | int | float | bool] = {
        "bootstrap.servers": f"127.0.0.1:{client_port}",
        "log_level": 0,
    }
    try:
        AdminClient(config).list_topics(timeout=timeout_s)
    except KafkaException:
        return False
    return True


def _our_pid(layout: _Layout) -> int | None:
    """The pid in the pid file, if that process is still our broker."""
    try:
        pid = int(layout.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if str(layout.server_properties) in process_cmdline(pid) else None


def _layout(client_port: int) -> _Layout:
    # One folder per port, so a second broker on another port never shares files.
    name = "kafka" if client_port == DEFAULT_PORT else f"kafka-{client_port}"
    return _Layout(data_root() / "dev" / name)


def _status(client_port: int, running: bool, detail: str) -> ServiceStatus:
    return ServiceStatus("kafka", f"kafka://127.0.0.1:{client_port}", running, detail)
