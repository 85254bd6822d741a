"""Field defaults: checked when a schema is loaded, and handed to handlers as values.

A reader's field that the writer's version lacks takes its default. fastavro hands the default
over as the schema's JSON holds it, and the same object to every datum: a `bytes` default
arrived as a str, a timestamp's as an int, a float's "NaN" as a string, and a handler that
appended to an array's default `[]` appended to every later job's. Here each default becomes
the value a producer's write of it would read as, and every datum gets a copy of its own.

Pure: no I/O.
"""

from __future__ import annotations

import copy
import json
import struct
from typing import Any

from fastavro import parse_schema
from fastavro.read import LOGICAL_READERS

from bridge.compatibility import Names, full_name, kind_of, unwrap
from bridge.errors import SchemaError


class _NotAValue(Exception):
    """A default is no value of its field's type (the message says why, if not by its kind)."""


def check_defaults(schema: dict[str, Any]) -> None:
    """Refuse a default its field's type cannot hold (the Avro spec asks for a value of the
    field's type): read from a version without the field, it would reach the handler as it is.
    (Checked on the schemas an app reads with; a producer's registered version is read
    whatever its defaults, which reading never uses.)"""
    names = Names()
    names.learn(schema, None)
    for full, node in names.defined.items():
        namespace = full.rpartition(".")[0] or None
        if node["type"] == "enum" and "default" in node and node["default"] not in node["symbols"]:
            raise SchemaError(f"enum {full}: its default {_brief(node['default'])} is not one of its symbols")
        for f in node.get("fields", ()) if node["type"] in ("record", "error") else ():
            if "default" not in f:
                continue
            try:  # (the underlying type only, as Java's Avro: a logical type's sentinel loads)
                value_of(names, f["type"], f["default"], namespace, logical=False)
            except _NotAValue as exc:
                kind = kind_of(f["type"])
                why = str(exc) or ("fits no type of its union" if kind == "union" else f"is no {kind}")
                raise SchemaError(f"{full}.{f['name']}: its default {_brief(f['default'])} {why}") from None


def value_of(names: Names, node: Any, default: Any, namespace: str | None, *, logical: bool) -> Any:
    """`default`, in Avro's JSON encoding, as the value of `node` that reading gives: bytes
    from a string of code points, floats from "NaN", records with their fields' defaults
    and, with `logical`, datetimes, Decimals, ... Raises _NotAValue when it is none."""
    annotated = node  # (unwrapping `{"type": "long", "logicalType": ...}` drops its annotation)
    node, namespace = names.resolve(unwrap(node), namespace)
    if isinstance(node, dict) and "logicalType" in node:  # (a named fixed)
        annotated = node
    kind = kind_of(node)
    if kind == "union":  # (Avro 1.11: any branch; before, the first)
        for branch in node:
            try:
                return value_of(names, branch, default, namespace, logical=logical)
            except _NotAValue:
                pass
        raise _NotAValue
    value = _plain(names, node, kind, default, namespace, logical)
    annotation = annotated.get("logicalType") if isinstance(annotated, dict) else None
    read = LOGICAL_READERS.get(f"{kind}-{annotation}") if logical and annotation else None
    if read is None:
        return value
    try:  # (fastavro's own reader of the logical type: the value decoding would give)
        return read(value, annotated, annotated)
    except Exception:  # ValueError, OverflowError, ...: a sentinel (a uuid of "") reads as it is
        return value


def _plain(names: Names, node: Any, kind: str, default: Any, namespace: str | None, logical: bool) -> Any:
    """`default` as a value of `node`'s type, its logical type aside."""
    numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
    if kind in ("int", "long"):
        bits = 32 if kind == "int" else 64
        if numeric and isinstance(default, int) and -(2 ** (bits - 1)) <= default < 2 ** (bits - 1):
            return default
    elif kind in ("float", "double"):
        if numeric or default in ("NaN", "Infinity", "-Infinity"):
            try:  # (a float reads back rounded to 32 bits, as a producer's write of it would)
                number = float(default)
                return struct.unpack("<f", struct.pack("<f", number))[0] if kind == "float" else number
            except OverflowError:  # (an integer beyond any double, or a float's range)
                pass
    elif kind in ("bytes", "fixed"):  # (a string of code points 0 to 255, one per byte)
        fits = isinstance(default, str) and all(ord(c) < 256 for c in default)
        if fits and (kind == "bytes" or len(default) == node["size"]):
            return default.encode("latin-1")
    elif kind == "array" and isinstance(default, list):
        return [value_of(names, node["items"], v, namespace, logical=logical) for v in default]
    elif kind == "map" and isinstance(default, dict):
        return {k: value_of(names, node["values"], v, namespace, logical=logical) for k, v in default.items()}
    elif kind in ("record", "error") and isinstance(default, dict):
        # (each field given, or with a default of its own)
        given = {f["name"]: default.get(f["name"], f.get("default")) for f in node["fields"]}
        if all(f["name"] in default or "default" in f for f in node["fields"]):
            return {
                f["name"]: value_of(names, f["type"], given[f["name"]], namespace, logical=logical)
                for f in node["fields"]
            }
    elif (
        (kind == "enum" and default in node["symbols"])
        or (kind == "null" and default is None)
        or (kind == "boolean" and isinstance(default, bool))
        or (kind == "string" and isinstance(default, str))
    ):
        return default
    raise _NotAValue


