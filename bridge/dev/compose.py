"""The Docker path of `bridge dev`: `docker compose` with the repository's docker-compose.yml.

Used only when a Docker engine answers; the services are then the `kafka`, `rabbitmq`,
`postgres`, `redis` and `apicurio` services of docker-compose.yml, published on the same
loopback ports as the native path.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from bridge.dev import apicurio, kafka, postgres, rabbitmq, redis
from bridge.dev._common import ServiceStatus
from bridge.dev._proc import Log, last_line, run
from bridge.errors import DevError

_STATUS: Final[dict[str, Callable[[], ServiceStatus]]] = {
    "kafka": kafka.status,
    "rabbitmq": rabbitmq.status,
    "postgres": postgres.status,
    "redis": redis.status,
    "apicurio": apicurio.status,
}


def engine_available() -> bool:
    """True when a Docker engine answers `docker info` within 3 seconds."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return run([docker, "info"], timeout_s=3).returncode == 0
    except DevError:
        return False


def compose_file() -> Path:
    """docker-compose.yml of the bridge checkout this module runs from.

    Never the current folder's: `down` would tear down the user's own compose project.
    """
    candidate = Path(__file__).resolve().parents[2] / "docker-compose.yml"
    if not candidate.is_file():
        raise DevError(
            f"{candidate} not found: `bridge dev` with Docker needs an editable install of a bridge checkout"
        )
    return candidate


def up(names: Sequence[str], log: Log) -> list[ServiceStatus]:
    """Start the named services that do not answer yet, bring those running as this file's
    containers up to date with it (compose recreates one whose settings changed, as the native
    path restarts such a Kafka), and wait for their healthchecks. A service that answers but is
    no container of this file (a native broker) is left as it is."""
    before = {name: _STATUS[name]() for name in names}
    ours = running_here()
    todo = [name for name in names if not before[name].running or name in ours]
    if not todo:
        return [dataclasses.replace(before[name], detail="already up") for name in names]
    log(f"docker compose: starting {', '.join(todo)}")
    started = time.monotonic()
    _compose(["up", "-d", "--wait", *todo], log)
    detail = f"started with docker compose in {time.monotonic() - started:.1f}s"
    return [
        dataclasses.replace(_STATUS[name](), detail="already up" if before[name].running else detail)
        for name in names
    ]


def running_here() -> set[str]:
    """The services of docker-compose.yml whose containers run."""
    argv = ["docker", "compose", "-f", str(compose_file()), "ps", "--services", "--status", "running"]
    result = run(argv, timeout_s=30)
    if result.returncode != 0:
        raise DevError(f"`{' '.join(argv)}` failed: {last_line(result)}")
    return set(result.stdout.split())


def down(names: Sequence[str], log: Log) -> list[ServiceStatus]:
    """Stop and remove the named services' containers, and the anonymous volumes of their data
    (which no later `up` would mount again)."""
    if set(names) >= set(_STATUS):
        _compose(["down", "--volumes"], log)
    else:
        _compose(["rm", "--stop", "--force", "--volumes", *names], log)
    return [_stopped(_STATUS[name]()) for name in names]


def _stopped(now: ServiceStatus) -> ServiceStatus:
    detail = "still answering: not a container of docker-compose.yml" if now.running else "stopped"
    return dataclasses.replace(now, detail=detail)


def _compose(args: Sequence[str], log: Log) -> None:
    argv = ["docker", "compose", "-f", str(compose_file()), *args]
    log("$ " + " ".join(argv))
    # Generous: the first `up` pulls the images.
    result = run(argv, timeout_s=900)
    if result.returncode != 0:
        raise DevError(f"`{' '.join(argv)}` failed: {last_line(result)}")
