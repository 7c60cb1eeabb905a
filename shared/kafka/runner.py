"""The consume-transform-produce loop that binds a pure stage to Kafka topics.

One iteration, in this order (the order is the guarantee):
  1. poll up to kafka.max_batch messages from the input topic;
  2. decode them; an undecodable message goes to the dead-letter topic with the error;
  3. call the stage on the decoded batch; if it raises, call it again one record at a
     time, so only the records it raises on go to the dead-letter topic; past RETRY_SHARE
     of max.poll.interval.ms since the poll, the records not yet retried are read again;
  4. send every routed record to its route's topic (or hand it to the sink, if the
     runner has one), every failure to the dead-letter topic; an output or dead letter
     the topic would refuse as too large is dead-lettered without its payload instead;
  5. checkpoint, quix-streams' order: flush the sink, flush the producer and check that
     every message was acknowledged (acks=all), then commit the input offsets (auto-commit
     is off). Without a sink every batch is a checkpoint; with one, when the sink is due.
A crash anywhere before 5 re-delivers the batch: at-least-once, never lost. A message the
broker refuses as too large (a topic's limit lowered or unreadable) would do so after every
restart: the runner notes a limit under its size instead and, on a fresh producer, reads the
batch again, so that step 4 dead-letters it (no sink: its outbox holds only that batch). A stop
request (SIGTERM in a service, an Event in tests) is honoured between batches, so the
current batch is finished and checkpointed before the clients close. A stage that raises
StageBroken (this process cannot do it any more) stops the runner at once, its batch uncommitted.

A sink that keeps the input offsets itself (the dataset writer's manifest) is a commit
point rather than an output: it is flushed after the producer's acknowledgements, and on
assignment each partition is sought to the offset it kept (exactly-once into the sink).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata, TopicPartition

from synpref.shared.config import Settings
from synpref.shared.kafka import metrics
from synpref.shared.kafka.admin import message_limits
from synpref.shared.kafka.batch import ROUTES, BatchPlan, first_offsets, learned_limit, next_offsets, plan_batch
from synpref.shared.kafka.clients import DeliveryError, Outbox, make_consumer, make_producer, poll_group
from synpref.shared.kafka.codec import Message
from synpref.shared.retry import capped_backoff
from synpref.shared.stage import Stage, StageBroken, StageUnavailable
from synpref.v1.pair_pb2 import PairRecord

log = logging.getLogger(__name__)
__all__ = ["ROUTES", "DeliveryError", "Message", "RunnerStats", "Sink", "StageRunner", "capped_backoff", "plan_batch"]
# A stage whose dependency cannot serve (StageUnavailable) has its batch read again after 1, 2, 4 ... s.
UNAVAILABLE_MAX_PAUSE_S = 30.0
# A batch the stage raised on is retried one record at a time for at most this share of max.poll.interval.ms
# from its poll; the rest is read again. The remainder of the interval is for sending, flushing and committing.
RETRY_SHARE = 0.5
# Each read of a batch refused as too large learns a lower limit from the one message the broker refused first (the
# producer aborts the rest); more reads in a row than this stop the runner as any delivery failure does.
MAX_REFUSED_READS = 16


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
        self._unavailable = 0
        """Batches in a row whose stage raised StageUnavailable."""
        self._refused = 0
        """Reads in a row of a batch that the broker refused messages of as too large."""
        self.clock: Callable[[], float] = time.monotonic
        """Times the per-record retry against max.poll.interval.ms (a test's fake clock replaces it)."""

    def open(self) -> None:
        """Connect: read the output topics' message limits, create the producer and outbox, subscribe the consumer.

        A static `instance_id` makes the consumer a static group member.
        """
        kafka = self.settings.kafka
        self.topic_limits = self._read_limits()
        self._open_producer()
        static = {"group_instance_id": self.instance_id} if self.instance_id else {}
        self.consumer = make_consumer(kafka, self.group_id, **static)
        # Metadata first: a group leader that assigns before it knows the topics' partitions hands
        # out none, and kafka-python rejoins only once its metadata refreshes (minutes).
        for topic in self.input_topics:
            self.consumer.partitions_for_topic(topic)
        self.consumer.subscribe(self.input_topics, listener=_Rebalance(self))
        log.info("%s: consuming %s as group %s%s", self.service, ", ".join(self.input_topics), self.group_id,
                 f" (static member {self.instance_id})" if self.instance_id else "")  # fmt: skip

    def _open_producer(self) -> None:
        """A producer, and an outbox on it, whose batches stay within the smallest limit known."""
        kafka = self.settings.kafka
        smallest = min([kafka.max_message_bytes, *self.topic_limits.values()])
        self.producer = make_producer(kafka, batch_size=min(256 * 1024, smallest))
        self.outbox = Outbox(self.producer, self.flush_timeout_s)

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
        """Loop until stop is set, then checkpoint what is in hand and close the clients. An error out of a batch
        (a failed delivery, the stage's StageBroken) ends the loop at once and closes the clients uncommitted."""
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
        deadline = self._retry_deadline()
        polled = poll_group(self.consumer, self.settings.kafka.consumer_poll_ms, self.settings.kafka.max_batch)
        messages = [msg for batch in polled.values() for msg in batch]
        if messages:
            started = time.perf_counter()
            try:
                plan = self._hand_over(messages, deadline)
            except StageBroken as exc:
                # Reading the batch again here would fail it for ever: stop instead, with the batch uncommitted, so
                # that it is read again from the last commit by whoever takes this process's place.
                self._rewind(messages)
                log.error("%s: %s; stopping without committing the batch of %d: it is read again after a restart",
                          self.service, exc, len(messages))  # fmt: skip
                raise
            except StageUnavailable as exc:
                self._read_again_later(messages, exc)
                return 0
            except BaseException:
                # The batch is neither sent in full nor in the sink, but the consumer's position is past it: a
                # caller that goes on (the desk's next tick) would poll the next batch and commit past this one.
                self._rewind(messages)
                raise
            if self.sink is None:
                try:
                    self.checkpoint()
                except DeliveryError as exc:
                    if not self._learn_limits(exc, len(messages)):
                        raise
                    # Nothing was committed: read the whole batch again; what was acknowledged is sent again.
                    self._pending = {}
                    self._rewind(messages)
                    return 0
                self._refused = 0
            elif self.sink.due():
                self.checkpoint()
            self._observe(plan, time.perf_counter() - started)
        elif self.sink is not None and self.sink.due():
            self.checkpoint()
        return len(messages)

    def _retry_deadline(self) -> float | None:
        """When the per-record retry of a batch polled now must stop: RETRY_SHARE of the consumer's poll interval."""
        config = getattr(self.consumer, "config", None)
        interval_ms = config.get("max_poll_interval_ms") if isinstance(config, dict) else None
        return self.clock() + RETRY_SHARE * interval_ms / 1000 if interval_ms else None

    def _hand_over(self, messages: list[Message], deadline: float | None = None) -> BatchPlan:
        """Run the stage on a polled batch, send what it produced, hand the sink its records and note the
        batch's offsets as pending; StageUnavailable (from the stage) before anything is sent. What the
        retry's `deadline` left is sought back to, and only the offsets before it are pending."""
        plan = plan_batch(messages, self.stage, self.settings.topics, self.service,
                          self.settings.kafka.max_message_bytes, self.topic_limits,
                          to_sink=self.sink is not None, deadline=deadline, clock=self.clock)  # fmt: skip
        self._unavailable = 0
        assert self.outbox is not None
        self.outbox.send(plan.outgoing)
        if self.sink is not None:
            write_sourced = getattr(self.sink, "write_sourced", None)
            if write_sourced is not None:
                write_sourced(plan.sunk, plan.sunk_from)
            else:
                self.sink.write(plan.sunk)
        self._pending.update(next_offsets(messages))
        if plan.left:
            self._pending.update(first_offsets(plan.left))
            self._rewind(plan.left)
        return plan

    def _learn_limits(self, exc: DeliveryError, batch: int) -> bool:
        """learn_limit, for reading the batch again; False past MAX_REFUSED_READS reads in a row."""
        self._refused += 1
        then = f"reading the batch of {batch} again to dead-letter what is over it"
        return self._refused <= MAX_REFUSED_READS and self.learn_limit(exc, then)

    def learn_limit(self, exc: DeliveryError, then: str) -> bool:
        """Whether the message the broker refused first as too large teaches its topic a lower limit (logged with what
        is done `then`): then it is in topic_limits, with any lower one the broker reports, on a fresh producer."""
        kafka, refused = self.settings.kafka, exc.too_large
        if refused is None or (limit := learned_limit(self.topic_limits, kafka.max_message_bytes, *refused)) is None:
            return False
        topic, size = refused
        log.warning("%s: topic %s refused a %d-byte message as too large: its limit is taken as %d bytes from now on; "
                    "%s", self.service, topic, size, limit, then)  # fmt: skip
        self.topic_limits[topic] = limit
        try:  # exact where readable (an operator lowered max.message.bytes); the refusals alone give an upper bound
            found = message_limits(kafka, self.settings.topics.all(), timeout_s=kafka.request_timeout_ms / 1000)
        except KafkaError as error:
            found = {}
            log.info("%s: cannot read the topics' max.message.bytes again (%s)", self.service, error)
        for name, n in found.items():
            if n < min(kafka.max_message_bytes, self.topic_limits.get(name, kafka.max_message_bytes)):
                log.warning("%s: topic %s takes messages up to %d bytes now", self.service, name, n)
                self.topic_limits[name] = n
        old = self.producer
        self._open_producer()
        try:
            old.close(timeout=self.flush_timeout_s)
        except KafkaError as error:  # kafka-python 3.0.12: the flush in close can fail on the aborted sends again
            log.info("%s: the producer that failed did not close cleanly: %r", self.service, error)
        return True

    def _rewind(self, messages: list[Message]) -> None:
        """Seek each partition of the batch that is still ours back to the batch's first offset on it."""
        owned = self.consumer.assignment()
        for tp, offset in first_offsets(messages).items():
            if tp in owned:  # a partition lost meanwhile is re-read by its new owner from the commit
                self.consumer.seek(tp, offset)

    def _read_again_later(self, messages: list[Message], exc: StageUnavailable) -> None:
        """Seek back to the batch's first offsets and pause (1, 2, 4 ... 30 s): the stage's dependency,
        not the batch, failed, so nothing is dead-lettered or committed. Heartbeats go on meanwhile."""
        self._rewind(messages)
        self._unavailable += 1
        pause = capped_backoff(self._unavailable, UNAVAILABLE_MAX_PAUSE_S)
        log.warning("%s: %s; reading the batch of %d again in %.0fs", self.service, exc, len(messages), pause)
        metrics.UNAVAILABLE.labels(self.service).inc()
        # No batch goes through meanwhile, so _observe does not run: the lag would stay at its last value
        # (0, say) however far behind the input topic gets while the dependency is down.
        metrics.report_lag(self.consumer, self.service)
        self.stop.wait(pause)

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
        except KafkaTimeoutError as exc:
            if self.sink is not None and not self.sink.keeps_offsets:
                raise  # the desk offers these offsets again on its next commit and reports the failure (/readyz)
            # Not a loss: the next checkpoint commits past these offsets, or the partitions' next owner reads them
            # again. Exiting instead would restart the service, re-read the batch and rejoin the group all the same.
            log.warning("%s: offset commit timed out, going on (committed later or read again): %s", self.service, exc)
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
        # run() checkpointed on its way out unless something failed; what is pending now is after a failure (an
        # unacknowledged output, a sink that could not write) and is left for the next owner to read again. The
        # revocation KafkaConsumer.close runs would checkpoint it once more: it failed again and kafka-python
        # raised "User rebalance callback throws an error" in place of the real error, leaving its client open.
        self._pending = {}
        consumer, producer, self.consumer, self.producer = self.consumer, self.producer, None, None
        if producer is not None:
            producer.close(timeout=self.flush_timeout_s)
        if consumer is not None:
            # Offsets were committed at each checkpoint; a dynamic member leaving now hands partitions over at once.
            consumer.close(autocommit=False)
        log.info("%s: stopped after %s", self.service, self.stats.snapshot())
