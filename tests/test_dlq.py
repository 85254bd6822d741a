"""Dead-letter tools on memory, Kafka and RabbitMQ: list, show, replay (once), purge."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bridge import Bridge, JobContext, Permanent, codec, testing
from bridge.dlq import Selection
from bridge.envelope import MAX_INT, DeadLetter, now_ms
from bridge.errors import BridgeError, ConfigError
from bridge.registry import DEAD_LETTER
from bridge.transports import Outgoing, dlq_name
from tests import names
from tests.conftest import REPO, SCHEMAS, publish_envelope, run
from tests.processes import assert_one_line_error


@pytest.fixture
def make_app(broker: str) -> Callable[..., Bridge]:
    prefix = names.prefix()

    def make(**settings: Any) -> Bridge:
        settings.setdefault("group", f"g-{uuid.uuid4().hex[:12]}")
        return Bridge(broker=broker, registry=str(SCHEMAS), prefix=prefix, delay_tiers="1s", **settings)

    return make


def test_list_show_replay_and_purge(make_app: Callable[..., Bridge], queue: str) -> None:
    # Given two jobs dead-lettered as permanent failures and one that succeeded,
    # When the letters are listed, shown, dry-run replayed, replayed and purged,
    # Then a dry run changes nothing, a replayed job runs again from attempt 1 and succeeds,
    # a second replay finds nothing to do, and a purged letter is gone.
    app = make_app()
    failing = {1, 2}
    runs: list[tuple[int, int]] = []

    @app.job("test.Echo", queue=queue)
    async def charge(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append((payload["n"], ctx.attempt))
        if payload["n"] in failing:
            raise Permanent(f"declined {payload['n']}")

    began = now_ms()

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            first, second, _ = [await app.enqueue_async("test.Echo", {"n": n}) for n in (1, 2, 3)]
            # each reading of the clock a second before the last: the last letter is the oldest
            readings = itertools.count()
            app.clock = lambda: began - 1_000 * next(readings)
            await app.consume(burst=True)
            app.clock = now_ms
            dlq = app.dead_letters(queue)

            letters = await dlq.find()
            assert sorted(item.id for item in letters) == sorted([first, second])
            assert letters[0].letter.at < letters[1].letter.at  # oldest first, not as queued
            [oldest] = await dlq.find(Selection(reason="permanent"), limit=1)
            assert oldest.id == letters[0].id
            assert await dlq.find(Selection(type="test.Other")) == []
            shown = await dlq.show(second)
            assert shown.letter.detail == "Permanent: declined 2" and shown.letter.queue == queue

            # (a dry run at one replay in 1,000 s does not wait: nothing is published)
            dry = await asyncio.wait_for(dlq.replay(Selection(), dry_run=True, rate=0.001), timeout=10)
            assert sorted(dry.replayed) == sorted([first, second])
            assert len(await dlq.find()) == 2

            failing.clear()
            report = await dlq.replay(Selection(ids={first}))
            assert report.replayed == [first] and report.refused == []
            again = await dlq.replay(Selection(ids={first}))
            assert again.replayed == []
            await app.consume(burst=True)
            assert runs[-1] == (1, 1)
            assert [item.id for item in await dlq.find()] == [second]

            assert await dlq.purge(Selection(ids={second})) == [second]
            assert await dlq.find() == []
            with pytest.raises(BridgeError, match="no dead letter"):
                await dlq.show(second)

    run(scenario(), timeout=120)
    assert sorted(runs) == [(1, 1), (1, 1), (2, 1), (3, 1)]


def test_a_job_replayed_too_often_is_refused(make_app: Callable[..., Bridge], queue: str) -> None:
    app = make_app()

    @app.job("test.Echo", queue=queue)
    async def hopeless(payload: dict[str, Any], ctx: JobContext) -> None:
        raise Permanent("still broken")

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            job_id = await app.enqueue_async("test.Echo", {"n": 1})
            await app.consume(burst=True)
            dlq = app.dead_letters(queue)
            for _ in range(2):
                assert (await dlq.replay(Selection(), max_replays=2)).replayed == [job_id]
                await app.consume(burst=True)
            refused = await dlq.replay(Selection(), max_replays=2)
            assert refused.replayed == [] and refused.refused[0][0] == job_id
            assert "already replayed 2 times" in refused.refused[0][1]
            [still] = await dlq.find()
            assert still.letter.envelope is not None and still.letter.envelope.replays == 2

    run(scenario(), timeout=120)


def test_two_letters_of_one_job_replay_it_once(make_app: Callable[..., Bridge], queue: str) -> None:
    # Given a job dead-lettered twice (its dead letter written again, as when the broker lost
    # the acknowledgement of the message it replaced), When every letter is replayed, Then the
    # job goes back once, the copy is removed, and the dead-letter queue is empty. (Both were
    # replayed, and the job ran twice.)
    app = make_app()
    runs: list[int] = []

    @app.job("test.Echo", queue=queue)
    async def echo(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append(ctx.attempt)
        if len(runs) == 1:
            raise Permanent("declined")

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            job_id = await app.enqueue_async("test.Echo", {"n": 1})
            await app.consume(burst=True)
            transport = await app.transport()
            [letter] = await transport.browse(dlq_name(queue))
            await transport.publish(Outgoing(dlq_name(queue), letter, None))
            report = await app.dead_letters(queue).replay(Selection())
            assert (report.replayed, report.copies, report.refused) == ([job_id], [job_id], [])
            await app.consume(burst=True)
            assert await app.dead_letters(queue).find() == []

    run(scenario(), timeout=120)
    assert runs == [1, 1]


@pytest.mark.parametrize("clock", ["same", "an hour ahead"])
def test_a_job_that_fails_again_while_its_replay_runs_keeps_its_new_letter(
    make_app: Callable[..., Bridge], queue: str, clock: str
) -> None:
    # Given two letters, and workers that dead-letter the first job again as soon as the replay
    # puts it back (its handler still broken), When every letter is replayed, from a host whose
    # clock is the workers' or an hour ahead of theirs, Then both jobs go back once, and the
    # first job's new letter stays for the next look, its replay counted. (RabbitMQ's replay went
    # on taking letters until the queue was empty, took the new one for a copy of the job it had
    # just replayed, and deleted it; from a host ahead, the new letter, stamped before the replay
    # began by that host's clock, was replayed again in the same run.)
    app = make_app()

    @app.job("test.Echo", queue=queue)
    async def broken(payload: dict[str, Any], ctx: JobContext) -> None:
        raise Permanent("still broken")

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            first, second = [await app.enqueue_async("test.Echo", {"n": n}) for n in (1, 2)]
            await app.consume(burst=True)
            transport = await app.transport()
            [first_letter] = await app.dead_letters(queue).find(Selection(ids={first}))
            missing, written = transport.missing, list[str]()

            async def failed_again(queues: list[str]) -> list[str]:
                # (the replay looks for the job's queue just before it puts the job back: here
                # the second's turn comes once the first's new letter is written, as a worker
                # writes it)
                if first not in written:
                    written.append(first)
                    await transport.publish(_letter_again(app, queue, first_letter.letter))
                return await missing(queues)

            transport.missing = failed_again  # type: ignore[method-assign,assignment]
            if clock == "an hour ahead":  # (the letters are stamped by the workers' clock, now_ms)
                app.clock = lambda: now_ms() + 3_600_000
            report = await app.dead_letters(queue).replay(Selection())
            transport.missing = missing  # type: ignore[method-assign]
            assert (sorted(report.replayed), report.copies) == (sorted([first, second]), [])
            [again] = await app.dead_letters(queue).find()
            assert again.id == first and again.letter.envelope is not None
            assert again.letter.envelope.replays == 1

    run(scenario(), timeout=120)


def _letter_again(app: Bridge, queue: str, letter: DeadLetter) -> Outgoing:
    """`letter`'s job dead-lettered again after one replay."""
    assert letter.envelope is not None
    envelope = replace(letter.envelope, attempt=1, replays=letter.envelope.replays + 1)
    again = replace(letter, detail="Permanent: still broken, again", at=now_ms(), envelope=envelope)
    return Outgoing(dlq_name(queue), codec.encode(app.registry.schema(DEAD_LETTER), again.to_avro()), None)


