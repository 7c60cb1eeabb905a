"""Where the loop's stages run: in this process, or in the Kafka services of a cluster.

The loop asks for named steps over a batch of records and gets a StageResult back. Both
stages run the same chain, score -> annotate -> filter (docs/architecture.md, Data flow):
  "stage1": retrieved pairs of a Stage-1 iteration (working RM, judges, stage-1 rule)
            -> "review" / "discarded" (REVIEW: gold candidates; SKIP)
  "stage2": the pairs left in D_un (gold and best RM, judges where the best RM is not
            sure, KEEP / FLIP / DISCARD)                         -> "curated" / "discarded"
  "review": human verification through the desk                 -> "verified" / "discarded"
In process the stage functions are chained here; in the cluster the same functions run as
the gold-scorer, annotator and filter services, chained by each stage's own topics.
Records that fail come back in StageResult.failed (dead-letter topic in the cluster).
Results are matched to inputs by record key (the ingest id, stable across flips).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from synpref.services.consistency_filter.rules import ROUTE_OF
from synpref.services.controller.state import StepVerdicts, key_of
from synpref.shared.config import Settings
from synpref.shared.stage import Stage, StageResult
from synpref.v1.pair_pb2 import PairRecord

log = logging.getLogger(__name__)

# name -> (input topic field, output topic fields) in the cluster's topic graph
KAFKA_PLANS: dict[str, tuple[str, tuple[str, ...]]] = {
    "stage1": ("s1_raw", ("s1_decided",)),
    "stage2": ("s2_raw", ("s2_decided",)),
    # Human review through the desk service: review topic in, its decisions out.
    "review": ("review", ("verified", "discarded")),
}
DECIDED = frozenset({"s1_decided", "s2_decided"})
"""The filter's output topics: a record's route there is its decision's (rules.ROUTE_OF), as in process."""


class StageExecutor(Protocol):
    """Runs a named pipeline step on a batch of records: here in-process, or through Kafka."""

    def run(self, name: str, records: list[PairRecord]) -> StageResult:
        """The routed and failed records of step `name` on `records`."""
        ...


def chain(*stages: Stage) -> Stage:
    """Stages in sequence: every routed output of one is the input of the next; failures collect."""

    def chained(batch: list[PairRecord]) -> StageResult:
        out = StageResult()
        current = batch
        for i, stage in enumerate(stages):
            result = stage(current)
            out.failed.extend(result.failed)
            if i == len(stages) - 1:
                out.routed.extend(result.routed)
            else:
                current = [r for _, r in result.routed]
        return out

    return chained


class InProcessExecutor:
    """Runs the named stage functions here, in batches (the embedded default)."""

    def __init__(self, stages: dict[str, Stage] | Callable[[str], Stage], batch_size: int = 64) -> None:
        self.stages = stages
        self.batch_size = batch_size

    def stage(self, name: str) -> Stage:
        """The stage function of step `name`."""
        return self.stages[name] if isinstance(self.stages, dict) else self.stages(name)

    def run(self, name: str, records: list[PairRecord]) -> StageResult:
        """Run step `name` over `records` in batches of batch_size; results are concatenated in order."""
        stage = self.stage(name)
        out = StageResult()
        for start in range(0, len(records), self.batch_size):
            result = stage(records[start : start + self.batch_size])
            out.routed.extend(result.routed)
            out.failed.extend(result.failed)
        return out


def route_of(record: PairRecord, topic_route: str) -> str:
    """The route of a record consumed from the topic of `topic_route`: its decision's on a decided topic."""
    return ROUTE_OF[record.decision.decision] if topic_route in DECIDED else topic_route


def dead_letter_key(msg, key_of_id: dict[str, str]) -> str:
    """The key (key_of) of the record dead-letter message `msg` is about, "" for none: a dead letter reduced to its
    provenance (its copy was too large for the topic) has no payload and names its pair by the message key only."""
    from synpref.shared.kafka.codec import PayloadError, decode_record

    try:
        return key_of(decode_record(msg.value, msg.headers))
    except PayloadError:
        return key_of_id.get((msg.key or b"").decode("utf-8", errors="replace"), "")


