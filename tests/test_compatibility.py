"""Avro schema resolution judged on whole schemas, with reasons a person can act on."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from bridge import codec
from bridge.codec import Schema
from bridge.compatibility import level_problems, read_problems
from bridge.errors import SchemaMismatch


def record(*fields: dict[str, Any], name: str = "Order") -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": "shop", "fields": list(fields)}


N = {"name": "n", "type": "int"}
NOTE = {"name": "note", "type": ["null", "string"], "default": None}
SIZE: dict[str, Any] = {"name": "size", "type": {"type": "enum", "name": "Size", "symbols": ["S", "M", "L"]}}


def test_an_optional_field_added_reads_both_ways() -> None:
    # Given version 1 and a version 2 that adds a field with a default,
    # Then each reads the other's data.
    v1, v2 = record(N), record(N, NOTE)
    assert read_problems(v2, v1) == []
    assert read_problems(v1, v2) == []
    assert level_problems("FULL_TRANSITIVE", v2, [v1]) == []


def test_a_named_type_defined_in_a_field_one_side_lacks_still_resolves() -> None:
    # Given version 1 defining record Address in `shipping`, and a version 2 that adds an
    # optional `billing` of that record before it, so that `shipping` only names it,
    # Then each reads the other's data, as fastavro and the registry say. (Named types were
    # learnt only along compared fields: "shipping: type changed from record shop.Address to
    # shop.Address", and v1's data was dead-lettered schema_mismatch.)
    address = {"type": "record", "name": "Address", "fields": [{"name": "city", "type": "string"}]}
    v1 = record(N, {"name": "shipping", "type": address})
    billing = {"name": "billing", "type": ["null", address], "default": None}
    v2 = record(N, billing, {"name": "shipping", "type": "Address"})
    assert read_problems(v2, v1) == []
    assert read_problems(v1, v2) == []
    assert level_problems("FULL", v2, [v1]) == []


def test_a_field_added_without_default_cannot_read_old_data() -> None:
    v1, v2 = record(N), record(N, {"name": "total", "type": "long"})
    assert read_problems(v2, v1) == [
        "total: the written data lacks this field and it has no default; give it one"
    ]
    assert read_problems(v1, v2) == []  # the old reader ignores the new field


def test_type_changes_follow_avro_promotions() -> None:
    # int widens to long, float and double, string and bytes swap; nothing narrows.
    as_long = record({"name": "n", "type": "long"})
    as_string = record({"name": "n", "type": "string"})
    assert read_problems(as_long, record(N)) == []
    assert read_problems(record(N), as_long) == ["n: type changed from long to int"]
    assert read_problems(as_string, record(N)) == ["n: type changed from int to string"]


def test_removed_enum_symbols_need_a_default() -> None:
    smaller = {"name": "size", "type": {"type": "enum", "name": "Size", "symbols": ["S", "M"]}}
    assert read_problems(record(smaller), record(SIZE)) == [
        "size: enum symbols L were removed and the enum has no default"
    ]
    with_default = {
        "name": "size",
        "type": {"type": "enum", "name": "Size", "symbols": ["S", "M"], "default": "M"},
    }
    assert read_problems(record(with_default), record(SIZE)) == []


def test_unions_nested_records_and_renames_are_named_by_path() -> None:
    nested_v1 = record({"name": "line", "type": record(N, name="Line")})
    nested_v2 = record({"name": "line", "type": record({"name": "n", "type": "boolean"}, name="Line")})
    assert read_problems(nested_v2, nested_v1) == ["line.n: type changed from int to boolean"]
    optional = record({"name": "n", "type": ["null", "int"], "default": None})
    assert read_problems(optional, record(N)) == []  # a union with a branch for the writer
    assert read_problems(record(N), optional) == ["n: type changed from null to int"]
    renamed = record(N, name="Purchase")
    assert read_problems(renamed, record(N)) == [
        "the record: record shop.Order is now named shop.Purchase; add the old name to aliases"
    ]
    assert read_problems({**renamed, "aliases": ["Order"]}, record(N)) == []


def test_a_nested_type_may_change_its_namespace_but_the_record_may_not() -> None:
    # Given a nested enum and an optional record moved to another namespace, as Avro (which
    # matches named types by unqualified name), Java and a Confluent registry allow,
    # Then the versions read each other, and data written with one decodes with the other,
    # with the reader's logical types (a union's branch is found by the same rule); but the
    # job's record itself, whose full name is its job type, keeps its namespace.
    def version(namespace: str, at: Any) -> dict[str, Any]:
        size = {**SIZE["type"], "namespace": namespace}
        line = {**record({"name": "at", "type": at}, name="Line"), "namespace": namespace}
        return record({"name": "size", "type": size}, {"name": "line", "type": ["null", line]})

    old = version("shop", "long")
    moved = version("shop.v2", {"type": "long", "logicalType": "timestamp-millis"})
    assert read_problems(moved, old) == []
    assert read_problems(old, moved) == []
    writer = Schema.from_definition(old, schema_id=1)
    data = codec.encode(writer, {"size": "M", "line": {"at": 1_700_000_000_000}})
    lookup = SimpleNamespace(by_id=lambda _: writer, by_fingerprint=lambda _: None)
    at = datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert codec.decode(data, lookup, Schema.from_definition(moved))[1] == {"size": "M", "line": {"at": at}}
    elsewhere = Schema.from_definition({**old, "namespace": "shop.v2"})
    with pytest.raises(SchemaMismatch, match=r"shop\.Order schema id 1 cannot be read as a shop\.v2\.Order"):
        codec.decode(data, lookup, elsewhere)


def test_levels_compare_with_the_latest_or_every_version() -> None:
    v1 = record(N)
    v2 = record(N, NOTE)
    v3 = record({"name": "n", "type": "long"}, NOTE)  # reads v1 and v2; they cannot read it
    assert level_problems("BACKWARD", v3, [v1, v2]) == []
    assert level_problems("FORWARD", v3, [v1, v2]) == [
        "version 2 cannot read its data: n: type changed from long to int"
    ]
    assert len(level_problems("FORWARD_TRANSITIVE", v3, [v1, v2])) == 2
    assert level_problems("NONE", v3, [v1, v2]) == []
    with pytest.raises(ValueError, match="unknown compatibility level 'SIDEWAYS'"):
        level_problems("sideways", v3, [v1])