def test_a_letter_in_a_schema_unknown_here_is_unreadable_not_undecodable() -> None:
    # Given a dead letter framed with a registry's schema id that this process does not know
    # (its workers use a registry, the command was run without it), and a letter of bytes that
    # never decoded, When letters are listed, purged by reason `undecodable` and replayed,
    # Then the first is `unreadable`: the purge leaves it, and the replay refuses it saying what
    # to give. (It was listed `undecodable`, and that purge deleted a replayable letter.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS))
    queue = "billing"

    async def scenario() -> None:
        async with app:
            transport = await app.transport()
            garbage = DeadLetter("undecodable", "not framed", queue, 0, raw=b"\x01\x02")
            letters = [
                b"\x00\x00\x00\x00\x07" + b"\x02" * 20,  # schema id 7: not known here
                codec.encode(app.registry.schema(DEAD_LETTER), garbage.to_avro()),
            ]
            for body in letters:
                await transport.publish(Outgoing(dlq_name(queue), body, None))
            dlq = app.dead_letters(queue)
            assert sorted(item.letter.reason for item in await dlq.find()) == ["undecodable", "unreadable"]
            assert len(await dlq.purge(Selection(reason="undecodable"))) == 1
            [left] = await dlq.find()
            assert (
                left.letter.reason == "unreadable"
                and "read it with the workers' --registry" in left.letter.detail
            )
            report = await dlq.replay(Selection())
            assert [why for _, why in report.refused] == [
                "its schema is unknown here; replay it with the registry its workers use (--registry)"
            ]

    run(scenario())


