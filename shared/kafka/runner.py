"""The consume-transform-produce loop that binds a pure stage to Kafka topics.

One iteration, in this order (the order is the guarantee):
  1. poll up to kafka.max_batch messages from the input topic;
  2. decode them; an undecodable message goes to the dead-letter topic with the error;
  3. call the stage on the decoded batch; if it raises, call it again one record at a
     time, so only the records it raises on go to the dead-letter topic;
  4. send every routed record to its route's topic (or hand it to the sink, if the
     runner has one), every failure to the dead-letter topic; an output or dead letter
     the topic would refuse as too large is dead-lettered without its payload instead;
  5. checkpoint, quix-streams' order: flush the sink, flush the producer and check that
     every message was acknowledged (acks=all), then commit the input offsets (auto-commit
     is off). Without a sink every batch is a checkpoint; with one, when the sink is due.
A crash anywhere before 5 re-delivers the batch: at-least-once, never lost. A stop
request (SIGTERM in a service, an Event in tests) is honoured between batches, so the
current batch is finished and checkpointed before the clients close.

A sink that keeps the input offsets itself (the dataset writer's manifest) is a commit
point rather than an output: it is flushed after the producer's acknowledgements, and on
assignment each partition is sought to the offset it kept (exactly-once into the sink).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from synpref.shared.config import STAGE_ROUTES, Settings, TopicSettings
from synpref.shared.kafka import metrics
from synpref.shared.kafka.admin import message_limits
from synpref.shared.kafka.clients import DeliveryError, Outbox, make_consumer, make_producer, poll_group
from synpref.shared.kafka.codec import Message, Outgoing, PayloadError, dead_letter_for, decode_record, encode_record
from synpref.shared.stage import Stage, StageResult
from synpref.v1.pair_pb2 import PairRecord

log = logging.getLogger(__name__)

ROUTES = frozenset(TopicSettings.model_fields) | frozenset(STAGE_ROUTES)
"""Topic fields, and the stage routes (raw, scored, ...) that go to the topic of each record's lineage.stage."""
__all__ = ["ROUTES", "DeliveryError", "Message", "RunnerStats", "Sink", "StageRunner", "plan_batch"]


class Sink(Protocol):
    """Where routed records go instead of Kafka topics (quix-streams' BatchingSink).

    A sink that also defines write_sourced(routed, sources) is handed each record's input
    message (or None) instead of write: the desk tracks offsets per record.
    """

    keeps_offsets: bool
    """True when flush stores the offsets as the sink's own commit point (and stored_offsets reads them)."""

    def write(self, routed: list[tuple[str, PairRecord]]) -> None:
        """Take the routed records of one batch; durable only once flush returns."""

    def due(self) -> bool:
        """Whether enough is buffered (rows, age) to checkpoint now."""

    def flush(self, offsets: Mapping[TopicPartition, int]) -> Mapping[TopicPartition, int] | None:
        """Make everything written durable; `offsets` are the next offsets it covers.

        A sink that holds records back (the desk, until they are decided) returns the
        offsets that are safe to commit instead; None commits `offsets`.
        """

    def stored_offsets(self) -> Mapping[TopicPartition, int]:
        """Where each partition resumes (only called when keeps_offsets)."""


@dataclass
class BatchPlan:
    """What one batch turns into: messages to produce and the counts behind them."""

    outgoing: list[Outgoing] = field(default_factory=list)
    sunk: list[tuple[str, PairRecord]] = field(default_factory=list)
    """Routed records for the sink (a runner with a sink), instead of outgoing messages."""
    sunk_from: list[Message | None] = field(default_factory=list)
    """The input message of each sunk record (by pair id, in order), for a sink with `write_sourced`."""
    emitted: Counter[str] = field(default_factory=Counter)
    """Records produced (or sunk) per route."""
    failed: Counter[str] = field(default_factory=Counter)
    """Inputs that went to the dead-letter topic, per kind: undecodable, failed, stage-error, bad-route, too-large."""
    dead_lettered: int = 0
    processed: int = 0


def call_stage(stage: Stage, batch: list[PairRecord]) -> StageResult:
    """Run `stage` on `batch`; TypeError when it returns anything but a StageResult."""
    result = stage(batch)
    if not isinstance(result, StageResult):
        raise TypeError(f"stage returned {type(result).__name__}, not StageResult")
    return result


