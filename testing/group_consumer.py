"""Fakes of kafka-python 3.0.12's clients, with its signatures, for the calls the product makes.

GroupConsumer is a group member on a fake clock, for tests of how long a batch may take (shared/kafka/runner.py):
kafka-python drops a member that goes longer than max.poll.interval.ms between polls (its heartbeat thread leaves
the group): its commit then fails, and once it rejoins it reads again from the committed offset. GroupConsumer plays
that on one partition. Topics holds topics as lists, as a broker does; TopicsConsumer reads them with its partitions
assigned by hand (the controller's executor). RecordingProducer acknowledges each send at once or at the next flush,
or fails the sends a test chooses; its futures are kafka-python's own. LimitedProducer is one on a Broker whose topics
take messages up to a size, refused as kafka-python 3.0.12's idempotent producer meets a refusal.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, IllegalStateError, KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
from kafka.future import Future
from kafka.producer.future import RecordMetadata
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.structs import OffsetAndMetadata, TopicPartition

Offsets = dict[TopicPartition, OffsetAndMetadata]
"""What commit and commit_async take: the next offset of each partition."""


class Clock:
    """A clock tests move by hand (`now`)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class GroupConsumer:
    """One partition `tp` as a group member sees it, with `poll_interval_ms` as max.poll.interval.ms.

    `seeks` and `commits` list the offsets sought and committed; `closes` the autocommit of each close."""

    def __init__(self, messages: list[ConsumerRecord], clock: Clock, tp: TopicPartition, poll_interval_ms: int) -> None:
        self.config = {"max_poll_interval_ms": poll_interval_ms}
        self.messages, self.clock, self.tp = messages, clock, tp
        self.committed = self.pos = 0
        self.last_poll = clock()
        self.failed_commits = 0
        self.longest_gap = 0.0
        self.seeks: list[int] = []
        self.commits: list[int] = []
        self.closes: list[bool] = []

    def _dropped(self) -> bool:
        return self.clock() - self.last_poll > self.config["max_poll_interval_ms"] / 1000

    def poll(
        self, timeout_ms: int = 0, max_records: int | None = None, update_offsets: bool = True
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        if self._dropped():
            self.pos = self.committed  # the rejoin: the position comes from the group's committed offset
        self.longest_gap = max(self.longest_gap, self.clock() - self.last_poll)
        self.last_poll = self.clock()
        batch = [m for m in self.messages if m.offset >= self.pos][:max_records]
        if batch and update_offsets:
            self.pos = batch[-1].offset + 1
        return {self.tp: batch} if batch else {}

    def commit(self, offsets: Offsets | None = None, timeout_ms: int | None = None) -> None:
        if self._dropped():
            self.failed_commits += 1
            raise CommitFailedError("the consumer was kicked out of the group")
        self.committed = self.pos if offsets is None else offsets[self.tp].offset  # None: what was consumed
        self.commits.append(self.committed)

    def commit_async(self, offsets: Offsets | None = None, callback: Callable[..., Any] | None = None) -> Future:
        """The commit's outcome goes to the returned future and to `callback(offsets, response)`, never raised."""
        future = Future()
        if callback is not None:
            future.add_both(lambda response: callback(offsets, response))
        try:
            self.commit(offsets)
        except CommitFailedError as exc:
            return future.failure(exc)
        return future.success(None)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append(offset)
        self.pos = offset

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    def highwater(self, partition: TopicPartition) -> int:
        return self.messages[-1].offset + 1 if self.messages else 0

    def position(self, partition: TopicPartition, timeout_ms: int | None = None) -> int:
        return self.pos

    def close(self, autocommit: bool = True, timeout_ms: int | None = None) -> None:
        self.closes.append(autocommit)


class Topics:
    """Topics of `partitions` partitions each, held as lists of records: what a broker holds.

    A message goes to the partition of its key's crc32 (Kafka's own partitioner hashes with murmur2: any stable hash
    keeps each key's messages in order on one partition)."""

    def __init__(self, partitions: int = 1) -> None:
        self.partitions = partitions
        self.logs: dict[TopicPartition, list[ConsumerRecord]] = {}

    def append(self, topic: str, key: bytes | None, value: bytes | None, headers: list[Any]) -> ConsumerRecord:
        tp = TopicPartition(topic, zlib.crc32(key or b"") % self.partitions)
        log = self.logs.setdefault(tp, [])
        header_size = sum(len(name) + len(v) for name, v in headers) if headers else -1
        log.append(ConsumerRecord(topic, tp.partition, 0, len(log), 0, 0, key, value, headers, None,
                                  len(key) if key else -1, len(value) if value else -1, header_size))  # fmt: skip
        return log[-1]

    def log(self, partition: TopicPartition) -> list[ConsumerRecord]:
        return self.logs.get(partition, [])

    def messages(self, topic: str) -> list[ConsumerRecord]:
        """Every message of `topic`, partition by partition."""
        return [m for p in range(self.partitions) for m in self.log(TopicPartition(topic, p))]


class TopicsConsumer:
    """A consumer of `topics` with its partitions assigned by hand (no group), as the controller's executor uses one.

    `before_poll(n)` runs as the n-th poll (from 1) starts: the rest of the pipeline at work meanwhile. A poll hands
    out the partitions in order, or in reverse order when `reverse` (which comes first is up to the broker)."""

    def __init__(
        self, topics: Topics, before_poll: Callable[[int], None] = lambda n: None, reverse: bool = False
    ) -> None:
        self.topics, self.before_poll, self.reverse = topics, before_poll, reverse
        self.positions: dict[TopicPartition, int] = {}
        self.polls, self.closed = 0, False

    def _assigned(self, partition: TopicPartition) -> TopicPartition:
        if partition not in self.positions:
            raise IllegalStateError(f"Partition {partition} is not assigned")
        return partition

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.topics.partitions))

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.positions = dict.fromkeys(partitions, 0)

    def assignment(self) -> set[TopicPartition]:
        return set(self.positions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.positions[self._assigned(partition)] = offset

    def seek_to_end(self, *partitions: TopicPartition) -> None:
        for tp in partitions or list(self.positions):
            self.positions[self._assigned(tp)] = len(self.topics.log(tp))

    def position(self, partition: TopicPartition, timeout_ms: int | None = None) -> int | None:
        return self.positions[self._assigned(partition)]

    def highwater(self, partition: TopicPartition) -> int | None:
        return len(self.topics.log(self._assigned(partition)))

    def poll(
        self, timeout_ms: int = 0, max_records: int | None = None, update_offsets: bool = True
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        self.polls += 1
        self.before_poll(self.polls)
        left = max_records
        polled: dict[TopicPartition, list[ConsumerRecord]] = {}
        for tp in sorted(self.positions, reverse=self.reverse):
            records = self.topics.log(tp)[self.positions[tp] :][:left]
            if records:
                polled[tp] = records
                left = None if left is None else left - len(records)
                if update_offsets:
                    self.positions[tp] += len(records)
        return polled

    def close(self, autocommit: bool = True, timeout_ms: int | None = None) -> None:
        self.closed = True


class Sent(Future):
    """A send's future: kafka-python's Future (callbacks and errbacks run as it completes, or at once when added to one
    already done), with FutureRecordMetadata's get(timeout), where the wait runs `wait` (the IO thread going on)."""

    def __init__(self, wait: Callable[[], None]) -> None:
        super().__init__()
        self._wait = wait

    def get(self, timeout: float | None = None) -> Any:
        if not self.is_done:
            self._wait()
        if not self.is_done:
            raise KafkaTimeoutError(f"Timeout after waiting for {timeout} secs.")
        if self.failed():
            raise self.exception
        return self.value


Refusal = Callable[[str, bytes | None], BaseException | None]
"""(topic, key) -> the exception the broker fails that send with, or None to acknowledge it."""


class RecordingProducer:
    """A producer that keeps every send in `sent` (topic, value, headers) and acknowledges it at once, or at the next
    flush when `at_flush` (a batch lingering in a real producer), appending it to `topics`; `fail` chooses the sends
    that fail instead, and how. send() refuses at once a message over `max_request_size` by kafka-python's own estimate,
    as kafka-python does. `flushes` counts the flushes."""

    def __init__(
        self,
        topics: Topics | None = None,
        fail: Refusal | None = None,
        at_flush: bool = False,
        max_request_size: int | None = None,
    ) -> None:
        self.topics = Topics() if topics is None else topics
        self.fail, self.at_flush, self.max_request_size = fail, at_flush, max_request_size
        self.sent: list[tuple[str, bytes | None, Any]] = []
        self.pending: list[tuple[Sent, str, bytes | None, bytes | None, Any]] = []
        self.flushes, self.closed = 0, False

    @property
    def sent_topics(self) -> list[str]:
        return [topic for topic, _, _ in self.sent]

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Sent:
        if self.closed:
            raise IllegalStateError("KafkaProducer already closed!")
        if self.max_request_size is not None:
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers or [])
            if size > self.max_request_size:
                raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized which is larger than the "
                                               "maximum request size you have configured with the max_request_size "
                                               "configuration")  # fmt: skip
        self.sent.append((topic, value, headers))
        future = Sent(self.deliver)
        self.pending.append((future, topic, key, value, headers or []))
        if not self.at_flush:
            self.deliver()
        return future

    def deliver(self) -> None:
        """Complete every send not done yet, as the IO thread does once the broker answers."""
        pending, self.pending = self.pending, []
        for future, topic, key, value, headers in pending:
            error = self.fail(topic, key) if self.fail is not None else None
            if error is not None:
                future.failure(error)
                continue
            m = self.topics.append(topic, key, value, headers)
            tp = TopicPartition(topic, m.partition)
            sizes = m.serialized_key_size, m.serialized_value_size, m.serialized_header_size
            future.success(RecordMetadata(topic, m.partition, tp, m.offset, m.timestamp, None, *sizes))

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1
        self.deliver()

    def close(self, timeout: float | None = None, null_logger: bool = False) -> None:
        self.closed = True


