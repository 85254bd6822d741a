"""Where schemas come from: job types are the full names of Avro record schemas.

`SchemaDirectory` is the embedded default: every `<full name>.avsc` under a directory, plus the
envelope schemas that ship inside the package. Payloads framed by it use Avro single-object
encoding, so a message names its schema by CRC-64-AVRO fingerprint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from bridge.avro_defaults import check_defaults
from bridge.codec import Schema, SchemaLookup, inline_named_types
from bridge.compatibility import full_name
from bridge.errors import ConfigError, SchemaError, UnknownJobType

BUILTIN_SCHEMAS = Path(__file__).parent / "schemas"
ENVELOPE = "bridge.JobEnvelope"
DEAD_LETTER = "bridge.DeadLetter"


class Registry(SchemaLookup, Protocol):
    """A source of schemas by name, fingerprint or id."""

    def schema(self, name: str) -> Schema:
        """The schema this app reads `name` with (and bridge's own records are written with)."""
        ...

    def writer(self, name: str) -> Schema:
        """The schema new payloads of job type `name` are written with."""
        ...

    def job_types(self) -> list[str]: ...

    def cached(self, schema_id: int) -> bool:
        """Whether `by_id(schema_id)` answers without asking a server (so without waiting)."""
        ...

    def ready_to_write(self, name: str) -> bool:
        """Whether `writer(name)` and the envelope's `schema` answer without asking a server."""
        ...

    def prepare(self, types: Iterable[str]) -> None:
        """Check, before consuming, that the handlers' types can be read; ConfigError if not."""
        ...

    def close(self) -> None:
        """Let go of connections; the registry may not be used after."""
        ...


class SchemaDirectory:
    """Schemas read once from a directory of `.avsc` files named after their full names."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        definitions = _read_definitions(self.path) if self.path else {}
        definitions.update(_read_definitions(BUILTIN_SCHEMAS))  # bridge.* always means ours
        self._schemas = _build(definitions)
        self._by_fingerprint = {s.fingerprint: s for s in self._schemas.values()}

    def schema(self, name: str) -> Schema:
        """The schema of job type (or bridge record) `name`."""
        try:
            return self._schemas[name]
        except KeyError:
            if self.path is None:
                raise UnknownJobType(
                    f"unknown job type {name!r}: no registry is set (--registry or BRIDGE_REGISTRY:"
                    f" the folder of {name}.avsc, or a registry URL)"
                ) from None
            raise UnknownJobType(f"unknown job type {name!r}: no {name}.avsc in {self.path}") from None

    def job_types(self) -> list[str]:
        """Every job type: the records that are not bridge's own."""
        return sorted(n for n in self._schemas if not n.startswith("bridge."))

    def writer(self, name: str) -> Schema:
        return self.schema(name)

    def prepare(self, types: Iterable[str]) -> None:
        pass  # every schema was read and checked when the directory was

    def close(self) -> None:
        pass

    def by_fingerprint(self, fingerprint: int) -> Schema | None:
        return self._by_fingerprint.get(fingerprint)

    def cached(self, schema_id: int) -> bool:
        return True

    def ready_to_write(self, name: str) -> bool:
        return True

    def by_id(self, schema_id: int) -> Schema | None:
        return None  # a directory has no ids; Confluent-framed input needs a registry server


@cache
def own_schema(name: str) -> Schema:
    """bridge's own record `name` (its envelope, its dead letter), single-object framed: every
    reader knows it, whatever registry it has."""
    return SchemaDirectory().schema(name)


def open_registry(url: str | None, schemas: str | None = None) -> Registry:
    """The registry for `--registry` and `--schemas` values.

    An http(s) URL is a Confluent-compatible registry, with `schemas` as this app's own
    versions; otherwise the registry is a directory of .avsc files (`url`, else `schemas`).
    """
    if url and url.startswith(("http://", "https://")):
        from bridge.schema_registry import HttpRegistry

        return HttpRegistry(url, _directory(schemas, "schemas") if schemas else SchemaDirectory(None))
    if not url and not schemas:
        return SchemaDirectory(None)
    # (a directory registry is the app's own schemas: a second folder would be ignored)
    if url and schemas and _folder(url, "registry").resolve() != _folder(schemas, "schemas").resolve():
        raise ConfigError(
            f"registry {url} is a directory, so it holds the job types, and schemas {schemas} would be"
            " ignored: give the one directory, or a registry URL (http://...) for --schemas"
        )
    return _directory(url or schemas, "registry" if url else "schemas")


def _directory(value: str | None, setting: str) -> SchemaDirectory:
    return SchemaDirectory(_folder(value, setting))


def _folder(value: str | None, setting: str) -> Path:
    path = Path(str(value).removeprefix("file://"))
    if not path.is_dir():
        raise ConfigError(
            f"{setting} {value}: not a directory of .avsc files (set --{setting} or BRIDGE_{setting.upper()})"
        )
    return path


def _read_definitions(directory: Path) -> dict[str, Any]:
    definitions: dict[str, Any] = {}
    problems = []
    for file in sorted(directory.rglob("*.avsc")):
        if file.is_symlink() and not file.exists():  # (a copy of a folder of relative links)
            problems.append(f"{file}: links to {file.readlink()}, which does not exist")
            continue
        try:
            definition = json.loads(file.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else exc
            problems.append(f"{file}: not JSON ({why})")
            continue
        name = full_name_of(definition)
        if name is None:
            problems.append(f"{file}: not a named Avro schema (a record, enum or fixed with a name)")
            continue
        if name != file.stem:
            problems.append(f"{file}: defines {name!r}; name the file {name}.avsc")
            continue
        definitions[name] = definition
    if problems:
        raise SchemaError("; ".join(problems))
    return definitions


def full_name_of(definition: Any) -> str | None:
    if not isinstance(definition, dict) or "name" not in definition:
        return None
    return full_name(str(definition["name"]), definition.get("namespace"))


def _build(definitions: dict[str, Any]) -> dict[str, Schema]:
    schemas: dict[str, Schema] = {}
    problems = []
    for name, definition in definitions.items():
        if definition.get("type") not in ("record", "error"):
            continue  # enums and fixed types are only referenced from records
        try:
            expanded = inline_named_types(definition, definitions)
            check_defaults(expanded)
            # Our own records keep timestamps as integers: faster, and the same on every wire.
            own = name.startswith("bridge.")
            schemas[name] = Schema.from_definition(expanded, logical_types=not own)
        except SchemaError as exc:
            problems.append(f"{name}: {exc}")
        except Exception as exc:  # fastavro's SchemaParseException and friends
            problems.append(f"{name}: not a valid Avro schema ({exc})")
    if problems:
        raise SchemaError("; ".join(problems))
    return schemas