@pytest.mark.parametrize("kept_in", ["delay", "billing"])
def test_a_job_as_it_is_in_a_dead_letter_queue_is_listed_unroutable_and_replayed(kept_in: str) -> None:
    # Given a job on its third attempt, due at a time, put in a dead-letter queue as it is, not
    # in a letter: as RabbitMQ keeps a delayed job whose queue was gone in `<prefix>.delay.dlq`,
    # or by another producer in a queue's own, When letters are listed and replayed,
    # Then it is `unroutable`, named by its job id and due time, with a detail naming its queue,
    # And the replay puts it on that queue: from `<prefix>.delay.dlq` as it was (it never ran:
    # its attempt, due time and expiry kept), from another as any replay does (attempt 1, no
    # expiry, its due time kept as it is still ahead, its replay count raised). (It was
    # `undecodable`: only a purge took it.)
    # A job from `<prefix>.delay.dlq` never failed: `max_replays` holds it back no more (one
    # replayed that many times before was refused with "fix the handler").
    app = Bridge(broker="memory://", registry=str(SCHEMAS))
    source = f"{app.settings.prefix}.delay" if kept_in == "delay" else "billing"
    job = app.build_envelope("test.Echo", {"n": 1}, queue="billing")
    job = replace(
        job, attempt=3, run_at=job.created_at + 60_000, expires_at=job.created_at + 120_000, replays=2
    )

    async def scenario() -> None:
        async with app:
            await publish_envelope(app, dlq_name(source), job)
            dlq = app.dead_letters(source)
            [item] = await dlq.find(Selection(reason="unroutable"))
            assert (item.id, item.letter.at) == (job.id, job.run_at)
            assert item.letter.detail == (
                "a delayed job that no queue 'billing' took when it was due"
                if kept_in == "delay"
                else "a job for queue 'billing', put here as it is, not in a dead letter"
            )
            if kept_in == "billing":  # (replayed twice already: held back, as any letter's job)
                held_back = await dlq.replay(Selection(), max_replays=2)
                assert held_back.replayed == [] and [i for i, _ in held_back.refused] == [job.id]
            report = await dlq.replay(Selection(), max_replays=3 if kept_in == "billing" else 2)
            assert report.replayed == [job.id] and await dlq.find() == []
            [body] = testing.memory_transport(app).messages("billing")
            back = codec.decode(body, app.registry)[1]
            kept = (3, job.run_at, job.expires_at) if kept_in == "delay" else (1, job.run_at, None)
            assert (back["id"], back["attempt"], back["run_at"], back["expires_at"], back["replays"]) == (
                job.id, *kept, 3
            )  # fmt: skip

    run(scenario())


