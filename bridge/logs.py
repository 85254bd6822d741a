"""Log lines that a client library repeats while its broker is unreachable, held back."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable

REPEAT_WINDOW_S = 30.0
MAX_KINDS = 256
_NUMBERS = re.compile(r"\d+")


class Repeats(logging.Filter):
    """Lets one line of each kind through per `window_s`; the next one after it says how many
    were held back meanwhile.

    While a broker is down its clients try again and again, and say so each time: each
    librdkafka client logs a failed connect about ten times a second (a 20 s Kafka restart gave
    900 ERROR lines from one `bridge consume`), aio-pika two lines a second. A kind is a line's
    level and its `text` (the message, unless given) with the numbers (ports, ms) masked.
    """

    def __init__(self, window_s: float, text: Callable[[logging.LogRecord], str] | None = None) -> None:
        super().__init__()
        self.window_s = window_s
        self._text = text or logging.LogRecord.getMessage
        self._kinds: dict[tuple[int, str], tuple[float, int]] = {}  # kind -> (when shown, held back)
        self._lock = threading.Lock()  # (librdkafka's lines come in whichever thread polls)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.levelno, _NUMBERS.sub("#", self._text(record)))
        now = time.monotonic()
        with self._lock:
            shown, held = self._kinds.get(kind, (-math.inf, 0))
            if now - shown < self.window_s:
                self._kinds[kind] = (shown, held + 1)
                return False
            if len(self._kinds) >= MAX_KINDS:  # forget the kinds not seen within the window
                self._kinds = {k: v for k, v in self._kinds.items() if now - v[0] < self.window_s}
            if len(self._kinds) < MAX_KINDS:  # (else too many kinds at once: none more is held back)
                self._kinds[kind] = (now, 0)
        if held:
            record.msg = f"{record.msg} (and {held} like it since the last one logged)"
        return True


class OneLine(logging.Formatter):
    """Each message on its own line: control characters in it (a newline in a job type that a
    producer wrote, say) are shown escaped, so no input can forge a line of the log. A
    traceback still follows on lines of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(_PASSWORD.sub(r"\1***@", record.message))
        return super().formatMessage(record)


# A URL's password: bridge's own lines name URLs without it (`errors.safe_url`), but a client's
# may not (httpx logs each registry request, URL and all, at --log-level debug).
_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^\s@]+@", re.IGNORECASE)


# (and the marks that turn text right to left, which could make a quoted id read otherwise)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def one_line(text: str) -> str:
    """`text` with its control characters shown escaped (`\\n`, `\\x1b`): on one line, and
    no terminal escape sequence from another producer's input reaches a person's terminal."""
    if text.isprintable():
        return text
    return _CONTROL.sub(lambda found: repr(found.group())[1:-1], text)
