"""Avro binary in the two framings of DESIGN.md, decoded strictly and within bounds.

Framings, both accepted on read:
- Avro single-object encoding: ``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint + body;
- Confluent wire format: ``00`` + 4-byte big-endian schema id + body.

fastavro trusts the lengths and counts it reads. Three rules keep a hostile message from costing
more than its own size: a size cap before anything is read; schemas whose arrays could hold
zero-byte items, or that recurse, or that nest too deep, are refused when loaded (`check_schema`),
so every item read consumes at least one byte and a count larger than the bytes present runs
out of input at once; and the body must end exactly where the bytes end. A fourth: a decimal
of bytes may be no longer than its precision needs (`_bounded_decimal`).

Pure: no I/O. Schemas come from a registry through the `SchemaLookup` protocol.
"""

from __future__ import annotations

import io
import json
import math
import struct
import sys
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Protocol
from uuid import UUID

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.read import LOGICAL_READERS
from fastavro.validation import ValidationError, validate

from bridge.avro_defaults import fill_defaults, reader_with_defaults, writer_defaults
from bridge.avro_reader import Read, compile_reader
from bridge.avro_writer import Write, compile_writer
from bridge.compatibility import (
    LOGICAL_KEYS,
    PRIMITIVES,
    Names,
    full_name,
    read_problems,
    strip_logical_types,
    with_readers_logical_types,
)
from bridge.errors import DecodeError, SchemaError, SchemaMismatch, UnknownSchema, utf8

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
_FINGERPRINT = struct.Struct("<Q")  # after the single-object magic
_SCHEMA_ID = struct.Struct(">I")  # after the Confluent magic
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_SCHEMA_DEPTH = 32
# What the compiled writer raises for a datum it cannot write as it is.
_NOT_AS_IT_IS = (KeyError, TypeError, ValueError, AttributeError, OverflowError, struct.error)
# The largest finite value of an Avro float (IEEE 754 single precision).
_FLOAT_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]
_DOUBLE_MAX = sys.float_info.max
# A time of day as an int counts from midnight, in these units in a day.
_IN_A_DAY = {"time-millis": 86_400_000, "time-micros": 86_400_000_000}
# What fastavro reads each logical type as: a valid value of that type reads back as written.
_READS_AS: dict[str, type | tuple[type, ...]] = {
    "date": date, "time-millis": time, "time-micros": time, "uuid": UUID, "decimal": Decimal,
    **dict.fromkeys(("timestamp-millis", "timestamp-micros", "local-timestamp-millis",
                     "local-timestamp-micros"), datetime),
}  # fmt: skip


def _bounded_decimal(read: Any) -> Any:
    """fastavro's reader of `bytes` decimals, refusing more bytes than the precision needs.

    It turns the bytes into one integer, then a Decimal, in time that grows with the square of
    their length: a 1 MB field from another producer held the event loop for 90 s (a decimal of
    precision 38 needs 16). Installed where fastavro takes its logical types' readers.
    """

    def bounded(data: bytes, writer_schema: dict[str, Any], reader_schema: Any) -> Any:
        precision = writer_schema.get("precision")
        if isinstance(precision, int) and len(data) > (needs := _decimal_bytes(precision)):
            raise ValueError(
                f"a decimal of precision {precision} takes {needs} bytes at most, not {len(data)}"
            )
        return read(data, writer_schema, reader_schema)

    return bounded


def _decimal_bytes(precision: int) -> int:
    """The bytes of the two's complement of the largest number of `precision` digits."""
    return math.ceil((precision * math.log2(10) + 1) / 8)


LOGICAL_READERS["bytes-decimal"] = _bounded_decimal(LOGICAL_READERS["bytes-decimal"])


def _crc64_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return tuple(table)


