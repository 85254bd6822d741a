"""The codec: both framings round-trip, and hostile bytes fail fast with DecodeError."""

from __future__ import annotations

import io
import json
import random
import re
import struct
import time
import tracemalloc
import uuid
from datetime import UTC, date, datetime
from datetime import time as dt_time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer

from bridge import codec
from bridge.avro_writer import write_long
from bridge.codec import Schema
from bridge.compatibility import read_problems, strip_logical_types
from bridge.envelope import DeadLetter, Envelope, JobError, uuid7
from bridge.errors import DecodeError, SchemaError
from bridge.registry import DEAD_LETTER, ENVELOPE, SchemaDirectory
from tests.conftest import REPO, SCHEMAS

REGISTRY = SchemaDirectory(SCHEMAS)
ENVELOPE_SCHEMA = REGISTRY.schema(ENVELOPE)


class IdLookup:
    """Schemas by Confluent id, as a registry server would hand them out."""

    def __init__(self, schemas: dict[int, Schema]) -> None:
        self.schemas = schemas

    def by_id(self, schema_id: int) -> Schema | None:
        return self.schemas.get(schema_id)

    def by_fingerprint(self, fingerprint: int) -> Schema | None:
        return None


def envelope_record(**fields: Any) -> dict[str, Any]:
    payload = codec.encode(REGISTRY.schema("test.Echo"), {"n": 1, "text": "hi", "sleep_ms": 0})
    defaults = {"id": uuid7(), "type": "test.Echo", "payload": payload, "queue": "q", "created_at": 1}
    return Envelope(**{**defaults, **fields}).to_avro()


def test_single_object_round_trip_carries_the_crc64_fingerprint() -> None:
    record = envelope_record(key="k", headers={"traceparent": "00-ab"}, run_at=5)
    data = codec.encode(ENVELOPE_SCHEMA, record)
    assert data[:2] == b"\xc3\x01"
    assert int.from_bytes(data[2:10], "little") == ENVELOPE_SCHEMA.fingerprint
    writer, decoded = codec.decode(data, REGISTRY)
    assert writer is ENVELOPE_SCHEMA and decoded == record


def test_an_envelope_read_back_equals_the_one_written() -> None:
    # Given an envelope with every optional field and an earlier error,
    # When written and read back, Then it is equal, field for field (from_avro adopts the
    # decoded record as it is, so the dataclass and the schema must name the same fields).
    fields = {f["name"] for f in ENVELOPE_SCHEMA.definition["fields"]}
    assert fields == set(Envelope.__dataclass_fields__)
    record = envelope_record(
        key="k", idempotency_key="i", max_attempts=3, run_at=5, expires_at=9, origin="o",
        headers={"h": "v"}, errors=[JobError(1, 2, "E", "m")],
    )  # fmt: skip
    envelope = Envelope.from_avro(record)
    _, record = codec.decode(codec.encode(ENVELOPE_SCHEMA, envelope.to_avro()), REGISTRY, ENVELOPE_SCHEMA)
    assert Envelope.from_avro(record) == envelope
    assert envelope.errors[0].type == "E"


def test_confluent_wire_format_round_trip() -> None:
    schema = Schema.from_definition(ENVELOPE_SCHEMA.definition, schema_id=42, logical_types=False)
    record = envelope_record()
    data = codec.encode(schema, record)
    assert data[:5] == b"\x00\x00\x00\x00\x2a"
    writer, decoded = codec.decode(data, IdLookup({42: schema}))
    assert writer is schema and decoded == record


def test_fingerprints_match_the_avro_specification() -> None:
    # The Avro spec's CRC-64-AVRO of the schema "null" is 0x63dd24e7cc258f8a.
    assert codec.crc64_avro(b'"null"') == 0x63DD24E7CC258F8A
    fastavro_form = _fastavro_canonical(REPO / "schemas" / "bridge.JobEnvelope.avsc")
    assert ENVELOPE_SCHEMA.canonical == fastavro_form


def test_a_nested_record_in_the_null_namespace_has_javas_fingerprint(tmp_path: Path) -> None:
    # Given a record in namespace rv holding a record declared `"namespace": ""`, which holds
    # one with no namespace (so in the null one too), Then its fingerprint is the one Java's
    # SchemaNormalization and Node's avsc give (helper-76 computed it with both). (bridge read
    # the two nested names in namespace rv: a job that Java or Node wrote with such a payload
    # was dead-lettered `unknown_schema`.)
    deeper = {"type": "record", "name": "Deeper", "fields": [{"name": "z", "type": "int"}]}
    plain = {"type": "record", "name": "Plain", "namespace": "", "fields": [{"name": "q", "type": deeper}]}
    edge = {"type": "record", "name": "Edge2", "namespace": "rv", "fields": [
        {"name": "p", "type": plain},
        {"name": "f", "type": {"type": "fixed", "name": "Hash", "namespace": "other", "size": 4}},
        {"name": "h", "type": {"type": "fixed", "name": "other.Hash2", "size": 2}},
        {"name": "g", "type": ["null", "other.Hash", "other.Hash2"], "default": None},
    ]}  # fmt: skip
    (tmp_path / "rv.Edge2.avsc").write_text(json.dumps(edge))
    schema = SchemaDirectory(tmp_path).schema("rv.Edge2")
    assert schema.fingerprint == 0xFA07193EE3D81179
    assert '"name":"Plain"' in schema.canonical and '"name":"Deeper"' in schema.canonical


def _fastavro_canonical(path: Path) -> str:
    from fastavro.schema import load_schema, to_parsing_canonical_form

    return str(to_parsing_canonical_form(load_schema(str(path))))


def test_reader_schema_resolves_an_older_writer() -> None:
    # Given a payload written before `sleep_ms` and `text` existed,
    # When read with today's schema, Then the new fields take their defaults.
    old = Schema.from_definition(
        {"type": "record", "name": "Echo", "namespace": "test", "fields": [{"name": "n", "type": "int"}]}
    )
    data = codec.encode(old, {"n": 3})
    _, decoded = codec.decode(data, _Both(old), REGISTRY.schema("test.Echo"))
    assert decoded == {"n": 3, "text": "", "sleep_ms": 0}


