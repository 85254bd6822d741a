"""Shared types and locations for `bridge dev`: the status record, folders and port settings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bridge.errors import DevError


@dataclass(frozen=True)
class ServiceStatus:
    """What `up`, `down` and `status` report for one local broker."""

    name: str
    url: str
    running: bool
    detail: str


def cache_root() -> Path:
    """Folder for downloads that can be thrown away and fetched again (the Kafka jars)."""
    return _xdg_folder("BRIDGE_CACHE", "XDG_CACHE_HOME", ".cache")


def data_root() -> Path:
    """Folder for state worth keeping between runs (broker data, logs, pid files)."""
    return _xdg_folder("BRIDGE_DATA", "XDG_DATA_HOME", ".local/share")


def _xdg_folder(own_var: str, xdg_var: str, home_default: str) -> Path:
    own = os.environ.get(own_var)
    if own:
        return Path(own).expanduser().absolute()  # (a relative one was taken from /, by sqlite's URL)
    xdg = os.environ.get(xdg_var)
    base = Path(xdg).expanduser() if xdg else Path.home() / home_default
    return base / "bridge"


def env_port(var: str, default: int, *, span: int = 1) -> int:
    """Read a port from `var`; `span` ports starting there must all be valid."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 65536 - span:
        raise DevError(f"{var}={raw!r} is not a usable port: set a number from 1 to {65536 - span}")
    return int(raw)


def is_root() -> bool:
    """True when we may install packages and write /etc."""
    return os.geteuid() == 0