class KafkaExecutor:
    """Publishes a batch to the step's input topic and collects every result from its output topics.

    The consumer is assigned the output (and dead-letter) partitions and positioned at their
    ends before anything is published, so it sees exactly the results of this batch (or of
    an earlier, interrupted attempt at it, which are the same: stages are deterministic and
    the key matches). A batch none of whose missing results comes back for `timeout_s`, while
    no other result does either, raises TimeoutError; the loop's durable state makes the retry
    safe. The wait is since the last result, not for the whole batch: a retry republishes the
    batch behind the first attempt's backlog and needs as long again, so a pipeline slower than
    batch / timeout_s but working would time out on every attempt, never finish the step, and
    pile a batch of duplicate work onto the services each time. Results not of this batch count
    too: the next batch waits behind the retry's duplicate copies of this one.

    With a `journal` (the human review: state.StepVerdicts) results are not to be had again
    for free, so a retry neither skips nor repeats them: the first attempt notes the output
    positions it starts from and, once acknowledged, the keys it published; a retry reads
    the outputs from those positions (results written while no controller listened are
    collected, not lost) and publishes only the records never published. Each result goes to
    `journal.record` as it is consumed.
    """

    def __init__(self, settings: Settings, timeout_s: float = 600.0, plans=KAFKA_PLANS) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.plans = plans

    def _partitions(self, consumer, topics) -> dict[str, list[int]]:
        """Each topic's partitions, waiting up to timeout_s for topics not created yet (in a cluster,
        the chart's topics hook runs only once every pod of the release is Ready, this one too)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            found = {t: sorted(consumer.partitions_for_topic(t) or ()) for t in topics}
            missing = sorted(t for t, parts in found.items() if not parts)
            if not missing:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"topics {missing} do not exist after {self.timeout_s:g}s: create them")
            log.warning("waiting for topics %s to be created", missing)
            time.sleep(5)

    def _end_offsets(self, consumer, parts) -> dict[str, int]:
        """Each of `parts`' positions ("topic:partition" -> offset) once seek_to_end has marked them, asking again up
        to timeout_s while a look-up gets no answer in time (a partition without a leader); then TimeoutError.
        Without a timeout_ms, kafka-python (3.0.12) retried the look-up for ever: the controller hung and said nothing.
        """
        from kafka.errors import KafkaTimeoutError

        deadline = time.monotonic() + self.timeout_s
        wait_ms = self.settings.kafka.request_timeout_ms
        missing = {f"{tp.topic}:{tp.partition}": tp for tp in parts}
        found: dict[str, int] = {}
        while True:
            for key, tp in list(missing.items()):
                left_ms = int((deadline - time.monotonic()) * 1000)
                try:
                    # 3.0.12 returns None when the time runs out in its offset look-up, raises in its coordinator's.
                    at = consumer.position(tp, timeout_ms=max(1, min(wait_ms, left_ms)))
                except KafkaTimeoutError:
                    at = None
                if at is not None:
                    found[key] = at
                    del missing[key]
            if not missing:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the end offsets of {sorted(missing)} are not known after {self.timeout_s:g}s:"
                    " do their partitions have a leader, is the broker up?"
                )
            log.warning("waiting for the end offsets of %s: the broker did not answer in time", sorted(missing))
            time.sleep(5)

    def run(self, name: str, records: list[PairRecord], journal: StepVerdicts | None = None) -> StageResult:
        """Publish `records` to the step's input topic and collect each one's result from its output or
        dead-letter topic; TimeoutError when some are not back and none came for timeout_s. `journal`: see
        the class.
        """
        from kafka import TopicPartition

        from synpref.shared.kafka.clients import deliver, make_consumer, make_producer
        from synpref.shared.kafka.codec import DLQ_REASON, PayloadError, decode_record, encode_record, header_map

        input_route, outputs = self.plans[name]
        topics = self.settings.topics
        by_topic = {getattr(topics, r): r for r in (*outputs, "dead_letter")}
        pending = {key_of(r): r for r in records}
        key_of_id = {**{r.pair.id: key_of(r) for r in records}, **{key: key for key in pending}}
        out = StageResult()
        if not pending:
            return out
        consumer = make_consumer(self.settings.kafka, None, enable_auto_commit=False)  # type: ignore[arg-type]
        producer = make_producer(self.settings.kafka)
        try:
            parts = [TopicPartition(t, p) for t, found in self._partitions(consumer, by_topic).items() for p in found]
            consumer.assign(parts)
            started = json.loads(journal.note("offsets") or "{}") if journal is not None else {}
            if started:  # a retry: read back from where the first attempt started
                for tp in parts:
                    consumer.seek(tp, started.get(f"{tp.topic}:{tp.partition}", 0))
            else:
                consumer.seek_to_end(*parts)
                # Resolve the end offsets now, before publishing.
                started = self._end_offsets(consumer, parts)
                if journal is not None:
                    journal.set_note("offsets", json.dumps(started, sort_keys=True))
            published = set(json.loads(journal.note("published") or "[]")) if journal is not None else set()
            sending = [record for record in records if key_of(record) not in published]
            in_topic = getattr(topics, input_route)
            # DeliveryError unless every record was acknowledged: one lost here would only time out later.
            deliver(producer, [encode_record(record, in_topic) for record in sending], timeout_s=60)
            if journal is not None and sending:
                published.update(key_of(record) for record in sending)
                journal.set_note("published", json.dumps(sorted(published)))
            deadline = time.monotonic() + self.timeout_s
            while pending and time.monotonic() < deadline:
                for tp, msgs in consumer.poll(timeout_ms=500).items():
                    route = by_topic[tp.topic]
                    for msg in msgs:
                        if route == "dead_letter":
                            key = dead_letter_key(msg, key_of_id)
                            if key in pending:
                                deadline = time.monotonic() + self.timeout_s  # still coming: wait on
                                reason = header_map(msg.headers).get(DLQ_REASON, "dead-lettered")
                                out.fail(pending.pop(key), reason)
                            continue
                        # Any result is the pipeline still coming: results of an earlier attempt's copies queued
                        # ahead of this batch too, or a batch behind them would time out every time it waits.
                        deadline = time.monotonic() + self.timeout_s
                        try:
                            record = decode_record(msg.value, msg.headers)
                        except PayloadError:
                            continue
                        key = key_of(record)
                        if key not in pending:
                            continue
                        if route in DECIDED and record.decision.decision not in ROUTE_OF:
                            out.fail(pending.pop(key), f"no decision on {tp.topic}")
                        else:
                            pending.pop(key)
                            out.emit(route_of(record, route), record)
                            if journal is not None:
                                journal.record(route_of(record, route), record)
            if pending:
                raise TimeoutError(
                    f"{name}: {len(pending)} of {len(records)} records not back, none for {self.timeout_s:g}s"
                )
            return out
        finally:
            consumer.close()
            producer.close()
