"""`bridge dev`: docker-compose.yml matches the native brokers; `up` is idempotent and never hangs.

`down` is not tested here: other tests share the running brokers.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge import dev
from bridge.dev import compose, kafka, rabbitmq
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


def test_compose_publishes_the_native_ports_on_loopback_only() -> None:
    # Given the broker services of docker-compose.yml, with no port overrides set
    services = compose_services()
    kafka_ports = [unset_defaults(port) for port in services["kafka"]["ports"]]
    rabbit_ports = [unset_defaults(port) for port in services["rabbitmq"]["ports"]]
    advertised = unset_defaults(services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"])
    # Then they are published on 127.0.0.1 at the native ports
    assert kafka_ports == [f"127.0.0.1:{kafka.DEFAULT_PORT}:29092"]
    assert rabbit_ports == [
        f"127.0.0.1:{rabbitmq.DEFAULT_PORT}:5672",
        f"127.0.0.1:{rabbitmq.MANAGEMENT_PORT}:15672",
    ]
    # And host clients are sent back to the published address, not to the container's
    assert f"HOST://127.0.0.1:{kafka.DEFAULT_PORT}" in advertised.split(",")


def test_native_kafka_listens_on_loopback_only() -> None:
    props = kafka.server_properties(kafka.DEFAULT_PORT, Path("/unused"))
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert kafka.KAFKA_SETTINGS.items() <= props.items()


def test_native_rabbitmq_listens_on_loopback_only() -> None:
    conf = rabbitmq.rabbitmq_conf(rabbitmq.DEFAULT_PORT)
    assert "listeners.tcp.default = 127.0.0.1:5672" in conf
    assert "management.tcp.ip = 127.0.0.1" in conf


@pytest.mark.brokers
def test_up_again_reports_already_up(brokers: dict[str, str]) -> None:
    # Given the brokers the session brought up
    # When up runs again
    again = dev.up(log=quiet)
    # Then it starts nothing and reports the same URLs
    assert [(s.name, s.url, s.running, s.detail) for s in again] == [
        ("kafka", brokers["kafka"], True, "already up"),
        ("rabbitmq", brokers["rabbitmq"], True, "already up"),
    ]


@pytest.mark.brokers
def test_status_says_running(brokers: dict[str, str]) -> None:
    # Given the brokers the session brought up
    # When asking for their status
    statuses = dev.status()
    # Then both answer on their URLs
    assert [(s.name, s.url, s.running) for s in statuses] == [
        ("kafka", brokers["kafka"], True),
        ("rabbitmq", brokers["rabbitmq"], True),
    ]


@pytest.mark.parametrize(
    ("service", "port_var", "what"),
    [("kafka", kafka.PORT_VAR, "not a Kafka broker"), ("rabbitmq", rabbitmq.PORT_VAR, "not an AMQP broker")],
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


def test_unknown_service_is_refused() -> None:
    with pytest.raises(DevError, match="unknown service 'kafak'"):
        dev.status(["kafak"])
