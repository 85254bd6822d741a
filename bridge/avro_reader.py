"""A reader of Avro binary compiled once per schema: what bridge reads on every job, faster.

fastavro decides what to read from a schema's type names at every datum and reads through a
file object. Compiling the schema into a tree of small functions that each read one type
from the bytes at an index reads bridge's envelope in about two thirds of the time, and the
envelope is read for every job consumed.

Only what fastavro would return unchanged is read here: a schema with logical types, or data
written with another version of a schema (which needs resolution), goes to fastavro, once
this reader has checked the bytes (fastavro is laxer). The reader is strict: a length, union
branch or enum index that does not fit the bytes or the schema raises ValueError, reading past
the end raises IndexError, and tests/test_codec.py checks it against fastavro on valid and
corrupted input. A huge count costs no more than the bytes present: `codec.check_schema`
refuses arrays whose items could be zero bytes, and a map entry holds at least its key's
length, so every item read consumes input.

Pure: no I/O.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

Read = Callable[[bytes, int], tuple[Any, int]]  # (data, index) -> (value, index after it)

_FLOAT = struct.Struct("<f")
_DOUBLE = struct.Struct("<d")


def compile_reader(canonical: str) -> Read:
    """A reader for the schema in Parsing Canonical Form (full names, no logical types)."""
    return _compile(json.loads(canonical), {})


def read_long(data: bytes, at: int) -> tuple[int, int]:
    """A zig-zag varint (Avro int and long)."""
    byte = data[at]
    if byte < 0x80:  # most lengths, counts and small numbers: one byte
        return (byte >> 1) ^ -(byte & 1), at + 1
    value, shift = byte & 0x7F, 7
    at += 1
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift > 63:  # ten bytes hold 64 bits; a hostile run of 0xff must not build a huge int
            raise ValueError("a varint longer than 10 bytes")
    if value >> 64:  # fastavro would wrap it round silently
        raise ValueError("a varint beyond 64 bits")
    return (value >> 1) ^ -(value & 1), at


def _read_bytes(data: bytes, at: int) -> tuple[bytes, int]:
    size, at = read_long(data, at)
    end = at + size
    if size < 0 or end > len(data):
        raise ValueError(f"a length of {size} bytes where {len(data) - at} remain")
    return data[at:end], end


def _read_string(data: bytes, at: int) -> tuple[str, int]:
    raw, at = _read_bytes(data, at)
    return raw.decode(), at


def _read_int(data: bytes, at: int) -> tuple[int, int]:
    value, at = read_long(data, at)
    if not -(2**31) <= value < 2**31:  # (a long where an int goes: a Java reader refuses it)
        raise ValueError(f"an int of {value}, beyond 32 bits")
    return value, at


def _read_null(data: bytes, at: int) -> tuple[None, int]:
    return None, at


def _read_boolean(data: bytes, at: int) -> tuple[bool, int]:
    byte = data[at]
    if byte > 1:  # (fastavro reads it as true, a Java reader as false)
        raise ValueError(f"a boolean byte of {byte}, neither 0 nor 1")
    return byte == 1, at + 1


def _read_float(data: bytes, at: int) -> tuple[float, int]:
    return _FLOAT.unpack_from(data, at)[0], at + 4


def _read_double(data: bytes, at: int) -> tuple[float, int]:
    return _DOUBLE.unpack_from(data, at)[0], at + 8


_PRIMITIVES: dict[str, Read] = {
    "null": _read_null,
    "boolean": _read_boolean,
    "int": _read_int,
    "long": read_long,
    "float": _read_float,
    "double": _read_double,
    "bytes": _read_bytes,
    "string": _read_string,
}


def _compile(schema: Any, named: dict[str, Read]) -> Read:
    if isinstance(schema, str):
        return _PRIMITIVES.get(schema) or named[schema]  # a named type is defined before its uses
    if isinstance(schema, list):
        return _union([_compile(branch, named) for branch in schema])
    kind = schema["type"]
    if kind in ("record", "error"):
        read: Read = _record([(f["name"], _compile(f["type"], named)) for f in schema["fields"]])
    elif kind == "enum":
        read = _enum(schema["symbols"])
    elif kind == "fixed":
        read = _fixed(schema["size"])
    elif kind == "array":
        read = _array(_compile(schema["items"], named))
    elif kind == "map":
        read = _map(_compile(schema["values"], named))
    else:
        raise ValueError(f"not an Avro type: {kind!r}")
    if "name" in schema:
        named[schema["name"]] = read
    return read


def _record(fields: list[tuple[str, Read]]) -> Read:
    def read_record(data: bytes, at: int) -> tuple[dict[str, Any], int]:
        record = {}
        for name, read in fields:
            record[name], at = read(data, at)
        return record, at

    return read_record


def _union(branches: list[Read]) -> Read:
    if len(branches) == 2 and branches[0] is _read_null:  # ["null", T]: the usual optional field
        other = branches[1]

        def read_optional(data: bytes, at: int) -> tuple[Any, int]:
            branch = data[at]
            if branch == 0:
                return None, at + 1
            if branch == 2:  # zig-zag 1
                return other(data, at + 1)
            branch, at = read_long(data, at)  # (a branch written in more bytes than it needs)
            if branch == 0:
                return None, at
            if branch == 1:
                return other(data, at)
            raise ValueError(f"union branch {branch} of 2")

        return read_optional

    def read_union(data: bytes, at: int) -> tuple[Any, int]:
        branch, at = read_long(data, at)
        if not 0 <= branch < len(branches):
            raise ValueError(f"union branch {branch} of {len(branches)}")
        return branches[branch](data, at)

    return read_union


def _enum(symbols: list[str]) -> Read:
    def read_enum(data: bytes, at: int) -> tuple[str, int]:
        index, at = read_long(data, at)
        if not 0 <= index < len(symbols):
            raise ValueError(f"enum index {index} of {len(symbols)}")
        return symbols[index], at

    return read_enum


def _fixed(size: int) -> Read:
    def read_fixed(data: bytes, at: int) -> tuple[bytes, int]:
        end = at + size
        if end > len(data):
            raise ValueError(f"a fixed of {size} bytes where {len(data) - at} remain")
        return data[at:end], end

    return read_fixed


def _blocks(data: bytes, at: int) -> tuple[int, int]:
    """The item count of the next block of an array or map (0 at the end)."""
    count, at = read_long(data, at)
    if count < 0:  # a negative count is followed by the block's size in bytes
        count = -count
        _, at = read_long(data, at)
    return count, at


def _array(items: Read) -> Read:
    def read_array(data: bytes, at: int) -> tuple[list[Any], int]:
        array = []
        count, at = _blocks(data, at)
        while count:
            for _ in range(count):  # each item is at least a byte: input runs out first
                item, at = items(data, at)
                array.append(item)
            count, at = _blocks(data, at)
        return array, at

    return read_array


def _map(values: Read) -> Read:
    def read_map(data: bytes, at: int) -> tuple[dict[str, Any], int]:
        mapping = {}
        count, at = _blocks(data, at)
        while count:
            for _ in range(count):  # each entry is at least its key's length byte
                key, at = _read_string(data, at)
                mapping[key], at = values(data, at)
            count, at = _blocks(data, at)
        return mapping, at

    return read_map