def writer_defaults(definition: dict[str, Any]) -> dict[str, Any]:
    """The record's own fields whose defaults a writer must be given as values, not as the
    schema's JSON holds them (bytes and fixed from a string of code points, a double from
    "NaN", maps and records holding those): a payload that left one out was refused, its
    default taken for a value of the wrong type. Underlying types only: what a payload holds.
    And those with a logical type, so that validation sees them: a sentinel such a default may
    be (a uuid of "") was written, and the consumer could not read the job."""
    names = Names()
    names.learn(definition, None)
    namespace = full_name(definition["name"], definition.get("namespace")).rpartition(".")[0] or None
    given: dict[str, Any] = {}
    for f in definition["fields"]:
        value = _default_of(names, f, namespace, logical=False)
        if value is _NO_VALUE:
            continue
        if _differs(value, f["default"]) or _logical(names, f["type"], namespace):
            given[f["name"]] = value
    return given


def _logical(names: Names, node: Any, namespace: str | None) -> bool:
    """Whether `node`, or a branch of it if a union, has a logical type."""
    if isinstance(node, dict) and "logicalType" in node:
        return True
    node, namespace = names.resolve(unwrap(node), namespace)
    if isinstance(node, list):
        return any(_logical(names, branch, namespace) for branch in node)
    return isinstance(node, dict) and "logicalType" in node


_NO_VALUE = object()


def _default_of(names: Names, f: dict[str, Any], namespace: str | None, *, logical: bool) -> Any:
    """Field `f`'s default as a value (`value_of`); _NO_VALUE if it has none, or one that no
    check refused (a producer's registered version's: left to fastavro as it is)."""
    if "default" not in f:
        return _NO_VALUE
    try:
        return value_of(names, f["type"], f["default"], namespace, logical=logical)
    except _NotAValue:
        return _NO_VALUE


def _differs(value: Any, default: Any) -> bool:
    """Whether `value` is not the default as the schema's JSON holds it (bytes for a str, ...)."""
    return type(value) is not type(default) or value != default


def _brief(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


class _Default:
    """A field's default in a reader's schema, as fastavro leaves it in a datum."""

    __slots__ = ("shared", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.shared = not isinstance(value, (list, dict))  # (immutable: one object serves all)

    def __float__(self) -> float:  # (fastavro 1.9's parse calls float() on a float's default)
        return 0.0

    def fresh(self) -> Any:
        return self.value if self.shared else copy.deepcopy(self.value)


def reader_with_defaults(definition: dict[str, Any], *, logical: bool) -> Any | None:
    """`definition` parsed for fastavro to read with, each field default that is not already
    the value reading gives (or that is a list, a map or a record, to be copied) left as a
    marker for `fill_defaults`; None when no default needs one."""
    names = Names()
    names.learn(definition, None)
    marked = False

    def walk(node: Any, namespace: str | None) -> Any:
        nonlocal marked
        if isinstance(node, list):
            return [walk(branch, namespace) for branch in node]
        if not isinstance(node, dict):
            return node
        out = dict(node)
        if node.get("type") in ("record", "error", "enum", "fixed"):
            namespace = full_name(node["name"], node.get("namespace", namespace)).rpartition(".")[0] or None
        elif isinstance(node.get("type"), (dict, list)):
            out["type"] = walk(node["type"], namespace)
        if isinstance(node.get("fields"), list):
            out["fields"] = fields = []
            for f in node["fields"]:
                fields.append({**f, "type": walk(f["type"], namespace)})
                if (value := _default_of(names, f, namespace, logical=logical)) is _NO_VALUE:
                    continue
                marker = _Default(value)
                if _differs(value, f["default"]) or not marker.shared:
                    fields[-1]["default"], marked = marker, True
        for key in ("items", "values"):
            if key in node:
                out[key] = walk(node[key], namespace)
        return out

    walked = walk(definition, None)
    return parse_schema(walked, _ignore_default_error=True) if marked else None


def fill_defaults(datum: Any) -> None:
    """Replace each default marker that fastavro left in `datum` with a value of its own."""
    for key, value in datum.items() if isinstance(datum, dict) else enumerate(datum):
        if type(value) is _Default:
            datum[key] = value.fresh()
        elif isinstance(value, (dict, list)):
            fill_defaults(value)
