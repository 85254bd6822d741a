"""Which Kafka offset may be committed when jobs of one partition finish out of order.

Pure bookkeeping: a partition's committable offset is one past the highest offset below which
every delivered record is settled. Each assignment of a partition is an `Assignment` of its
own, which its records carry, so a job that finishes after its partition was revoked (and
maybe assigned back) cannot move the new assignment's offset.
"""

from __future__ import annotations

from collections import deque
from typing import Any

TopicPartition = tuple[str, int]


class Assignment:
    """One assignment of a partition: its records in delivery order, and which are settled."""

    def __init__(self) -> None:
        self.ended = False  # the partition was revoked (or lost) since: its records are not ours
        self.order: deque[list[Any]] = deque()  # [offset, settled] in delivery order
        # The unsettled entries of each offset: one, unless the log went back under the consumer
        # (a broker that lost records, and auto.offset.reset) and handed an offset out again.
        self.by_offset: dict[int, list[list[Any]]] = {}
        self.unsettled = 0
        self.position: int | None = None  # the offset everything below is settled, once known


class OffsetTracker:
    """In-flight offsets per assigned partition, in delivery order."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, Assignment] = {}

    def assign(self, tp: TopicPartition) -> None:
        """Start tracking `tp` afresh."""
        self.revoke(tp)
        self._partitions[tp] = Assignment()

    def revoke(self, tp: TopicPartition) -> None:
        """Forget `tp`: its unsettled records will be delivered again to its next owner."""
        partition = self._partitions.pop(tp, None)
        if partition is not None:
            partition.ended = True

    def clear(self) -> None:
        """Forget every partition."""
        for tp in list(self._partitions):
            self.revoke(tp)

    def started(self, tp: TopicPartition, offset: int) -> Assignment | None:
        """Record that `offset` was handed out; return the assignment to settle it with.

        None when `tp` is not assigned: a record fetched before its partition was revoked
        belongs to the partition's next owner, and must not run here. (Counting it in a later
        assignment would commit past the records fetched before it in that assignment.)
        """
        partition = self._partitions.get(tp)
        if partition is None:
            return None
        entry = [offset, False]
        partition.order.append(entry)
        partition.by_offset.setdefault(offset, []).append(entry)
        partition.unsettled += 1
        return partition

    def done(self, tp: TopicPartition, offset: int, assignment: Assignment) -> int | None:
        """Mark `offset` settled; return the new committable offset if it moved."""
        partition = self._partitions.get(tp)
        if partition is None or partition is not assignment:
            return None
        entries = partition.by_offset.get(offset)
        if not entries:
            return None
        entries.pop(0)[1] = True  # (an offset handed out again settles in turn: none is left behind)
        if not entries:
            del partition.by_offset[offset]
        partition.unsettled -= 1
        committable = None
        while partition.order and partition.order[0][1]:
            committable = partition.order.popleft()[0] + 1
        if committable is not None:
            partition.position = committable
        return committable

    def found(self, tp: TopicPartition, committed: int) -> None:
        """Note where `tp`'s group offset was when its first record of this assignment came."""
        partition = self._partitions.get(tp)
        if partition is not None and partition.position is None:
            partition.position = committed

    def settled(self) -> dict[TopicPartition, int]:
        """The assigned partitions with nothing in flight, and the offset each is settled up to
        (those whose offset is known)."""
        return {
            tp: p.position for tp, p in self._partitions.items() if not p.by_offset and p.position is not None
        }

    def first_unsettled(self, tp: TopicPartition) -> int | None:
        """The lowest handed-out offset of `tp` not settled yet, if any."""
        partition = self._partitions.get(tp)
        return partition.order[0][0] if partition is not None and partition.order else None

    def assigned(self, tp: TopicPartition) -> bool:
        """Whether `tp` is assigned now."""
        return tp in self._partitions

    def owns(self, tp: TopicPartition, assignment: Assignment) -> bool:
        """Whether `tp` is still assigned in `assignment`."""
        return self._partitions.get(tp) is assignment

    def ahead(self, tp: TopicPartition) -> int:
        """How many records of `tp` were handed out from its first unsettled one on."""
        partition = self._partitions.get(tp)
        return len(partition.order) if partition is not None else 0

    def in_flight(self) -> int:
        """How many handed-out records are not settled yet."""
        return sum(p.unsettled for p in self._partitions.values())