def plan_batch(
    messages: Sequence[Message],
    stage: Stage,
    topics: TopicSettings,
    service: str,
    max_bytes: int | None = None,
    topic_limits: Mapping[str, int] | None = None,
    to_sink: bool = False,
) -> BatchPlan:
    """Decode, run the stage, and route: everything of a batch except the I/O.

    A message over the limit of its topic (`max_bytes`, or less where `topic_limits` says
    so) would be refused and stop the service on every restart: an output that large is
    dead-lettered as its input, and a dead letter that large keeps only its provenance.
    """
    plan = BatchPlan(processed=len(messages))
    limits = topic_limits or {}

    def limit(topic: str) -> int | None:
        return min(max_bytes, limits.get(topic, max_bytes)) if max_bytes is not None else limits.get(topic)

    def to_dlq(msg: Message | None, kind: str, reason: str, record: PairRecord | None = None) -> None:
        dlq = topics.dead_letter
        plan.outgoing.append(dead_letter_for(msg, dlq, kind=kind, reason=reason, service=service, record=record,
                                             max_bytes=limit(dlq)))  # fmt: skip
        plan.failed[kind] += 1
        plan.dead_lettered += 1

    decoded: list[tuple[Message, PairRecord]] = []
    arrivals: dict[str, list[Message]] = {}
    for msg in messages:
        try:
            decoded.append((msg, decode_record(msg.value, msg.headers)))
        except PayloadError as exc:
            to_dlq(msg, "undecodable", str(exc))
    if not decoded:
        return plan
    for msg, record in decoded:
        arrivals.setdefault(record.pair.id, []).append(msg)

    try:
        results = [call_stage(stage, [record for _, record in decoded])]
    except Exception as exc:
        results = []
        if len(decoded) == 1:
            log.warning("%s: stage raised on one record: %r", service, exc)
            to_dlq(decoded[0][0], "stage-error", stage_error(exc))
        else:
            log.warning("%s: stage raised on a batch of %d (%r); retrying one record at a time",
                        service, len(decoded), exc)  # fmt: skip
            for msg, record in decoded:
                try:
                    results.append(call_stage(stage, [record]))
                except Exception as one:
                    log.warning("%s: stage raised on %s:%d@%d: %r", service, msg.topic, msg.partition, msg.offset, one)
                    to_dlq(msg, "stage-error", stage_error(one))

    # Stage outputs name no source message; find it by pair id for the dead-letter headers.
    source = {record.pair.id: msg for msg, record in decoded}
    for result in results:
        for route, record in result.routed:
            if route not in ROUTES:
                to_dlq(source.get(record.pair.id), "bad-route", f"stage emitted to unknown route {route!r}", record)
            elif to_sink:
                plan.sunk.append((route, record))
                # A pair id seen twice in one batch takes its messages in turn, so each offset is sunk once.
                same_id = arrivals.get(record.pair.id)
                plan.sunk_from.append(same_id.pop(0) if same_id else None)
                plan.emitted[route] += 1
            else:
                encoded = encode_record(record, topics.stage_topic(route, record.lineage.stage))
                cap = limit(encoded.topic)
                if cap is None or encoded.size <= cap:
                    plan.outgoing.append(encoded)
                    plan.emitted[route] += 1
                    continue
                reason = f"output for route {route!r} is {encoded.size} bytes, over the {cap} of topic {encoded.topic}"
                source_msg = source.get(record.pair.id) or source.get(record.lineage.original_id)
                if source_msg is not None:
                    to_dlq(source_msg, "too-large", reason)
                else:
                    log.error("%s: %s; pair %s has no source message to dead-letter", service, reason, record.pair.id)
        for record, reason in result.failed:
            to_dlq(source.get(record.pair.id), "failed", reason, record)
    return plan


def stage_error(exc: Exception) -> str:
    """The failure reason recorded for a stage that raised `exc`."""
    return f"stage raised {type(exc).__name__}: {exc}"


def next_offsets(messages: Sequence[Message]) -> dict[TopicPartition, int]:
    """One past the last message of each partition: where a consumer resumes after them."""
    last: dict[TopicPartition, int] = {}
    for msg in messages:
        tp = TopicPartition(msg.topic, msg.partition)
        last[tp] = max(last.get(tp, -1), msg.offset)
    return {tp: offset + 1 for tp, offset in last.items()}


