"""Fixtures: real brokers for the session (the same code as `bridge dev up`), apps, queues.

With CI set, a broker that cannot be started fails the run; elsewhere its tests are skipped.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Coroutine, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import pytest
from confluent_kafka import KafkaException
from packaging.requirements import Requirement
from packaging.version import Version

from bridge import Bridge, JobContext, codec
from bridge.envelope import Envelope
from bridge.errors import BridgeError
from bridge.registry import ENVELOPE
from bridge.transports import Outgoing
from tests import names

TESTS = Path(__file__).resolve().parent
SCHEMAS = TESTS / "schemas"
REPO = TESTS.parent
# `make pytest-lowest` leaves out the in-memory broker: it uses no broker client, and the codec,
# registry and retry code it runs is the same on the real ones.
BROKERS = ["kafka", "rabbitmq"] if os.environ.get("BRIDGE_LOWEST_BOUNDS") else ["memory", "kafka", "rabbitmq"]
STORES = ["sqlite", "postgres", "redis"]
T = TypeVar("T")
# The shortest session `bridge dev up`'s Kafka takes (bridge's default is 10 s, Kafka's floor
# 6 s): after each SIGKILL the group waits this long for the killed member, and the killer tests
# and duplicate storms kill about 25 times. Heartbeats go every second. Set here, the apps of
# the tests and the `bridge consume` processes they start read it.
os.environ.setdefault("BRIDGE_SESSION_TIMEOUT_S", "3")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def pytest_configure(config: pytest.Config) -> None:
    """With BRIDGE_LOWEST_BOUNDS (`make pytest-lowest`), refuse to run above the lower bounds.

    Otherwise a resolver that quietly picked newer versions would prove nothing about them.
    Then mark this session as running, so that another's end leaves its queues alone.
    """
    if os.environ.get("BRIDGE_LOWEST_BOUNDS") and (problems := above_lower_bounds()):
        raise pytest.UsageError(f"BRIDGE_LOWEST_BOUNDS is set, but {'; '.join(problems)}")
    names.register()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    names.unregister()
    _exit_if_threads_hold_it_up(config.stash.get(EXIT_STATUS, 1))


# How long the process may take to exit once the session is over. Python waits at exit for
# every thread that is not a daemon: once, a call into librdkafka 2.8 never returned (its
# group thread spinning for good), and the run, CI's included, never ended.
EXIT_STATUS = pytest.StashKey[int]()
EXIT_WAIT_S = float(os.environ.get("BRIDGE_TEST_EXIT_WAIT_S", "60"))


def _exit_if_threads_hold_it_up(status: int) -> None:
    """Exit with `status` (1 if the tests passed) EXIT_WAIT_S from now, naming the threads
    still running, unless the process has exited by itself by then."""

    def watch() -> None:
        time.sleep(EXIT_WAIT_S)
        running = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        print(
            f"tests: the process has not exited {EXIT_WAIT_S:g} s after the session ended; threads"
            f" still running: {', '.join(running) or 'none but the main one'}. Exiting without them",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        os._exit(status or 1)

    threading.Thread(target=watch, name="tests-exit-watch", daemon=True).start()


def above_lower_bounds() -> list[str]:
    """The dependencies in pyproject.toml (with every extra) not installed at their `>=` bound."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    lines = [*project["dependencies"], *(line for extra in extras for line in extra)]
    problems = []
    for requirement in map(Requirement, lines):
        installed = Version(version(requirement.name))
        for bound in (s for s in requirement.specifier if s.operator == ">="):
            if installed != Version(bound.version):
                problems.append(f"{requirement.name} is {installed}, not its lower bound {bound.version}")
    return list(dict.fromkeys(problems))  # (a package can appear in several extras)