def test_a_payload_from_a_writer_without_logical_types_reads_with_the_readers_own() -> None:
    # Given a record whose reader declares timestamp-millis and decimal, and a producer in
    # another language that registered the same record without the annotations (as hamba/avro
    # needs), When its payload is read, Then the handler gets a datetime and a Decimal, as from
    # its own producer. (It got an int and bytes: equal fingerprints skipped resolution, and
    # the bytes were read with the writer's schema.)
    money = {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}
    declared = {
        "type": "record",
        "name": "Order",
        "namespace": "shop",
        "fields": [
            {"name": "placed_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "total", "type": money},
        ],
    }
    reader = Schema.from_definition(declared)
    writer = Schema.from_definition(strip_logical_types(declared), schema_id=7)
    assert writer.fingerprint == reader.fingerprint
    cents = (12345).to_bytes(2, "big", signed=True)
    data = codec.encode(writer, {"placed_at": 1_700_000_000_000, "total": cents})
    found, decoded = codec.decode(data, _Both(writer), reader)
    assert found is writer  # (what wrote it, for the messages that name it)
    assert decoded == {
        "placed_at": datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
        "total": Decimal("123.45"),
    }


def test_a_payload_from_another_version_reads_with_the_readers_logical_types() -> None:
    # Given a handler's record with a timestamp, an optional timestamp, a decimal, a list of
    # dates in a nested record, and a count the handler reads as a plain long,
    # When a producer in another language sends a second version (one more field) registered
    # without the first four annotations and with one on the count, Then the handler gets what
    # its own record declares: datetimes, a Decimal, dates and an int, as Avro resolution
    # (Java's) gives. (fastavro converts by the writer's annotations: ints, bytes, a datetime.)
    money = {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}
    day = {"type": "int", "logicalType": "date"}
    stamp = {"type": "long", "logicalType": "timestamp-millis"}
    declared = {
        "type": "record",
        "name": "Order",
        "namespace": "shop",
        "fields": [
            {"name": "placed_at", "type": stamp},
            {"name": "shipped_at", "type": ["null", stamp], "default": None},
            {"name": "total", "type": money},
            {"name": "plan", "type": {"type": "record", "name": "Plan", "fields": [
                {"name": "days", "type": {"type": "array", "items": day}}]}},
            {"name": "count", "type": "long"},
        ],
    }  # fmt: skip
    reader = Schema.from_definition(declared)
    second = strip_logical_types(declared)
    second["fields"][-1] = {"name": "count", "type": stamp}
    second["fields"].append({"name": "note", "type": "string", "default": ""})
    writer = Schema.from_definition(second, schema_id=8, logical_types=False)
    assert writer.fingerprint != reader.fingerprint
    cents = (12345).to_bytes(2, "big", signed=True)
    datum = {"placed_at": 1_700_000_000_000, "shipped_at": 1_700_000_060_000, "total": cents,
             "plan": {"days": [19_675]}, "count": 3, "note": "v2"}  # fmt: skip
    _, decoded = codec.decode(codec.encode(writer, datum), _Both(writer), reader)
    assert decoded == {
        "placed_at": datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
        "shipped_at": datetime(2023, 11, 14, 22, 14, 20, tzinfo=UTC),
        "total": Decimal("123.45"),
        "plan": {"days": [date(2023, 11, 14)]},
        "count": 3,
    }


def test_a_promoted_value_reads_with_the_readers_logical_type() -> None:
    # Given a writer whose time is an int and whose id is bytes, and a reader whose time is a
    # long timestamp-millis and whose id a string uuid (Avro promotes int to long and bytes to
    # string), When its payload is read, Then the handler gets a datetime and a UUID. (It got
    # the promoted int and str: fastavro has no conversion for an int timestamp.)
    def record(at: Any, ident: Any) -> dict[str, Any]:
        fields = [{"name": "at", "type": at}, {"name": "ident", "type": ident}]
        return {"type": "record", "name": "Tick", "namespace": "shop", "fields": fields}

    reader = Schema.from_definition(
        record({"type": "long", "logicalType": "timestamp-millis"}, {"type": "string", "logicalType": "uuid"})
    )
    writer = Schema.from_definition(record("int", "bytes"), schema_id=12)
    ident = uuid.uuid4()
    data = codec.encode(writer, {"at": 86_400_000, "ident": str(ident).encode()})
    _, decoded = codec.decode(data, _Both(writer), reader)
    assert decoded == {"at": datetime(1970, 1, 2, tzinfo=UTC), "ident": ident}


def test_where_both_versions_annotate_a_value_differently_the_writers_annotation_reads_it() -> None:
    # Given a writer whose decimal has scale 3 and whose time is in microseconds, and a reader
    # whose decimal has scale 2 and whose time is in milliseconds (the bytes mean what the
    # writer's annotations say), When its payload is read, Then the values are the writer's:
    # 1.234, not 12.34; the microseconds' moment, not one 1,000 times later. (A writer of the
    # reader's fingerprint was read with the reader's annotations; one of another writer's
    # fingerprint with that writer's.)
    def order(scale: int, unit: str, extra: list[dict[str, Any]]) -> dict[str, Any]:
        money = {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": scale}
        at = {"type": "long", "logicalType": f"timestamp-{unit}"}
        fields = [{"name": "total", "type": money}, {"name": "at", "type": at}, *extra]
        return {"type": "record", "name": "Order", "namespace": "shop", "fields": fields}

    reader = Schema.from_definition(order(2, "millis", []))
    at = datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    note = [{"name": "note", "type": "string"}]
    # With a field more, with the reader's very fields (one fingerprint: it leaves logical types
    # out), and with a field more and a scale of 4 (the first writer's fingerprint):
    for scale, extra, schema_id in ((3, note, 9), (3, [], 10), (4, note, 11)):
        writer = Schema.from_definition(order(scale, "micros", extra), schema_id=schema_id)
        data = codec.encode(writer, {"total": Decimal("1.234"), "at": at, "note": ""})
        _, decoded = codec.decode(data, _Both(writer), reader)
        assert decoded == {"total": Decimal("1.234"), "at": at}, schema_id


def test_writers_of_one_fingerprint_annotated_otherwise_are_each_resolved_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given two writer versions of one fingerprint, a decimal's scale apart, and a reader of
    # another, When their jobs arrive in turn, Then each pair is resolved once (they took one
    # cache slot and evicted each other: every job was resolved again), and the annotations
    # that do not change what a value means cost no resolution: bridge's own envelope, which is
    # read without logical types, from a producer that annotated its id as a uuid.
    resolved: list[str] = []

    def counted(reader: Any, writer: Any) -> list[str]:
        resolved.append(writer["name"])
        return read_problems(reader, writer)

    monkeypatch.setattr(codec, "read_problems", counted)

    def paid(scale: int, extra: list[dict[str, Any]]) -> dict[str, Any]:
        money = {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": scale}
        return {"type": "record", "name": "Paid", "fields": [{"name": "total", "type": money}, *extra]}

    reader = Schema.from_definition(paid(2, []))
    note = [{"name": "note", "type": "string"}]
    writers = {Decimal("1.234"): Schema.from_definition(paid(3, note), schema_id=23),
               Decimal("1.2345"): Schema.from_definition(paid(4, note), schema_id=24)}  # fmt: skip
    for _ in range(3):
        for total, writer in writers.items():
            data = codec.encode(writer, {"total": total, "note": ""})
            assert codec.decode(data, _Both(writer), reader)[1] == {"total": total}
    assert resolved == ["Paid", "Paid"]
    ours = ENVELOPE_SCHEMA.definition
    uuid_id = [{**f, "type": {"type": "string", "logicalType": "uuid"}} if f["name"] == "id" else f
               for f in ours["fields"]]  # fmt: skip
    theirs = Schema.from_definition({**ours, "fields": uuid_id}, schema_id=30, logical_types=False)
    envelope = Envelope(id=uuid7(), type="test.Echo", payload=b"", queue="q", created_at=1)
    data = codec.encode(theirs, envelope.to_avro())
    assert codec.decode(data, _Both(theirs), ENVELOPE_SCHEMA)[1] == envelope.to_avro()
    assert resolved == ["Paid", "Paid"]


def test_an_envelope_of_another_version_keeps_its_times_as_integers() -> None:
    # Given bridge's envelope (read without logical types: its times are epoch ms) and another
    # registered version of it with one more optional field, When an envelope of that version
    # is read, Then its times are ints, as bridge's own are, and it can be written again (as a
    # retry is). (They came back as datetimes, and writing the retry raised TypeError.)
    ours = ENVELOPE_SCHEMA.definition
    theirs = {
        **ours,
        "fields": [*ours["fields"], {"name": "trace", "type": ["null", "string"], "default": None}],
    }
    writer = Schema.from_definition(theirs, schema_id=11, logical_types=False)
    reader = Schema.from_definition(ours, schema_id=10, logical_types=False)
    envelope = Envelope(id=uuid7(), type="test.Echo", payload=b"", queue="q", created_at=1_700_000_000_000)
    _, decoded = codec.decode(
        codec.encode(writer, {**envelope.to_avro(), "trace": None}), _Both(writer), reader
    )
    assert decoded["created_at"] == 1_700_000_000_000
    codec.encode(reader, Envelope.from_avro(decoded).to_avro())


class _Both:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema

    def by_fingerprint(self, fingerprint: int) -> Schema | None:
        return self.schema if fingerprint == self.schema.fingerprint else None

    def by_id(self, schema_id: int) -> Schema | None:
        return self.schema if schema_id == self.schema.schema_id else None


def test_trailing_bytes_are_rejected() -> None:
    data = codec.encode(ENVELOPE_SCHEMA, envelope_record()) + b"\x00"
    with pytest.raises(DecodeError, match="1 trailing bytes") as caught:
        codec.decode(data, REGISTRY)
    assert caught.value.raw == data


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "not a framed Avro message"),
        (b"\x42garbage", "not a framed Avro message"),
        (b"\xc3\x01\x00", "truncated single-object header"),
        (b"\xc3\x01" + b"\x01" * 8 + b"body", "unknown schema fingerprint"),
        (b"\x00\x00\x00\x00\x07body", "unknown schema id 7"),
        (b"\x00\x00", "truncated Confluent header"),
    ],
)
def test_bad_frames_raise_decode_error_keeping_the_bytes(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message) as caught:
        codec.decode(data, REGISTRY)
    assert caught.value.raw == data


