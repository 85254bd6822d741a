"""Counting the returns of Kafka records whose worker stopped before settling them.

Kafka keeps no delivery count. A record whose handler kills its process (a crash in C code, the
out-of-memory killer) is read again from the committed offset by the partition's next owner, and
kills that one too, for good. RabbitMQ counts such returns (`x-delivery-count`) and the worker
dead-letters a job that reaches `delivery_limit`; on Kafka bridge keeps the count itself, in the
metadata of its group's committed offsets, which outlives every process:

    bridge:run      an owner is running the partition's records (every commit while consuming)
    bridge:end      its owner handed it over with nothing in flight (revoked, or stopped in time)
    bridge:try:N    its owner was about to run the record at this offset alone, and the record
                    had come back N times

A new assignment's records wait at the partition's Gate while the committed offset and its note
are read. A partition handed over cleanly (any note but `run` or `try`, or none: never consumed
by bridge, never committed) opens once `bridge:run` is committed where it was left, so that a
process killed before its first commit of its own still leaves the mark. One that says `run` or
`try` follows an owner that stopped holding records: its first `concurrency` records run one at
a time (one in the whole process), each once `bridge:try:N` is committed at its offset. A record
that stops its worker again is then the one named, with its count, and the count reaches the
worker as `Delivery.returns` (a record of a careful start counts at least one return: it may
have been running when its owner stopped). Records that the stopped owner had reached further on come to
the front in later rounds: each round commits past the records it ran alone.
"""

from __future__ import annotations

import asyncio

RUNNING = "bridge:run"
HANDED_OVER = "bridge:end"
TRYING = "bridge:try:"


def trying(returns: int) -> str:
    """The commit note saying that the record at the offset runs alone after `returns` returns."""
    return f"{TRYING}{returns}"


class Gate:
    """The start of one assignment of a partition: its records wait here until it is marked."""

    def __init__(self, careful: int) -> None:
        self.ready = asyncio.Event()  # set once the note is read (and a clean start marked)
        self.lock = asyncio.Lock()  # records pass one at a time, in the order they were started
        self.open = False  # marked, and past the records to run alone: records run side by side
        self._careful = careful
        self._left = 0  # records still to run alone
        self._returned: tuple[int, int] | None = None  # the offset run alone at the stop, and its count

    def learn(self, offset: int | None, note: str | None) -> None:
        """Take where the partition was left (None: unknown) and the note committed there."""
        count = note.removeprefix(TRYING) if note is not None and note.startswith(TRYING) else None
        if note == RUNNING:
            self._left = self._careful
        elif count is not None and count.isascii() and count.isdigit():
            self._left = self._careful
            if offset is not None:
                self._returned = (offset, int(count))
        else:  # handed over, never consumed by bridge, or never committed at all
            self._left = 0

    @property
    def keeps_note(self) -> bool:
        """Whether the note where the partition was left must stay (not be replaced by
        `bridge:end`): it is not read yet, or it began a careful start none of whose records ran."""
        return not self.ready.is_set() or self._left == self._careful > 0

    def returns(self, offset: int) -> int:
        """0 if the record at `offset` may run beside others; else the returns to count for it."""
        if not self._left:
            return 0
        if self._returned is not None and self._returned[0] == offset:
            return self._returned[1] + 1
        return 1

    def passed(self, returns: int) -> None:
        """A record was marked and runs: alone if `returns`, else the partition is open."""
        if returns:
            assert self._left
            self._left -= 1
        self.open = not self._left
