"""A TCP proxy in front of a real server, to cut a store or a broker off from its workers for a
while; and `silenced`, which drops one loopback connection's packets in the kernel."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import in_ci


class FlakyProxy:
    """Forwards to the server of `url`; `cut(down_s)` closes every forwarded connection and
    drops new ones for `down_s` seconds from the first one it drops (so a consumer that only
    comes to the store seconds later still finds it down), or until `heal()` with `down_s` None.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._target, self._url = (parts.hostname, parts.port), parts
        self._down_s: float | None = None  # while cut
        self._healing: asyncio.Task[None] | None = None  # started at the first dropped connection
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()  # both ends of every connection, to close at exit
        self._flowing = asyncio.Event()  # cleared by `stall()`: data is taken in and not passed on
        self._flowing.set()
        self._port = 0  # any, until it listens
        self._listening: asyncio.Task[None] | None = None  # started by `refuse`
        self._swallowing_until = 0.0  # time.monotonic() up to which `swallow` holds new connections

    @property
    def url(self) -> str:
        """`url`, through the proxy."""
        credentials, at, _ = self._url.netloc.rpartition("@")
        return self._url._replace(netloc=f"{credentials}{at}127.0.0.1:{self._port}").geturl()

    def cut(self, down_s: float | None) -> None:
        if self._healing is not None:  # an earlier cut's timer must not end this one early
            self._healing.cancel()
        self._down_s, self._healing = (down_s if down_s is not None else float("inf")), None
        for pipe in self._pipes:
            pipe.cancel()

    async def reset(self) -> None:
        """Close every forwarded connection, as a server that restarts (or a pooler's idle
        timeout) does, and go on forwarding new ones: the clients' sockets have their end."""
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        closing = [writer.wait_closed() for writer in self._writers if writer.is_closing()]
        await asyncio.gather(*closing, return_exceptions=True)

    async def refuse(self, down_s: float) -> None:
        """Close every forwarded connection and listen to nothing for `down_s` seconds: a new
        one is refused, as by a host whose server is stopped."""
        self._server.close()
        await self.reset()
        self._listening = asyncio.create_task(self._listen(after_s=down_s))

    async def swallow(self, down_s: float) -> None:
        """Close every forwarded connection, and for `down_s` seconds take new ones in and
        never answer them, nor later: connects whose packets a network dropped (a host gone,
        a partition), which wait on their own timeout however soon the network heals."""
        self._swallowing_until = time.monotonic() + down_s
        await self.reset()

    def stall(self) -> None:
        """Pass nothing on, either way, and close nothing: as a network that drops packets
        looks to a client (until `heal()`)."""
        self._flowing.clear()

    def heal(self) -> None:
        """End the cut, or the stall, now."""
        if self._healing is not None:
            self._healing.cancel()
        self._down_s, self._healing = None, None
        self._flowing.set()

    async def __aenter__(self) -> FlakyProxy:
        await self._listen()
        return self

    async def _listen(self, after_s: float = 0.0) -> None:
        await asyncio.sleep(after_s)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        tasks = [*self._pipes, *(task for task in (self._healing, self._listening) if task)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in self._writers:  # (clients still connecting meanwhile: a process's leftovers)
            writer.close()
        await asyncio.gather(*(writer.wait_closed() for writer in self._writers), return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if time.monotonic() < self._swallowing_until:
            return  # (held open, unread, until the proxy closes)
        if self._down_s is not None:
            self._healing = self._healing or asyncio.create_task(self._heal_in(self._down_s))
            writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:  # the server is not there (stopped, or not started yet): nor is this one
            writer.close()
            return
        self._writers.add(upstream_writer)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            pipe = asyncio.create_task(_pipe(source, sink, self._flowing))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    async def _heal_in(self, down_s: float) -> None:
        await asyncio.sleep(down_s)  # (for good when infinite: `heal()` cancels it)
        self._down_s = None


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
    try:
        while data := await source.read(65536):
            await flowing.wait()
            sink.write(data)
            await sink.drain()
    except ConnectionError:
        pass  # the other side went away: close this one too
    finally:
        sink.close()


class ThreadedProxy:
    """A FlakyProxy serving from a thread and event loop of its own, so that it forwards even
    while the test's loop is blocked (a blocking client call waits on what the proxy carries)."""

    def __init__(self, proxy: FlakyProxy, loop: asyncio.AbstractEventLoop) -> None:
        self._proxy, self._loop = proxy, loop
        self.url = proxy.url

    def cut(self, down_s: float) -> None:
        self._loop.call_soon_threadsafe(self._proxy.cut, down_s)


@contextmanager
def threaded_proxy(url: str) -> Iterator[ThreadedProxy]:
    """A ThreadedProxy in front of the server of `url`, stopped after."""
    started: list[ThreadedProxy] = []
    ready, done = threading.Event(), asyncio.Event()

    async def serve() -> None:
        async with FlakyProxy(url) as proxy:
            started.append(ThreadedProxy(proxy, asyncio.get_running_loop()))
            ready.set()
            await done.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield started[0]
    finally:
        started[0]._loop.call_soon_threadsafe(done.set)
        thread.join(10)


@contextmanager
def kafka_behind_proxy(root: Path) -> Iterator[ThreadedProxy]:
    """A Kafka node of its own (its files in `root`) that clients reach only through a
    ThreadedProxy, the address it advertises: `cut` cuts it off from every client."""
    from tests.brokerio import another_kafka, free_port_pair

    port = free_port_pair()
    with threaded_proxy(f"kafka://127.0.0.1:{port}") as proxy:
        advertised = {"advertised.listeners": f"PLAINTEXT://127.0.0.1:{proxy.url.rpartition(':')[2]}"}
        with another_kafka(root, advertised, client_port=port):
            yield proxy


# Loopback is the host's, and `make test` runs four sessions at once: one test at a time changes
# its qdiscs. While one does, every loopback packet passes through its filter, a timing test's
# of the other session too.
QDISC_LOCK = Path(tempfile.gettempdir()) / "bridge-tests-lo-qdisc.lock"
_qdisc_held = False


@contextmanager
def loopback_qdisc() -> Iterator[None]:
    """Loopback's qdisc, this test's until the block ends (waiting for another session's test:
    take it before the test's event loop runs, which waiting would block)."""
    global _qdisc_held
    with QDISC_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (let go when the file closes, or the process ends)
        _qdisc_held = True
        try:
            yield
        finally:
            _qdisc_held = False


@contextmanager
def silenced(port: int, server_port: int) -> Iterator[None]:
    """Drop every IPv4 packet between this host's `port` and `server_port` on loopback, either way,
    until the block ends: a network gone silent, as both ends' kernels see it. A proxy cannot
    do that: its kernel acknowledges what the server sends, keepalive probes included.

    Needs root and iproute2. The packets are dropped as they arrive, once their sender's kernel
    has sent them, as a network would lose them: loopback's ingress redirects them to a device
    that is down (this kernel has no netem and no drop action). Dropped as they left, the
    sender's kernel saw each keepalive probe fail to go out, took that for congestion of its
    own, and never counted a probe unanswered: the session of a silent client was never ended.
    Loopback's other traffic passes as before. Loopback is the host's: the caller holds
    `loopback_qdisc()`, and what a killed run left behind goes first.
    """
    assert _qdisc_held, "silenced() needs loopback_qdisc() held, taken before the test's event loop runs"
    if os.geteuid() != 0 or not (shutil.which("tc") and shutil.which("ip")):  # (CI runs as root)
        reason = "silencing a connection needs root and iproute2 (tc, ip)"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    lo, nowhere = ["dev", "lo"], "bridge-silent"
    undo = [["tc", "qdisc", "del", *lo, "ingress"], ["ip", "link", "del", nowhere]]
    commands = [
        ["ip", "link", "add", nowhere, "type", "ifb"],  # (left down: what goes there is dropped)
        ["tc", "qdisc", "add", *lo, "handle", "ffff:", "ingress"],
        *(
            ["tc", "filter", "add", *lo, "parent", "ffff:", "protocol", "ip", "prio", "1", "u32",
             "match", "ip", "sport", str(source), "0xffff", "match", "ip", "dport", str(to), "0xffff",
             "action", "mirred", "egress", "redirect", "dev", nowhere]
            for source, to in ((port, server_port), (server_port, port))
        ),
    ]  # fmt: skip
    try:
        for command in undo:
            subprocess.run(command, capture_output=True, check=False)
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
        yield
    finally:
        for command in undo:
            subprocess.run(command, capture_output=True, check=False)
