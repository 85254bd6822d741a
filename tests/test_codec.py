"""The codec: both framings round-trip, and hostile bytes fail fast with DecodeError."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import pytest

from bridge import codec
from bridge.codec import Schema
from bridge.envelope import Envelope, JobError, uuid7
from bridge.errors import DecodeError, SchemaError
from bridge.registry import ENVELOPE, SchemaDirectory
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


class _Both:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema

    def by_fingerprint(self, fingerprint: int) -> Schema | None:
        return self.schema if fingerprint == self.schema.fingerprint else None

    def by_id(self, schema_id: int) -> Schema | None:
        return None


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
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    for attempt in (data, data_full):
        with pytest.raises(DecodeError):
            codec.decode(attempt, REGISTRY)
    assert time.perf_counter() - started < 0.1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 10_000  # KiB


def test_huge_string_length_fails_fast() -> None:
    schema = REGISTRY.schema("test.Echo")
    data = schema.header + b"\x02" + b"\xfe\xff\xff\xff\x0f" + b"abc"  # n=1, text of 2**31-1 bytes
    with pytest.raises(DecodeError):
        codec.decode(data, REGISTRY)


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


def test_validation_names_the_offending_field() -> None:
    schema = REGISTRY.schema("test.Echo")
    with pytest.raises(SchemaError, match=r"test\.Echo\.n: expected int, got 'x'"):
        codec.encode_validated(schema, {"n": "x"})
    with pytest.raises(SchemaError, match=r"test\.Echo\.bogus: no such field"):
        codec.encode_validated(schema, {"n": 1, "bogus": 2})
    with pytest.raises(SchemaError, match=r"test\.Echo\.n: missing"):
        codec.encode_validated(schema, {})


def test_schema_directory_checks_file_names(tmp_path: Path) -> None:
    (tmp_path / "wrong.avsc").write_text(
        json.dumps({"type": "record", "name": "A", "namespace": "x", "fields": []})
    )
    with pytest.raises(SchemaError, match=r"name the file x\.A\.avsc"):
        SchemaDirectory(tmp_path)