def commit_offsets(messages: Sequence[Message]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit after a batch: one past the last message of each partition."""
    return {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in next_offsets(messages).items()}


class _Rebalance(ConsumerRebalanceListener):
    """Checkpoints what is buffered before partitions move; seeks a sink's partitions to its offsets."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner

    def on_partitions_revoked(self, revoked: Any) -> None:
        service = self.runner.service
        if revoked:
            log.info("%s: partitions revoked: %s", service, sorted((tp.topic, tp.partition) for tp in revoked))
            # Still the owner: whatever a sink buffered for these partitions is flushed and committed now.
            # kafka-python 3 calls this on the consumer's IO thread, where a blocking commit raises:
            # the commit is queued instead, ahead of the JoinGroup on the coordinator's connection.
            self.runner.checkpoint(blocking=False)
        metrics.forget_lag(service, revoked or ())

    def on_partitions_assigned(self, assigned: Any) -> None:
        runner = self.runner
        log.info("%s: partitions assigned: %s", runner.service, sorted((tp.topic, tp.partition) for tp in assigned))
        if runner.sink is None or not runner.sink.keeps_offsets:
            return
        stored = runner.sink.stored_offsets()
        for tp in assigned:
            if tp in stored:
                runner.consumer.seek(tp, stored[tp])
                log.info("%s: %s:%d resumes at stored offset %d", runner.service, tp.topic, tp.partition, stored[tp])


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
        """Fold one batch's outcome into the totals and the per-route and per-kind counters (thread-safe)."""
        with self._lock:
            self.processed += plan.processed
            self.failed += sum(plan.failed.values())
            self.dead_lettered += plan.dead_lettered
            self.batches += 1
            for route, n in plan.emitted.items():
                self.counters[f"emitted.{route}"] += n
            for kind, n in plan.failed.items():
                self.counters[f"failed.{kind}"] += n

    def count(self, name: str, n: int) -> None:
        """A counter of the service's own (a sink's rows written, say)."""
        with self._lock:
            self.counters[name] += n

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of the totals and counters, as a plain dict."""
        with self._lock:
            return {
                "processed": self.processed,
                "failed": self.failed,
                "dead_lettered": self.dead_lettered,
                "batches": self.batches,
                "counters": dict(self.counters),
            }


class StageRunner:
    """Runs `stage` over the input topics of `input_route` (both stages' for a stage route) until `stop` is set.

    instance_id makes the consumer a static group member (group.instance.id): a restart
    with the same id takes its partitions back at once instead of waiting out
    kafka.session_timeout_ms for the group to drop the old member. Only for a service
    that runs one process per id (a second one with the same id fences the first).
    """

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
        sink: Sink | None = None,
        instance_id: str | None = None,
    ) -> None:
        if input_route not in ROUTES:
            raise ValueError(f"unknown input route {input_route!r}; one of {sorted(ROUTES)}")
        self.settings = settings
        self.stage = stage
        self.service = service
        self.input_topics: list[str] = settings.topics.topics_of(input_route)
        self.group_id = group_id or settings.service.group_id or f"synpref-{service}"
        self.stop = stop or threading.Event()
        self.stats = stats or RunnerStats()
        self.flush_timeout_s = flush_timeout_s
        self.sink = sink
        self.instance_id = instance_id
        self.topic_limits: dict[str, int] = {}
        self.consumer: Any = None
        self.producer: Any = None
        self.outbox: Outbox | None = None
        self._pending: dict[TopicPartition, int] = {}
        """Next offsets of everything processed since the last checkpoint."""

    def open(self) -> None:
        """Connect: read the output topics' message limits, create the producer and outbox, subscribe the consumer.

        A static `instance_id` makes the consumer a static group member.
        """
        kafka = self.settings.kafka
        self.topic_limits = self._read_limits()
        smallest = min([kafka.max_message_bytes, *self.topic_limits.values()])
        self.producer = make_producer(kafka, batch_size=min(256 * 1024, smallest))
        self.outbox = Outbox(self.producer, self.flush_timeout_s)
        static = {"group_instance_id": self.instance_id} if self.instance_id else {}
        self.consumer = make_consumer(kafka, self.group_id, **static)
        # Metadata first: a group leader that assigns before it knows the topics' partitions hands
        # out none, and kafka-python rejoins only once its metadata refreshes (minutes).
        for topic in self.input_topics:
            self.consumer.partitions_for_topic(topic)
        self.consumer.subscribe(self.input_topics, listener=_Rebalance(self))
        log.info("%s: consuming %s as group %s%s", self.service, ", ".join(self.input_topics), self.group_id,
                 f" (static member {self.instance_id})" if self.instance_id else "")  # fmt: skip

    def _read_limits(self) -> dict[str, int]:
        """max.message.bytes of the topics this runner writes, where smaller than the config's."""
        kafka, topics = self.settings.kafka, self.settings.topics
        try:
            found = message_limits(kafka, topics.all(), timeout_s=kafka.request_timeout_ms / 1000)
        except KafkaError as exc:  # no DescribeConfigs permission, say: the config's limit it is
            log.warning("%s: cannot read the topics' max.message.bytes (%s); assuming %d",
                        self.service, exc, kafka.max_message_bytes)  # fmt: skip
            return {}
        smaller = {topic: n for topic, n in found.items() if n < kafka.max_message_bytes}
        for topic, n in smaller.items():
            log.warning("%s: topic %s takes messages up to %d bytes, less than kafka.max_message_bytes=%d",
                        self.service, topic, n, kafka.max_message_bytes)  # fmt: skip
        return smaller

    def run(self) -> None:
        """Loop until stop is set, then checkpoint what is in hand and close the clients."""
        if self.consumer is None:
            self.open()
        try:
            while not self.stop.is_set():
                self.run_once()
            self.checkpoint()
        finally:
            self.close()

    def run_once(self) -> int:
        """Poll one batch and take it through (to its commit, unless a sink is not due); returns its size."""
        polled = poll_group(self.consumer, self.settings.kafka.consumer_poll_ms, self.settings.kafka.max_batch)
        messages = [msg for batch in polled.values() for msg in batch]
        if messages:
            started = time.perf_counter()
            plan = plan_batch(messages, self.stage, self.settings.topics, self.service,
                              self.settings.kafka.max_message_bytes, self.topic_limits,
                              to_sink=self.sink is not None)  # fmt: skip
            assert self.outbox is not None
            self.outbox.send(plan.outgoing)
            if self.sink is not None:
                write_sourced = getattr(self.sink, "write_sourced", None)
                if write_sourced is not None:
                    write_sourced(plan.sunk, plan.sunk_from)
                else:
                    self.sink.write(plan.sunk)
            self._pending.update(next_offsets(messages))
            if self.sink is None or self.sink.due():
                self.checkpoint()
            self._observe(plan, time.perf_counter() - started)
        elif self.sink is not None and self.sink.due():
            self.checkpoint()
        return len(messages)

    def checkpoint(self, blocking: bool = True) -> None:
        """Flush the sink, wait for every acknowledgement, commit (sent, not awaited, unless `blocking`)."""
        offsets, sink = self._pending, self.sink
        if not offsets or self.outbox is None:
            return
        safe: Mapping[TopicPartition, int] | None = None
        if sink is not None and not sink.keeps_offsets:
            safe = sink.flush(offsets)
        # Not committing is what keeps the batch when this raises: the next owner of its partitions re-reads it.
        self.outbox.flush()
        if sink is not None and sink.keeps_offsets:
            safe = sink.flush(offsets)
        self._pending = {}
        self.commit(offsets if safe is None else safe, blocking)

    def commit(self, offsets: Mapping[TopicPartition, int], blocking: bool = True) -> None:
        """Commit these next offsets now; only for what is already flushed and acknowledged."""
        if not offsets:
            return
        commits = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
        # Not blocking: a failure is logged by kafka-python's callback; the next owner re-reads the batch.
        self._commit(commits) if blocking else self.consumer.commit_async(commits)

    def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        try:
            self.consumer.commit(offsets)
        except CommitFailedError as exc:
            # The group rebalanced while we worked: the new owner re-reads the batch (a duplicate, not a loss).
            log.warning("%s: commit failed after a rebalance, the batch will be re-delivered: %s", self.service, exc)
        except KafkaError as exc:
            if self.sink is None or not self.sink.keeps_offsets:
                raise
            # The sink's stored offsets are the truth; Kafka's copy only feeds lag dashboards.
            log.warning("%s: Kafka offset commit failed (the sink has the offsets): %s", self.service, exc)

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
        metrics.report_lag(self.consumer, service)

    def close(self) -> None:
        """Close the producer (flushing within the timeout) and the consumer, without committing offsets."""
        consumer, producer, self.consumer, self.producer = self.consumer, self.producer, None, None
        if producer is not None:
            producer.close(timeout=self.flush_timeout_s)
        if consumer is not None:
            # Offsets were committed at each checkpoint; a dynamic member leaving now hands partitions over at once.
            consumer.close(autocommit=False)
        log.info("%s: stopped after %s", self.service, self.stats.snapshot())