@pytest.fixture(scope="session")
def brokers() -> Iterator[dict[str, str]]:
    """URLs of the real Kafka, RabbitMQ, PostgreSQL and Redis, started if they are not running.

    Queues and topics the tests made are deleted after the session.
    """
    from bridge import dev

    try:
        statuses = dev.up(log=lambda _: None)
    except BridgeError as exc:
        if in_ci():
            pytest.fail(f"the real brokers are required under CI: {exc}")
        pytest.skip(f"real brokers unavailable: {exc}")
    urls = {s.name: s.url for s in statuses}
    another_rabbitmq = os.environ.get("BRIDGE_TEST_RABBITMQ")  # (`make pytest-rabbitmq4`)
    if another_rabbitmq:
        urls["rabbitmq"] = another_rabbitmq
    yield urls
    from tests.brokerio import delete_test_objects

    try:
        delete_test_objects(urls)
    # (hygiene only: a broker that went away has failed its tests already)
    except (OSError, KafkaException) as exc:
        print(f"could not delete the test queues and topics: {exc}")


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each idempotency store in turn: SQLite in a fresh folder, the real PostgreSQL and Redis."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    urls: dict[str, str] = request.getfixturevalue("brokers")
    return urls[request.param]


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> str:
    """Each broker in turn: memory, then the real Kafka and RabbitMQ."""
    if request.param == "memory":
        return "memory://"
    urls: dict[str, str] = request.getfixturevalue("brokers")
    return urls[request.param]


@pytest.fixture
def queue() -> str:
    """A queue name no other test uses."""
    return names.queue()


@pytest.fixture
def make_app(broker: str) -> Callable[..., Bridge]:
    """Apps on the current broker, each in its own consumer group."""

    def make(**settings: Any) -> Bridge:
        settings.setdefault("group", f"g-{uuid.uuid4().hex[:12]}")
        return Bridge(broker=broker, registry=str(SCHEMAS), **settings)

    return make


def own_app(broker: str) -> Bridge:
    """An app on `broker` with a prefix (so delay tiers) and a consumer group of its own."""
    prefix, group = names.prefix(), f"g-{uuid.uuid4().hex[:12]}"
    settings = {"prefix": prefix, "delay_tiers": "1s", "partitions": 1, "group": group}
    return Bridge(broker=broker, registry=str(SCHEMAS), **settings)


def tiered_app(broker: str, prefix: str, tiers: str) -> Bridge:
    """An app on `broker` with `prefix` and `tiers`, topics of one partition, a group of its own."""
    return Bridge(broker=broker, registry=str(SCHEMAS), prefix=prefix, delay_tiers=tiers, partitions=1,
                  group=f"g-{uuid.uuid4().hex[:12]}")  # fmt: skip


def tiers_changed(broker: str) -> tuple[str, Bridge, Bridge]:
    """A prefix of its own, an app there with tiers of 1s and 5s, and one with 1s and 2s: the
    second's settings no longer name the first's 5s tier."""
    prefix = names.prefix()
    return prefix, tiered_app(broker, prefix, "1s,5s"), tiered_app(broker, prefix, "1s,2s")


def failing_first(app: Bridge, queue: str, error: Callable[[], Exception], **options: Any) -> list[int]:
    """A test.Echo handler on `queue` that raises `error()` for job 1; the jobs it ran, in order."""
    ran: list[int] = []

    @app.job("test.Echo", queue=queue, **options)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.append(payload["n"])
        if payload["n"] == 1:
            raise error()

    return ran


def signalling(app: Bridge, queue: str) -> asyncio.Event:
    """A test.Echo handler on `queue` that sets the event returned each time a job runs."""
    ran = asyncio.Event()

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        ran.set()

    return ran


async def publish_envelope(app: Bridge, queue: str, envelope: Envelope) -> None:
    """Put `envelope` on `queue` as another producer would: its bytes as written, none of
    enqueue's checks or defaults."""
    body = codec.encode(app.registry.schema(ENVELOPE), envelope.to_avro())
    await (await app.transport()).publish(Outgoing(queue, body, None))


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """Run `coro` to completion on a new event loop, within `timeout` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