def test_truncated_envelope_fails() -> None:
    data = codec.encode(ENVELOPE_SCHEMA, envelope_record())
    for cut in range(10, len(data)):
        with pytest.raises(DecodeError):
            codec.decode(data[:cut], REGISTRY)


def test_a_five_byte_body_claiming_a_huge_array_fails_fast_without_allocating() -> None:
    # Given test.Numbers (an array of int) and a body whose block count is 2**62,
    # When decoded, Then it fails at once, using no memory to speak of.
    schema = REGISTRY.schema("test.Numbers")
    huge_count = b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f"  # zig-zag varint of 2**62 - 1
    data = schema.header + huge_count[:5]
    data_full = schema.header + huge_count
    tracemalloc.start()  # (the process's peak RSS would hide it under an earlier test's peak)
    started = time.perf_counter()
    try:
        for attempt in (data, data_full):
            with pytest.raises(DecodeError):
                codec.decode(attempt, REGISTRY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1  # (reading 2**62 items: never)
    assert peak < 1_000_000  # bytes


def test_huge_string_length_fails_fast() -> None:
    schema = REGISTRY.schema("test.Echo")
    data = schema.header + b"\x02" + b"\xfe\xff\xff\xff\x0f" + b"abc"  # n=1, text of 2**31-1 bytes
    with pytest.raises(DecodeError):
        codec.decode(data, REGISTRY)


def test_a_decimal_longer_than_its_precision_needs_fails_fast() -> None:
    # Given a decimal of precision 38 (16 bytes at most) whose bytes are 1 MB long, as another
    # producer may send, When decoded, Then it fails at once, naming the precision; a decimal
    # of 16 bytes still reads. (It took fastavro 90 s, on the event loop, to make a Decimal.)
    schema = Schema.from_definition(
        {
            "type": "record",
            "name": "Payment",
            "namespace": "shop",
            "fields": [
                {
                    "name": "amount",
                    "type": {"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 2},
                }
            ],
        }
    )
    largest = Decimal("9" * 36 + ".99")
    assert codec.decode(codec.encode(schema, {"amount": largest}), _Both(schema))[1] == {"amount": largest}
    length = 1_000_000 - 16
    data = bytearray(schema.header)
    write_long(data, length)
    data += b"\x7f" * length
    started = time.perf_counter()
    with pytest.raises(DecodeError, match="a decimal of precision 38 takes 16 bytes at most, not 999984"):
        codec.decode(bytes(data), _Both(schema))
    assert time.perf_counter() - started < 1


def test_size_cap() -> None:
    data = codec.encode(ENVELOPE_SCHEMA, envelope_record(headers={"big": "x" * 2000}))
    with pytest.raises(DecodeError, match="exceeds the 1000-byte cap"):
        codec.decode(data, REGISTRY, max_bytes=1000)


@pytest.mark.parametrize(
    "definition, message",
    [
        (
            {"type": "record", "name": "Node", "namespace": "x",
             "fields": [{"name": "next", "type": ["null", "Node"]}]},
            "recursive",
        ),
        (
            {"type": "record", "name": "Nulls", "namespace": "x",
             "fields": [{"name": "many", "type": {"type": "array", "items": "null"}}]},
            "zero bytes",
        ),
        (
            {"type": "record", "name": "Empty", "namespace": "x",
             "fields": [{"name": "many", "type": {"type": "array", "items":
                 {"type": "record", "name": "E", "fields": []}}}]},
            "zero bytes",
        ),
        (  # a fixed of size 0 defined in one field, named by an array's items in the next
            {"type": "record", "name": "Named", "namespace": "x",
             "fields": [{"name": "z", "type": {"type": "fixed", "name": "Z", "size": 0}},
                        {"name": "many", "type": {"type": "array", "items": "Z"}}]},
            "zero bytes",
        ),
        (  # read backwards: 19 bytes held a decode for good, its memory growing
            {"type": "record", "name": "Backwards", "namespace": "x",
             "fields": [{"name": "many", "type": {"type": "array", "items":
                 {"type": "fixed", "name": "F", "size": -1}}}]},
            "fixed x.F has size -1: a number of bytes, 0 or more",
        ),
        (  # no value fits it: every enqueue failed with a traceback
            {"type": "record", "name": "Nothing", "namespace": "x", "fields": [{"name": "n", "type": []}]},
            "a union in x.Nothing has no types",
        ),
    ],
)  # fmt: skip
def test_schemas_that_would_unbound_decoding_are_refused(definition: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        Schema.from_definition(definition)


def test_deep_nesting_is_refused() -> None:
    definition: dict[str, Any] = {"type": "record", "name": "L0", "namespace": "x", "fields": []}
    node = definition
    for depth in range(1, 40):
        child = {"type": "record", "name": f"L{depth}", "fields": []}
        node["fields"].append({"name": "child", "type": child})
        node = child
    with pytest.raises(SchemaError, match="nests deeper"):
        Schema.from_definition(definition)


@pytest.mark.parametrize(
    ("payload", "where"),
    [({"v": -(10**400), "m": {}}, "x.Measure.v"), ({"v": 1.5, "m": {"a": 2, "b": 10**309}}, "x.Measure.m.b")],
)
def test_an_int_beyond_a_doubles_range_is_refused_naming_its_field(
    payload: dict[str, Any], where: str
) -> None:
    # Given a payload whose double (or a map of doubles) holds an int no double holds, When it
    # is enqueued, Then a SchemaError names the field. (Validation took it, and the writer's
    # OverflowError came out as a traceback.)
    schema = Schema.from_definition({
        "type": "record", "name": "Measure", "namespace": "x",
        "fields": [{"name": "v", "type": "double"},
                   {"name": "m", "type": {"type": "map", "values": "double"}}],
    })  # fmt: skip
    with pytest.raises(SchemaError) as refused:
        codec.encode_validated(schema, payload)
    assert (
        str(refused.value)
        == f"payload does not match x.Measure: {where}: beyond a double's range (±1.797693e+308)"
    )


def test_validation_names_the_offending_field() -> None:
    schema = REGISTRY.schema("test.Echo")
    with pytest.raises(SchemaError, match=r"test\.Echo\.n: expected int, got 'x'"):
        codec.encode_validated(schema, {"n": "x"})
    with pytest.raises(SchemaError, match=r"test\.Echo\.bogus: no such field"):
        codec.encode_validated(schema, {"n": 1, "bogus": 2})
    with pytest.raises(SchemaError, match=r"test\.Echo\.n: missing"):
        codec.encode_validated(schema, {})
    # (A null given is no missing field: it was called missing, though the payload named it.)
    with pytest.raises(SchemaError, match=r"test\.Echo\.n: null \(expected int\)"):
        codec.encode_validated(schema, {"n": None})


LOGICAL = Schema.from_definition({
    "type": "record", "name": "t.Logical", "fields": [
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "on", "type": ["null", {"type": "int", "logicalType": "date"}], "default": None},
        {"name": "times", "type": {"type": "array", "items": {"type": "int", "logicalType": "time-millis"}}},
        {"name": "ratio", "type": "float"},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2}},
        {"name": "either", "type": ["string", {"type": "int", "logicalType": "date"}]},
    ],
})  # fmt: skip
GOOD_LOGICAL = {
    "id": str(uuid.uuid4()), "at": datetime(2026, 12, 4, tzinfo=UTC), "on": date(2026, 12, 4),
    "times": [0, 86_399_999], "ratio": 3.4e38, "price": Decimal("12.34"), "either": 1,
}  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("id", "not-a-uuid", r"t\.Logical\.id: 'not-a-uuid' is not a uuid: badly formed"),
        ("at", 2**62, r"t\.Logical\.at: 4611686018427387904 is not a timestamp-millis: out of range"),
        ("on", 10**9, r"t\.Logical\.on: 1000000000 is not a date: year 2739877 is out of range"),
        ("on", "2020-13-01", r"t\.Logical\.on: '2020-13-01' is not a date: month must be in 1\.\.12"),
        ("times", [1, -1], r"t\.Logical\.times\[1\]: -1 is not a time of day in time-millis \(0 to 86399999"),
        ("times", [86_400_000], r"t\.Logical\.times\[0\]: 86400000 is not a time of day"),
        ("ratio", 1e300, r"t\.Logical\.ratio: 1e\+300 is beyond a float's range"),
        ("price", Decimal("123.45"), r"t\.Logical\.price: Decimal\('123\.45'\) is not a decimal: .*preci"),
        ("either", 10**9, r"t\.Logical: a consumer could not read it back: .*year 2739877 is out of range"),
    ],
)
def test_a_value_no_consumer_reads_back_is_refused_at_enqueue(field: str, value: Any, message: str) -> None:
    # Given a value that fastavro's validation takes but that no consumer reads back as written
    # (it would be dead-lettered, or read as another value), Then encoding refuses it by name.
    _, read = codec.decode(codec.encode_validated(LOGICAL, GOOD_LOGICAL), _Both(LOGICAL))
    assert read["times"] == [dt_time(0), dt_time(23, 59, 59, 999_000)] and read["either"] == date(1970, 1, 2)
    with pytest.raises(SchemaError, match=message):
        codec.encode_validated(LOGICAL, {**GOOD_LOGICAL, field: value})


