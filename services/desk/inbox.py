"""What the desk takes in from the review topic, free of clients: the pair ids it takes, the stage and the sink the
Kafka backend's StageRunner reads the topic through, and how far each partition's committed offset may move.

A pair id is taken only if a verdict can name it (PAIR_ID); the runner dead-letters any other (pass_through), so it
never holds its partition. ReviewInbox holds each record until the desk fetches it, and its offset open until the desk
settles it (a decision written and acknowledged); commit_point never moves past the oldest open one.
kafka_queue.py does the I/O around them.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from typing import Any

from kafka.structs import TopicPartition

from synpref.shared.kafka.codec import Message
from synpref.shared.stage import StageResult
from synpref.v1.pair_pb2 import PairRecord

Handle = tuple[TopicPartition, int]
# What a verdict may name (fullmatch), so the only ids taken in: a pair no verdict can name holds its commit point.
PAIR_ID = re.compile(r"[0-9A-Za-z_.:-]{1,128}")


def pair_id_problem(pair_id: str) -> str | None:
    """Why the desk refuses a record with this pair id (not a PAIR_ID), or None."""
    return None if PAIR_ID.fullmatch(pair_id) else f"pair id {pair_id[:64]!r} is not 1-128 chars of [0-9A-Za-z_.:-]"


def pass_through(batch: list[PairRecord]) -> StageResult:
    """The desk's stage: every review record goes to the desk (the inbox) as it is, but one whose pair id no verdict
    could name: the runner dead-letters that one (and commits past it) rather than hold its partition for ever."""
    problems = [(record, pair_id_problem(record.pair.id)) for record in batch]
    return StageResult(
        routed=[("review", record) for record, problem in problems if problem is None],
        failed=[(record, f"the desk cannot take it: {problem}") for record, problem in problems if problem],
    )


class ReviewInbox:
    """The runner's sink for the desk: records wait here until fetched, offsets until settled."""

    keeps_offsets = False

    def __init__(self) -> None:
        self.waiting: deque[tuple[PairRecord, Handle | None]] = deque()
        self.open: dict[TopicPartition, dict[int, bool]] = {}
        self.polled_to: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.settled_below: dict[TopicPartition, int] = {}
        """Per partition, the highest commit point reached: every record below it is settled."""

    def write(self, routed: list[tuple[str, PairRecord]]) -> None:
        """Take records without their offsets (unused: the runner calls write_sourced)."""
        self.write_sourced(routed, [None] * len(routed))

    def write_sourced(self, routed: list[tuple[str, PairRecord]], sources: list[Message | None]) -> None:
        """Hold each record for the desk, its offset open until the desk settles it; skip one read again."""
        for (_, record), msg in zip(routed, sources, strict=True):
            handle = None
            if msg is not None:
                tp, offset = TopicPartition(msg.topic, msg.partition), msg.offset
                handle = (tp, offset)
                offsets = self.open.setdefault(tp, {})
                if offset in offsets or offset < self.settled_below.get(tp, 0):
                    # Read again from the group's offset (a rebalance, fresh clients): the desk holds the pair or
                    # wrote its decision, so not again. The group's offset is behind ours (a commit failed): resend.
                    self.committed.pop(tp, None)
                    continue
                offsets[offset] = False
            self.waiting.append((record, handle))

    def take(self, limit: int) -> list[tuple[PairRecord, Handle | None]]:
        """Up to `limit` held records, oldest first."""
        return [self.waiting.popleft() for _ in range(min(limit, len(self.waiting)))]

    def settle(self, handles: list[Any]) -> None:
        """Mark these (partition, offset) handles settled; unknown ones are ignored."""
        for handle in handles:
            if handle is None:
                continue
            tp, offset = handle
            offsets = self.open.get(tp)
            if offsets is not None and offset in offsets:
                offsets[offset] = True

    def due(self) -> bool:
        """Every batch is a checkpoint: dead letters are acknowledged and settled offsets committed at once."""
        return True

    def flush(self, offsets: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Nothing to write; note how far polling got and return what is safe to commit."""
        for tp, offset in offsets.items():
            self.polled_to[tp] = max(self.polled_to.get(tp, 0), offset)
        return self.safe_offsets()

    def safe_offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the first offset still open (or where polling got to), where it moved since the last call."""
        moved: dict[TopicPartition, int] = {}
        for tp, polled in self.polled_to.items():
            offsets = self.open.get(tp, {})
            point = commit_point(offsets, polled)
            if point is None or point == self.committed.get(tp):
                continue
            moved[tp] = self.committed[tp] = point
            self.settled_below[tp] = max(point, self.settled_below.get(tp, 0))
            for offset in [o for o in offsets if o < point]:
                del offsets[offset]
        return moved

    def stored_offsets(self) -> Mapping[TopicPartition, int]:
        """None of its own: the group's committed offsets are where the desk resumes."""
        return {}


def commit_point(open_offsets: dict[int, bool], polled_to: int | None = None) -> int | None:
    """The offset to commit on a partition: the first still-open one, else where polling got to.

    `open_offsets` maps each offset handed out and not yet committed to whether it is settled;
    `polled_to` is one past the last message processed (dead letters included). Without it,
    one past the last settled offset; None when nothing was handed out.
    """
    unsettled = [o for o, settled in open_offsets.items() if not settled]
    if polled_to is not None:
        # Never past polled_to: offsets read after it (a batch whose dead letters were not acknowledged) may
        # hold a dead letter below their first open pair.
        return min([polled_to, *unsettled])
    if unsettled:
        return min(unsettled)
    return max(open_offsets) + 1 if open_offsets else None
