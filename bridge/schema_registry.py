"""A Confluent-compatible schema registry over HTTP, through confluent-kafka's SchemaRegistryClient.

Subjects are record full names (the record-name strategy): a job type's subject is the type,
the envelope's is `bridge.JobEnvelope`. Messages are framed with registry ids (Confluent wire
format); single-object frames of the local schemas are still read.

The local schema directory, when there is one, holds this app's own version of each type: it
reads every payload of that type (Avro resolution from whatever version wrote it) and writes
new ones. A type with no local file is read and written with the registry's latest version.

Only ids of known subjects are decoded: an id is fetched once, and accepted only when it names
a record this app knows (a local type, a handled type, or bridge's own). Ids are immutable, so
every answer is cached; fetches happen at start (`prepare`) and the first time a new version
appears on the wire.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bridge.codec import Schema
from bridge.compatibility import LEVELS, level_problems, read_problems
from bridge.errors import (
    ConfigError,
    RegistryUnavailable,
    SchemaError,
    UnknownJobType,
    UnknownSchema,
    safe_url,
)
from bridge.registry import DEAD_LETTER, ENVELOPE, SchemaDirectory, full_name_of

NOT_FOUND_RETRY_S = 30.0  # an id the registry did not know is asked again after this long
MAX_REFUSED = 10_000
REQUEST_TIMEOUT_S = 10.0  # for each HTTP request (the client tries a request up to 4 times)
# 4xx answers that say the registry is busy, not that it refuses: a request timeout, a rate
# limit. Read as refusals, a 429 dead-lettered good jobs as `unknown_schema` for 30 s.
BUSY = {408, 425, 429}
SAID_CHARS = 300  # of a registry's error message, in bridge's own


log = logging.getLogger("bridge.registry")


def _subject(name: str) -> str:
    """`name`, refused if blank: the client reads and sets the registry's global level for it."""
    if not name.strip():
        raise ConfigError(f"give a job type as the subject, e.g. billing.ChargeCard, not {name!r}")
    return name


class _Rejected(ConfigError):
    """The registry answered with a 4xx: no such subject, version or id, or an incompatible schema.
    (A ConfigError where no caller expects it: one line with the registry's answer.)"""


class _Forbidden(ConfigError):
    """The registry refused the request (401, 403): the credentials, or their rights."""

    def __init__(self, message: str, status: int, said: str) -> None:
        super().__init__(message)
        self.status, self.said = status, said


@dataclass(frozen=True)
class Subject:
    """One subject as `bridge schemas list` shows it."""

    name: str
    versions: list[int]
    latest_id: int
    compatibility: str