def test_schema_directory_checks_file_names(tmp_path: Path) -> None:
    (tmp_path / "wrong.avsc").write_text(
        json.dumps({"type": "record", "name": "A", "namespace": "x", "fields": []})
    )
    with pytest.raises(SchemaError, match=r"name the file x\.A\.avsc"):
        SchemaDirectory(tmp_path)
    # (A file that holds no named schema was told to be called None.avsc.)
    (tmp_path / "wrong.avsc").write_text("[1, 2]")
    with pytest.raises(SchemaError, match=r"wrong\.avsc: not a named Avro schema \(a record, enum or fixed"):
        SchemaDirectory(tmp_path)
    # (A file nested deeper than Python's stack raised RecursionError.)
    (tmp_path / "wrong.avsc").write_text("[" * 10_000 + "]" * 10_000)
    with pytest.raises(SchemaError, match=r"wrong\.avsc: not JSON \(nested too deeply\)"):
        SchemaDirectory(tmp_path)
    # (A link to nothing, as a copy of a folder of relative links makes, was "not JSON ([Errno 2]".)
    (tmp_path / "wrong.avsc").unlink()
    (tmp_path / "x.A.avsc").symlink_to("../elsewhere/x.A.avsc")
    with pytest.raises(
        SchemaError, match=r"x\.A\.avsc: links to \.\./elsewhere/x\.A\.avsc, which does not exist$"
    ):
        SchemaDirectory(tmp_path)


