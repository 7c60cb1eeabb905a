"""A Kafka group member on a fake clock, for tests of how long a batch may take (shared/kafka/runner.py).

kafka-python drops a member that goes longer than max.poll.interval.ms between polls (its heartbeat thread leaves
the group): its commit then fails, and once it rejoins it reads again from the committed offset. GroupConsumer
plays that on one partition; RecordingProducer acknowledges every send at once and keeps what was sent.
"""

from __future__ import annotations

from typing import Any

from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata, TopicPartition


class Clock:
    """A clock tests move by hand (`now`)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class GroupConsumer:
    """One partition `tp` as a group member sees it, with `poll_interval_ms` as max.poll.interval.ms."""

    def __init__(self, messages: list[ConsumerRecord], clock: Clock, tp: TopicPartition, poll_interval_ms: int) -> None:
        self.config = {"max_poll_interval_ms": poll_interval_ms}
        self.messages, self.clock, self.tp = messages, clock, tp
        self.committed = self.pos = 0
        self.last_poll = clock()
        self.failed_commits = 0
        self.longest_gap = 0.0

    def _dropped(self) -> bool:
        return self.clock() - self.last_poll > self.config["max_poll_interval_ms"] / 1000

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        if self._dropped():
            self.pos = self.committed  # the rejoin: the position comes from the group's committed offset
        self.longest_gap = max(self.longest_gap, self.clock() - self.last_poll)
        self.last_poll = self.clock()
        batch = [m for m in self.messages if m.offset >= self.pos][:max_records]
        if batch:
            self.pos = batch[-1].offset + 1
        return {self.tp: batch} if batch else {}

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        if self._dropped():
            self.failed_commits += 1
            raise CommitFailedError("the consumer was kicked out of the group")
        self.committed = offsets[self.tp].offset

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.pos = offset

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.messages)

    def position(self, tp: TopicPartition, timeout_ms: int = 0) -> int:
        return self.pos


class Acked:
    """A send the broker acknowledged."""

    is_done, exception = True, None

    def failed(self) -> bool:
        return False


class RecordingProducer:
    """A producer whose every send is acknowledged at once; `sent` holds (topic, value, headers)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, Any]] = []

    def send(self, topic: str, key: Any, value: bytes, headers: Any) -> Acked:
        self.sent.append((topic, value, headers))
        return Acked()

    def flush(self, timeout: float) -> None:
        pass