class HttpRegistry:
    """Schemas by name, id and fingerprint from a registry at `url` and an optional local directory."""

    def __init__(self, url: str, local: SchemaDirectory, client: Any = None) -> None:
        self.url = url
        self.shown_url = safe_url(url)  # for messages: never a password
        self.local = local
        self._client = client or _client(url)
        # Its HTTP connections close with this object even when nobody calls close(). (Its
        # __exit__, since close() is recent and we support confluent-kafka from 2.6.)
        self.close = weakref.finalize(self, self._client.__exit__, None, None, None)
        self._schemas: dict[str, Schema] = {}  # by name: the version this app reads and writes
        self._by_id: dict[int, Schema] = {}
        self._refused: dict[int, tuple[str, float]] = {}  # id -> (why, when)
        self._known = set(local.job_types()) | {ENVELOPE, DEAD_LETTER}

    # -- Registry ------------------------------------------------------------------------

    def schema(self, name: str) -> Schema:
        """This app's version of `name`; bridge's own records are registered on first use,
        unless the registry has them (a worker needs no right to write there: it was refused
        with read-only credentials, or by a registry in read-only mode)."""
        if name not in self._schemas:
            self._known.add(name)
            if name.startswith("bridge."):
                found = self._with_id(self.local.schema(name))
                self._schemas[name] = found if found.schema_id is not None else self._register(found)
            elif name in self.local.job_types():
                self._schemas[name] = self._with_id(self.local.schema(name))
            else:
                self._schemas[name] = self._latest(name)
        return self._schemas[name]

    def writer(self, name: str) -> Schema:
        """The schema to write `name` with, registered first when the registry lacks it.

        As Confluent's serializers do by default; the registry's compatibility rule decides
        whether the new version is accepted.
        """
        schema = self.schema(name)
        if schema.schema_id is None:
            self._schemas[name] = schema = self._register(schema)
        return schema

    def job_types(self) -> list[str]:
        return sorted(self.local.job_types())

    def by_fingerprint(self, fingerprint: int) -> Schema | None:
        return self.local.by_fingerprint(fingerprint)

    def cached(self, schema_id: int) -> bool:
        return schema_id in self._by_id or self._still_refused(schema_id) is not None

    def ready_to_write(self, name: str) -> bool:
        known = self._schemas.get(name)
        return known is not None and known.schema_id is not None and ENVELOPE in self._schemas

    def by_id(self, schema_id: int) -> Schema | None:
        """The schema registered as `schema_id`, when it is one of a known record."""
        refused = self._still_refused(schema_id)
        if refused is not None:
            raise UnknownSchema(refused)
        try:
            return self._fetch(schema_id)
        except UnknownSchema as exc:
            if len(self._refused) >= MAX_REFUSED:
                self._refused.clear()  # a flood of made-up ids costs memory no more than this
            self._refused[schema_id] = (str(exc), time.monotonic())
            raise

    def _still_refused(self, schema_id: int) -> str | None:
        """Why the registry refused `schema_id`, if it did less than NOT_FOUND_RETRY_S ago."""
        refused = self._refused.get(schema_id)
        if refused is not None and time.monotonic() - refused[1] < NOT_FOUND_RETRY_S:
            return refused[0]
        return None

    # -- checks at start and before deploy -------------------------------------------------

    def prepare(self, types: Iterable[str]) -> None:
        """Check that every type is registered and readable here; learn every version's id.

        Raises ConfigError listing every problem: a type the registry lacks, or a local schema
        that cannot read the registry's latest version of its type.
        """
        self.schema(ENVELOPE)
        self.schema(DEAD_LETTER)
        problems = []
        try:
            self._versions(ENVELOPE, skip_unreadable=True)  # other producers' copies of it too
        except UnknownSchema as exc:
            problems.append(f"{ENVELOPE}: {exc}")
        for name in types:
            try:
                versions = self._versions(name, skip_unreadable=True)
            except _Rejected:
                problems.append(
                    f"{name} is not registered at {self.shown_url} (run `bridge schemas register`)"
                )
                continue
            except UnknownSchema as exc:
                problems.append(f"{name}: {exc}")
                continue
            latest = versions[-1]
            try:
                mine = self.schema(name)
            except SchemaError as exc:
                problems.append(f"{name}: {exc}")
                continue
            for problem in read_problems(mine.definition, latest.definition):
                problems.append(
                    f"{name}: this app's schema cannot read version {len(versions)} "
                    f"(schema id {latest.schema_id}): {problem}"
                )
        if problems:
            raise ConfigError("; ".join(problems))

    def register(self, name: str) -> tuple[int, bool]:
        """Register the local schema of `name`: its id, and whether it was new."""
        schema = self.local.schema(name)
        before = self._lookup(name, schema)
        registered = self._register(schema)
        assert registered.schema_id is not None
        return registered.schema_id, before is None

    def check(self, name: str) -> tuple[str, list[str]]:
        """The subject's compatibility level and why the local schema breaks it (empty: it does not)."""
        level = self.compatibility(name)
        try:
            older = [schema.definition for schema in self._versions(name)]
        except _Rejected:
            return level, []  # a new subject: anything goes
        mine = self.local.schema(name)
        # (A level bridge does not know, another registry's, say, is the registry's alone to
        # judge: it was a ValueError's traceback.)
        problems = level_problems(level, mine.definition, older) if level.upper() in LEVELS else []
        # The registry has the last word; it may apply rules this module does not know.
        if (
            not problems
            and level != "NONE"
            and not self._call(self._client.test_compatibility, name, _wire(mine))
        ):
            problems = [f"the registry at {self.shown_url} reports it incompatible ({level})"]
        return level, problems

    def compatibility(self, name: str) -> str:
        """The subject's compatibility level, or the registry's global one."""
        return self.own_compatibility(name) or self.default_compatibility()

    def own_compatibility(self, name: str) -> str | None:
        """The subject's own compatibility level; None if it has none (the registry's applies)."""
        try:
            return str(self._call(self._client.get_compatibility, _subject(name)))
        except _Rejected:
            return None

    def default_compatibility(self) -> str:
        """The registry's global compatibility level."""
        return str(self._call(self._client.get_compatibility))

    def registered(self, name: str) -> bool:
        """Whether a schema is registered under subject `name`."""
        try:
            return bool(self._call(self._client.get_versions, _subject(name)))
        except _Rejected:
            return False

    def set_compatibility(self, name: str, level: str) -> None:
        """Set the subject's compatibility level (see bridge.compatibility.LEVELS)."""
        self._call(self._client.set_compatibility, _subject(name), level)

    def subjects(self) -> list[Subject]:
        """Every subject of the registry with its versions and latest id."""
        out = []
        for name in sorted(self._call(self._client.get_subjects)):
            versions = self._call(self._client.get_versions, name)
            latest = self._call(self._client.get_latest_version, name)
            out.append(Subject(name, versions, latest.schema_id, self.compatibility(name)))
        return out

    # -- HTTP ----------------------------------------------------------------------------

    def _versions(self, name: str, *, skip_unreadable: bool = False) -> list[Schema]:
        """Every registered version of `name`, oldest first; their ids are learnt on the way.

        With `skip_unreadable`, an older version this app cannot read (one with schema
        references, say) is left out, with a warning: its jobs are dead-lettered
        `unknown_schema` as they come, and it no longer stops every worker from starting."""
        self._known.add(name)
        schemas = []
        versions = self._call(self._client.get_versions, name)
        for n, version in enumerate(versions, start=1):
            registered = self._call(self._client.get_version, name, version)
            try:
                schemas.append(self._fetch(registered.schema_id))
            except UnknownSchema as exc:
                if not skip_unreadable or n == len(versions):
                    raise
                log.warning("%s: version %s is left out, as this app cannot read it: %s", name, version, exc)
        return schemas

    def _latest(self, name: str) -> Schema:
        try:
            registered = self._call(self._client.get_latest_version, name)
            return self._fetch(registered.schema_id)
        except _Rejected:
            where = f" in {self.local.path}" if self.local.path else ""
            raise UnknownJobType(
                f"unknown job type {name!r}: no {name}.avsc{where} and no subject {name} at {self.shown_url}"
            ) from None
        except UnknownSchema as exc:
            raise SchemaError(str(exc)) from None

    def _fetch(self, schema_id: int) -> Schema:
        """The schema registered as `schema_id`, asked of the registry once."""
        known = self._by_id.get(schema_id)
        if known is not None:
            return known
        try:
            fetched = self._call(self._client.get_schema, schema_id)
        except _Rejected:
            raise UnknownSchema(
                f"unknown schema id {schema_id}: the registry at {self.shown_url} has none"
            ) from None
        except _Forbidden as exc:
            if exc.status != 403 or not self._by_id:
                raise
            # This worker read its own ids at start: a 403 now is a right to this id's subject
            # it lacks (as Confluent's RBAC grants ids), not its credentials. Stopping for it
            # stopped every consume, at each start, the message never dead-lettered.
            raise UnknownSchema(
                f"schema id {schema_id}: the registry at {self.shown_url} refuses this worker to read it "
                f"(403 {exc.said})"
            ) from None
        if fetched.references:
            raise UnknownSchema(f"schema id {schema_id} uses schema references, which bridge does not read")
        kind = fetched.schema_type or "AVRO"  # (the registry leaves it out for Avro)
        if kind != "AVRO":  # a producer of Protobuf or JSON messages, on a bridge topic
            raise UnknownSchema(f"schema id {schema_id} is a {kind} schema, not an Avro one")
        try:
            definition = json.loads(fetched.schema_str)
        except (ValueError, RecursionError, TypeError) as exc:  # (TypeError: no schema in the answer)
            why = "nested too deeply" if isinstance(exc, RecursionError) else exc
            raise UnknownSchema(f"schema id {schema_id} is not JSON, so no Avro schema: {why}") from None
        name = full_name_of(definition)
        if name is None:
            raise UnknownSchema(f"schema id {schema_id} is no named Avro type (a record, enum or fixed)")
        if name not in self._known:
            raise UnknownSchema(f"schema id {schema_id} is a {name}, not a type known to this app")
        try:
            schema = Schema.from_definition(definition, schema_id=schema_id, logical_types=_logical(name))
        except SchemaError as exc:  # recursive, or nested too deep: never decoded
            raise UnknownSchema(f"schema id {schema_id} ({name}) is refused: {exc}") from None
        except Exception as exc:  # fastavro's SchemaParseException and friends
            raise UnknownSchema(f"schema id {schema_id} ({name}) is not a valid Avro schema: {exc}") from None
        self._by_id[schema_id] = schema
        return schema

    def _lookup(self, name: str, schema: Schema) -> int | None:
        try:
            return int(self._call(self._client.lookup_schema, name, _wire(schema)).schema_id)
        except _Rejected:
            return None

    def _with_id(self, schema: Schema) -> Schema:
        """`schema` with its registry id, when the registry has it under its subject."""
        schema_id = self._lookup(schema.name, schema)
        return schema if schema_id is None else self._identified(schema, schema_id)

    def _register(self, schema: Schema) -> Schema:
        try:
            schema_id = int(self._call(self._client.register_schema, schema.name, _wire(schema)))
        except _Rejected as exc:
            raise SchemaError(f"{schema.name}: the registry at {self.shown_url} refused it: {exc}") from None
        return self._identified(schema, schema_id)

    def _identified(self, schema: Schema, schema_id: int) -> Schema:
        """`schema` framed with `schema_id`, made once per id."""
        if schema_id not in self._by_id:
            self._by_id[schema_id] = Schema.from_definition(
                schema.definition, schema_id=schema_id, logical_types=_logical(schema.name)
            )
        return self._by_id[schema_id]

    def _call(self, method: Any, *args: Any) -> Any:
        """`method(*args)`; a 4xx answer as _Rejected, no answer as RegistryUnavailable."""
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            return method(*args)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404 and exc.error_code in (None, SchemaRegistryError.UNKNOWN):
                # A registry's "not found" carries its own code (40401, ...): this is some other
                # web server, or the registry's host without the path of its API.
                raise ConfigError(
                    f"registry {self.shown_url} is not a schema registry's API: it answered 404 without"
                    " a registry error code (for Apicurio, the URL ends in /apis/ccompat/v7)"
                ) from None
            said = _cut(exc.error_message)  # (a proxy's error page can be megabytes, logged per job)
            if exc.http_status_code in (401, 403):  # (every command that asked was a traceback)
                status = exc.http_status_code
                raise _Forbidden(
                    f"registry {self.shown_url} refused the request ({status} {said}): check the user "
                    "and password in its URL",
                    status, said,
                ) from None  # fmt: skip
            if 400 <= exc.http_status_code < 500 and exc.http_status_code not in BUSY:
                raise _Rejected(said) from None
            raise RegistryUnavailable(f"schema registry at {self.shown_url}: {said}") from None
        except Exception as exc:  # httpx's connection and timeout errors
            raise RegistryUnavailable(f"schema registry at {self.shown_url} did not answer: {exc}") from None


def _cut(text: Any) -> str:
    text = str(text)
    return text if len(text) <= SAID_CHARS else f"{text[:SAID_CHARS]}... ({len(text):,} characters)"


def _client(url: str) -> Any:
    try:
        from confluent_kafka.schema_registry import SchemaRegistryClient
    except ImportError as exc:
        raise ConfigError(
            f"registry {safe_url(url)}: HTTP registries need confluent-kafka's schema registry client: "
            f"pip install 'bridge-jobs[registry]' ({exc})"
        ) from None
    # Without a timeout the client waits for an answer for good (httpx's default when given None).
    return SchemaRegistryClient({"url": url, "timeout": REQUEST_TIMEOUT_S})


def _wire(schema: Schema) -> Any:
    from confluent_kafka.schema_registry import Schema as RegistrySchema

    return RegistrySchema(json.dumps(schema.definition), "AVRO")


def _logical(name: str) -> bool:
    return not name.startswith("bridge.")  # bridge's own records keep timestamps as integers