SUB = {"type": "record", "name": "Sub", "fields": [{"name": "q", "type": "int"}]}
MONEY = {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2}
# (A union's default from a branch other than the first is left out: Avro 1.11 allows it,
# and fastavro, which bridge lets decide, refuses it in its oldest versions that bridge takes.)
GOOD_DEFAULTS: list[tuple[Any, Any]] = [
    ("int", 2**31 - 1), ("long", -(2**63)), ("double", 1), ("float", "NaN"), ("bytes", "\u00ff\u0000"),
    ({"type": "fixed", "name": "F", "size": 2}, "ab"), (["null", "string"], None),
    ({"type": "array", "items": "int"}, [1, 2]), ({"type": "map", "values": "long"}, {"a": 1}),
    (SUB, {"q": 1}), ({"type": "enum", "name": "E", "symbols": ["A", "B"]}, "B"),
    ({"type": "long", "logicalType": "timestamp-millis"}, 0),
]  # fmt: skip
BAD_DEFAULTS: list[tuple[Any, Any, str]] = [
    ("int", 2**40, "1099511627776 is no int"), ("int", True, "true is no int"),
    ("long", 1.5, "1.5 is no long"), ("double", "1", '"1" is no double'),
    ("bytes", "\u0100", "is no bytes"), ("string", 7, "7 is no string"),
    ({"type": "fixed", "name": "F", "size": 4}, "ab", '"ab" is no fixed'),
    (["null", "int"], "x", '"x" fits no type of its union'), (SUB, {}, "{} is no record"),
    ({"type": "array", "items": "int"}, ["x"], "is no array"),
    ({"type": "map", "values": "int"}, [], "is no map"),
    ({"type": "enum", "name": "E", "symbols": ["A", "B"]}, "Z", '"Z" is no enum'),
    ({"type": "enum", "name": "E", "symbols": ["A"], "default": "Z"}, "A", 'x.E: its default "Z" is not'),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "default"), GOOD_DEFAULTS)
def test_a_schema_directory_takes_defaults_their_fields_hold(tmp_path: Path, kind: Any, default: Any) -> None:
    write_order(tmp_path, kind, default)
    SchemaDirectory(tmp_path)


@pytest.mark.parametrize(("kind", "default", "message"), BAD_DEFAULTS)
def test_a_schema_directory_refuses_a_default_its_field_cannot_hold(
    tmp_path: Path, kind: Any, default: Any, message: str
) -> None:
    # Given a field added with a default its type cannot hold (the Avro spec asks for a value of its type),
    # Then the schema is refused when loaded, naming the field; it used to reach the handlers
    # of jobs written without the field as it was: 2**40 in an int, "Z" in an enum.
    write_order(tmp_path, kind, default)
    with pytest.raises(SchemaError, match=re.escape(message)):
        SchemaDirectory(tmp_path)


