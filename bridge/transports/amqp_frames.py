"""Lenient reading of the AMQP properties and headers that other producers write.

pamqp, with which aiormq parses frames, raises on a timestamp past what a datetime holds (year
9999: one written in microseconds, say), on a short string that is not UTF-8 (a content type),
and on a header name that is not UTF-8 either. aiormq then closes the connection, and RabbitMQ
delivers the message again on the next one: its queue was blocked for good, and the message
never reached the worker, to be run or dead-lettered. The jobs held beside it came back with
each reconnect, and one was dead-lettered `delivery_limit` for what was none of its doing.

bridge reads none of those values, so they are read leniently instead: such a timestamp as
None, such text with U+FFFD where its bytes are not UTF-8. Frames that are cut short or
otherwise malformed still fail as before.
"""

from __future__ import annotations

import datetime
import struct
from typing import Any

from pamqp import common, decode

_timestamp, _short_str = decode.timestamp, decode.short_str


def install() -> None:
    """Have pamqp read leniently, in this whole process (idempotent)."""
    decode.METHODS["timestamp"] = decode.TABLE_MAPPING[b"T"] = timestamp
    decode.METHODS["shortstr"] = short_str
    decode.METHODS["table"] = decode.TABLE_MAPPING[b"F"] = field_table


def timestamp(value: bytes) -> tuple[int, datetime.datetime | None]:
    """pamqp's timestamp, or None for one past what a datetime holds."""
    try:
        return _timestamp(value)
    except ValueError as exc:
        if exc.__cause__ is not None:  # (struct.error: the frame is cut short)
            raise
        return 8, None  # ("year 292278994 is out of range")
    except (OverflowError, OSError):
        return 8, None


def short_str(value: bytes) -> tuple[int, str]:
    """pamqp's short string, with U+FFFD for bytes that are not UTF-8."""
    try:
        return _short_str(value)
    except UnicodeDecodeError:
        length = value[0]
        return length + 1, value[1 : length + 1].decode("utf-8", "replace")


def field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    """pamqp's field table (headers), with U+FFFD in names for bytes that are not UTF-8."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset, end = 4, 4 + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        table: dict[str, Any] = {}
        while offset < end:
            key_length = value[offset]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", "replace")
            consumed, table[key] = decode.embedded_value(value[offset + key_length :])
            offset += key_length + consumed
        return end, table
    except (struct.error, TypeError, IndexError) as err:
        raise ValueError("Could not unpack data") from err