def test_a_delayed_job_kept_past_its_expiry_is_replayed_without_it() -> None:
    # Given a delayed job kept in `<prefix>.delay.dlq` whose expiry has passed since,
    # When it is replayed, Then it goes back without an expiry (as any replay), its attempt
    # kept. (Kept, its worker dead-lettered it at once as `expired`: a second replay to run it.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS))
    job = app.build_envelope("test.Echo", {"n": 1}, queue="billing")
    job = replace(job, attempt=2, run_at=job.created_at - 2_000, expires_at=job.created_at - 1_000)

    async def scenario() -> None:
        async with app:
            await publish_envelope(app, dlq_name(f"{app.settings.prefix}.delay"), job)
            await app.dead_letters(f"{app.settings.prefix}.delay").replay(Selection())
            [body] = testing.memory_transport(app).messages("billing")
            back = codec.decode(body, app.registry)[1]
            assert (back["attempt"], back["run_at"], back["expires_at"]) == (2, job.run_at, None)

    run(scenario())


@pytest.mark.parametrize("due", ["ahead", "past", "in-µs"])
def test_a_replayed_job_keeps_a_due_time_still_ahead(due: str) -> None:
    # Given a job due in 7 days, dead-lettered before it was due (no worker knew its type then),
    # one whose due time has passed, and one whose due time another producer wrote in µs, When
    # replayed, Then the first goes back due when it was, and the others due now. (Each went
    # back with no due time: the first ran at once, 7 days early.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS))
    ahead = due == "ahead"
    job = app.build_envelope("test.Echo", {"n": 1}, queue="billing")
    run_at = {"ahead": now_ms() + 7 * 86_400_000, "past": now_ms() - 1_000, "in-µs": now_ms() * 1000}[due]
    job = replace(job, run_at=run_at)
    letter = DeadLetter("unknown_type", "no handler", "billing", now_ms(), envelope=job)

    async def scenario() -> None:
        async with app:
            body = codec.encode(app.registry.schema(DEAD_LETTER), letter.to_avro())
            await (await app.transport()).publish(Outgoing(dlq_name("billing"), body, None))
            assert (await app.dead_letters("billing").replay(Selection())).replayed == [job.id]
            [body] = testing.memory_transport(app).messages("billing")
            assert codec.decode(body, app.registry)[1]["run_at"] == (job.run_at if ahead else None)

    run(scenario())


def test_a_delayed_job_replayed_as_many_times_as_a_job_counts_is_refused() -> None:
    # Given a delayed job kept as it is, replayed 2**31 - 1 times (no `max_replays` holds such a
    # job back), When replayed, Then it is refused, saying so. (It went back with 2**31
    # replays, which no reader decodes: beyond an Avro int.)
    app = Bridge(broker="memory://", registry=str(SCHEMAS))
    job = replace(app.build_envelope("test.Echo", {"n": 1}, queue="billing"), replays=MAX_INT)
    delayed = f"{app.settings.prefix}.delay"

    async def scenario() -> None:
        async with app:
            await publish_envelope(app, dlq_name(delayed), job)
            report = await app.dead_letters(delayed).replay(Selection())
            assert report.refused == [
                (job.id, f"already replayed {MAX_INT:,} times, as many as a job can count; purge it")
            ]
            assert testing.memory_transport(app).messages("billing") == []

    run(scenario())