UUID_TYPE = {"type": "string", "logicalType": "uuid"}
# A field's type, its default, and the value a job written without the field reads it as.
ADDED_DEFAULTS: list[tuple[Any, Any, Any]] = [
    ("bytes", "\u00ff\u0000", b"\xff\x00"), ("double", 1, 1.0), ("float", 0.1, 0.10000000149011612),
    ({"type": "string", "logicalType": "uuid"}, "", ""),  # (a sentinel Java loads: read as it is)
    ({"type": "fixed", "name": "F", "size": 2}, "ab", b"ab"),
    ({"type": "long", "logicalType": "timestamp-millis"}, 1000, datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)),
    (MONEY, "\u0004\u00d2", Decimal("12.34")),
    ({"type": "array", "items": {"type": "int", "logicalType": "date"}}, [1], [date(1970, 1, 2)]),
    (["null", {"type": "int", "logicalType": "date"}], None, None),
    ({**SUB, "fields": [*SUB["fields"], {"name": "b", "type": "bytes", "default": "z"}]}, {"q": 1},
     {"q": 1, "b": b"z"}),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "default", "value"), ADDED_DEFAULTS)
def test_a_field_added_with_a_default_reaches_handlers_as_a_value_of_its_type(
    tmp_path: Path, kind: Any, default: Any, value: Any
) -> None:
    # Given a version that added a field with a default, When a job written before it is read,
    # Then the handler gets the value a producer writing the default would give. fastavro handed
    # the default over as the schema's JSON holds it: bytes as a str, a timestamp as an int.
    _, read = codec.decode(*older_order_read_with(tmp_path, kind, default))
    assert read == {"n": 1, "added": value} and type(read["added"]) is type(value)


@pytest.mark.parametrize(
    ("kind", "default", "value"),
    [
        *[case for case in ADDED_DEFAULTS if case[0] != {"type": "string", "logicalType": "uuid"}],
        ({"type": "map", "values": "bytes"}, {"k": "v"}, {"k": b"v"}),
        ("double", "NaN", float("nan")),
        ({"type": "string", "logicalType": "uuid"}, str(uuid.UUID(int=7)), uuid.UUID(int=7)),
    ],
)
def test_a_payload_that_leaves_out_a_field_with_a_default_is_written_with_it(
    tmp_path: Path, kind: Any, default: Any, value: Any
) -> None:
    # Given a field with a default, When a payload leaves it out (Avro: it takes its default),
    # Then the payload is written with the default, read back as `value`. (A default of bytes,
    # a fixed, a decimal, a map of bytes or "NaN" was taken as the schema's JSON holds it, and
    # the payload refused: "expected bytes, got ''", naming a field the producer never gave.)
    write_order(tmp_path, kind, default)
    schema = SchemaDirectory(tmp_path).schema("x.Order")
    _, read = codec.decode(codec.encode_validated(schema, {"n": 1}), _Both(schema))
    if value != value:  # (NaN)
        assert isinstance(read["added"], float) and read["added"] != read["added"]
    else:
        assert read == {"n": 1, "added": value} and type(read["added"]) is type(value)


@pytest.mark.parametrize("kind", [UUID_TYPE, [UUID_TYPE, "null"]])
def test_a_payload_that_leaves_out_a_field_whose_default_would_not_read_back_is_refused(
    tmp_path: Path, kind: Any
) -> None:
    # Given a uuid field whose default is "" (a sentinel Java's Avro loads), When a payload
    # leaves it out, Then the enqueue is refused, naming the field: it was written, and the
    # worker could not read the job ("badly formed hexadecimal UUID string").
    write_order(tmp_path, kind, "")
    schema = SchemaDirectory(tmp_path).schema("x.Order")
    message = "x.Order.added (left out: its default): '' is not a uuid"
    with pytest.raises(SchemaError, match=re.escape(message)):
        codec.encode_validated(schema, {"n": 1})


def test_a_float_default_of_nan_reaches_handlers_as_a_float(tmp_path: Path) -> None:
    _, read = codec.decode(*older_order_read_with(tmp_path, "double", "NaN"))
    assert isinstance(read["added"], float) and read["added"] != read["added"]


def test_each_job_read_without_a_field_gets_a_default_of_its_own(tmp_path: Path) -> None:
    # Given a field added as an array of records with the default [{"q": 1}], When one handler
    # changes its job's, Then the next job's is still the default: fastavro gave every datum
    # the one list in the schema, so a handler's append reached every later job.
    args = older_order_read_with(tmp_path, {"type": "array", "items": SUB}, [{"q": 1}])
    _, first = codec.decode(*args)
    first["added"].append({"q": 2})
    first["added"][0]["q"] = 3
    assert codec.decode(*args)[1]["added"] == [{"q": 1}]


def older_order_read_with(folder: Path, kind: Any, default: Any) -> tuple[bytes, Any, Schema]:
    """The arguments to decode a job written without the field `write_order` adds."""
    write_order(folder, kind, default)
    reader = SchemaDirectory(folder).schema("x.Order")
    older = Schema.from_definition({**reader.definition, "fields": reader.definition["fields"][:1]})
    return codec.encode(older, {"n": 1}), _Both(older), reader


def write_order(folder: Path, kind: Any, default: Any) -> None:
    fields = [{"name": "n", "type": "int"}, {"name": "added", "type": kind, "default": default}]
    order = {"type": "record", "name": "Order", "namespace": "x", "fields": fields}
    (folder / "x.Order.avsc").write_text(json.dumps(order))


# -- bridge's compiled reader against fastavro's ------------------------------------------------

