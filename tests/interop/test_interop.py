"""Services in other languages produce and read bridge jobs: Java with Apache Avro and
kafka-clients, Go with hamba/avro and amqp091-go, Node with avsc and amqplib, against the real
brokers (docs/envelope.md).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient

from bridge import Bridge, JobContext, Permanent, codec
from bridge.registry import DEAD_LETTER, ENVELOPE, SchemaDirectory
from bridge.transports import Outgoing, dlq_name
from tests import names
from tests.brokerio import java_partition, read_partitions, read_queue
from tests.conftest import SCHEMAS, run
from tests.interop.app import runs
from tests.interop.conftest import SCHEMA_DIRS, Enqueue, Program
from tests.processes import consumer, finish, publish

APP = "tests.interop.app:app"
TIERS = "1s"


def own_prefix() -> str:
    """A prefix of the test's own, so that a burst run waits for nobody else's delayed jobs."""
    return names.prefix()


def consume_burst(broker: str, queue: str, prefix: str, ledger: Path, *flags: str) -> str:
    """Run `bridge consume --burst` on the interop app until it exits 0; return its output."""
    env = {"BRIDGE_PREFIX": prefix, "BRIDGE_DELAY_TIERS": TIERS}
    # `consumer` starts the ledger app; a second --app replaces it (argparse keeps the last).
    process = consumer(broker, queue, ledger, f"g-{queue}", "--burst", "--app", APP, *flags, env=env)
    code, log = finish(process, ledger)
    assert code == 0, log
    return log


def fingerprints(lines: str) -> dict[str, str]:
    """`FULL_NAME FINGERPRINT` lines as a dict."""
    return dict(line.split() for line in lines.splitlines())


def bridge_fingerprints(names: list[str]) -> dict[str, str]:
    registry = SchemaDirectory(SCHEMAS)
    return {name: f"{registry.schema(name).fingerprint:016x}" for name in names}


def as_json(datum: Any) -> Any:
    """A decoded datum as the Java reader prints it: bytes as hex."""
    if isinstance(datum, bytes):
        return datum.hex()
    if isinstance(datum, dict):
        return {name: as_json(value) for name, value in datum.items()}
    if isinstance(datum, list):
        return [as_json(item) for item in datum]
    return datum


def ran_once(ledger: Path) -> dict[str, Any]:
    """The one run in `ledger`, without its created_at, once that is checked to be milliseconds
    since the epoch (a producer writing seconds or µs would be orders of magnitude off)."""
    [ran] = runs(ledger)
    assert abs(ran.pop("created_at") - time.time() * 1000) < 60_000, ran
    return ran


def test_java_fingerprints_schemas_as_bridge_does(java: dict[str, Program]) -> None:
    # Given bridge's own schemas and the test job types,
    # When Apache Avro (Java) computes SchemaNormalization.parsingFingerprint64 of every record,
    # Then each is the fingerprint bridge writes in its single-object headers.
    printed = fingerprints(java["Fingerprint"](SCHEMA_DIRS))
    assert {"bridge.JobEnvelope", "bridge.JobError", "bridge.DeadLetter", "test.Echo"} <= set(printed)
    assert printed == bridge_fingerprints(list(printed))


def test_go_fingerprints_schemas_as_bridge_does(go_enqueue: Program) -> None:
    # Given the same schemas, When the Go program fingerprints them with hamba/avro,
    # Then each is the fingerprint bridge writes (hamba needs the logical types stripped first).
    printed = fingerprints(go_enqueue("-schemas", SCHEMA_DIRS, "-fingerprints"))
    assert set(printed) == {"bridge.JobEnvelope", "bridge.JobError", "bridge.DeadLetter", "test.Echo"}
    assert printed == bridge_fingerprints(list(printed))


def test_java_reads_the_dead_letters_bridge_writes(
    java: dict[str, Program], brokers: dict[str, str], queue: str, tmp_path: Path
) -> None:
    # Given a job whose handler raises Permanent and bytes that are no job, consumed by bridge on Kafka,
    # When Apache Avro (Java) decodes the two dead letters, and the payload inside the first,
    # Then it reads every field as bridge wrote it: the reason, the source partition and offset,
    # the envelope with its error history, or the raw bytes.
    app = Bridge(
        broker=brokers["kafka"],
        registry=str(SCHEMAS),
        group=f"g-{queue}",
        prefix=own_prefix(),
        delay_tiers=TIERS,
    )

    @app.job("test.Echo", queue=queue)
    async def decline(payload: dict[str, Any], ctx: JobContext) -> None:
        raise Permanent("card déclinée")

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            job = {"n": 7, "text": "naïve"}
            await app.enqueue_async("test.Echo", job, key="order-7", headers={"tenant": "acme"})
            await (await app.transport()).publish(Outgoing(queue, b"not a job"))
            await app.consume(burst=True)

    run(scenario())
    bodies = read_queue(app, dlq_name(queue))
    files = [tmp_path / f"letter-{n}" for n in range(len(bodies))]
    for file, body in zip(files, bodies, strict=True):
        file.write_bytes(body)
    printed = java["ReadDeadLetter"](SCHEMA_DIRS, *map(str, files))

    read = [json.loads(line) for line in printed.splitlines()]
    written = [codec.decode(body, app.registry, app.registry.schema(DEAD_LETTER))[1] for body in bodies]
    assert [letter["dead_letter"] for letter in read] == as_json(written)
    by_reason = {letter["dead_letter"]["reason"]: letter for letter in read}
    assert set(by_reason) == {"permanent", "undecodable"}
    assert by_reason["permanent"]["payload"] == {"n": 7, "text": "naïve", "sleep_ms": 0}
    permanent = by_reason["permanent"]["dead_letter"]
    assert permanent["partition"] is not None and permanent["offset"] is not None
    envelope = permanent["envelope"]
    assert envelope["key"] == "order-7" and envelope["errors"][0]["type"] == "Permanent"
    assert by_reason["undecodable"]["dead_letter"]["raw"] == b"not a job".hex()
    assert by_reason["undecodable"]["payload"] is None


def test_job_enqueued_by_java_on_kafka_runs_in_bridge_consume(
    java: dict[str, Program], brokers: dict[str, str], queue: str, tmp_path: Path
) -> None:
    # Given a bridge queue on Kafka,
    # When a Java producer (kafka-clients, Apache Avro's single-object encoder) enqueues a
    # test.Echo job on it and `bridge consume --burst` runs,
    # Then the handler ran the job once, with the payload, key, headers and created_at Java gave it.
    broker, prefix, ledger = brokers["kafka"], own_prefix(), tmp_path / "ledger"
    run(publish(broker, queue, 0, prefix=prefix, delay_tiers=TIERS))  # creates the topics
    bootstrap = broker.partition("://")[2]
    job_id = java["KafkaEnqueue"](SCHEMA_DIRS, bootstrap, queue, "7", "from Java", "order-7").strip()
    # (Java put it where bridge's producers would: they partition keys with the same murmur2.)
    assert [partition for partition, _ in read_partitions(bootstrap, queue)] == [
        java_partition(b"order-7", 3)
    ]

    log = consume_burst(broker, queue, prefix, ledger)

    assert ran_once(ledger) == {
        "id": job_id, "queue": queue, "key": "order-7", "attempt": 1,
        "headers": {"producer": "java"}, "payload": {"n": 7, "text": "from Java", "sleep_ms": 0},
    }  # fmt: skip
    assert "dead-lettering" not in log


def test_job_enqueued_by_java_through_the_registry_runs_in_bridge_consume(
    java: dict[str, Program], brokers: dict[str, str], queue: str, tmp_path: Path
) -> None:
    # Given a bridge queue on Kafka and a Confluent-API registry,
    # When a Java producer registers the envelope and test.Echo schemas over HTTP and enqueues
    # a job framed with their registry ids, and `bridge consume --burst --registry URL` runs,
    # Then the job is framed with the registry's ids and the handler ran it once, as Java gave it
    # (created_at included).
    broker, registry, prefix, ledger = (
        brokers["kafka"],
        brokers["apicurio"],
        own_prefix(),
        tmp_path / "ledger",
    )
    run(publish(broker, queue, 0, prefix=prefix, delay_tiers=TIERS))  # creates the topics
    bootstrap = broker.partition("://")[2]
    args = (SCHEMA_DIRS, registry, bootstrap, queue, "9", "through the registry", "order-9")
    job_id = java["RegistryEnqueue"](*args).strip()

    [body] = read_queue(Bridge(broker=broker), queue)
    with SchemaRegistryClient({"url": registry}) as client:
        envelope_id = client.get_latest_version(ENVELOPE).schema_id
    assert body[:5] == b"\x00" + envelope_id.to_bytes(4, "big")

    log = consume_burst(broker, queue, prefix, ledger, "--registry", registry, "--schemas", str(SCHEMAS))

    assert ran_once(ledger) == {
        "id": job_id, "queue": queue, "key": "order-9", "attempt": 1,
        "headers": {"producer": "java"}, "payload": {"n": 9, "text": "through the registry", "sleep_ms": 0},
    }  # fmt: skip
    assert "dead-lettering" not in log


def test_node_fingerprints_schemas_as_bridge_does(node: Program) -> None:
    names = ["bridge.JobError", "bridge.JobEnvelope", "bridge.DeadLetter", "test.Echo"]
    assert fingerprints(node("fingerprints", "--schemas", SCHEMA_DIRS)) == bridge_fingerprints(names)


def test_node_reads_a_job_that_bridge_enqueued(node: Program, brokers: dict[str, str], queue: str) -> None:
    # Given a job enqueued by bridge on RabbitMQ, with a key and headers, that no worker ran,
    app = Bridge(broker=brokers["rabbitmq"], registry=str(SCHEMAS), prefix=own_prefix(), delay_tiers=TIERS)

    async def enqueue() -> str:
        async with app:
            await app.apply_topology([queue])
            return await app.enqueue_async(
                "test.Echo", {"n": 7, "text": "from Python"}, queue=queue, key="order-7",
                headers={"producer": "python"},
            )  # fmt: skip

    job_id = run(enqueue())
    # When a Node service takes it from the queue and decodes it (avsc),
    read = json.loads(node("read", "--schemas", SCHEMA_DIRS, "--url", brokers["rabbitmq"], "--queue", queue))
    # Then it reads the job as bridge wrote it: the envelope's fields and the payload inside.
    created_at = read.pop("createdAt")
    assert read == {
        "id": job_id, "type": "test.Echo", "queue": queue, "key": "order-7", "attempt": 1,
        "headers": {"producer": "python"}, "payload": {"n": 7, "text": "from Python", "sleep_ms": 0},
    }  # fmt: skip
    assert abs(created_at / 1000 - time.time()) < 60


def test_job_enqueued_on_rabbitmq_by_go_or_node_runs_in_bridge_consume(
    rabbitmq_enqueue: Enqueue, brokers: dict[str, str], queue: str, tmp_path: Path
) -> None:
    # Given a bridge queue on RabbitMQ under a prefix of its own,
    # When a Go producer (hamba/avro, amqp091-go) or a Node one (avsc, amqplib) publishes a
    # test.Echo job to <prefix>.jobs, routed by the queue's name, and `bridge consume --burst` runs,
    # Then the handler ran the job once, with the payload, key, headers and created_at the producer
    # gave it.
    broker, prefix, ledger = brokers["rabbitmq"], own_prefix(), tmp_path / "ledger"
    run(publish(broker, queue, 0, prefix=prefix, delay_tiers=TIERS))  # creates the queues
    language = rabbitmq_enqueue.language
    job_id = rabbitmq_enqueue(
        url=broker, prefix=prefix, queue=queue, n="8", text=f"from {language}", key="order-8"
    ).strip()

    log = consume_burst(broker, queue, prefix, ledger)

    assert ran_once(ledger) == {
        "id": job_id, "queue": queue, "key": "order-8", "attempt": 1,
        "headers": {"producer": language}, "payload": {"n": 8, "text": f"from {language}", "sleep_ms": 0},
    }  # fmt: skip
    assert "dead-lettering" not in log


def test_a_go_or_node_producer_fails_when_no_queue_takes_its_job(
    rabbitmq_enqueue: Enqueue, brokers: dict[str, str]
) -> None:
    # Given a prefix's exchange with one queue bound, but not the one the job names,
    broker, prefix = brokers["rabbitmq"], own_prefix()
    run(publish(broker, names.queue(), 0, prefix=prefix, delay_tiers=TIERS))
    missing = names.queue()
    # When the producer publishes a job to that queue (mandatory),
    done = rabbitmq_enqueue.run(url=broker, prefix=prefix, queue=missing)
    # Then RabbitMQ returns the message and the producer fails instead of reporting it enqueued.
    assert done.returncode != 0 and done.stdout == ""
    assert f'no queue "{missing}" is bound to {prefix}.jobs: NO_ROUTE' in done.stderr


def test_a_go_or_node_producer_says_which_exchange_is_missing(
    rabbitmq_enqueue: Enqueue, brokers: dict[str, str]
) -> None:
    # Given a prefix whose topology was never applied, When the producer publishes to it,
    broker, prefix = brokers["rabbitmq"], own_prefix()
    done = rabbitmq_enqueue.run(url=broker, prefix=prefix, queue="t")
    # Then it fails with RabbitMQ's reason, which names the exchange, as its own error: not a crash.
    assert done.returncode != 0 and done.stdout == ""
    assert f"NOT_FOUND - no exchange '{prefix}.jobs'" in done.stderr
    own_error = {  # Node's catch prints "enqueue: ..."; Go's log.Fatal a timestamp, then the error
        "node": r"enqueue: ",
        "go": r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d RabbitMQ closed the channel publishing to ",
    }[rabbitmq_enqueue.language]
    assert re.match(own_error, done.stderr), done.stderr
    trace = ("    at ", "goroutine ", "panic: ")  # Node's stack frames, Go's panic and goroutine dump
    assert not any(line.startswith(trace) for line in done.stderr.splitlines()), done.stderr