def test_a_letter_larger_than_this_process_writes_is_read_not_undecodable() -> None:
    # Given workers with max_message_bytes of 8 MiB whose job of 2 MiB was dead-lettered, and a
    # `bridge dlq` with the default (1 MiB), When it lists, purges `undecodable` and replays,
    # Then it reads the letter as the job's: the purge leaves it, and the replay puts the job
    # back. (It was listed `undecodable`, the replay refused it, and that purge deleted it.)
    workers = Bridge(broker="memory://", registry=str(SCHEMAS), max_message_bytes=8 * 1024 * 1024)
    tool = Bridge(broker="memory://", registry=str(SCHEMAS))

    @workers.job("test.Echo", queue="q")
    async def fail(payload: dict[str, Any], ctx: JobContext) -> None:
        raise Permanent("broken")

    async def scenario() -> None:
        async with workers, tool:
            job_id = await workers.enqueue_async("test.Echo", {"n": 1, "text": "x" * (2 * 1024 * 1024)})
            await workers.consume(["q"], burst=True)
            [letter] = testing.memory_transport(workers).messages(dlq_name("q"))
            assert len(letter) > tool.settings.dlq_bytes
            await (await tool.transport()).publish(Outgoing(dlq_name("q"), letter, None))
            dlq = tool.dead_letters("q")
            assert [(item.id, item.letter.reason) for item in await dlq.find()] == [(job_id, "permanent")]
            assert await dlq.purge(Selection(reason="undecodable")) == []
            assert (await dlq.replay(Selection())).replayed == [job_id]

    run(scenario())


@pytest.mark.parametrize("broker", ["rabbitmq", "kafka"], indirect=True)
def test_a_letter_larger_than_this_process_writes_is_replayed_and_runs(
    make_app: Callable[..., Bridge], queue: str
) -> None:
    # Given workers with max_message_bytes of 8 MiB whose job of 2 MiB was dead-lettered, and a
    # tool with the default (1 MiB), When the tool replays it, Then the job goes back and runs.
    # (On Kafka the tool's producer refused a record over its own limit: the replay ended with
    # an error at that letter, every time.)
    workers, tool = make_app(max_message_bytes=8 * 1024 * 1024, partitions=1), make_app()
    failing, ran = [True], []

    @workers.job("test.Echo", queue=queue)
    async def large(payload: dict[str, Any], ctx: JobContext) -> None:
        if failing:
            raise Permanent("not yet")
        ran.append(len(payload["text"]))

    async def scenario() -> None:
        async with workers, tool:
            await workers.apply_topology()
            job_id = await workers.enqueue_async("test.Echo", {"n": 1, "text": "x" * (2 * 1024 * 1024)})
            await workers.consume(burst=True)
            assert (await tool.dead_letters(queue).replay(Selection())).replayed == [job_id]
            failing.clear()
            await workers.consume(burst=True)

    run(scenario(), timeout=120)
    assert ran == [2 * 1024 * 1024]