EVERY_TYPE: dict[str, Any] = {
    "type": "record", "name": "Every", "namespace": "x",
    "fields": [
        {"name": "flag", "type": "boolean"},
        {"name": "small", "type": "int"},
        {"name": "big", "type": "long"},
        {"name": "ratio", "type": "float"},
        {"name": "exact", "type": "double"},
        {"name": "blob", "type": "bytes"},
        {"name": "text", "type": "string"},
        {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN", "BLUE"]}},
        {"name": "digest", "type": {"type": "fixed", "name": "Digest", "size": 4}},
        {"name": "maybe", "type": ["null", "string"]},
        {"name": "late", "type": ["long", "null"]},
        {"name": "either", "type": ["null", "long", "string", "Color"]},
        {"name": "points", "type": {"type": "array", "items": {
            "type": "record", "name": "Point", "fields": [
                {"name": "x", "type": "int"}, {"name": "tag", "type": ["null", "Digest"]}]}}},
        {"name": "extra", "type": {"type": "map", "values": ["null", "double"]}},
        {"name": "origin", "type": "Point"},
    ],
}  # fmt: skip


def _random_every(rng: random.Random) -> dict[str, Any]:
    def text() -> str:
        return "".join(rng.choice("aé€😀 z") for _ in range(rng.randrange(6)))

    def point() -> dict[str, Any]:
        return {"x": rng.randrange(-(2**31), 2**31), "tag": rng.choice([None, rng.randbytes(4)])}

    return {
        "flag": rng.random() < 0.5,
        "small": rng.randrange(-(2**31), 2**31),
        "big": rng.randrange(-(2**63), 2**63),
        "ratio": struct.unpack("<f", struct.pack("<f", rng.uniform(-1e6, 1e6)))[0],
        "exact": rng.uniform(-1e300, 1e300),
        "blob": rng.randbytes(rng.randrange(5)),
        "text": text(),
        "color": rng.choice(["RED", "GREEN", "BLUE"]),
        "digest": rng.randbytes(4),
        "maybe": rng.choice([None, text()]),
        "late": rng.choice([None, rng.randrange(-(2**63), 2**63)]),
        "either": rng.choice([None, rng.randrange(-1000, 1000), text(), "GREEN"]),
        "points": [point() for _ in range(rng.randrange(3))],
        "extra": {text(): rng.choice([None, rng.random()]) for _ in range(rng.randrange(3))},
        "origin": point(),
    }


def _random_envelope(rng: random.Random) -> dict[str, Any]:
    def maybe(value: Any) -> Any:
        return rng.choice([None, value])

    errors = [JobError(a, rng.randrange(2**41), "E", "m" * a, maybe("tb")) for a in range(rng.randrange(3))]
    return envelope_record(
        key=maybe("k"), idempotency_key=maybe("i" * rng.randrange(200)), attempt=rng.randrange(1, 9),
        max_attempts=maybe(rng.randrange(9)), created_at=rng.randrange(2**41),
        run_at=maybe(rng.randrange(2**41)), expires_at=maybe(-1), origin=maybe("o"),
        headers={f"h{n}": "v" * n for n in range(rng.randrange(3))}, errors=errors, replays=rng.randrange(3),
    )  # fmt: skip


def _fastavro_read(schema: Schema, data: bytes) -> tuple[Any, int]:
    stream = io.BytesIO(data)
    stream.seek(len(schema.header))
    return schemaless_reader(stream, schema.parsed, None), stream.tell()


def _compiled_read(schema: Schema, data: bytes) -> tuple[Any, int]:
    assert schema.read is not None
    return schema.read(data, len(schema.header))


@pytest.mark.parametrize("name", ["every type", "envelope"])
def test_the_compiled_reader_reads_what_fastavro_reads(name: str) -> None:
    # Given records of every Avro type (and bridge envelopes), written by fastavro,
    # When read by bridge's compiled reader, Then each equals fastavro's reading of it,
    # and both end at the same byte.
    rng = random.Random(7)
    schema = Schema.from_definition(EVERY_TYPE) if name == "every type" else ENVELOPE_SCHEMA
    make = _random_every if name == "every type" else _random_envelope
    for _ in range(300):
        data = codec.encode(schema, make(rng))
        assert repr(_compiled_read(schema, data)) == repr(_fastavro_read(schema, data))
        assert repr(codec.decode(data, _Both(schema))[1]) == repr(_fastavro_read(schema, data)[0])


@pytest.mark.parametrize("name", ["every type", "envelope"])
def test_the_compiled_reader_is_never_laxer_than_fastavro(name: str) -> None:
    # Given valid records cut short, or with one byte changed,
    # When both readers read them, Then whatever bridge's reader accepts, fastavro reads
    # the same way; bridge's may refuse more (a negative enum index or union branch, which
    # fastavro reads as counting from the end, and varints past 64 bits, which it wraps).
    rng = random.Random(11)
    schema = Schema.from_definition(EVERY_TYPE) if name == "every type" else ENVELOPE_SCHEMA
    make = _random_every if name == "every type" else _random_envelope
    start = len(schema.header)
    accepted = 0
    for _ in range(60):
        data = codec.encode(schema, make(rng))
        variants = [data[:cut] for cut in range(start, len(data))]
        for _ in range(40):
            at = rng.randrange(start, len(data))
            variants.append(data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :])
        for variant in variants:
            try:
                ours = _compiled_read(schema, variant)
            except Exception:
                continue
            accepted += 1
            assert repr(ours) == repr(_fastavro_read(schema, variant)), variant.hex()
    assert accepted > 1000  # the mutations left most records readable: the comparison happened


