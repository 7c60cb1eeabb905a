"""One batch of a consume-transform-produce loop, without the I/O: decode, run the stage, route.

plan_batch turns polled messages into the messages to produce (outputs and dead letters) or the
records for a sink; shared/kafka/runner.py does the polling, producing and committing around it.
A stage that raises StageUnavailable (shared/stage.py) fails the whole batch instead: the runner
reads it again later, since nothing is wrong with the records.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kafka.structs import OffsetAndMetadata, TopicPartition

from synpref.shared.config import STAGE_ROUTES, TopicSettings
from synpref.shared.kafka.codec import Message, Outgoing, PayloadError, dead_letter_for, decode_record, encode_record
from synpref.shared.stage import Stage, StageResult, StageUnavailable
from synpref.v1.pair_pb2 import PairRecord

log = logging.getLogger("synpref.shared.kafka.runner")

ROUTES = frozenset(TopicSettings.model_fields) | frozenset(STAGE_ROUTES)
"""Topic fields, and the stage routes (raw, scored, ...) that go to the topic of each record's lineage.stage."""


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
    except StageUnavailable:
        raise
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
                except StageUnavailable:
                    raise
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
                # With no source message found (a stage that changed the id without original_id) the output
                # itself is dead-lettered, cut to what the dead-letter topic takes, rather than lost.
                to_dlq(source_msg, "too-large", reason, None if source_msg is not None else record)
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