@pytest.mark.parametrize("broker", ["rabbitmq", "kafka"], indirect=True)
def test_a_letter_whose_queue_is_no_queue_is_refused_and_the_others_replayed(
    make_app: Callable[..., Bridge], queue: str
) -> None:
    # Given a job dead-lettered `unroutable` (another producer's envelope named a queue that does
    # not exist) and one dead-lettered as a permanent failure,
    # When every letter is replayed, Then the first is refused, saying its queue does not exist,
    # and the second is replayed and runs. (The replay stopped with an error at the first,
    # asking for `bridge topology apply`, and left the rest.)
    app = make_app(partitions=1)
    failing = {1}
    runs: list[int] = []

    @app.job("test.Echo", queue=queue)
    async def charge(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append(payload["n"])
        if payload["n"] in failing:
            raise Permanent("declined")

    nowhere = f"no-such-queue-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            envelope = app.build_envelope("test.Echo", {"n": 0}, queue=nowhere)
            await publish_envelope(app, queue, envelope)
            declined = await app.enqueue_async("test.Echo", {"n": 1})
            await app.consume(burst=True)
            dlq = app.dead_letters(queue)
            assert {item.letter.reason for item in await dlq.find()} == {"unroutable", "permanent"}

            failing.clear()
            report = await dlq.replay(Selection())
            assert report.replayed == [declined]
            assert report.refused == [
                (
                    envelope.id,
                    f"its queue {nowhere!r} does not exist or is no queue: create it "
                    "(`bridge topology apply`), or purge the letter",
                )
            ]
            await app.consume(burst=True)
            [left] = await dlq.find()
            assert left.id == envelope.id

    run(scenario(), timeout=120)
    assert runs == [1, 1]


def bridge_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], cwd=REPO, env={**os.environ, **env},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("broker", ["rabbitmq", "kafka"], indirect=True)
def test_dlq_commands(make_app: Callable[..., Bridge], queue: str, broker: str) -> None:
    # Given one dead letter, the CLI lists it (as JSON too), shows its decoded payload,
    # refuses to purge without --yes, replays it once, and purges what is left. A newline in
    # the letter's detail is listed escaped: it could forge a second letter's line.
    app = make_app()

    @app.job("test.Echo", queue=queue)
    async def refuse(payload: dict[str, Any], ctx: JobContext) -> None:
        raise Permanent("no\nforged-id  2026-01-01T00:00:00  exhausted")

    async def scenario() -> str:
        async with app:
            await app.apply_topology()
            job_id = await app.enqueue_async("test.Echo", {"n": 42})
            await app.consume(burst=True)
            return job_id

    job_id = run(scenario())
    env = {"BRIDGE_BROKER": broker, "BRIDGE_REGISTRY": str(SCHEMAS), "BRIDGE_PREFIX": app.settings.prefix,
           "BRIDGE_DELAY_TIERS": "1s"}  # fmt: skip
    listed = bridge_cli("dlq", "list", queue, "--json", **env)
    assert listed.returncode == 0, listed.stderr
    [entry] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["id"] == job_id and entry["reason"] == "permanent"
    [line] = bridge_cli("dlq", "list", queue, **env).stdout.splitlines()
    assert line.startswith(job_id) and line.endswith(
        "Permanent: no\\nforged-id  2026-01-01T00:00:00  exhausted"
    )
    shown = bridge_cli("dlq", "show", queue, job_id, **env)
    assert json.loads(shown.stdout)["job"]["payload"] == {"n": 42, "text": "", "sleep_ms": 0}
    # (The count says what it counts: it read as the queue's size after a filter or a limit.)
    assert bridge_cli("dlq", "list", queue, **env).stderr.strip() == f"1 dead letters in {queue}.dlq"
    chosen = bridge_cli("dlq", "list", queue, "--type", "test.Echo", "--limit", "1", **env).stderr.strip()
    assert chosen == f"1 dead letters selected in {queue}.dlq (--limit: there may be more)"
    # (An id that matches nothing is named, and fails: a replay or purge of nothing exited 0.)
    for command in (["replay"], ["purge", "--yes"]):
        missed = bridge_cli("dlq", command[0], queue, "--id", "no-such-id", *command[1:], **env)
        assert missed.returncode == 1 and f"no dead letter no-such-id in {queue}.dlq" in missed.stderr
    # (A queue without dead letters: one line, not a "stopped" for a sweep that never began.)
    assert_one_line_error(
        bridge_cli("dlq", "purge", f"{queue}-none", "--all", "--yes", **env),
        "not exist",  # (does, do)
    )

    refused = bridge_cli("dlq", "purge", queue, "--all", **env)
    assert refused.returncode == 1 and "add --yes" in refused.stderr
    assert (
        bridge_cli("dlq", "replay", queue, "--all", "--dry-run", **env).stdout.strip()
        == f"would replay {job_id}"
    )
    # (Each --id counts: a second one replaced the first, and a purge of two purged one.)
    both = bridge_cli("dlq", "replay", queue, "--dry-run", "--id", job_id, "--id", "no-such-id", **env)
    assert both.stdout.strip() == f"would replay {job_id}" and "no-such-id" in both.stderr
    assert bridge_cli("dlq", "replay", queue, "--id", job_id, **env).stdout.strip() == f"replayed {job_id}"
    again = bridge_cli("dlq", "replay", queue, "--all", **env)
    assert again.returncode == 0 and again.stdout.strip() == "", again.stderr
    assert again.stderr.strip().endswith("replayed 0, refused 0"), again.stderr
    run(scenario_consume(app))
    purged = bridge_cli("dlq", "purge", queue, "--all", "--yes", **env)
    assert purged.stdout.strip() == f"purged 1 dead letters from {queue}.dlq"
    emptied = bridge_cli("dlq", "list", queue, "--json", **env)
    assert emptied.returncode == 0 and emptied.stdout == "", emptied.stderr


