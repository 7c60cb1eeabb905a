"""The consume-transform-produce loop that binds a pure stage to Kafka topics.

One iteration, in this order (the order is the guarantee):
  1. poll up to kafka.max_batch messages from the input topic;
  2. decode them; an undecodable message goes to the dead-letter topic with the error;
  3. call the stage on the decoded batch; a stage that raises sends the whole batch to
     the dead-letter topic with the exception, and the loop goes on;
  4. produce every routed record to its route's topic, and every failure to the
     dead-letter topic;
  5. flush the producer and check that every message was acknowledged (acks=all);
  6. only then commit the input offsets (auto-commit is off).
A crash anywhere before 6 re-delivers the batch: at-least-once, never lost. A stop
request (SIGTERM in a service, an Event in tests) is honoured between batches, so the
current batch is finished, flushed and committed before the clients close.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from synpref.shared.config import Settings, TopicSettings
from synpref.shared.kafka import metrics
from synpref.shared.kafka.clients import make_consumer, make_producer
from synpref.shared.kafka.codec import Outgoing, PayloadError, dead_letter, decode_record, encode_record
from synpref.shared.stage import Stage, StageResult
from synpref.v1.pair_pb2 import PairRecord

log = logging.getLogger(__name__)

ROUTES = frozenset(TopicSettings.model_fields)


class DeliveryError(KafkaError):
    """Outputs of a batch were not acknowledged: its offsets stay uncommitted."""


class Message(Protocol):
    """What the runner reads from a consumed message (kafka-python's ConsumerRecord has it)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any


@dataclass
class BatchPlan:
    """What one batch turns into: messages to produce and the counts behind them."""

    outgoing: list[Outgoing] = field(default_factory=list)
    emitted: Counter[str] = field(default_factory=Counter)
    """Records produced per route."""
    failed: Counter[str] = field(default_factory=Counter)
    """Inputs that went to the dead-letter topic, per kind: undecodable, failed, stage-error, bad-route."""
    dead_lettered: int = 0
    processed: int = 0


# Room left under max_message_bytes for the key, headers and record framing of an output.
FRAMING_ALLOWANCE_BYTES = 16 * 1024


def plan_batch(
    messages: Sequence[Message], stage: Stage, topics: TopicSettings, service: str, max_bytes: int | None = None
) -> BatchPlan:
    """Decode, run the stage, and route: everything of a batch except the I/O.

    An output over `max_bytes` would be refused by the producer and stop the service on
    every restart; it goes to the dead-letter topic as its input message (which the
    broker did accept) instead.
    """
    plan = BatchPlan(processed=len(messages))

    def to_dlq(msg: Message | None, kind: str, reason: str, record: PairRecord | None = None) -> None:
        if record is not None:
            encoded = encode_record(record, topics.dead_letter)
            key, value, headers = encoded.key, encoded.value, encoded.headers
        else:
            assert msg is not None
            key, value, headers = msg.key, msg.value, msg.headers
        plan.outgoing.append(
            dead_letter(
                topics.dead_letter,
                key=key,
                value=value,
                headers=headers,
                kind=kind,
                reason=reason,
                service=service,
                source_topic=msg.topic if msg else "",
                source_partition=msg.partition if msg else -1,
                source_offset=msg.offset if msg else -1,
            )
        )
        plan.dead_lettered += 1

    decoded: list[tuple[Message, PairRecord]] = []
    for msg in messages:
        try:
            decoded.append((msg, decode_record(msg.value, msg.headers)))
        except PayloadError as exc:
            plan.failed["undecodable"] += 1
            to_dlq(msg, "undecodable", str(exc))
    if not decoded:
        return plan

    try:
        result = stage([record for _, record in decoded])
        if not isinstance(result, StageResult):
            raise TypeError(f"stage returned {type(result).__name__}, not StageResult")
    except Exception as exc:
        log.exception("%s: stage raised on a batch of %d; sending it to the dead-letter topic", service, len(decoded))
        reason = f"stage raised {type(exc).__name__}: {exc}"
        for msg, _ in decoded:
            plan.failed["stage-error"] += 1
            to_dlq(msg, "stage-error", reason)
        return plan

    # Stage outputs name no source message; find it by pair id for the dead-letter headers.
    source = {record.pair.id: msg for msg, record in decoded}
    for route, record in result.routed:
        if route not in ROUTES:
            plan.failed["bad-route"] += 1
            to_dlq(source.get(record.pair.id), "bad-route", f"stage emitted to unknown route {route!r}", record)
            continue
        encoded = encode_record(record, getattr(topics, route))
        if max_bytes is not None and len(encoded.value) > max_bytes - FRAMING_ALLOWANCE_BYTES:
            plan.failed["too-large"] += 1
            reason = (
                f"output for route {route!r} is {len(encoded.value)} bytes, over kafka.max_message_bytes={max_bytes}"
            )
            source_msg = source.get(record.pair.id) or source.get(record.lineage.original_id)
            if source_msg is not None:
                to_dlq(source_msg, "too-large", reason)
            else:
                log.error("%s: %s; pair %s has no source message to dead-letter", service, reason, record.pair.id)
            continue
        plan.outgoing.append(encoded)
        plan.emitted[route] += 1
    for record, reason in result.failed:
        plan.failed["failed"] += 1
        to_dlq(source.get(record.pair.id), "failed", reason, record)
    return plan


def commit_offsets(messages: Sequence[Message]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit after a batch: one past the last message of each partition."""
    last: dict[TopicPartition, int] = {}
    for msg in messages:
        tp = TopicPartition(msg.topic, msg.partition)
        last[tp] = max(last.get(tp, -1), msg.offset)
    return {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in last.items()}


class _LogRebalance(ConsumerRebalanceListener):
    """Logs partition moves. Nothing to commit on revoke: each batch is committed before the next poll."""

    def __init__(self, service: str) -> None:
        self.service = service

    def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            log.info("%s: partitions revoked: %s", self.service, sorted((tp.topic, tp.partition) for tp in revoked))
        for tp in revoked or ():
            # Another member owns this partition now: its lag is that member's to report.
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(self.service, tp.topic, str(tp.partition))

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("%s: partitions assigned: %s", self.service, sorted((tp.topic, tp.partition) for tp in assigned))


class RunnerStats:
    """Counters for the Status RPC; updated by the runner thread, read by gRPC threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.processed = 0
        self.failed = 0
        self.dead_lettered = 0
        self.batches = 0
        self.counters: Counter[str] = Counter()

    def add(self, plan: BatchPlan) -> None:
        with self._lock:
            self.processed += plan.processed
            self.failed += sum(plan.failed.values())
            self.dead_lettered += plan.dead_lettered
            self.batches += 1
            for route, n in plan.emitted.items():
                self.counters[f"emitted.{route}"] += n
            for kind, n in plan.failed.items():
                self.counters[f"failed.{kind}"] += n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "processed": self.processed,
                "failed": self.failed,
                "dead_lettered": self.dead_lettered,
                "batches": self.batches,
                "counters": dict(self.counters),
            }


class StageRunner:
    """Runs `stage` over the input topic of `input_route` until `stop` is set."""

    def __init__(
        self,
        settings: Settings,
        stage: Stage,
        *,
        service: str,
        input_route: str = "raw",
        group_id: str | None = None,
        stop: threading.Event | None = None,
        stats: RunnerStats | None = None,
        flush_timeout_s: float = 120.0,
    ) -> None:
        if input_route not in ROUTES:
            raise ValueError(f"unknown input route {input_route!r}; one of {sorted(ROUTES)}")
        self.settings = settings
        self.stage = stage
        self.service = service
        self.input_topic: str = getattr(settings.topics, input_route)
        self.group_id = group_id or settings.service.group_id or f"synpref-{service}"
        self.stop = stop or threading.Event()
        self.stats = stats or RunnerStats()
        self.flush_timeout_s = flush_timeout_s
        self.consumer: Any = None
        self.producer: Any = None

    def open(self) -> None:
        kafka = self.settings.kafka
        self.producer = make_producer(kafka)
        self.consumer = make_consumer(kafka, self.group_id)
        self.consumer.subscribe([self.input_topic], listener=_LogRebalance(self.service))
        log.info("%s: consuming %s as group %s", self.service, self.input_topic, self.group_id)

    def run(self) -> None:
        """Loop until stop is set, then finish the batch in hand, commit, and close the clients."""
        if self.consumer is None:
            self.open()
        try:
            while not self.stop.is_set():
                self.run_once()
        finally:
            self.close()

    def run_once(self) -> int:
        """Poll one batch and take it through to its commit; returns how many messages it held."""
        polled = self.consumer.poll(
            timeout_ms=self.settings.kafka.consumer_poll_ms, max_records=self.settings.kafka.max_batch
        )
        messages = [msg for batch in polled.values() for msg in batch]
        if not messages:
            return 0
        started = time.perf_counter()
        plan = plan_batch(
            messages, self.stage, self.settings.topics, self.service, self.settings.kafka.max_message_bytes
        )
        self._deliver(plan.outgoing)
        self._commit(messages)
        self._observe(plan, time.perf_counter() - started)
        return len(messages)

    def _deliver(self, outgoing: list[Outgoing]) -> None:
        futures = [self.producer.send(out.topic, key=out.key, value=out.value, headers=out.headers) for out in outgoing]
        self.producer.flush(timeout=self.flush_timeout_s)
        errors = [f.exception for f in futures if not f.is_done or f.failed()]
        if errors:
            # Not committing is what keeps the batch: the next owner of these partitions re-reads it.
            raise DeliveryError(f"{len(errors)} of {len(futures)} outputs not acknowledged; first: {errors[0]!r}")

    def _commit(self, messages: Sequence[Message]) -> None:
        try:
            self.consumer.commit(commit_offsets(messages))
        except CommitFailedError as exc:
            # The group rebalanced while we worked: the new owner re-reads the batch (a duplicate, not a loss).
            log.warning("%s: commit failed after a rebalance, the batch will be re-delivered: %s", self.service, exc)

    def _observe(self, plan: BatchPlan, seconds: float) -> None:
        self.stats.add(plan)
        service = self.service
        metrics.PROCESSED.labels(service).inc(plan.processed)
        metrics.DEAD_LETTERED.labels(service).inc(plan.dead_lettered)
        metrics.BATCHES.labels(service).inc()
        metrics.BATCH_SECONDS.labels(service).observe(seconds)
        for route, n in plan.emitted.items():
            metrics.EMITTED.labels(service, route).inc(n)
        for kind, n in plan.failed.items():
            metrics.FAILED.labels(service, kind).inc(n)
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = self.consumer.position(tp, timeout_ms=0)
            except Exception:  # no position yet for a partition just assigned: no lag to report
                continue
            if position is not None:
                metrics.CONSUMER_LAG.labels(service, tp.topic, str(tp.partition)).set(max(0, highwater - position))

    def close(self) -> None:
        consumer, producer, self.consumer, self.producer = self.consumer, self.producer, None, None
        if producer is not None:
            producer.close(timeout=self.flush_timeout_s)
        if consumer is not None:
            # Offsets were committed batch by batch; leaving the group now hands partitions over at once.
            consumer.close(autocommit=False)
        log.info("%s: stopped after %s", self.service, self.stats.snapshot())
