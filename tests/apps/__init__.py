"""Apps that tests run with `bridge consume`, configured by environment."""

from __future__ import annotations

import os


def append_line(path: str, line: str) -> None:
    """Append `line` to the file at `path` in one write() on an O_APPEND file.

    Lines of concurrent processes never interleave, and a process killed mid-run leaves whole
    lines only (a reader may still see the last one half-written while it is being appended).
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)