class Broker:
    """Topics that take at most `limits[topic]` bytes a message (the broker's own count: key, value and headers); one
    over it is refused with `refusal`. `error`, when set, fails every send instead (a broker away: the delivery timed
    out). What it acknowledged is in `topics`, and in `acked` (topic, value, headers) in the order acknowledged;
    `events` lists ("ack", topic) as each is, where a test adds its commits to see what came first."""

    def __init__(self, limits: dict[str, int], refusal: type[KafkaError] = MessageSizeTooLargeError) -> None:
        self.limits, self.refusal = limits, refusal
        self.error: KafkaError | None = None
        self.topics = Topics()
        self.acked: list[tuple[str, bytes | None, Any]] = []
        self.events: list[tuple[str, Any]] = []

    def refuses(self, topic: str, key: bytes | None, value: bytes | None, headers: list[Any]) -> bool:
        size = len(key or b"") + len(value or b"") + sum(len(name) + len(v) for name, v in headers)
        return size > self.limits.get(topic, size)


class LimitedProducer(RecordingProducer):
    """A RecordingProducer on `broker`, its sends acknowledged at the flush (or in a future's get(), as the IO thread
    goes on). As kafka-python 3.0.12's idempotent producer, once the broker refuses a message the producer fails for
    good: the refused send fails first and every other send of the flush with the same exception, sent before it or
    not. `flush_error` is raised by every flush before any result (3.0.12 once it split a refused batch)."""

    def __init__(
        self, broker: Broker, flush_error: KafkaError | None = None, max_request_size: int | None = None
    ) -> None:
        super().__init__(broker.topics, at_flush=True, max_request_size=max_request_size)
        self.broker, self.flush_error = broker, flush_error

    def deliver(self) -> None:
        pending, broker = self.pending, self.broker
        refused = next((p for p in pending if broker.refuses(*p[1:])), None)
        error = broker.error or (broker.refusal() if refused is not None else None)
        if error is None:
            super().deliver()
            for _, topic, _, value, headers in pending:
                broker.acked.append((topic, value, headers))
                broker.events.append(("ack", topic))
            return
        self.pending = []
        for future, *_ in sorted(pending, key=lambda p: p is not refused):  # the refused one fails first
            future.failure(error)

    def flush(self, timeout: float | None = None) -> None:
        if self.flush_error is not None:
            raise self.flush_error
        super().flush(timeout)