def test_dlq_json_names_floats_that_are_no_number_so_any_json_parser_reads_it(
    brokers: dict[str, str], queue: str, tmp_path: Path
) -> None:
    # Given a dead letter whose payload holds a NaN double and a -Infinity float,
    # When `bridge dlq list --json` and `dlq show` print it, Then a strict JSON parser reads
    # both, with the values named "NaN" and "-Infinity". (They were printed as NaN and
    # -Infinity, which are no JSON: JavaScript, Go and jq refuse the line.)
    schema = {"type": "record", "name": "Reading", "namespace": "test",
              "fields": [{"name": "x", "type": "double"}, {"name": "y", "type": "float"}]}  # fmt: skip
    (tmp_path / "test.Reading.avsc").write_text(json.dumps(schema))
    app = Bridge(broker=brokers["rabbitmq"], registry=str(tmp_path), prefix=names.prefix(), delay_tiers="1s")

    @app.job("test.Reading", queue=queue)
    async def refuse(payload: dict[str, Any], ctx: JobContext) -> None:
        raise Permanent("out of range")

    async def scenario() -> str:
        async with app:
            await app.apply_topology()
            job_id = await app.enqueue_async("test.Reading", {"x": float("nan"), "y": float("-inf")})
            await app.consume(burst=True)
            return job_id

    job_id = run(scenario())
    env = {"BRIDGE_BROKER": brokers["rabbitmq"], "BRIDGE_REGISTRY": str(tmp_path),
           "BRIDGE_PREFIX": app.settings.prefix, "BRIDGE_DELAY_TIERS": "1s"}  # fmt: skip

    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"not JSON: {name}"))

    listed = bridge_cli("dlq", "list", queue, "--json", **env)
    assert listed.returncode == 0, listed.stderr
    [entry] = [strict(line) for line in listed.stdout.splitlines()]
    assert entry["id"] == job_id and entry["job"]["payload"] == {"x": "NaN", "y": "-Infinity"}
    shown = bridge_cli("dlq", "show", queue, job_id, **env)
    assert strict(shown.stdout)["job"]["payload"] == {"x": "NaN", "y": "-Infinity"}


