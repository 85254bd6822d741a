"""The `bridge` command as a user runs it: one clear line for every mistake, no traceback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pty
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bridge import Bridge, cli, codec
from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.idempotency import default_url
from bridge.idempotency import sql as idempotency_sql
from tests.brokerio import read_queue, tier_held_in
from tests.conftest import REPO, SCHEMAS
from tests.processes import assert_one_line_error, bridge

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
CHARGE = '{"invoice_id": "inv-1", "customer_id": "cus-1", "amount_cents": 1999, "card_token": "tok"}'


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["billing.Nope", "{}"], ["unknown job type 'billing.Nope'"]),
        (["billing.ChargeCard", "{not json"], ["payload is not valid JSON"]),
        (["billing.ChargeCard", "[" * 10_000 + "]" * 10_000], ["not valid JSON (nested too deeply)"]),
        (
            ["billing.ChargeCard", CHARGE, "--at", "9999-12-31T00:00:00Z"],
            ["--at: within 100 years of now"],
        ),
        (
            ["billing.ChargeCard", '{"invoice_id": 5}'],
            ["billing.ChargeCard.invoice_id: expected string, got 5"],
        ),
        (["billing.ChargeCard", "[1]"], ["expected an object"]),
        # (json took the last of the two)
        (
            ["billing.ChargeCard", '{"invoice_id": "a", "invoice_id": "b", "amount_cents": 1}'],
            ["payload gives 'invoice_id' more than once: give each field once"],
        ),
        (
            ["billing.ChargeCard", CHARGE, "--delay", "99999999999999d"],
            ["--delay: at most 100 years (36500d)"],
        ),
        (
            ["billing.ChargeCard", CHARGE, "--ttl", "9999999999999d"],
            ["--ttl: at most 100 years (36500d)"],
        ),
        # (The API's own checks named its keywords, `ttl=` and `delay=`.)
        (
            ["billing.ChargeCard", CHARGE, "--delay", "2h", "--ttl", "1h"],
            ["--ttl ends the job before --delay lets it start: give a longer --ttl"],
        ),
        (  # (a job dead-lettered `expired`, unrun)
            ["billing.ChargeCard", CHARGE, "--ttl", "0"],
            ["--ttl must be 1 ms or more: a job not started within it is dead-lettered, unrun"],
        ),
        (  # (both are 1,000 ms in the envelope: the API refused it, naming `ttl=`)
            ["billing.ChargeCard", CHARGE, "--delay", "1.0005", "--ttl", "1.0009"],
            ["--ttl ends the job before --delay lets it start: give a longer --ttl"],
        ),
        (
            ["billing.ChargeCard", CHARGE, "--at", "2126-01-01T00:00:00Z", "--ttl", "1d"],
            ["--ttl ends the job before --at lets it start: give a longer --ttl"],
        ),
    ],
)
def test_enqueue_mistakes_get_one_line(args: list[str], fragments: list[str]) -> None:
    done = bridge("enqueue", *args, "--app", "consumers.billing:app", "--broker", "memory://")
    assert_one_line_error(done, *fragments)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        # (on Kafka a job in `billing.dlq.done` hid the dead letter its key named from every dlq
        # command; one in `billing.dlq` was a letter that `dlq replay` refused as undecodable)
        (
            ["enqueue", "--queue", "billing.dlq.done"],
            "queue 'billing.dlq.done' is 'billing''s dead-letter queue",
        ),
        (["enqueue", "--queue", "billing.dlq"], "queue 'billing.dlq' is 'billing''s dead-letter queue"),
        # (RabbitMQ: a traceback from pamqp; Kafka: "does not exist: run `bridge topology apply`",
        # which Kafka then refused)
        (["enqueue", "--queue", "bad name!"], "queue 'bad name!': use letters, digits, '.', '_' and '-'"),
        (["enqueue", "--queue", "q" * 241], "at most 240 characters, not 241"),
        (["enqueue", "--queue", "__consumer_offsets"], "names starting with __ are Kafka's own"),
        (
            ["topology", "apply", "--queues", "..", "--dry-run"],
            "queue '..': Kafka takes no topic named . or ..",
        ),
        (["topology", "apply", "--queues", "billing,bad name!"], "queue 'bad name!': use letters"),
        (
            ["consume", "--app", "consumers.billing:app", "--queues", "amq.orders", "--burst"],
            "with amq. RabbitMQ's",
        ),
        (["dlq", "list", "bad name!"], "queue 'bad name!': use letters"),
        (["dlq", "list", "billing.dlq"], "the dlq commands take the job queue's name: billing"),
        # (they found no letters, and exited 0)
        (["dlq", "list", "billing", "--broker", "memory://"], "memory:// keeps dead letters in one process"),
    ],
)
def test_a_queue_name_either_broker_refuses_gets_one_line(args: list[str], fragment: str) -> None:
    if args[0] == "enqueue":
        args = ["enqueue", "billing.ChargeCard", CHARGE, *args[1:]]
    registry = [] if "--app" in args else ["--registry", "schemas"]
    done = bridge(*args, *registry, "--broker", "memory://")
    assert_one_line_error(done, fragment)


@pytest.mark.parametrize("scheme", ["kafka", "amqp"])
def test_unreachable_broker_gets_one_line(scheme: str) -> None:
    url = (
        f"kafka://127.0.0.1:{closed_port()}"
        if scheme == "kafka"
        else f"amqp://guest:secret@127.0.0.1:{closed_port()}/"
    )
    done = bridge("enqueue", "billing.ChargeCard", CHARGE, "--app", "consumers.billing:app", "--broker", url)
    assert_one_line_error(done, "cannot reach", "bridge dev up")
    assert "secret" not in done.stderr


@pytest.mark.parametrize("scheme", ["kafka", "amqp"])
def test_a_broker_host_that_does_not_resolve_is_named(scheme: str) -> None:
    # (.invalid never resolves. librdkafka said only "Broker transport failure".)
    url = "kafka://nowhere.invalid:9092" if scheme == "kafka" else "amqp://guest:guest@nowhere.invalid:5672/"
    done = bridge("enqueue", "billing.ChargeCard", CHARGE, "--app", "consumers.billing:app", "--broker", url)
    assert_one_line_error(done, "cannot reach")
    assert re.search(r"(nowhere.invalid does not resolve|'Name or service not known')", done.stderr), (
        done.stderr
    )


def test_bridge_schemas_with_a_registry_that_is_no_url_says_what_it_was_given() -> None:
    done = bridge("schemas", "list", "--registry", "htp://127.0.0.1:8081/x")
    assert_one_line_error(done, "needs a registry URL (http:// or https://), not 'htp://127.0.0.1:8081/x'")


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"password": "not-it"}, ["refused the login", "check the user and password", "ACCESS_REFUSED"]),
        ({"vhost": "no-such-vhost"}, ["would not open virtual host 'no-such-vhost'", "does it exist"]),
    ],
)
def test_a_rabbitmq_that_refuses_the_url_says_what_it_refused(
    change: dict[str, str], fragments: list[str], brokers: dict[str, str]
) -> None:
    # Given the local RabbitMQ's URL with a wrong password, or a virtual host it does not have,
    parts = urlsplit(brokers["rabbitmq"])
    password, vhost = change.get("password", parts.password), change.get("vhost", parts.path[1:])
    url = f"amqp://{parts.username}:{password}@{parts.hostname}:{parts.port}/{vhost}"
    # When a job is enqueued there,
    done = bridge("enqueue", "billing.ChargeCard", CHARGE, "--app", "consumers.billing:app", "--broker", url)
    # Then one line says what RabbitMQ refused (not that it cannot be reached), without the password.
    assert_one_line_error(done, *fragments)
    assert "cannot reach" not in done.stderr and "not-it" not in done.stderr


@pytest.mark.parametrize(
    "env, fragments",
    [
        ({"BRIDGE_CONCURRENCY": "lots"}, ["concurrency must be a whole number, got 'lots'"]),
        ({"BRIDGE_BROKER": "redis://x"}, ["broker 'redis://x'", "kafka://host:port"]),
        ({"BRIDGE_CONCURRENCY": "0", "BRIDGE_GRACE_S": "-1"}, ["concurrency must be at least 1", "grace_s"]),
        ({"BRIDGE_CONCURRENCY": "8", "BRIDGE_PREFETCH": "4"}, ["prefetch (4) must be at least concurrency"]),
        ({"BRIDGE_DELIVERY_LIMIT": "0"}, ["delivery_limit must be at least 1"]),
        ({"BRIDGE_DELAY_TIERS": "1h,6h"}, ["delay_tiers start at 1h", "start them at 1m or less"]),
        ({"BRIDGE_SESSION_TIMEOUT_S": "0.5"}, ["session_timeout_s must be from 1 to 3600 seconds"]),
        # (aio-pika retried a URL without a host for good, saying nothing; Kafka waited 5 s, then
        # called a malformed URL a broker that is down; a port out of range raised ValueError)
        ({"BRIDGE_BROKER": "amqp://"}, ["broker 'amqp://': it names no host", "amqp://user:pass@host"]),
        # (a password cut short at its / was taken for a port that is no number)
        (
            {"BRIDGE_BROKER": "amqp://guest:pa/ss@rabbit/"},
            ["its user or password holds / ? or # (percent-encoded", "(with / ? # @ in the password"],
        ),
        ({"BRIDGE_BROKER": "amqp://gu#est:guest@rabbit/"}, ["its user or password holds / ? or #"]),
        ({"BRIDGE_BROKER": "amqp://rabbit:70000/"}, ["its port must be a number from 1 to 65535"]),
        ({"BRIDGE_BROKER": "kafka://a:9092,:9"}, ["broker 'kafka://a:9092,:9': it names no host"]),
        (
            {"BRIDGE_BROKER": "kafka://u:pw@kafka:9092"},
            ["'kafka://u:***@kafka:9092': a Kafka URL takes no user"],
        ),
        # (librdkafka read the host and port alone; aiormq read a heartbeat that is no whole
        # number as 0, which turned heartbeats off)
        (
            {"BRIDGE_BROKER": "kafka://kafka:9092/jobs?acks=1"},
            ["takes host:port[,host:port] and nothing more"],
        ),
        (
            {"BRIDGE_BROKER": "amqp://rabbit/?heartbeat=abc"},
            ["its heartbeat= must be a whole number of seconds from 0 to 65534, not 'abc'"],
        ),
        # (bridge checked the last of two, aiormq read the first: heartbeats off; and a blank one)
        ({"BRIDGE_BROKER": "amqp://rabbit/?heartbeat=abc&heartbeat=30"}, ["its heartbeat= is given twice"]),
        ({"BRIDGE_BROKER": "amqp://rabbit/?heartbeat="}, ["its heartbeat= must be a whole number"]),
        # (NaN meant a grace without end; Kafka refused the size with a traceback)
        ({"BRIDGE_GRACE_S": "nan"}, ["grace_s must be a finite number, got 'nan'"]),
        ({"BRIDGE_MAX_MESSAGE_BYTES": "2000000000"}, ["max_message_bytes must be at most 999,475,712"]),
        ({"BRIDGE_PREFETCH": "70000"}, ["prefetch must be at most 65535"]),
        ({"BRIDGE_PARTITIONS": str(2**31)}, ["partitions must be at most 10,000"]),  # (OverflowError)
        ({"BRIDGE_CONCURRENCY": "70000"}, ["concurrency must be at most 65,535"]),
        ({"BRIDGE_DELAY_TIERS": "1s,1001ms,1.0004s"}, ["delay_tiers must be whole milliseconds"]),
        # (a file named `keys.db?mode=ro` was made)
        ({"BRIDGE_IDEMPOTENCY": "sqlite:///tmp/keys.db?mode=ro"}, ["takes a path and no options (?...)"]),
        # (a worker took each for a store that did not answer, and its keyed jobs waited for good)
        ({"BRIDGE_IDEMPOTENCY": "sqlite:///tmp"}, ["'sqlite:///tmp': /tmp is a directory"]),
        ({"BRIDGE_IDEMPOTENCY": "sqlite:///dev/null"}, ["/dev/null is not a regular file"]),
        ({"BRIDGE_IDEMPOTENCY": "sqlite:///dev/null/keys.db"}, ["/dev/null is not a directory"]),
        ({"BRIDGE_IDEMPOTENCY": f"sqlite://{REPO / 'README.md'}"}, ["README.md is not a SQLite database"]),
        # (a store's own options: found when its first keyed job came, which then waited for good)
        (
            {"BRIDGE_IDEMPOTENCY": "redis://cache:6379/0?socket_timeout=5s"},
            ["idempotency 'redis://cache:6379/0?socket_timeout=5s'", "Invalid value for 'socket_timeout'"],
        ),
        # (redis-py took port 0 for 6379; PostgreSQL's port 0 waited for good, as a store outage)
        ({"BRIDGE_IDEMPOTENCY": "redis://cache:0/0"}, ["'redis://cache:0/0': its port must be"]),
        ({"BRIDGE_IDEMPOTENCY": "redis://cache:abc/0"}, ["'redis://cache:abc/0': its port must be"]),
        (
            {"BRIDGE_IDEMPOTENCY": "postgresql://db:5432,db2:0/b"},
            ["'postgresql://db:5432,db2:0/b': its port"],
        ),
        # (0: libpq waited for a connection without end; every redis-py read timed out at once,
        # an outage without end: keyed jobs waited for good)
        (
            {"BRIDGE_IDEMPOTENCY": "redis://cache:6379/0?socket_timeout=0"},
            ["its socket_timeout must be a number of seconds above 0, not 0.0"],
        ),
        (
            {"BRIDGE_IDEMPOTENCY": "postgresql://db/bridge?connect_timeout=0"},
            ["its connect_timeout must be a number of seconds above 0, not '0'"],
        ),
        # (libpq and redis-py find these only as they connect, or at each command: every claim
        # failed, keyed jobs waited as in an outage without end, or went round the tiers with
        # a traceback each time; redis-py took /abc for database 0)
        (
            {"BRIDGE_IDEMPOTENCY": "postgresql://db/bridge?connect_timeout=1e9999"},
            ["its connect_timeout must be a number of seconds above 0, not '1e9999'"],
        ),
        (
            {"BRIDGE_IDEMPOTENCY": "postgresql://db:abc/bridge"},
            ["'postgresql://db:abc/bridge': its port must be"],
        ),
        (
            {"BRIDGE_IDEMPOTENCY": "postgresql://db:99999/bridge"},
            ["its port must be a number from 1 to 65535"],
        ),
        (
            {"BRIDGE_IDEMPOTENCY": "postgresql://db/bridge?sslmode=always"},
            ["its sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full, not"],
        ),
        (
            {"BRIDGE_IDEMPOTENCY": "postgresql://db/bridge?target_session_attrs=rw"},
            ["its target_session_attrs must be one of any, read-write"],
        ),
        ({"BRIDGE_IDEMPOTENCY": "redis://cache:6379/abc"}, ["its path must be a database number"]),
        (
            {"BRIDGE_IDEMPOTENCY": "redis://cache:6379/0?bogus=1"},
            ["an option redis-py does not take", "'bogus'"],
        ),
        # (the default store in a folder that is a file: found at the first keyed job, which
        # waited for good)
        (
            {"BRIDGE_DATA": "/dev/null"},
            ["/dev/null is not a directory", "the default store: set BRIDGE_DATA"],
        ),
        # (a folder nothing can be made in: found at the first keyed job, which waited for good)
        (
            {"BRIDGE_IDEMPOTENCY": "sqlite:///proc/sys/bridge/keys.db"},
            ["'sqlite:///proc/sys/bridge/keys.db': /proc/sys cannot be written to"],
        ),
        # (Kafka: librdkafka refused the group in every transaction, and consume tried again
        # every 5 s for good)
        ({"BRIDGE_GROUP": "büro"}, ["group 'büro' must be printable ASCII"]),
        ({"BRIDGE_GROUP": "a\tb"}, ["group 'a\\tb' must be printable ASCII"]),
        # (RabbitMQ: a traceback from pamqp; Kafka: topics it then refused to make)
        ({"BRIDGE_PREFIX": "my jobs"}, ["prefix 'my jobs': use letters, digits, '.', '_' and '-'"]),
        # (a prefix of 231 to 240 was taken: Kafka refused its tiers' `.dlq.done` topics)
        (
            {"BRIDGE_PREFIX": "p" * 231},
            ["is 231 characters", "longer than a Kafka topic's 249; give it at most 230"],
        ),
        ({"BRIDGE_PREFIX": "p" * 229, "BRIDGE_DELAY_TIERS": "250ms,1s"}, ["give it at most 228"]),
        # (RabbitMQ refused the tier's TTL with a traceback, Kafka its retention)
        (
            {"BRIDGE_DELAY_TIERS": "1s,1000000000000d"},
            ["delay_tiers must be at most 365d, not 1000000000000d"],
        ),
        # (ignored: with a directory registry, job types came from it alone, so a mistyped or
        # another folder of the app's schemas went unnoticed)
        ({"BRIDGE_SCHEMAS": "/nonexistent"}, ["schemas /nonexistent: not a directory of .avsc files"]),
        (
            {"BRIDGE_SCHEMAS": str(REPO / "tests")},
            ["registry schemas is a directory", "would be ignored: give the one directory"],
        ),
        (
            {"BRIDGE_IDEMPOTENCY": "postgresql://bridge:secret@db/bridge?timeout=5"},
            [
                "idempotency 'postgresql://bridge:***@db/bridge?timeout=5'",
                'invalid URI query parameter: "timeout"',
            ],
        ),
    ],
)
def test_bad_settings_are_reported_at_once(env: dict[str, str], fragments: list[str]) -> None:
    done = bridge("enqueue", "billing.ChargeCard", CHARGE, "--registry", "schemas", **env)
    assert_one_line_error(done, *fragments)


@pytest.mark.parametrize(
    "options, fragment",
    [
        # (aio-pika tried again every second for good, saying nothing: aiormq reads it first)
        ("cadata=zzz", "its cadata= is no base64 (of DER certificates): Incorrect padding"),
        # (both said that RabbitMQ could not be reached)
        ("cafile=/nonexistent", "its cafile= cannot be used: [Errno 2] No such file"),
        ("cafile={junk}", "its cafile= cannot be used: [X509: NO_CERTIFICATE_OR_CRL_FOUND]"),
        ("certfile={junk}&keyfile=", "its certfile= and keyfile= cannot be used:"),
        # (an empty one beside another is a path to aiormq: "cannot reach", as it failed)
        ("cafile=&capath={folder}", "its cafile= capath= cannot be used: [Errno 2] No such file"),
        # (ignored without its certificate)
        ("keyfile={junk}", "its keyfile= goes with a certfile="),
    ],
)
def test_tls_files_an_amqps_url_names_that_cannot_be_used_are_named(
    options: str, fragment: str, tmp_path: Path
) -> None:
    junk = tmp_path / "not-a-certificate.pem"
    junk.write_text("not a certificate\n")
    options = options.format(junk=junk, folder=tmp_path)
    done = bridge(
        "enqueue", "billing.ChargeCard", CHARGE, "--registry", "schemas",
        "--broker", f"amqps://127.0.0.1:1/?{options}",
    )  # fmt: skip
    assert_one_line_error(done, f"RabbitMQ at amqps://127.0.0.1:1/?{options}: {fragment}")
    assert "cannot reach" not in done.stderr


def test_an_enqueue_whose_id_cannot_be_written_says_the_job_is_out_and_exits_0() -> None:
    # Given stdout on a full disk, When a job is enqueued, Then the job id is on stderr, saying
    # the job is out, and the exit is 0: a traceback and 1 made a script enqueue it again.
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "bridge", "enqueue", "billing.ChargeCard", CHARGE, "--registry", "schemas",
             "--broker", "memory://"],
            cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(r"^bridge: job \S+ is enqueued; its id could not be written \(\[Errno 28\]", done.stderr)
    assert "Traceback" not in done.stderr


def test_a_command_whose_output_cannot_be_written_says_so_in_one_line() -> None:
    # (PYTHONUNBUFFERED, common in containers, makes each print the write that fails)
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "bridge", "dev", "status"], cwd=REPO, stdout=full, stderr=subprocess.PIPE,
            text=True, timeout=60, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    assert_one_line_error(done, "bridge: a write failed ([Errno 28] No space left on device)")


def test_an_enqueue_to_a_delay_tier_is_refused_on_memory_as_on_the_brokers() -> None:
    # (memory:// took it and printed a job id, where Kafka and RabbitMQ refuse it)
    args = ["billing.ChargeCard", CHARGE, "--queue", "bridge.delay.5s", "--registry", "schemas"]
    done = bridge("enqueue", *args, "--broker", "memory://")
    assert_one_line_error(
        done, "queue bridge.delay.5s is a delay tier, not a queue: enqueue the job to its own"
    )


def test_a_directory_registry_and_the_same_folder_as_the_apps_schemas_are_one_setting() -> None:
    # Given the registry as a relative folder and the app's schemas as that folder's full path,
    # Then that is no conflict: the enqueue goes through.
    done = bridge(
        "enqueue", "billing.ChargeCard", CHARGE, "--registry", "schemas", "--broker", "memory://",
        BRIDGE_SCHEMAS=str(REPO / "schemas"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_a_setting_that_cannot_be_read_is_not_compared_as_its_default() -> None:
    # Given a concurrency that is no number and a prefetch of 4, Then the one line names the
    # concurrency, and says nothing of the prefetch: it was said to be below a concurrency of
    # 16, the default, which nobody asked for.
    env = {"BRIDGE_CONCURRENCY": "abc", "BRIDGE_PREFETCH": "4"}
    done = bridge("enqueue", "billing.ChargeCard", CHARGE, "--registry", "schemas", **env)
    assert_one_line_error(done, "concurrency must be a whole number, got 'abc'")
    assert "prefetch" not in done.stderr


@pytest.mark.parametrize(
    ("url", "client"), [("redis://127.0.0.1/0", "redis"), ("postgresql://db/b", "psycopg")]
)
def test_a_store_whose_client_is_not_installed_is_reported_at_once(
    tmp_path: Path, url: str, client: str
) -> None:
    # Given a store whose client cannot be imported (a package first on the path that refuses),
    (tmp_path / client).mkdir()
    (tmp_path / client / "__init__.py").write_text("raise ImportError('not installed')\n")
    # When a job is enqueued, Then one line names the extra to install. (It was found at the
    # first keyed job only, whose every copy then went round the delay tiers for good.)
    done = bridge(
        "enqueue", "billing.ChargeCard", CHARGE, "--registry", "schemas",
        BRIDGE_IDEMPOTENCY=url, PYTHONPATH=f"{tmp_path}:{REPO}",
    )  # fmt: skip
    extra = "redis" if client == "redis" else "postgres"
    assert_one_line_error(done, f"needs {client}: pip install 'bridge-jobs[{extra}]'")


def test_an_app_module_that_exits_when_imported_is_reported(tmp_path: Path) -> None:
    # Given an app module that runs a script when imported, ending in sys.exit(0),
    (tmp_path / "script.py").write_text("import sys\nimport bridge\napp = bridge.Bridge()\nsys.exit(0)\n")
    # When it is consumed, Then one line says why nothing runs (consume exited 0, silent).
    done = bridge("consume", "--app", "script:app", "--broker", "memory://", PYTHONPATH=str(tmp_path))
    assert_one_line_error(done, "--app 'script:app': importing script called sys.exit(0)", "__main__")


def test_an_app_is_found_from_a_working_directory_that_was_deleted(tmp_path: Path) -> None:
    # Given a shell whose working directory was deleted (FileNotFoundError from os.getcwd),
    gone = tmp_path / "gone"
    gone.mkdir()
    command = f'cd "{gone}" && rmdir "{gone}" && exec "$0" -m bridge "$@"'
    args = ["enqueue", "billing.ChargeCard", "{}", "--app", "consumers.billing:app", "--broker", "memory://"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    done = subprocess.run(
        ["sh", "-c", command, sys.executable, *args], env={**environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # Then the app on the Python path is imported all the same: its payload is what is refused.
    assert_one_line_error(done, "billing.ChargeCard.invoice_id: missing")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        # (tracebacks: ValueError from urllib and from confluent-kafka's client at the first schema)
        ("http://[::1", "it is not a URL (Invalid IPv6 URL)"),
        ("http://a,/tmp", "'/tmp' is not an http:// or https:// URL"),
        # (called a registry that did not answer)
        ("http://localhost:99999", "its port must be a number from 1 to 65535"),
    ],
)
def test_a_malformed_registry_url_is_reported_before_any_request(url: str, problem: str) -> None:
    app = ("--app", "consumers.billing:app", "--broker", "memory://", "--registry", url)
    done = bridge("enqueue", "billing.ChargeCard", CHARGE, *app)
    assert_one_line_error(done, f"registry {url!r}: {problem}; use http(s)://host:port/path")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        # (TypeError: 'int' object is not iterable)
        (b"bridge = 5\n", "bridge must be a table of settings ([bridge]), not 5"),
        # (UnicodeDecodeError)
        (b"\xff[bridge]\n", "'utf-8' codec can't decode byte 0xff"),
        # (the broker beside [bridge] was dropped unread: "no broker: ... or broker in bridge.toml")
        (b'broker = "memory://"\n[bridge]\ngroup = "g"\n[worker]\n', "broker, worker outside the [bridge]"),
        # (OverflowError; 3.7 became 3; a list became its repr as text)
        (b"[bridge]\nconcurrency = inf\n", "concurrency must be a whole number, got inf"),
        (b"[bridge]\nconcurrency = 3.7\n", "concurrency must be a whole number, got 3.7"),
        (b"[bridge]\nconcurrency = true\n", "concurrency must be a whole number, got True"),
        (b'[bridge]\nprefix = ["a", "b"]\n', "prefix must be text, got ['a', 'b']"),
        # (passed, then OverflowError naming the tier's Kafka topic)
        (b"[bridge]\ndelay_tiers = [1, inf]\n", "delay_tiers must be durations above zero"),
        (b"[bridge]\ndelay_tiers = [true, 5]\n", "duration True: write seconds, or a number"),  # (1 s)
        (b"[bridge]\nconcurrency = 1e300\n", "concurrency must be at most 65,535"),
        # (it said "unknown setting 'concurency'", naming neither the file nor the setting meant)
        (
            b"[bridge]\nconcurency = 4\n",
            "bridge.toml: unknown setting 'concurency' (did you mean 'concurrency'?)",
        ),
        # (TOML's own "Invalid value (at line 2, column 10)")
        (b"[bridge]\nbroker = kafka://x:9092\n", "Invalid value (at line 2, column 10) (text goes in quotes"),
    ],
)
def test_a_bridge_toml_of_the_wrong_shape_is_named(tmp_path: Path, toml: bytes, message: str) -> None:
    (tmp_path / "bridge.toml").write_bytes(toml)
    with pytest.raises(ConfigError) as refused:
        Settings.load(environ={}, toml_path=tmp_path / "bridge.toml")
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "url", ["redis://cache/0", "redis://cache:6380/1", "postgresql://db/bridge", "sqlite:///tmp/keys.db"]
)
def test_good_store_urls_pass_the_settings_check(url: str) -> None:
    # (A Redis URL without a port, which redis-py takes for 6379, was refused: "its port must be
    # a number from 1 to 65535".)
    assert Settings.load(environ={"BRIDGE_IDEMPOTENCY": url}).idempotency == url


@pytest.mark.parametrize("store", ["postgres", "redis"])
def test_a_worker_whose_store_refuses_its_url_stops_with_one_line(
    brokers: dict[str, str], store: str
) -> None:
    # Given a PostgreSQL store URL with a wrong password, or a Redis one with a database that
    # does not exist, When `bridge consume` starts, Then it stops at once with one line saying
    # so. (Taken for a store that is away, the keyed jobs would wait for it for good.)
    url = brokers[store]
    url = (
        url.replace("bridge:bridge@", "bridge:wrong@")
        if store == "postgres"
        else url.rsplit("/", 1)[0] + "/99"
    )
    done = bridge("consume", "--app", "consumers.billing:app", "--broker", "memory://", "--idempotency", url)
    says = (
        'password authentication failed for user "bridge"'
        if store == "postgres"
        else "DB index is out of range"
    )
    said = done.stderr.strip().splitlines()[-1]  # (after the daemon's log lines)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert said.startswith("bridge: idempotency store ") and says in said
    assert said.endswith(": check the user, password and database in its URL")


def test_a_bridge_toml_that_starts_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    # (As some Windows editors save UTF-8. It was refused: "Invalid statement (at line 1, column 1)".)
    (tmp_path / "bridge.toml").write_bytes(b'\xef\xbb\xbf[bridge]\ngroup = "billing"\n')
    assert Settings.load(environ={}, toml_path=tmp_path / "bridge.toml").group == "billing"


@pytest.mark.parametrize("shape", ["a directory", "a link to nothing"])
def test_a_bridge_toml_that_is_no_file_is_named(tmp_path: Path, shape: str) -> None:
    # Given a bridge.toml that is a directory, or a link whose file is gone, When the settings
    # are loaded, Then they say so. (Either was ignored: "no broker: ... or broker in bridge.toml".)
    path = tmp_path / "bridge.toml"
    if shape == "a directory":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "moved.toml")
    with pytest.raises(ConfigError) as refused:
        Settings.load(environ={}, toml_path=path)
    expected = (
        "is a directory" if shape == "a directory" else f"links to {tmp_path / 'moved.toml'}, which does not"
    )
    assert expected in str(refused.value)


def test_a_relative_bridge_data_is_taken_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given BRIDGE_DATA=data, run from tmp_path, Then the default store is tmp_path/data's.
    # (It was /data's: `sqlite:///` and the relative path, read from /.)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BRIDGE_DATA", "data")
    assert default_url() == f"sqlite://{tmp_path / 'data' / 'idempotency.db'}"


def test_a_keys_job_type_that_is_no_record_name_gets_one_line() -> None:
    # (`billing.ChargeCard:tenant` reached billing.ChargeCard's keys that began `tenant:`:
    # records are named `run:<type>:<key>`)
    done = bridge(
        "keys", "forget", "billing.ChargeCard:tenant", "--all", "--yes", "--idempotency", "memory://"
    )
    assert_one_line_error(done, "job type 'billing.ChargeCard:tenant': give a record's full name")


def test_delay_tiers_given_as_a_number_in_bridge_toml_are_named(tmp_path: Path) -> None:
    # Given `delay_tiers = 5` in bridge.toml, Then loading the settings says what to write
    # instead. (It raised TypeError: 'int' object is not iterable.)
    (tmp_path / "bridge.toml").write_text("[bridge]\ndelay_tiers = 5\n")
    with pytest.raises(ConfigError) as refused:
        Settings.load(environ={}, toml_path=tmp_path / "bridge.toml")
    assert str(refused.value) == 'delay_tiers must be durations such as "1s,5s,30s", got 5'


def test_a_since_further_back_than_any_time_gets_one_line() -> None:
    # (It raised OverflowError.)
    done = bridge("dlq", "list", "billing", "--since", "9" * 400, "--broker", "memory://")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "argument --since: '999" in done.stderr and "is further back than any time" in done.stderr


def test_a_since_that_is_neither_a_duration_nor_a_time_says_both_will_do() -> None:
    # (It asked for an ISO 8601 time only, though `--since 2h` is the usual way.)
    done = bridge("dlq", "list", "billing", "--since", "yesterday", "--broker", "memory://")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "'yesterday': write how long ago, e.g. 2h or 3d, or an ISO 8601 time" in done.stderr


def test_a_max_replays_beyond_an_avro_int_gets_one_line() -> None:
    # (A job replayed 2**31 - 1 times was put back with a count beyond an Avro int, which no
    # reader takes: it came back as undecodable.)
    args = ("dlq", "replay", "billing", "--all", "--broker", f"kafka://127.0.0.1:{closed_port()}")
    refused = bridge(*args, "--max-replays", str(2**31))
    assert_one_line_error(refused, "max_replays must be a whole number from 1 to 2,147")
    assert_one_line_error(bridge(*args, "--max-replays", str(2**31 - 1)), "cannot reach Kafka")


@pytest.mark.parametrize("rate", ["0", "-5", "nan", "inf", "fast"])
def test_a_replay_rate_that_is_no_rate_gets_one_line(rate: str) -> None:
    # (0 and below meant no limit; nan and inf passed too.)
    done = bridge("dlq", "replay", "billing", "--all", "--rate", rate, "--broker", "memory://")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"argument --rate: expected a number of replays per second above 0, got '{rate}'" in done.stderr


@pytest.mark.parametrize("count", ["0", "-1", "many", "²", "1.5"])
def test_a_count_that_is_no_whole_number_gets_one_line_saying_so(count: str) -> None:
    # ("²" is a digit to str.isdigit, not to int(): argparse said "invalid _positive value".)
    done = bridge("dlq", "list", "billing", "--limit", count, "--broker", "memory://")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"argument --limit: expected a whole number of at least 1, got '{count}'" in done.stderr


@pytest.mark.parametrize(
    "args, said",
    [
        (["--broker", "memory://", "--registry", "schemas", "enqueue", "billing.ChargeCard", CHARGE], "gone"),
        (["dlq", "--broker", "memory://", "list", "billing"], "memory:// keeps dead letters in one process"),
    ],
)
def test_options_before_the_command_count_as_after_it(args: list[str], said: str) -> None:
    # Given --broker before the command's name (as `bridge --help` shows it), and BRIDGE_BROKER
    # naming a broker nobody runs, Then the command uses the broker given. (The command's own
    # default overwrote it: the command ran on BRIDGE_BROKER's broker, so a `dlq purge` could
    # empty another broker's queue.)
    done = bridge(*args, BRIDGE_BROKER=f"kafka://127.0.0.1:{closed_port()}")
    assert said in done.stderr and "cannot reach" not in done.stderr, done.stderr


def test_a_job_enqueued_to_memory_on_the_command_line_is_said_to_be_gone() -> None:
    # Given --broker memory:// (a broker inside one process), When a job is enqueued, Then it is
    # checked and gets its id, And stderr says the job is gone and what broker to give. (The
    # enqueue printed an id for a job that was gone at once, and said nothing more.)
    app = ("--app", "consumers.billing:app", "--broker", "memory://")
    done = bridge("enqueue", "billing.ChargeCard", CHARGE, *app)
    assert done.returncode == 0 and UUID.match(done.stdout.strip()), done.stderr
    assert done.stderr == (
        "bridge: this job is gone with this process: memory:// keeps jobs in one process, no other"
        " (give a kafka:// or amqp:// --broker)\n"
    )


def test_a_value_of_thousands_of_characters_is_cut_in_the_error_line() -> None:
    # Given a job type of 5,000 characters, When it is enqueued, Then the one error line shows
    # its start and its length, not all of it. (Each of the two places it was named was echoed
    # whole: a line of 10,000 characters.)
    done = bridge("enqueue", "k" * 5000, "{}", "--registry", "schemas", "--broker", "memory://")
    assert_one_line_error(done, "unknown job type 'kkkk", "... (5,003 characters)")
    assert len(done.stderr) < 500, len(done.stderr)
    # (And in argparse's own lines: a time of 3,000 characters.)
    done = bridge("enqueue", "test.Echo", "{}", "--at", "9" * 3000, "--broker", "memory://")
    assert done.returncode == 2 and "... (3,003 characters)" in done.stderr and len(done.stderr) < 500


def test_bad_app_and_missing_broker() -> None:
    assert_one_line_error(bridge("consume", "--app", "nowhere"), "write MODULE:ATTR")
    # (An empty one was taken for none: "bridge:  registers no handlers")
    assert_one_line_error(bridge("consume", "--app", ""), "--app '': write MODULE:ATTR")
    assert_one_line_error(bridge("consume", "--app", "..jobs:app"), "give the module's full name")
    assert_one_line_error(bridge("consume", "--app", "no.such.module:app"), "cannot import no.such.module")
    assert_one_line_error(bridge("consume", "--app", "consumers.billing:log"), "is not a bridge.Bridge")
    assert_one_line_error(bridge("consume", "--app", "consumers.billing:ap"), "consumers.billing has no 'ap'")
    assert_one_line_error(bridge("consume", "--app", "consumers.billing:app"), "no broker", "BRIDGE_BROKER")


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("import os\n\nraise RuntimeError('no DATABASE_URL')\n", "RuntimeError: no DATABASE_URL ("),
        ("def handler(:\n", "SyntaxError: invalid syntax ("),
    ],
)
def test_an_app_module_that_fails_to_import_gets_one_line(tmp_path: Path, source: str, says: str) -> None:
    # (Its traceback was printed instead.)
    (tmp_path / "broken_jobs.py").write_text(source)
    done = bridge("consume", "--app", "broken_jobs:app", PYTHONPATH=str(tmp_path))
    where = f"{tmp_path / 'broken_jobs.py'}, line {3 if 'raise' in source else 1})"
    assert_one_line_error(done, "--app 'broken_jobs:app': importing broken_jobs failed: " + says + where)


def test_schemas_check_of_a_folder_without_schemas_fails(tmp_path: Path) -> None:
    # (It checked nothing and exited 0: a wrong path passed as a CI gate.)
    for command in ("check", "register"):
        done = bridge("schemas", command, str(tmp_path), "--registry", f"http://127.0.0.1:{closed_port()}")
        assert_one_line_error(done, f"no job types in {tmp_path}: it holds no <full name>.avsc files")


@pytest.mark.parametrize("broker_name", ["kafka", "rabbitmq"])
def test_topology_apply_and_enqueue_on_a_real_broker(
    broker_name: str, brokers: dict[str, str], queue: str
) -> None:
    # Given a fresh queue, When the plan is printed, applied twice and a job enqueued,
    # Then the dry run creates nothing, the second apply finds everything, and a UUIDv7 comes back.
    # (The queue named twice is planned once: Kafka refused to subscribe to it twice.)
    env = {
        "BRIDGE_BROKER": brokers[broker_name], "BRIDGE_REGISTRY": str(SCHEMAS),
        "BRIDGE_PREFIX": f"p{queue[2:10]}", "BRIDGE_DELAY_TIERS": "1s,1m",
    }  # fmt: skip
    plan = bridge("topology", "apply", "--queues", f"{queue},{queue}", "--dry-run", **env)
    assert plan.returncode == 0, plan.stderr
    assert "exists" not in plan.stdout and queue in plan.stdout and f"p{queue[2:10]}.delay.1m" in plan.stdout
    lines = plan.stdout.splitlines()
    assert len(lines) == len(set(lines)), plan.stdout
    refused = bridge("enqueue", "test.Echo", '{"n": 1}', "--queue", queue, **env)
    assert_one_line_error(refused, "topology apply")

    assert bridge("topology", "apply", "--queues", queue, **env).returncode == 0
    again = bridge("topology", "apply", "--queues", queue, **env)
    assert "create" not in again.stdout and again.stdout.count("exists") >= 4, again.stdout
    # (The dead-letter queue's own name: told to run topology apply, which would make its own.)
    listed = bridge("dlq", "list", f"{queue}.dlq", **env)
    assert_one_line_error(
        listed, f"is a dead-letter queue: the dlq commands take the job queue's name: {queue}"
    )

    done = bridge("enqueue", "test.Echo", '{"n": 1}', "--queue", queue, "--key", "k1", **env)
    assert done.returncode == 0, done.stderr
    assert UUID.match(done.stdout.strip())

    # --delay 90s waits in the longest tier that fits (1m), carrying run_at = created_at + 90 s.
    delayed = bridge("enqueue", "test.Echo", '{"n": 2}', "--queue", queue, "--delay", "90s", **env)
    assert delayed.returncode == 0, delayed.stderr
    app = Bridge(broker=env["BRIDGE_BROKER"], registry=str(SCHEMAS), prefix=env["BRIDGE_PREFIX"])
    [body] = read_queue(app, tier_held_in(app, 60))
    envelope = codec.decode(body, app.registry)[1]
    assert envelope["id"] == delayed.stdout.strip() and envelope["run_at"] - envelope["created_at"] == 90_000


def test_enqueue_mistakes_name_the_flag_that_mends_them() -> None:
    # (Without a registry, the type was said to have no .avsc, as if a folder had been searched;
    # --dedupe alone was told of `dedupe=True` and `idempotency_key`, the Python API's names.)
    no_registry = bridge(
        "enqueue", "billing.ChargeCard", CHARGE, "--queue", "billing", "--broker", "memory://"
    )
    assert_one_line_error(
        no_registry, "unknown job type 'billing.ChargeCard': no registry is set (--registry"
    )
    alone = bridge("enqueue", "billing.ChargeCard", CHARGE, "--dedupe", "--app", "consumers.billing:app")
    assert_one_line_error(alone, "--dedupe needs --idempotency-key")


@pytest.mark.parametrize(
    "args, says",
    [
        (
            "consume --app consumers.billing:app --concurency 4",
            "bridge consume: unknown option --concurency: did you mean --concurrency?",
        ),
        (
            "dlq list billing --reasn=exhausted",
            "bridge dlq list: unknown option --reasn: did you mean --reason?",
        ),
        (
            "enqueue t {} --idempotency_key k",
            "bridge enqueue: unknown option --idempotency_key: did you mean --idempotency-key?",
        ),
        ("dev up --colour", "bridge dev: unknown option --colour"),
        ("topology apply --queues q extra", "bridge topology apply: unrecognized arguments: extra"),
    ],
    ids=["consume", "dlq list", "enqueue", "no close one", "not an option"],
)
def test_an_unknown_option_is_named_by_its_command_with_the_one_it_may_have_meant(
    args: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # (It was `bridge: unrecognized arguments: --concurency 4 (see `bridge --help`)`: no hint,
    # and the help of a command that does not have the option.)
    with pytest.raises(SystemExit) as exited:
        cli.main(args.split())
    assert exited.value.code == 2
    command = says.partition(":")[0]
    assert capsys.readouterr().err == f"{says} (see `{command} --help`)\n"


def test_output_to_a_reader_that_goes_away_ends_quietly() -> None:
    # Given a command printing some 400 KB (more than a pipe holds), When its reader stops
    # reading and goes away (`| head`), Then it ends, exit code 1, with nothing on stderr.
    # (It ended with a traceback of BrokenPipeError.)
    queues = ",".join(f"q{n}" for n in range(10_000))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    command = [
        sys.executable,
        "-m",
        "bridge",
        "topology",
        "apply",
        "--queues",
        queues,
        "--broker",
        "memory://",
    ]
    with subprocess.Popen(
        command, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.read(100)
        process.stdout.close()
        stderr = process.stderr.read()
        assert process.wait(timeout=60) == 1
    assert stderr == ""


def test_python_dash_m_bridge_shows_help() -> None:
    done = bridge("--help")
    assert done.returncode == 0 and "enqueue" in done.stdout and "consume" in done.stdout


@pytest.mark.parametrize(
    "command", [["dlq", "purge", "q", "--all"], ["keys", "forget", "test.Echo", "--all"]]
)
def test_ctrl_d_at_a_confirmation_is_a_no(command: list[str], tmp_path: Path) -> None:
    # Given a command that asks before it removes for good, at a terminal,
    # When the person answers Ctrl-D (end of input), Then it exits 1, having removed nothing,
    # with no traceback. (EOFError came out as a traceback.)
    store = tmp_path / "keys.db"  # (a store of the workers', for `keys`)
    with contextlib.closing(sqlite3.connect(store)) as db:
        db.execute(idempotency_sql.SCHEMA)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    environ.update(BRIDGE_BROKER="memory://", BRIDGE_IDEMPOTENCY=f"sqlite:///{store}")
    pid, terminal = pty.fork()
    if pid == 0:  # the child, at the terminal's other end
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "bridge", *command], environ)
    seen = b""
    while not seen.endswith(b"[y/N] "):  # (the question; a command that never asks fails the read)
        seen += os.read(terminal, 1024)
    os.write(terminal, b"\x04")
    with contextlib.suppress(OSError):  # (EIO once the child has gone)
        while chunk := os.read(terminal, 1024):
            seen += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1, seen
    assert b"Traceback" not in seen, seen


def test_a_second_signal_says_what_was_done_by_then(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a command stopping on its first signal, whose exit line says what it has done so far,
    # When a second signal comes after more was done, Then the line says what was done by then,
    # and the process exits at once with 128 + the signal. (A dlq replay said only "stopped at
    # once", its last letter's fate untold.)
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    done = ["replayed 0"]

    async def scenario() -> None:
        stop = asyncio.Event()
        cli._on_signals(stop.set, stopping="stopping", exiting=lambda: f"exiting after {done[0]}")
        signal.raise_signal(signal.SIGINT)
        await stop.wait()
        done[0] = "replayed 2"
        signal.raise_signal(signal.SIGINT)
        while not exits:
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING, logger="bridge"):
        asyncio.run(asyncio.wait_for(scenario(), 10))
    assert exits == [128 + signal.SIGINT]
    assert "exiting after replayed 2" in caplog.text