def test_the_compiled_reader_serves_plain_schemas_only() -> None:
    # fastavro gives datetimes for logical types, which the compiled reader does not make.
    with_logical = {
        "type": "record", "name": "At", "namespace": "x",
        "fields": [{"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}],
    }  # fmt: skip
    assert Schema.from_definition(with_logical).read is None
    assert Schema.from_definition(with_logical, logical_types=False).read is not None
    assert ENVELOPE_SCHEMA.read is not None  # bridge's own records are read without logical types


STAMPED = {
    "type": "record", "name": "Stamped", "namespace": "x",
    "fields": [
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN", "BLUE"]}},
        {"name": "either", "type": ["null", "string", "long"]},
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x00\x01\x00", "enum index -1 of 3"),  # fastavro read it as BLUE
        (b"\x00\x00\x01\x00", "union branch -1 of 3"),  # fastavro read it as the long 0
        (b"\x00\x00" + b"\x82" + b"\x80" * 8 + b"\x02" + b"\x00", "beyond 64 bits"),  # fastavro: 1
    ],
)
def test_a_schema_with_logical_types_is_read_as_strictly(body: bytes, message: str) -> None:
    # Given a schema with a logical type (which fastavro reads, for its datetimes), and bodies
    # with an index below zero or a varint too long for 64 bits, which fastavro reads as
    # something else, When decoded, alone or resolved against a reader schema,
    # Then each fails with what is wrong, and its job goes to the dead-letter queue.
    writer = Schema.from_definition(STAMPED)
    newer = {**STAMPED, "fields": [*STAMPED["fields"], {"name": "note", "type": "string", "default": ""}]}
    for reader in (None, writer, Schema.from_definition(newer)):
        with pytest.raises(DecodeError, match=message):
            codec.decode(writer.header + body, _Both(writer), reader)
    good = writer.header + b"\x00\x04\x04\x06"  # 1970-01-01, BLUE, the long 3
    at = datetime(1970, 1, 1, tzinfo=UTC)
    assert codec.decode(good, _Both(writer))[1] == {"at": at, "color": "BLUE", "either": 3}


def test_a_boolean_byte_other_than_0_or_1_is_refused() -> None:
    # Given a boolean written as the byte 2 (the spec allows 0 and 1 only; fastavro reads it
    # as true, Java's decoder as false, so two consumers of one job would disagree),
    # Then it fails to decode, and its job goes to the dead-letter queue.
    flagged = {
        "type": "record",
        "name": "Flagged",
        "namespace": "x",
        "fields": [{"name": "on", "type": "boolean"}],
    }
    writer = Schema.from_definition(flagged)
    assert codec.decode(writer.header + b"\x01", _Both(writer))[1] == {"on": True}
    with pytest.raises(DecodeError, match="a boolean byte of 2, neither 0 nor 1"):
        codec.decode(writer.header + b"\x02", _Both(writer))


def test_an_optional_fields_branch_in_more_bytes_than_it_needs_reads_as_fastavro_reads_it() -> None:
    # Given ["null", T] branches written as 80 00 (0) and 82 00 (1): longer than needed, as
    # Avro allows, When decoded, Then they read as fastavro and Java read them.
    fields = {"type": "record", "name": "Opt", "fields": [{"name": "maybe", "type": ["null", "string"]}]}
    opt = Schema.from_definition(fields)
    for body, expected in [(b"\x80\x00", None), (b"\x82\x00\x02a", "a")]:
        data = opt.header + body
        assert codec.decode(data, _Both(opt))[1] == {"maybe": expected} == _fastavro_read(opt, data)[0]


def test_a_varint_that_never_ends_fails_fast() -> None:
    # Given a body of a megabyte of 0xff (every byte says "more of this number follows"),
    # When decoded, Then it fails at the eleventh byte rather than building a huge integer.
    schema = REGISTRY.schema("test.Numbers")
    data = schema.header + b"\xff" * (codec.MAX_MESSAGE_BYTES - 20)
    started = time.perf_counter()
    with pytest.raises(DecodeError, match="longer than 10 bytes"):
        codec.decode(data, REGISTRY)
    assert time.perf_counter() - started < 1


# -- bridge's compiled writer against fastavro's ------------------------------------------------

# The compiled writer chooses a union's branch by None alone: "either" is left to fastavro.
EVERY_OPTIONAL = {**EVERY_TYPE, "fields": [f for f in EVERY_TYPE["fields"] if f["name"] != "either"]}


def _fastavro_write(schema: Schema, datum: Any) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, schema.parsed, datum)
    return out.getvalue()


def _dead_letter(rng: random.Random) -> dict[str, Any]:
    envelope = Envelope.from_avro(_random_envelope(rng))
    reason = rng.choice(["undecodable", "exhausted"])
    raw = rng.randbytes(9) if reason == "undecodable" else None
    return DeadLetter(reason, "why", "q", rng.randrange(2**41), rng.choice([None, 2]), rng.choice([None, 7]),
                      rng.choice([None, "g"]), None if raw else envelope, raw).to_avro()  # fmt: skip


@pytest.mark.parametrize("name", ["every type", "envelope", "dead letter"])
def test_the_compiled_writer_writes_what_fastavro_writes(name: str) -> None:
    # Given random records of every Avro type, envelopes and dead letters,
    # When bridge's compiled writer writes them, Then the bytes are fastavro's, byte for byte.
    rng = random.Random(5)
    schema, make = {
        "every type": (Schema.from_definition(EVERY_OPTIONAL), _random_every),
        "envelope": (ENVELOPE_SCHEMA, _random_envelope),
        "dead letter": (REGISTRY.schema(DEAD_LETTER), _dead_letter),
    }[name]
    assert schema.write is not None
    for _ in range(300):
        datum = make(rng)
        datum.pop("either", None)
        written = bytearray()
        schema.write(written, datum)
        assert bytes(written) == _fastavro_write(schema, datum)


def test_what_the_compiled_writer_cannot_write_as_it_is_goes_to_fastavro() -> None:
    # Given a union of three types, a field left to its default, and a value of the wrong type,
    # Then encode gives fastavro's bytes for the first two and fastavro's error for the last.
    assert Schema.from_definition(EVERY_TYPE).write is None
    echo = REGISTRY.schema("test.Echo")  # text and sleep_ms have defaults
    assert echo.write is not None
    assert codec.encode(echo, {"n": 1}) == echo.header + _fastavro_write(echo, {"n": 1})
    with pytest.raises((TypeError, ValueError)):
        codec.encode(echo, {"n": "one", "text": "", "sleep_ms": 0})
    numbers = REGISTRY.schema("test.Numbers")  # an array: fastavro writes a tuple as one too
    assert codec.encode(numbers, {"values": (1, 2)}) == codec.encode(numbers, {"values": [1, 2]})
