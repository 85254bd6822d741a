"""The `bridge` command: enqueue, consume, topology apply, dlq, keys, schemas, dev up|down|status.

Every failure a user can fix prints one line on stderr and exits non-zero; no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import difflib
import errno
import importlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Collection, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from bridge.app import Bridge
from bridge.compatibility import LEVELS
from bridge.dlq import DeadLetters, ReplayReport, Selection, describe
from bridge.envelope import LONGEST_S, REASONS, iso_ms, now_ms
from bridge.errors import BridgeError, ConfigError, RegistryUnavailable, TransportError
from bridge.idempotency import DONE, ENQUEUED, ENQUEUING, RUNNING, default_url
from bridge.idempotency import sqlite as sqlite_store
from bridge.keys import DEFAULT_LIMIT, Entry, Keys, check_job_type
from bridge.logs import OneLine, one_line
from bridge.policy import parse_duration

if TYPE_CHECKING:
    from bridge.schema_registry import HttpRegistry

log = logging.getLogger("bridge.cli")


# A run of text without a space longer than any name either broker takes (255 bytes), in an
# error line, is what someone gave (a type, key or id of thousands of characters, say): shown
# cut, so that the line still shows what to fix.
_LONG_RUN = re.compile(r"\S{301,}")


def _shortened(line: str) -> str:
    """`line` with each run of over 300 characters without a space cut to its first 100."""
    return _LONG_RUN.sub(lambda run: f"{run.group()[:100]}... ({len(run.group()):,} characters)", line)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `bridge` console script."""
    args, unknown = _parser().parse_known_args(argv)
    if unknown:  # (named by the command they were given to, not by `bridge`, as argparse does)
        args.command_parser.error(_unknown_arguments(args.command_parser, unknown))
    _configure_logging(args.log_level, daemon=args.run is _consume)
    try:
        code = args.run(args)
        if sys.stdout is not None:  # (None: started with it closed, `>&-`)
            sys.stdout.flush()  # (here, so a reader gone is a BrokenPipeError below)
    except BridgeError as exc:  # (one line whatever it quotes: a job id from another producer, say)
        print(_shortened(one_line(f"bridge: {exc}")), file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # (`bridge dlq list | head`: the reader went away; so do we, quietly)
        _stdout_gone()
        code = 1
    except OSError as exc:  # (stdout on a full disk, most likely, or a file a command writes)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
        _stdout_gone()
        print(one_line(f"bridge: a write failed ({exc})"), file=sys.stderr)
        code = 1
    sys.exit(code)


def _stdout_gone() -> None:
    """Point stdout at /dev/null, so that the flush at exit does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _configure_logging(level: str | None, *, daemon: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(OneLine("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(
        level=getattr(logging, (level or ("info" if daemon else "warning")).upper()), handlers=[handler]
    )
    if not daemon and level != "debug":
        # A one-shot command reports a failure in one line; the clients' own logs would repeat it.
        for name in ("aiormq", "aio_pika", "bridge.kafka.client"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if level != "debug":
        # The registry client logs each HTTP request at INFO.
        for name in ("httpx", "httpx2", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # While PostgreSQL is down, bridge logs a line per round of tries (idempotency/outage.py);
        # psycopg's pool would add a warning of several lines at each of its reconnect attempts.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported in one line rather than a usage screen."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {_shortened(message)} (see `{self.prog} --help`)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace or argparse.Namespace())
        if not hasattr(parsed, "command_parser"):  # (the innermost command's parser is first here)
            parsed.command_parser = self
        return parsed, extras


def _unknown_arguments(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """What a command was given that it does not take, with the option it may have meant."""
    option = unknown[0].partition("=")[0]
    if not option.startswith("-"):
        return f"unrecognized arguments: {' '.join(unknown)}"
    close = difflib.get_close_matches(option, list(parser._option_string_actions), n=1)
    return f"unknown option {option}" + (f": did you mean {close[0]}?" if close else "")


def _common(default: object) -> _Parser:
    """The options every command takes, before or after the command's name."""
    common = _Parser(add_help=False, argument_default=default)
    common.add_argument(
        "--broker", help="kafka://host:port or amqp://user:pass@host:port/vhost (BRIDGE_BROKER)"
    )
    common.add_argument(
        "--registry",
        help="directory of .avsc schemas, or a Confluent-API registry URL http://... (BRIDGE_REGISTRY)",
    )
    common.add_argument("--schemas", help="with a registry URL: this app's .avsc schemas (BRIDGE_SCHEMAS)")
    common.add_argument("--prefix", help="topology name prefix (BRIDGE_PREFIX, default bridge)")
    common.add_argument(
        "--idempotency",
        help="key store: sqlite:///path (default), postgresql://..., redis://... (BRIDGE_IDEMPOTENCY)",
    )
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return common


def _parser() -> argparse.ArgumentParser:
    # A command's own copy leaves out what it was not given, so `bridge --broker X dlq list`
    # keeps X (the command's None overwrote it, and the command ran on BRIDGE_BROKER's broker).
    common = _common(argparse.SUPPRESS)
    parser = _Parser(prog="bridge", description=__doc__, parents=[_common(None)])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    enqueue = commands.add_parser("enqueue", parents=[common], help="validate and publish one job")
    enqueue.add_argument("type", help="job type, e.g. billing.ChargeCard")
    enqueue.add_argument("payload", help="the payload as a JSON object")
    where = enqueue.add_mutually_exclusive_group()
    where.add_argument("--queue", help="queue to publish to (default: the handler's, else 'default')")
    where.add_argument("--app", help="MODULE:ATTR of a Bridge whose handler names the queue")
    enqueue.add_argument("--key", help="partition key: on Kafka, one key's jobs go to one partition")
    enqueue.add_argument("--idempotency-key", help="jobs sharing it have their effect once")
    enqueue.add_argument(
        "--dedupe", action="store_true",
        help="publish nothing if --idempotency-key was enqueued with --dedupe within its window (the "
        "job type's, with --app; else 24 h); print that job's id",
    )  # fmt: skip
    when = enqueue.add_mutually_exclusive_group()
    when.add_argument("--delay", type=_duration, help="run no sooner than this from now: 90s, 5m, 2h, 3d")
    when.add_argument("--at", type=_moment, help="run no sooner than this time: 2026-12-01T09:00:00Z")
    enqueue.add_argument("--ttl", type=_duration, help="dead-letter as expired if not started within this")
    enqueue.set_defaults(run=_enqueue)

    consume = commands.add_parser("consume", parents=[common], help="run an app's handlers")
    consume.add_argument("--app", required=True, help="MODULE:ATTR of a Bridge")
    consume.add_argument("--queues", type=_names, help="comma-separated queues (default: the app's)")
    consume.add_argument("--concurrency", type=_positive, help="jobs running at once (default 16)")
    consume.add_argument(
        "--prefetch",
        type=_positive,
        help="RabbitMQ deliveries held at once, per queue (default twice --concurrency)",
    )
    consume.add_argument("--group", help="Kafka consumer group (BRIDGE_GROUP, default bridge)")
    consume.add_argument("--grace", type=float, help="seconds in-flight jobs get on SIGTERM (default 30)")
    consume.add_argument("--burst", action="store_true", help="exit 0 once the queues are drained")
    consume.set_defaults(run=_consume)

    topology = commands.add_parser("topology", parents=[common], help="broker topology")
    topology_commands = topology.add_subparsers(required=True, metavar="ACTION")
    apply = topology_commands.add_parser("apply", parents=[common], help="create queues idempotently")
    apply.add_argument("--app", help="MODULE:ATTR of a Bridge whose queues to create")
    apply.add_argument("--queues", type=_names, help="comma-separated queues (default: the app's)")
    apply.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    apply.set_defaults(run=_topology_apply)

    _dlq_parsers(commands, common)
    _keys_parsers(commands, common)
    _schemas_parsers(commands, common)

    dev = commands.add_parser(
        "dev", parents=[common], help="local Kafka, RabbitMQ, PostgreSQL, Redis and Apicurio for development"
    )
    dev.add_argument("action", choices=["up", "down", "status"])
    dev.add_argument("services", nargs="*", help="kafka, rabbitmq, postgres, redis, apicurio (default: all)")
    dev.set_defaults(run=_dev)
    return parser


def _schemas_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    schemas = commands.add_parser(
        "schemas", parents=[common], help="job type schemas in a registry: register, check, list"
    )
    actions = schemas.add_subparsers(required=True, metavar="ACTION")
    for name, run, text in (
        ("register", _schemas_register, "register every .avsc under DIR under its subject (its full name)"),
        ("check", _schemas_check, "check every .avsc under DIR against the registry's compatibility rule"),
    ):
        action = actions.add_parser(name, parents=[common], help=text)
        action.add_argument("dir", nargs="?", help="directory of .avsc files (default: --schemas)")
        action.set_defaults(run=run)
    level = actions.add_parser(
        "compatibility", parents=[common], help="show or set a subject's compatibility level"
    )
    level.add_argument("subject", help="a job type, e.g. billing.ChargeCard")
    level.add_argument("level", nargs="?", type=str.upper, choices=LEVELS, help="the level to set")
    level.set_defaults(run=_schemas_compatibility)
    listing = actions.add_parser(
        "list", parents=[common], help="subjects, versions and ids; which have handlers"
    )
    listing.add_argument("--app", help="MODULE:ATTR of a Bridge: mark the types it has handlers for")
    listing.set_defaults(run=_schemas_list)


def _dlq_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    dlq = commands.add_parser("dlq", parents=[common], help="dead-letter queues: list, show, replay, purge")
    actions = dlq.add_subparsers(required=True, metavar="ACTION")

    def action(name: str, run: Callable[[argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, parents=[common], help=text)
        parser.add_argument("queue", help="the queue whose dead letters to look at (not the .dlq name)")
        parser.set_defaults(run=run)
        return parser

    def filters(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--type", help="only jobs of this type")
        parser.add_argument("--reason", choices=REASONS, help="only letters with this reason")

    listing = action("list", _dlq_list, "list dead letters")
    filters(listing)
    listing.add_argument("--since", type=_since, help="only since: 2026-12-01T09:00:00Z, or 2h (ago)")
    listing.add_argument("--limit", type=_positive, help="at most this many")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = action("show", _dlq_show, "show one dead letter, payload decoded")
    show.add_argument("id", help="the job id (or raw-... id) from `bridge dlq list`")
    for name, run, text in (("replay", _dlq_replay, "put jobs back on their queue"),
                            ("purge", _dlq_purge, "remove dead letters for good")):  # fmt: skip
        parser = action(name, run, text)
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--id", nargs="+", action="extend", dest="ids", help="these letters")
        which.add_argument("--all", action="store_true", help="every letter matching the filters")
        filters(parser)
    replay = actions.choices["replay"]
    replay.add_argument("--dry-run", action="store_true", help="print what would be replayed, change nothing")
    replay.add_argument("--rate", type=_rate, help="at most this many replays per second")
    replay.add_argument("--max-replays", type=_positive, default=3, help="refuse jobs replayed this often")
    actions.choices["purge"].add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _keys_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    keys = commands.add_parser(
        "keys", parents=[common], help="idempotency keys in the store (--idempotency): show, list, forget"
    )
    actions = keys.add_subparsers(required=True, metavar="ACTION")
    for name, run, text in (
        ("show", _keys_show, "what the store holds for a key: running, done, enqueued, and until when"),
        ("forget", _keys_forget, "delete a key's records (or --all), so that its next job runs again"),
    ):
        action = actions.add_parser(name, parents=[common], help=text)
        action.add_argument("type", help="the job type the key belongs to, e.g. billing.ChargeCard")
        action.add_argument(
            "key", nargs="?" if name == "forget" else None, help="the idempotency key, e.g. welcome:42"
        )
        action.set_defaults(run=run)
    listing = actions.add_parser("list", parents=[common], help="the job type's keys that count now, by key")
    listing.add_argument("type", help="the job type, e.g. billing.ChargeCard")
    listing.add_argument(
        "--limit", type=_positive, default=DEFAULT_LIMIT, help="at most this many (default 100)"
    )
    listing.set_defaults(run=_keys_list)
    for action in (actions.choices["show"], listing):
        action.add_argument("--json", action="store_true", help="one JSON object per record")
    forget = actions.choices["forget"]
    forget.add_argument("--all", action="store_true", help="every key of the job type (see --state)")
    forget.add_argument("--yes", action="store_true", help="with --all: do not ask for confirmation")
    forget.add_argument(
        "--force", action="store_true", help="even while a job with the key runs (a copy may run beside it)"
    )
    for action in (listing, forget):
        action.add_argument(
            "--state", choices=[RUNNING, DONE, ENQUEUING, ENQUEUED], help="only keys in this state"
        )


def _since(text: str) -> int:
    try:
        return now_ms() - int(parse_duration(text) * 1000)
    except ConfigError:
        return int(_moment(text, "how long ago, e.g. 2h or 3d, or an ISO 8601 time").timestamp() * 1000)
    except OverflowError:  # (a duration no float holds)
        raise argparse.ArgumentTypeError(f"{text!r} is further back than any time") from None


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name, e.g. --queues billing,emails")
    return names


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _moment(text: str, what: str = "an ISO 8601 time") -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write {what}, e.g. 2026-12-01T09:00:00Z") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: add a timezone, e.g. Z or +01:00")
    return moment


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not 0 < rate < math.inf:  # (0 read as "no limit" once, a surprise for a safety valve)
        raise argparse.ArgumentTypeError(f"expected a number of replays per second above 0, got {text!r}")
    return rate


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:  # ("²" is a digit to isdigit)
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _each_name_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose names are all different (json takes the last of a repeated one)."""
    found = dict(pairs)
    if len(found) < len(pairs):
        names = [name for name, _ in pairs]
        twice = next(name for name in names if names.count(name) > 1)
        raise ConfigError(f"payload gives {twice!r} more than once: give each field once")
    return found


# -- commands --------------------------------------------------------------------------------


def _enqueue(args: argparse.Namespace) -> int:
    if args.dedupe and args.idempotency_key is None:
        raise ConfigError("--dedupe needs --idempotency-key")
    _check_times(args)
    app = _app(args)
    try:
        payload = json.loads(args.payload, object_pairs_hook=_each_name_once)
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ConfigError(f"payload is not valid JSON ({why}); quote it, e.g. '{{\"id\": 1}}'") from None
    options = {
        "queue": args.queue, "key": args.key, "idempotency_key": args.idempotency_key,
        "delay": args.delay, "at": args.at, "ttl": args.ttl, "dedupe": args.dedupe,
    }  # fmt: skip
    job_id = asyncio.run(_closing(app, app.enqueue_async(args.type, payload, **options)))
    try:
        print(job_id, flush=True)
    except OSError as exc:  # (a reader gone, a full disk: the job is out, and a script that
        _stdout_gone()  # enqueued again on a failure would enqueue it twice)
        print(f"bridge: job {job_id} is enqueued; its id could not be written ({exc})", file=sys.stderr)
    if app.settings.require_broker().startswith("memory://"):  # (a check of the job, nothing more)
        print(
            "bridge: this job is gone with this process: memory:// keeps jobs in one process, no other"
            " (give a kafka:// or amqp:// --broker)",
            file=sys.stderr,
        )
    return 0


def _check_times(args: argparse.Namespace) -> None:
    """Refuse what the API would refuse of --delay, --at and --ttl, naming the options (it
    names its keywords: `delay=`, `ttl=`)."""
    starts_s = args.delay
    if args.at is not None:
        starts_s = args.at.timestamp() - time.time()
        if abs(starts_s) > LONGEST_S:
            raise ConfigError("--at: within 100 years of now")
    for option, seconds in (("--delay", args.delay), ("--ttl", args.ttl)):
        if seconds is not None and seconds > LONGEST_S:
            raise ConfigError(f"{option}: at most 100 years (36500d)")
    if args.ttl is not None and int(args.ttl * 1000) <= 0:  # (its job was dead-lettered, unrun)
        raise ConfigError("--ttl must be 1 ms or more: a job not started within it is dead-lettered, unrun")
    # (in whole ms, as the envelope holds them: `--delay 1.0005 --ttl 1.0009` are both 1 s)
    if args.ttl is not None and starts_s is not None and int(args.ttl * 1000) <= int(starts_s * 1000):
        start = "--delay" if args.at is None else "--at"
        raise ConfigError(f"--ttl ends the job before {start} lets it start: give a longer --ttl")


def _consume(args: argparse.Namespace) -> int:
    app = _app(
        args, group=args.group, concurrency=args.concurrency, prefetch=args.prefetch, grace_s=args.grace
    )
    queues = args.queues or app.queues()
    if not queues:
        raise ConfigError(f"{args.app} registers no handlers: decorate functions with @app.job(...)")
    asyncio.run(_run_until_signalled(app, queues, burst=args.burst))
    return 0


async def _run_until_signalled(app: Bridge, queues: list[str], *, burst: bool) -> None:
    stop = asyncio.Event()
    _on_signals(
        stop.set,
        stopping="stopping: no new jobs; waiting for in-flight ones (signal again to exit now)",
        exiting="second signal: exiting now; unfinished jobs will be delivered again",
    )
    stats = await _closing(app, app.consume(queues, burst=burst, stop=stop))
    print(f"bridge consume: {stats.summary()}", flush=True)


def _on_signals(
    first: Callable[[], None],
    *,
    stopping: str,
    exiting: str | Callable[[], str],
    tell: Callable[[str], None] = log.info,
) -> None:
    """First SIGTERM or SIGINT: `first()`, to stop gracefully, telling `stopping`. Second: log
    `exiting` (or what it returns then) and exit at once."""
    loop = asyncio.get_running_loop()

    def handle(signum: int) -> None:
        if getattr(handle, "seen", False):
            log.warning(exiting if isinstance(exiting, str) else exiting())
            os._exit(128 + signum)
        handle.seen = True  # type: ignore[attr-defined]
        tell(stopping)
        first()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handle, signum)


def _topology_apply(args: argparse.Namespace) -> int:
    app = _app(args)
    for line in asyncio.run(_closing(app, app.apply_topology(args.queues, dry_run=args.dry_run))):
        print(line)
    return 0


def _selection(args: argparse.Namespace) -> Selection:
    ids = getattr(args, "ids", None)
    return Selection(ids=set(ids) if ids else None, type=args.type, reason=args.reason,
                     since_ms=getattr(args, "since", None))  # fmt: skip


def _dlq_app(args: argparse.Namespace) -> tuple[Bridge, DeadLetters]:
    """The app of the flags, on a broker whose dead letters outlive a process, and the dead
    letters of the queue named."""
    app = _app(args)
    letters = app.dead_letters(args.queue)  # (a queue that is no job queue's, named first)
    if app.settings.require_broker().startswith("memory://"):  # (it found none, and exited 0)
        raise ConfigError(
            "memory:// keeps dead letters in one process, not the workers': give their broker, "
            "--broker kafka://... or amqp://... (or BRIDGE_BROKER)"
        )
    return app, letters


def _dlq_list(args: argparse.Namespace) -> int:
    app, dead = _dlq_app(args)
    letters = asyncio.run(_closing(app, dead.find(_selection(args), args.limit)))
    for item in letters:
        if args.json:
            print(_json(describe(app, item)))
            continue
        envelope = item.letter.envelope
        kind = f"{envelope.type} attempt {envelope.attempt}" if envelope else "(raw bytes)"
        # (0 for bytes that never decoded: when they were written is not known)
        when = iso_ms(item.letter.at, timespec="seconds") if item.letter.at else f"{'-':25}"
        # (Text from handlers and other producers: escaped, so it cannot forge a line of its own.)
        line = f"{item.id}  {when}  {item.letter.reason:15} {kind}  {item.letter.detail[:100]}"
        print(one_line(line))
    if not args.json:
        chosen = _selection(args)
        narrowed = chosen.ids or chosen.type or chosen.reason or chosen.since_ms is not None
        what = "dead letters selected" if narrowed else "dead letters"  # (not the queue's size)
        more = " (--limit: there may be more)" if len(letters) == args.limit else ""
        print(f"{len(letters)} {what} in {args.queue}.dlq{more}", file=sys.stderr)
    return 0


def _dlq_show(args: argparse.Namespace) -> int:
    app, letters = _dlq_app(args)
    item = asyncio.run(_closing(app, letters.show(args.id)))
    print(_json(describe(app, item), indent=2))
    return 0


def _dlq_replay(args: argparse.Namespace) -> int:
    app, letters = _dlq_app(args)
    verb = "would replay" if args.dry_run else "replayed"
    removed = "would remove" if args.dry_run else "removed"

    def told(what: str, job_id: str, why: str) -> None:  # (each as it happens: see _stoppable)
        if what == "refused":
            print(one_line(f"refused {job_id}: {why}"), file=sys.stderr)
        elif what == "replayed":
            print(one_line(f"{verb} {job_id}"), flush=True)
        else:
            print(one_line(f"{removed} a second letter of {job_id}, replayed once"), flush=True)

    report = ReplayReport(told=told)
    stop = asyncio.Event()
    work = letters.replay(
        _selection(args), dry_run=args.dry_run, rate=args.rate, max_replays=args.max_replays,
        report=report, stop=stop,
    )  # fmt: skip

    def summary() -> str:
        said = f"{verb} {len(report.replayed)}, refused {len(report.refused)}"
        return said + (f", {len(report.copies)} copies of replayed letters removed" if report.copies else "")

    # (On RabbitMQ a letter whose job went back, but whose ack had not, stays: the next run
    # puts its job back again. Kafka aborts the transaction of both.)
    in_hand = "; the letter in hand, if its job was put back, may be replayed again by the next run"
    if args.dry_run or app.settings.require_broker().startswith("kafka"):
        in_hand = ""
    if _stoppable(app, work, stop, summary, in_hand):
        return 130
    print(summary(), file=sys.stderr)
    found = [*report.replayed, *(letter_id for letter_id, _ in report.refused), *report.copies]
    if _not_found(args, found) or (report.refused and not report.replayed):
        return 1
    return 0


def _dlq_purge(args: argparse.Namespace) -> int:
    if not args.yes and not _confirmed(
        f"remove the selected dead letters of {args.queue} for good?",
        "purge removes dead letters for good: add --yes to confirm",
    ):
        return 1
    app, letters = _dlq_app(args)
    purged: list[str] = []
    stop = asyncio.Event()
    work = letters.purge(_selection(args), told=purged.append, stop=stop)
    if _stoppable(app, work, stop, lambda: f"purged {len(purged)}"):
        return 130
    print(f"purged {len(purged)} dead letters from {args.queue}.dlq")
    return 1 if _not_found(args, purged) else 0


def _not_found(args: argparse.Namespace, found: Collection[str]) -> bool:
    """Say which of the letters `--id` named were not found (a typo, or gone already): whether
    none of them was. (A replay or purge of nothing exited 0, a success to a script.)"""
    seen = set(found)
    missing = [letter_id for letter_id in args.ids or () if letter_id not in seen]
    if missing:
        _say(f"no dead letter {', '.join(missing)} in {args.queue}.dlq (as selected)")
    return bool(args.ids) and len(missing) == len(set(args.ids))


def _stoppable(
    app: Bridge,
    work: Coroutine[Any, Any, Any],
    stop: asyncio.Event,
    done: Callable[[], str],
    in_hand: str = "",
) -> bool:
    """Run a dlq sweep that Ctrl-C (or SIGTERM) stops after the letter in hand; whether it was.

    Each letter is told as it goes, so a sweep stopped by a signal, or by a broker lost,
    leaves a true account: what `done()` says, printed with "stopped" before. A second signal
    exits at once, saying `done()` and `in_hand`."""

    async def sweep() -> None:
        def exiting() -> str:
            return f"second signal: stopped at once, after {done()}{in_hand}"

        _on_signals(stop.set, stopping="stopping after the letter in hand (again to stop at once)",
                    exiting=exiting, tell=_say)  # fmt: skip
        await _closing(app, work)

    told = done()
    try:
        asyncio.run(sweep())
    except (TransportError, RegistryUnavailable):  # (a ConfigError comes before any letter)
        if done() != told:  # (else it stopped before any letter: a missing queue, say)
            _say(f"stopped: {done()} so far")
        raise
    if stop.is_set():
        _say(f"stopped: {done()} before the signal")
    return stop.is_set()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _keys(args: argparse.Namespace) -> tuple[Bridge, Keys]:
    """The app of the flags, and the keys of the job type named, in a store workers share."""
    check_job_type(args.type)
    app = _app(args)
    url = app.settings.idempotency  # (the workers' default, without needing a broker to say it)
    url = url or ("memory://" if (app.settings.broker or "").startswith("memory:") else default_url())
    if url.startswith("memory:"):  # (this process's own store, empty: it would show nothing, wrongly)
        raise ConfigError(
            "the memory:// idempotency store lives in one process, not the workers': give theirs, "
            "--idempotency sqlite:///... (or BRIDGE_IDEMPOTENCY)"
        )
    if url.startswith("sqlite:") and (
        problem := sqlite_store.unused(Path("/" + url.removeprefix("sqlite://").lstrip("/")))
    ):
        raise ConfigError(
            f"{problem}. Give the workers' store, --idempotency sqlite:///path (or "
            "BRIDGE_IDEMPOTENCY; the default is in BRIDGE_DATA)"
        )
    if url.startswith("postgres"):
        from bridge.idempotency import postgres  # (psycopg: only for its URLs)

        if problem := postgres.unused(url):
            raise ConfigError(f"{problem}. Give the workers' database, --idempotency postgresql://...")
    if url.startswith("redis"):
        from bridge.idempotency import redis  # (redis-py: only for its URLs)

        if problem := redis.unused(url):
            raise ConfigError(f"{problem}. Give the workers' database, --idempotency redis://host:port/db")
    app.configure(idempotency=url)
    keys = app.idempotency_keys(args.type)
    # A mistyped type said "no record ...: its next job runs", untrue of the type meant. (One the
    # store holds keys of is taken as it is: another service's, whose schema is not here.)
    if (unknown := _unknown_type(app, args.type)) and not asyncio.run(_closing(app, keys.find(limit=1))):
        raise ConfigError(unknown)
    return app, keys


def _keys_show(args: argparse.Namespace) -> int:
    app, keys = _keys(args)
    entries = asyncio.run(_closing(app, keys.show(args.key)))
    if args.json:
        _print_json(entries)
        return 0
    if not entries:
        print(one_line(f"no record of idempotency key {args.key!r} of {args.type}: its next job runs "
                       "(never used, or its window ended)"))  # fmt: skip
    for entry in entries:
        print(one_line(f"{entry.kind:8} {entry.describe()}"))
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    app, keys = _keys(args)
    entries = asyncio.run(_closing(app, keys.find(args.state, args.limit)))
    if args.json:
        _print_json(entries)
        return 0
    for entry in entries:
        print(one_line(f"{entry.key}  {entry.kind:8} {entry.describe()}"))
    more = " (--limit: there may be more)" if len(entries) == args.limit else ""
    print(f"{_records(len(entries))} of {args.type}{more}", file=sys.stderr)
    return 0


def _unknown_type(app: Bridge, job_type: str) -> str | None:
    """What to say of a job type that neither the app nor the registry's schemas know (None
    when they know it, or know none: nothing to compare with)."""
    try:
        known = {*app.jobs, *app.registry.job_types()}
    except BridgeError:
        return None
    if not known or job_type in known:
        return None
    close = difflib.get_close_matches(job_type, sorted(known), n=1)
    hint = f"did you mean {close[0]}?" if close else f"it knows {', '.join(sorted(known))}"
    return f"no job type {job_type} in the app or the registry, and no key of it in the store: {hint}"


def _records(count: int) -> str:
    return f"{count} idempotency record{'' if count == 1 else 's'}"


def _print_json(entries: list[Entry]) -> None:
    for entry in entries:  # (times in epoch ms, as in `bridge dlq list --json`)
        print(json.dumps({"key": entry.key, "kind": entry.kind, **dataclasses.asdict(entry.record)}))


def _keys_forget(args: argparse.Namespace) -> int:
    if (args.key is None) == (not args.all):
        raise ConfigError("give one idempotency KEY to forget, or --all (the job type's every key)")
    for flag, given in (("--state", args.state), ("--yes", args.yes)):
        if given and not args.all:
            raise ConfigError(f"{flag} goes with --all: add --all, or leave out {flag}")
    if args.all:
        return _keys_forget_all(args)
    app, keys = _keys(args)
    forgotten = asyncio.run(_closing(app, keys.forget(args.key, force=args.force)))
    if not forgotten:
        print(one_line(f"no record of idempotency key {args.key!r} of {args.type}: nothing to forget"))
    for entry in forgotten:
        print(one_line(f"forgot {entry.kind:8} {entry.describe()}"))
    return 0


def _keys_forget_all(args: argparse.Namespace) -> int:
    which = f"{args.state} " if args.state else ""
    app, keys = _keys(args)  # (the store checked before asking)
    if not args.yes and not _confirmed(
        f"forget every {which}idempotency key of {args.type}, so their copies run again?",
        f"forget --all lets a copy of every {which}job of {args.type} run again: add --yes to confirm",
    ):
        return 1
    forgotten, left, changed = asyncio.run(_closing(app, keys.forget_all(args.state, force=args.force)))
    for entry in forgotten:
        print(one_line(f"forgot {entry.key}  {entry.kind:8} {entry.describe()}"))
    summary = f"forgot {_records(len(forgotten))} of {args.type}"
    if left:
        summary += f"; left {len(left)} whose job or publish is under way (--force forgets them too)"
    if changed:
        summary += f"; left {len(changed)} that changed after they were listed (taken by a job, or ended)"
    print(summary, file=sys.stderr)
    return 0


def _confirmed(question: str, refusal: str) -> bool:
    """Whether the person at the terminal answers yes; without one, `refusal` as the error."""
    if not sys.stdin.isatty():
        raise ConfigError(refusal)
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:  # (Ctrl-D: no)
        print(file=sys.stderr)
        return False
    return answer.strip().lower() in ("y", "yes")


def _json(value: Any, indent: int | None = None) -> str:
    """`value` as JSON that every parser reads: bytes as hex, what JSON has no type for as text,
    and a float that is no number as its name, "NaN", "Infinity" or "-Infinity" (as Avro's
    JSON encoding in Java writes them): Python wrote NaN, which JavaScript, Go and jq refuse."""
    return json.dumps(_finite(value), default=_jsonable, allow_nan=False, indent=indent)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _jsonable(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes) else str(value)


def _dev(args: argparse.Namespace) -> int:
    from bridge import dev  # provisioning code is only needed here

    services = args.services or dev.SERVICES
    if args.action == "up":
        statuses = dev.up(services)
    elif args.action == "down":
        statuses = dev.down(services)
    else:
        statuses = dev.status(services)
    for status in statuses:
        print(f"{status.name:9} {'up' if status.running else 'down':5} {status.url}  ({status.detail})")
    if args.action == "up":
        for status in statuses:
            setting = "BRIDGE_BROKER"
            if status.name in dev.STORES:
                setting = "BRIDGE_IDEMPOTENCY"
            elif status.name in dev.REGISTRIES:
                setting = "BRIDGE_REGISTRY"
            print(f"# to use {status.name}: export {setting}={status.url}")
    return 0 if args.action != "status" or all(s.running for s in statuses) else 1


def _schemas_register(args: argparse.Namespace) -> int:
    _, registry = _http_registry(args, local=True)
    for name in registry.local.job_types():
        schema_id, new = registry.register(name)
        print(f"{name:40} id {schema_id:<6} {'registered' if new else 'already registered'}")
    return 0


def _schemas_check(args: argparse.Namespace) -> int:
    _, registry = _http_registry(args, local=True)
    failed = 0
    for name in registry.local.job_types():
        level, problems = registry.check(name)
        print(f"{name:40} {level:20} {'INCOMPATIBLE' if problems else 'ok'}")
        for problem in problems:
            print(f"    {problem}")
        failed += bool(problems)
    if failed:
        print(f"bridge: {failed} schema(s) would break their subject's compatibility rule", file=sys.stderr)
    return 1 if failed else 0


def _schemas_compatibility(args: argparse.Namespace) -> int:
    _, registry = _http_registry(args, local=False)
    if args.level:
        registry.set_compatibility(args.subject, args.level)
    if (own := registry.own_compatibility(args.subject)) is not None:
        print(f"{args.subject} {own}")
        return 0
    # (A mistyped subject was shown the registry's level as if it were its own.)
    unknown = "" if registry.registered(args.subject) else f"; no schema is registered as {args.subject}"
    print(f"{args.subject} {registry.default_compatibility()} (the registry's default{unknown})")
    return 0


def _schemas_list(args: argparse.Namespace) -> int:
    app, registry = _http_registry(args, local=False)
    handled = set(app.jobs)  # none without --app
    subjects = registry.subjects()
    for subject in subjects:
        mark = "handler" if subject.name in handled else ""
        versions = ",".join(map(str, subject.versions))
        latest = f"latest id {subject.latest_id:<6}"
        print(f"{subject.name:40} versions {versions:12} {latest} {subject.compatibility:20} {mark}")
    for name in sorted(handled - {s.name for s in subjects}):
        print(f"{name:40} NOT REGISTERED{'':38} handler")
    return 0


def _http_registry(args: argparse.Namespace, *, local: bool) -> tuple[Bridge, HttpRegistry]:
    """The app of the flags and its registry, which must be a URL; with `local`, with a schema directory."""
    from bridge.schema_registry import HttpRegistry

    if getattr(args, "dir", None):
        args.schemas = args.dir
    app = _app(args)
    if not (app.settings.registry or "").startswith(("http://", "https://")):
        given = f", not {app.settings.registry!r}" if app.settings.registry else ""
        raise ConfigError(
            f"bridge schemas needs a registry URL (http:// or https://){given}: pass --registry"
            " http://... or set BRIDGE_REGISTRY"
        )
    if local and not app.settings.schemas:
        raise ConfigError("which schemas? pass a directory, --schemas DIR, or set BRIDGE_SCHEMAS")
    registry = app.registry
    assert isinstance(registry, HttpRegistry)
    if local and not registry.local.job_types():  # (a wrong path checked nothing, and passed)
        raise ConfigError(f"no job types in {app.settings.schemas}: it holds no <full name>.avsc files")
    return app, registry


# -- helpers ---------------------------------------------------------------------------------


def _app(args: argparse.Namespace, **settings: Any) -> Bridge:
    """The app named by --app (or an empty one), configured from the common flags."""
    app = load_app(args.app) if getattr(args, "app", None) is not None else Bridge()
    app.configure(
        broker=args.broker,
        registry=args.registry,
        schemas=args.schemas,
        prefix=args.prefix,
        idempotency=args.idempotency,
        **settings,
    )
    app.settings  # noqa: B018 -- resolve and validate settings now, before any connection
    return app


def load_app(spec: str) -> Bridge:
    """Import `module:attr` (from the current directory too) and check it is a Bridge."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--app {spec!r}: write MODULE:ATTR, e.g. consumers.billing:app")
    if module_name.startswith("."):  # (importlib's TypeError, "the 'package' argument is required")
        raise ConfigError(f"--app {spec!r}: give the module's full name, not a relative one")
    with contextlib.suppress(FileNotFoundError):  # (a deleted directory: the app may be installed)
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--app {spec!r}: cannot import {module_name} ({exc})") from None
    except SystemExit as exc:  # (`bridge consume` exited 0 at once, saying nothing)
        raise ConfigError(
            f"--app {spec!r}: importing {module_name} called sys.exit({exc.code!r}); "
            'put its script part under `if __name__ == "__main__":`'
        ) from None
    except Exception as exc:  # the module itself failed: say where, in one line
        raise ConfigError(f"--app {spec!r}: importing {module_name} failed: {_raised_at(exc)}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"--app {spec!r}: {module_name} has no {attr!r}")
    app = getattr(module, attr)
    if not isinstance(app, Bridge):
        raise ConfigError(f"--app {spec!r}: {module_name}.{attr} is not a bridge.Bridge")
    return app


def _raised_at(exc: Exception) -> str:
    """`exc` and the line that raised it (a SyntaxError's own, or the innermost frame's)."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} ({frame.filename}, line {frame.lineno})"


async def _closing(app: Bridge, work: Any) -> Any:
    try:
        return await work
    finally:
        await app.aclose()