CRC64_EMPTY = 0xC15D213AA4D7A795
_CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The CRC-64-AVRO fingerprint of `data` (the Avro specification's Rabin fingerprint)."""
    fp = CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


@dataclass(frozen=True, eq=False)
class Schema:
    """A parsed record schema with its identity on the wire."""

    name: str  # the record's full name, e.g. billing.ChargeCard
    definition: dict[str, Any]  # expanded JSON: every named type defined inline once
    parsed: Any  # fastavro's parsed form
    canonical: str
    fingerprint: int
    check: Read  # bridge's reader without logical types: it checks the bytes fastavro reads
    schema_id: int | None = None
    header: bytes = field(default=b"")
    field_names: frozenset[str] = frozenset()  # the record's own fields
    read: Read | None = None  # bridge's own faster reader, when fastavro would change nothing
    write: Write | None = None  # and writer
    logical_types: bool = True  # whether reading makes datetimes, Decimals, ... (not for bridge's own)
    readback: _Readback | None = None  # where a value that validates may not read back
    annotated: str = ""  # the canonical form with logical types kept: what the bytes mean
    defaults: dict[str, Any] = field(default_factory=dict)  # `writer_defaults`: for fields left out

    @classmethod
    def from_definition(
        cls, definition: dict[str, Any], *, schema_id: int | None = None, logical_types: bool = True
    ) -> Schema:
        """Check `definition` (self-contained JSON) and parse it for reading and writing."""
        check_schema(definition)
        canonical = parsing_canonical_form(definition)
        fingerprint = crc64_avro(canonical.encode())
        plain = strip_logical_types(definition)
        parsed = parse_schema(definition if logical_types else plain)
        # fastavro turns logical types into datetimes, decimals, ... and back; without them, the
        # compiled reader and writer do what it does.
        compiled = not logical_types or plain == definition
        check = compile_reader(canonical)
        read = check if compiled else None
        write = compile_writer(canonical) if compiled else None
        if schema_id is None:
            header = SINGLE_OBJECT_MAGIC + fingerprint.to_bytes(8, "little")
        else:
            header = CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")
        name = full_name(definition["name"], definition.get("namespace"))
        field_names = frozenset(f["name"] for f in definition["fields"])
        # (a field named float too: harmless)
        readback = _Readback(definition, parsed) if not compiled or '"float"' in canonical else None
        return cls(
            name, definition, parsed, canonical, fingerprint, check, schema_id, header, field_names, read,
            write, logical_types, readback, annotated_form(definition), writer_defaults(definition),
        )  # fmt: skip


class SchemaLookup(Protocol):
    """Finds the writer schema named by a frame."""

    def by_fingerprint(self, fingerprint: int) -> Schema | None: ...

    def by_id(self, schema_id: int) -> Schema | None: ...


# -- encoding ------------------------------------------------------------------------------


def encode(schema: Schema, datum: Any) -> bytes:
    """Frame and encode `datum`; it must already be valid for `schema`."""
    if schema.write is not None:
        compiled = bytearray(schema.header)
        try:
            schema.write(compiled, datum)
            return bytes(compiled)
        except _NOT_AS_IT_IS:
            pass  # a field left to its default, or a value of another type: fastavro decides
    out = io.BytesIO()
    out.write(schema.header)
    schemaless_writer(out, schema.parsed, datum)
    return out.getvalue()


def encode_validated(schema: Schema, datum: Any) -> bytes:
    """Validate `datum` against `schema`, naming the offending field, then encode it."""
    left_out: Collection[str] = ()
    if schema.defaults and isinstance(datum, dict) and (left_out := schema.defaults.keys() - datum.keys()):
        datum = {**datum, **{name: schema.defaults[name] for name in left_out}}
    problems = validation_problems(schema, datum)
    if problems:
        for name in left_out:  # (a default that would not read back: a uuid of "")
            at, said = f"{schema.name}.{name}: ", f"{schema.name}.{name} (left out: its default): "
            problems = [said + p[len(at) :] if p.startswith(at) else p for p in problems]
        raise SchemaError(f"payload does not match {schema.name}: " + "; ".join(problems))
    try:
        return encode(schema, datum)
    except UnicodeEncodeError:  # (validation takes any str; UTF-8 cannot carry a lone surrogate)
        where = _first(datum, schema.name, _not_utf8) or schema.name
        raise SchemaError(f"payload does not match {schema.name}: {where}: not UTF-8 text") from None
    except OverflowError:  # (validation takes any int for a double)
        where = _first(datum, schema.name, _beyond_double) or schema.name
        raise SchemaError(
            f"payload does not match {schema.name}: {where}: beyond a double's range (±{_DOUBLE_MAX:.7g})"
        ) from None


def _first(value: Any, path: str, wrong: Callable[[Any], bool]) -> str | None:
    """Where in `value` the first value or map key that is `wrong` is, as a path from `path`;
    None if nowhere."""
    if isinstance(value, dict):
        for name, item in value.items():
            if wrong(name):
                return f"{path}[{utf8(str(name))!r}]"
            if found := _first(item, f"{path}.{name}", wrong):
                return found
        return None
    if isinstance(value, list | tuple):
        for n, item in enumerate(value):
            if found := _first(item, f"{path}[{n}]", wrong):
                return found
        return None
    return path if wrong(value) else None


def _not_utf8(value: Any) -> bool:
    """A string holding what UTF-8 cannot (a lone surrogate from a file name or `surrogateescape`)."""
    return isinstance(value, str) and utf8(value) != value


def _beyond_double(value: Any) -> bool:
    return isinstance(value, int) and abs(value) > _DOUBLE_MAX


def validation_problems(schema: Schema, datum: Any) -> list[str]:
    """Every way `datum` fails `schema`, each naming its field."""
    if not isinstance(datum, dict):
        return [f"expected an object (record {schema.name}), got {type(datum).__name__}"]
    problems = [f"{schema.name}.{name}: no such field" for name in datum if name not in schema.field_names]
    try:
        validate(datum, schema.parsed, raise_errors=True)
    except ValidationError as exc:
        return problems + [_describe(error, schema.name, datum) for error in exc.errors]
    except (ValueError, TypeError, OverflowError) as exc:  # a logical type's conversion refused a value
        readback = schema.readback.problems(schema.name, datum, valid=False) if schema.readback else []
        return problems + (readback or [f"{schema.name}: {exc}"])
    return problems + (schema.readback.problems(schema.name, datum) if schema.readback else [])


class _Readback:
    """Finds what in a valid datum of one schema a consumer could not read back as written.

    fastavro's validation takes any int for a date or a time of day, any string for a uuid and
    any number for a float; the consumer's reader then fails on a time past midnight or a year
    beyond 9999 (the job is dead-lettered), or reads a float beyond its range as infinity. Each
    value with a logical type is written and read back alone, naming its field; the whole datum
    too where a union of several types holds logical types, as the walk does not follow those.
    """

    def __init__(self, definition: dict[str, Any], parsed: Any) -> None:
        self.definition, self.parsed = definition, parsed
        self.names = Names()
        self.names.learn(definition, None)
        self.alone: dict[int, Any] = {}  # id() of a logical type's node -> the node parsed alone
        self.whole = self._mixed_union(definition)

    def problems(self, name: str, datum: Any, *, valid: bool = True) -> list[str]:
        """`valid`: whether fastavro's validation took `datum`; if not, the walk names the value
        it refused (a Decimal of too many digits), which a valid one would be trusted to be."""
        reads_as = _READS_AS if valid else {}
        problems = list(self._walk(self.definition, datum, name, None, reads_as))
        if not problems and self.whole:
            try:
                _round_trip(self.parsed, datum)
            except Exception as exc:
                problems.append(f"{name}: a consumer could not read it back: {_why(exc)}")
        return problems

    def _walk(
        self, node: Any, value: Any, path: str, namespace: str | None, reads_as: dict[str, Any]
    ) -> Iterator[str]:
        node, namespace = self.names.resolve(node, namespace)
        if isinstance(node, list):  # a union: followed when it is null or one other type
            others = [branch for branch in node if branch != "null"]
            if value is not None and len(others) == 1:
                yield from self._walk(others[0], value, path, namespace, reads_as)
            return
        if isinstance(node, str):
            node = {"type": node}
        kind = node["type"]
        if isinstance(kind, dict | list):
            yield from self._walk(kind, value, path, namespace, reads_as)
        elif kind == "record" and isinstance(value, dict):
            for field_ in node["fields"]:
                if field_["name"] in value:
                    item = value[field_["name"]]
                    yield from self._walk(
                        field_["type"], item, f"{path}.{field_['name']}", namespace, reads_as
                    )
        elif kind == "array" and isinstance(value, list | tuple):
            for n, item in enumerate(value):
                yield from self._walk(node["items"], item, f"{path}[{n}]", namespace, reads_as)
        elif kind == "map" and isinstance(value, dict):
            for key, item in value.items():
                yield from self._walk(node["values"], item, f"{path}[{key!r}]", namespace, reads_as)
        elif "logicalType" in node:
            if problem := self._logical(node, value, reads_as):
                yield f"{path}: {problem}"
        elif kind == "float" and isinstance(value, int | float) and _FLOAT_MAX < abs(value) < math.inf:
            yield f"{path}: {value!r} is beyond a float's range (±{_FLOAT_MAX:.7g}); a double holds it"

    def _logical(self, node: dict[str, Any], value: Any, reads_as: dict[str, Any]) -> str | None:
        """Why `value` does not survive being written and read as `node`, a logical type."""
        logical = node["logicalType"]
        in_a_day = _IN_A_DAY.get(logical)
        if in_a_day and isinstance(value, int) and not 0 <= value < in_a_day:
            return f"{value} is not a time of day in {logical} (0 to {in_a_day - 1})"
        if isinstance(value, reads_as.get(logical, ())):  # (valid, so it reads back as it is)
            return None
        if (alone := self.alone.get(id(node))) is None:
            alone = self.alone[id(node)] = parse_schema(node)
        try:
            _round_trip(alone, value)
        except Exception as exc:
            why = "out of range" if isinstance(exc, OverflowError) else exc
            return f"{value!r} is not a {logical}: {why}"
        return None

    def _mixed_union(self, node: Any) -> bool:
        """Whether `node` holds a union of several types one of which holds a logical type."""
        if isinstance(node, list):
            others = [self.names.resolve(branch, None)[0] for branch in node if branch != "null"]
            return (len(others) > 1 and '"logicalType"' in json.dumps(others)) or any(
                map(self._mixed_union, node)
            )
        if not isinstance(node, dict):
            return False
        inside = [field_["type"] for field_ in node.get("fields", ())]
        inside += [node[key] for key in ("type", "items", "values") if key in node]
        return any(map(self._mixed_union, inside))


def _round_trip(parsed: Any, datum: Any) -> None:
    """Write `datum` with fastavro's `parsed` schema and read it back: what either raises."""
    stream = io.BytesIO()
    schemaless_writer(stream, parsed, datum)
    _read_with_fastavro(stream.getvalue(), 0, parsed, None)


def _describe(error: Any, record: str, datum: Any) -> str:
    if error.datum is None and error.field:
        given = _given(datum, record, error.field)  # (a null given is no missing field)
        return f"{error.field}: {'null' if given else 'missing'} (expected {_type_name(error.schema)})"
    return f"{error.field}: expected {_type_name(error.schema)}, got {error.datum!r}"


def _given(datum: Any, record: str, path: str) -> bool:
    """Whether the field at `path` (fastavro's: `record`'s full name, then field names) is in
    `datum`, as a value or a null; False when it is left out, or the path is no such one."""
    *parents, last = path.removeprefix(f"{record}.").split(".")
    for name in parents:
        datum = datum.get(name) if isinstance(datum, dict) else None
    return isinstance(datum, dict) and last in datum


def _type_name(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return " or ".join(_type_name(s) for s in schema)
    if isinstance(schema, dict):
        return str(schema.get("logicalType") or schema.get("name") or schema.get("type"))
    return repr(schema)


# -- decoding ------------------------------------------------------------------------------


def frame_id(data: bytes) -> int | None:
    """The registry id a Confluent frame names, if `data` has one."""
    if data.startswith(CONFLUENT_MAGIC) and len(data) >= 5:
        return int(_SCHEMA_ID.unpack_from(data, 1)[0])
    return None


def read_frame(data: bytes, lookup: SchemaLookup) -> tuple[Schema, int]:
    """The writer schema named by `data`'s frame and where its body starts."""
    if data.startswith(SINGLE_OBJECT_MAGIC):
        if len(data) < 10:
            raise DecodeError(f"truncated single-object header ({len(data)} bytes)", data)
        (fingerprint,) = _FINGERPRINT.unpack_from(data, 2)
        schema = lookup.by_fingerprint(fingerprint)
        if schema is None:
            raise UnknownSchema(f"unknown schema fingerprint {fingerprint:016x}", data)
        return schema, 10
    if data.startswith(CONFLUENT_MAGIC):
        if len(data) < 5:
            raise DecodeError(f"truncated Confluent header ({len(data)} bytes)", data)
        (schema_id,) = _SCHEMA_ID.unpack_from(data, 1)
        try:
            found = lookup.by_id(schema_id)
        except UnknownSchema as exc:  # the registry says why
            raise UnknownSchema(str(exc), data) from None
        if found is None:
            raise UnknownSchema(f"unknown schema id {schema_id}", data)
        return found, 5
    raise DecodeError(f"not a framed Avro message (first bytes {data[:2].hex() or 'empty'})", data)


def decode(
    data: bytes,
    lookup: SchemaLookup,
    reader: Schema | None = None,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[Schema, Any]:
    """Decode framed `data` exactly; return the writer schema and the datum.

    With `reader`, the datum is resolved to the reader's schema (Avro schema evolution).
    Any failure raises DecodeError carrying the raw bytes.
    """
    if len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds the {max_bytes}-byte cap", data)
    writer, start = read_frame(data, lookup)
    layout = writer  # what the bytes are read with
    if (
        reader is not None
        and reader.fingerprint == writer.fingerprint
        and (reader.annotated == writer.annotated or not _annotated(reader) or not _annotated(writer))
    ):
        # The same schema, nothing to resolve: read it as the reader declares it. Fingerprints
        # leave logical types out, and a producer in another language may have registered the
        # record without them; its handler still gets the datetimes and Decimals it declares.
        # (Where both annotate and the writer's say otherwise, a decimal's scale, say,
        # resolution reads with the writer's.)
        layout, reader = reader, None
    elif reader is not None and reader.name != writer.name:  # Avro resolves records of one name only
        raise SchemaMismatch(f"a {_identity(writer)} cannot be read as a {_identity(reader)}", data)
    elif reader is not None:
        problems, resolved, defaults = _resolution(reader, writer)
        if problems:
            raise SchemaMismatch(
                f"{_identity(writer)} cannot be read with {_identity(reader)}: " + "; ".join(problems), data
            )
    try:
        if reader is None and layout.read is not None:
            datum, end = layout.read(data, start)
        else:
            # fastavro takes a negative enum index or union branch for one counted from the end,
            # and wraps a varint beyond 64 bits round: bridge's strict reader checks the bytes first.
            _, end = writer.check(data, start)
            if end == len(data) and reader is None:
                datum, end = _read_with_fastavro(data, start, layout.parsed, None)
            elif end == len(data) and reader is not None:
                datum, end = _read_with_fastavro(data, start, resolved, defaults or reader.parsed)
                if defaults is not None:  # (fastavro left the defaults that need it as markers)
                    fill_defaults(datum)
    except Exception as exc:  # EOFError, IndexError, UnicodeDecodeError, ValueError, ...
        raise DecodeError(f"body does not decode as {writer.name}: {_why(exc)}", data) from exc
    if end != len(data):
        raise DecodeError(f"{len(data) - end} trailing bytes after a {writer.name}", data)
    return writer, datum


def _why(exc: Exception) -> str:
    """Why bytes did not decode, for a person: the readers raise what Python raises."""
    if isinstance(exc, IndexError | EOFError | struct.error):
        return "it ends early (cut short, or a length or count in it is wrong)"
    if isinstance(exc, UnicodeDecodeError):
        return f"a string in it is not UTF-8 text (byte {exc.object[exc.start]:#04x})"
    if isinstance(exc, OverflowError):
        return "a number in it is out of range"
    if type(exc) is ValueError:  # (bridge's reader says what it found)
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _read_with_fastavro(data: bytes, start: int, writer: Any, reader: Any) -> tuple[Any, int]:
    """Read with fastavro's parsed schemas: `writer` lays out the bytes, `reader` resolves."""
    stream = io.BytesIO(data)
    stream.seek(start)
    datum = schemaless_reader(stream, writer, reader)
    return datum, stream.tell()


# (reader fingerprint, writer annotated form) -> the reader it was for, the problems, the
# writer to read with, the reader to read with if its defaults need filling in
_RESOLUTIONS: dict[tuple[int, str], tuple[Schema, list[str], Any, Any]] = {}
_MAX_RESOLUTIONS = 4096


def _resolution(reader: Schema, writer: Schema) -> tuple[list[str], Any, Any]:
    """Why `writer`'s data cannot be read with `reader`, and else `writer` parsed to be read
    with `reader`'s logical types, and `reader` parsed to fill in its fields' defaults (None
    when fastavro's own serve): worked out once per pair of schemas."""
    # (Fingerprints leave logical types out: writers of one fingerprint annotated otherwise
    # each have their own, and a reader annotated otherwise replaces the one cached.)
    pair = (reader.fingerprint, writer.annotated)
    cached = _RESOLUTIONS.get(pair)
    if cached is None or (cached[0] is not reader and not _reads_alike(cached[0], reader)):
        if len(_RESOLUTIONS) >= _MAX_RESOLUTIONS:
            _RESOLUTIONS.clear()
        problems = read_problems(reader.definition, writer.definition)
        resolved = defaults = None
        if not problems:
            # (bridge's own records are read without logical types: their times stay ints)
            wanted = reader.definition if reader.logical_types else strip_logical_types(reader.definition)
            resolved = parse_schema(with_readers_logical_types(wanted, writer.definition))
            defaults = reader_with_defaults(reader.definition, logical=reader.logical_types)
        cached = _RESOLUTIONS[pair] = (reader, problems, resolved, defaults)
    return cached[1], cached[2], cached[3]


def _annotated(schema: Schema) -> bool:
    """Whether reading with `schema` makes values of logical types (not bridge's own records)."""
    return schema.logical_types and schema.annotated != schema.canonical


def _reads_alike(one: Schema, other: Schema) -> bool:
    return one.definition == other.definition and one.logical_types == other.logical_types


def _identity(schema: Schema) -> str:
    if schema.schema_id is not None:
        return f"{schema.name} schema id {schema.schema_id}"
    return f"{schema.name} schema {schema.fingerprint:016x}"


# -- schema checks and transforms ------------------------------------------------------------


def parsing_canonical_form(definition: Any) -> str:
    """Avro's Parsing Canonical Form of a self-contained schema (the input to fingerprints)."""
    return json.dumps(_canonical(definition, None), separators=(",", ":"))


_CANONICAL_KEYS = ("name", "type", "fields", "symbols", "items", "values", "size")


def annotated_form(definition: Any) -> str:
    """The Parsing Canonical Form with logical types (and a decimal's precision and scale) kept:
    two schemas of one fingerprint whose bytes mean the same values have the same one."""
    return json.dumps(_canonical(definition, None, logical=True), separators=(",", ":"))


def _canonical(schema: Any, namespace: str | None, *, logical: bool = False) -> Any:
    if isinstance(schema, list):
        return [_canonical(s, namespace, logical=logical) for s in schema]
    if isinstance(schema, str):
        return full_name(schema, namespace) if schema not in PRIMITIVES else schema
    kind = schema["type"]
    annotation = (
        {k: schema[k] for k in LOGICAL_KEYS if k in schema} if logical and "logicalType" in schema else {}
    )
    if isinstance(kind, str) and kind in PRIMITIVES and annotation:
        return {"type": kind, **annotation}
    if not isinstance(kind, str) or kind in PRIMITIVES:
        return _canonical(kind, namespace, logical=logical)
    out: dict[str, Any] = {}
    if "name" in schema:
        full = full_name(schema["name"], schema.get("namespace", namespace))
        out["name"] = full
        namespace = full.rpartition(".")[0] or None
    out["type"] = kind
    if "fields" in schema:
        out["fields"] = [
            {"name": f["name"], "type": _canonical(f["type"], namespace, logical=logical)}
            for f in schema["fields"]
        ]
    if "symbols" in schema:
        out["symbols"] = schema["symbols"]
    if "items" in schema:
        out["items"] = _canonical(schema["items"], namespace, logical=logical)
    if "values" in schema:
        out["values"] = _canonical(schema["values"], namespace, logical=logical)
    if "size" in schema:
        out["size"] = schema["size"]
    return {**out, **annotation}


def inline_named_types(schema: Any, defined: dict[str, Any]) -> dict[str, Any]:
    """Make `schema` self-contained: each referenced named type from `defined` inlined once.

    Raises SchemaError naming a reference that nothing defines.
    """
    seen: set[str] = set()

    def walk(node: Any, namespace: str | None) -> Any:
        if isinstance(node, list):
            return [walk(s, namespace) for s in node]
        if isinstance(node, str):
            if node in PRIMITIVES:
                return node
            full = full_name(node, namespace)
            if full in seen:
                return full
            if full not in defined:
                raise SchemaError(f"unknown type {full!r} (no {full}.avsc in the schema directory)")
            return walk(defined[full], full.rpartition(".")[0] or None)
        if not isinstance(node.get("type"), str):
            return {**node, "type": walk(node["type"], namespace)}
        out = dict(node)
        if "name" in node and node["type"] in ("record", "error", "enum", "fixed"):
            full = full_name(node["name"], node.get("namespace", namespace))
            seen.add(full)
            out["name"], namespace = full, full.rpartition(".")[0] or None
            out.pop("namespace", None)
            if namespace is None:  # the null namespace, said so: an undotted name alone would be
                out["namespace"] = ""  # read in the enclosing one (Java's fingerprint differed)
        if "fields" in node:
            out["fields"] = [{**f, "type": walk(f["type"], namespace)} for f in node["fields"]]
        for key in ("items", "values"):
            if key in node:
                out[key] = walk(node[key], namespace)
        return out

    result = walk(schema, None)
    if not isinstance(result, dict) or result.get("type") not in ("record", "error"):
        raise SchemaError("a job type must be an Avro record schema")
    return result


def check_schema(schema: dict[str, Any]) -> None:
    """Refuse schemas that would let a small message cost unbounded time, memory or stack.

    A self-reference makes nesting depth depend on the message (fastavro recursed until the
    interpreter crashed); an array of zero-byte items lets five bytes claim billions of items.
    """
    _min_size(schema, None, [], {})


def _min_size(node: Any, namespace: str | None, stack: list[str], sizes: dict[str, int]) -> int:
    if len(stack) > MAX_SCHEMA_DEPTH:
        raise SchemaError(f"{stack[0]} nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, list):
        if not node:  # (no value fits it: every write of the job type would fail)
            raise SchemaError(f"a union in {stack[-1] if stack else 'the schema'} has no types; refused")
        for branch in node:
            _min_size(branch, namespace, stack, sizes)
        return 1
    if isinstance(node, str):
        if node in PRIMITIVES:
            return {"null": 0, "float": 4, "double": 8}.get(node, 1)
        full = full_name(node, namespace)
        if full in stack:
            raise SchemaError(f"{stack[0]} is recursive through {full}; recursive schemas are refused")
        return sizes.get(full, 1)
    kind = node["type"]
    if not isinstance(kind, str) or kind in PRIMITIVES:
        return _min_size(kind, namespace, stack, sizes)
    if kind in ("record", "error"):
        full = full_name(node["name"], node.get("namespace", namespace))
        inner = full.rpartition(".")[0] or None
        stack.append(full)
        size = sum(_min_size(f["type"], inner, stack, sizes) for f in node["fields"])
        stack.pop()
        sizes[full] = size
        return size
    if kind == "array":
        if _min_size(node["items"], namespace, [*stack, "[]"], sizes) == 0:
            where = stack[-1] if stack else "schema"
            raise SchemaError(f"an array in {where} has items that encode to zero bytes; refused")
        return 1
    if kind == "map":
        _min_size(node["values"], namespace, [*stack, "{}"], sizes)
        return 1
    if kind == "fixed":  # (its size recorded too, for arrays that name it later)
        full, size = full_name(node["name"], node.get("namespace", namespace)), node["size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:  # (-1 read backwards for good)
            raise SchemaError(f"fixed {full} has size {size!r}: a number of bytes, 0 or more")
        sizes[full] = size
        return size
    return 1  # enum
