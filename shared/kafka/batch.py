"""One batch of a consume-transform-produce loop, without the I/O: decode, run the stage, route.

plan_batch turns polled messages into the messages to produce (outputs and dead letters) or the
records for a sink; shared/kafka/runner.py does the polling, producing and committing around it.
A stage that raises StageUnavailable (shared/stage.py) fails the whole batch instead: the runner
reads it again later, since nothing is wrong with the records. A batch the stage raises on is
retried one record at a time until a deadline; the records past it are left for the runner to
read again (BatchPlan.left), so a slow stage cannot hold a batch past max.poll.interval.ms.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    left: list[Message] = field(default_factory=list)
    """Messages the retry's deadline left untouched (from the first on each partition on): nothing of theirs is in
    the plan, and the runner reads them again rather than commit past them."""


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
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> BatchPlan:
    """Decode, run the stage, and route: everything of a batch except the I/O.

    A batch the stage raises on is retried one record at a time until `deadline` (a `clock()` time); the
    records after it, and any message after them on their partition, are left out (`BatchPlan.left`).

    A message over the limit of its topic (`max_bytes`, or less where `topic_limits` says
    so) would be refused and stop the service on every restart: an output that large is
    dead-lettered as its input, and a dead letter that large keeps only its provenance.
    """
    plan = BatchPlan()
    limits = topic_limits or {}

    def to_dlq(msg: Message | None, kind: str, reason: str, record: PairRecord | None = None) -> None:
        dlq = topics.dead_letter
        dead_lettered(dead_letter_for(msg, dlq, kind=kind, reason=reason, service=service, record=record,
                                      max_bytes=topic_limit(max_bytes, limits, dlq)), kind)  # fmt: skip

    def dead_lettered(letter: Outgoing, kind: str) -> None:
        plan.outgoing.append(letter)
        plan.failed[kind] += 1
        plan.dead_lettered += 1

    decoded: list[tuple[Message, PairRecord]] = []
    undecodable: list[tuple[Message, str]] = []
    for msg in messages:
        try:
            decoded.append((msg, decode_record(msg.value, msg.headers)))
        except PayloadError as exc:
            undecodable.append((msg, str(exc)))
    results, errors, cut = run_stage(stage, decoded, service, deadline, clock)
    resume = first_offsets(cut)

    def later(msg: Message) -> bool:
        at = resume.get(TopicPartition(msg.topic, msg.partition))
        return at is not None and msg.offset >= at

    plan.left = [msg for msg in messages if later(msg)]
    plan.processed = len(messages) - len(plan.left)
    for msg, reason in undecodable:
        if not later(msg):
            to_dlq(msg, "undecodable", reason)
    for msg, error in errors:
        to_dlq(msg, "stage-error", stage_error(error))
    decoded = [(msg, record) for msg, record in decoded if not later(msg)]
    arrivals: dict[str, list[Message]] = {}
    for msg, record in decoded:
        arrivals.setdefault(record.pair.id, []).append(msg)

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
                message, too_large = fit_to_topic(
                    record, topics.stage_topic(route, record.lineage.stage), max_bytes=max_bytes, topic_limits=limits,
                    dead_letter_topic=topics.dead_letter, service=service, what=f"output for route {route!r}",
                    source=source.get(record.pair.id) or source.get(record.lineage.original_id),
                )  # fmt: skip
                if too_large is None:
                    plan.outgoing.append(message)
                    plan.emitted[route] += 1
                else:
                    dead_lettered(message, "too-large")
        for record, reason in result.failed:
            to_dlq(source.get(record.pair.id), "failed", reason, record)
    return plan


def topic_limit(max_bytes: int | None, limits: Mapping[str, int], topic: str) -> int | None:
    """The message limit of `topic`: `max_bytes`, or less where `limits` says so; None when neither sets one."""
    return min(max_bytes, limits.get(topic, max_bytes)) if max_bytes is not None else limits.get(topic)


def fit_to_topic(
    record: PairRecord,
    topic: str,
    *,
    max_bytes: int | None,
    topic_limits: Mapping[str, int],
    dead_letter_topic: str,
    service: str,
    what: str,
    source: Message | None = None,
) -> tuple[Outgoing, str | None]:
    """`record`'s message to `topic`, and None; or, when that is over the topic's limit (topic_limit), its too-large
    dead letter and why (its size, the limit and the topic).

    A message over its topic's limit is never writable: produced, it would hold the outbox (and a restart) for ever.
    The dead letter's reason is "<what> is <why>"; it carries `source`, the consumed message the record came from, or
    without one the record itself, cut to what the dead-letter topic takes, rather than lose it.
    """
    out = encode_record(record, topic)
    cap = topic_limit(max_bytes, topic_limits, topic)
    if cap is None or out.size <= cap:
        return out, None
    over = f"{out.size} bytes, over the {cap}-byte message limit of topic {topic}"
    letter = dead_letter_for(source, dead_letter_topic, kind="too-large", reason=f"{what} is {over}", service=service,
                             record=None if source is not None else record,
                             max_bytes=topic_limit(max_bytes, topic_limits, dead_letter_topic))  # fmt: skip
    return letter, over


def learned_limit(limits: Mapping[str, int], max_bytes: int, topic: str, size: int) -> int | None:
    """The lower limit of `topic` that the broker's refusal of a `size`-byte message to it as too large teaches: one
    byte under. None when the message was already over the topic's known limit (`max_bytes`, or less where `limits`
    says so): plan_batch could not make it smaller, so reading its batch again would be refused all the same."""
    return size - 1 if size <= min(max_bytes, limits.get(topic, max_bytes)) else None


def run_stage(
    stage: Stage,
    decoded: list[tuple[Message, PairRecord]],
    service: str,
    deadline: float | None,
    clock: Callable[[], float],
) -> tuple[list[StageResult], list[tuple[Message, Exception]], list[Message]]:
    """Call `stage` on the decoded batch and, if it raises, on one record at a time until `deadline`.

    Returns the results, the records it raised on alone, and those not retried by the deadline. At least one
    record is retried, so that each read of a batch the stage keeps raising on gets further.
    """
    if not decoded:
        return [], [], []
    try:
        return [call_stage(stage, [record for _, record in decoded])], [], []
    except StageUnavailable:
        raise
    except Exception as exc:
        if len(decoded) == 1:
            log.warning("%s: stage raised on one record: %r", service, exc)
            return [], [(decoded[0][0], exc)], []
        log.warning("%s: stage raised on a batch of %d (%r); retrying one record at a time",
                    service, len(decoded), exc)  # fmt: skip
    results: list[StageResult] = []
    errors: list[tuple[Message, Exception]] = []
    for i, (msg, record) in enumerate(decoded):
        if i and deadline is not None and clock() >= deadline:
            # One at a time past max.poll.interval.ms, the group would drop this member, fail its commit and hand
            # the whole batch out again: what is done is committed, the rest read again.
            log.warning("%s: retried %d of %d records alone before the deadline; reading the rest again",
                        service, i, len(decoded))  # fmt: skip
            return results, errors, [m for m, _ in decoded[i:]]
        try:
            results.append(call_stage(stage, [record]))
        except StageUnavailable:
            raise
        except Exception as one:
            log.warning("%s: stage raised on %s:%d@%d: %r", service, msg.topic, msg.partition, msg.offset, one)
            errors.append((msg, one))
    return results, errors, []


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


def first_offsets(messages: Iterable[Message]) -> dict[TopicPartition, int]:
    """The first offset of each partition among `messages`: where a consumer reads them again."""
    first: dict[TopicPartition, int] = {}
    for msg in messages:
        tp = TopicPartition(msg.topic, msg.partition)
        first[tp] = min(first.get(tp, msg.offset), msg.offset)
    return first


def commit_offsets(messages: Sequence[Message]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit after a batch: one past the last message of each partition."""
    return {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in next_offsets(messages).items()}