@pytest.mark.parametrize("broker", ["rabbitmq", "kafka"], indirect=True)
def test_a_replay_stopped_by_ctrl_c_tells_of_every_job_it_put_back_and_of_no_other(
    make_app: Callable[..., Bridge], queue: str, broker: str
) -> None:
    # Given 12 dead letters, When `bridge dlq replay --rate 5` gets SIGINT once it has told of
    # two replays, Then it stops after the job in hand (exit 130) and says how many it put back;
    # the jobs it named, and only those, are back on their queue, and the other letters are
    # still dead letters. (It told nothing until the sweep ended: Ctrl-C hid what it had done.)
    app = make_app()
    failing = True
    ran: list[str] = []

    @app.job("test.Echo", queue=queue)
    async def handle(payload: dict[str, Any], ctx: JobContext) -> None:
        if failing:
            raise Permanent("not yet")
        ran.append(ctx.job_id)

    async def dead_letters() -> list[str]:
        async with app:
            await app.apply_topology()
            ids = [await app.enqueue_async("test.Echo", {"n": n}) for n in range(12)]
            await app.consume(burst=True)
            return ids

    ids = run(dead_letters())
    env = {"BRIDGE_BROKER": broker, "BRIDGE_REGISTRY": str(SCHEMAS), "BRIDGE_PREFIX": app.settings.prefix,
           "BRIDGE_DELAY_TIERS": "1s"}  # fmt: skip
    replay = subprocess.Popen(
        [sys.executable, "-m", "bridge", "dlq", "replay", queue, "--all", "--rate", "5"],
        cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert replay.stdout is not None
    told = [replay.stdout.readline(), replay.stdout.readline()]
    replay.send_signal(signal.SIGINT)
    out, err = replay.communicate(timeout=60)
    told += out.splitlines()
    assert replay.returncode == 130, err
    put_back = [line.removeprefix("replayed ").strip() for line in told]
    assert 2 <= len(put_back) < 12 and set(put_back) <= set(ids), told
    assert f"stopped: replayed {len(put_back)}, refused 0 before the signal" in err, err

    failing = False
    run(scenario_consume(app))
    assert sorted(ran) == sorted(put_back)

    async def still_dead() -> list[str]:
        async with app:
            return [item.id for item in await app.dead_letters(queue).find()]

    assert sorted(run(still_dead())) == sorted(set(ids) - set(put_back))


def test_a_purge_stopped_halfway_removes_no_letter_after_the_stop(
    make_app: Callable[..., Bridge], queue: str
) -> None:
    # Given 5 dead letters, When a purge's stop is set as the second letter is told gone,
    # Then it removes those two and no other, and the other three are still there to list.
    app = make_app()

    @app.job("test.Echo", queue=queue)
    async def refuse(payload: dict[str, Any], ctx: JobContext) -> None:
        raise Permanent("no")

    async def scenario() -> None:
        async with app:
            await app.apply_topology()
            ids = [await app.enqueue_async("test.Echo", {"n": n}) for n in range(5)]
            await app.consume(burst=True)
            stop = asyncio.Event()
            told: list[str] = []

            def gone(letter_id: str) -> None:
                told.append(letter_id)
                if len(told) == 2:
                    stop.set()

            purged = await app.dead_letters(queue).purge(Selection(), told=gone, stop=stop)
            assert purged == told and len(purged) == 2
            left = [item.id for item in await app.dead_letters(queue).find()]
            assert sorted(left + purged) == sorted(ids)

    run(scenario(), timeout=120)


@pytest.mark.parametrize("rate", [0, -1, float("nan"), float("inf")])
def test_a_replay_rate_that_is_no_rate_is_refused(rate: float) -> None:
    # (0 and below meant no limit, in the API as on the command line)
    app = Bridge(broker="memory://", registry=str(SCHEMAS))
    with pytest.raises(ConfigError, match="rate must be a number of replays per second above 0"):
        run(app.dead_letters("q").replay(Selection(), rate=rate))


async def scenario_consume(app: Bridge) -> None:
    async with app:
        await app.consume(burst=True)


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_letters_that_never_decoded_are_listed_with_no_time_and_the_whole_hint(
    make_app: Callable[..., Bridge], queue: str, broker: str
) -> None:
    # Given a dead letter in a schema unknown here (a registry's id) in a queue's dead-letter queue,
    # When the CLI lists it, Then its time is "-" ("at" null in JSON), not 1970, and its line
    # ends with the whole hint, the flag to give. (The hint was cut off at 80 characters.)
    app = make_app()

    async def scenario() -> None:
        async with app:
            await app.apply_topology([queue])
            unknown = b"\x00\x00\x00\x00\x07" + b"\x02" * 20  # schema id 7: not known here
            await (await app.transport()).publish(Outgoing(dlq_name(queue), unknown, None))

    run(scenario())
    env = {"BRIDGE_BROKER": broker, "BRIDGE_REGISTRY": str(SCHEMAS), "BRIDGE_PREFIX": app.settings.prefix}
    [line] = bridge_cli("dlq", "list", queue, **env).stdout.splitlines()
    assert line.split()[1:3] == ["-", "unreadable"], line
    assert line.endswith("read it with the workers' --registry"), line
    [entry] = [
        json.loads(each) for each in bridge_cli("dlq", "list", queue, "--json", **env).stdout.splitlines()
    ]
    assert entry["at"] is None and entry["reason"] == "unreadable"
