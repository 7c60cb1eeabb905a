"""kafka-python clients configured for the pipeline's delivery guarantees.

At-least-once transport: the producer waits for all in-sync replicas (acks=all) and is
idempotent, so its own retries never duplicate a message; consumers never auto-commit,
the runner commits input offsets only after its outputs are acknowledged. Outbox (and
deliver, for one batch) is the one place that checks those acknowledgements.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.coordinator.base import MemberState
from kafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError, UnknownError

from synpref.shared.config import KafkaSettings
from synpref.shared.kafka.codec import Outgoing

log = logging.getLogger(__name__)


TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
"""How a broker refuses a message over its topic's max.message.bytes (or its own message.max.bytes)."""


class DeliveryError(KafkaError):
    """Messages were not acknowledged: whatever they stand for must not be committed.

    `too_large` is (topic, size) when the first failure was the broker refusing a message as too large (its size
    as Outgoing.size counts it): a limit under that size holds for that topic.
    """

    def __init__(self, message: str, too_large: tuple[str, int] | None = None) -> None:
        super().__init__(message)
        self.too_large = too_large


def producer_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """kafka-python producer settings: idempotent, acks=all, unlimited retries, batches within max.message.bytes.

    `overrides` replace any of them.
    """
    config: dict[str, Any] = {
        **kafka.client_kwargs(),
        "acks": "all",
        "enable_idempotence": True,
        # Idempotence keeps order with up to 5 requests in flight per connection.
        "max_in_flight_requests_per_connection": 5,
        "retries": 2**31 - 1,
        # delivery_timeout_ms bounds all retries; a record not acknowledged by then fails its future.
        "delivery_timeout_ms": max(120_000, kafka.request_timeout_ms * 2 + 5),
        # A batch of records leaves together: wait a few ms to fill 256 KiB batches. The broker checks
        # a whole batch against max.message.bytes, so a batch never outgrows that limit.
        "linger_ms": 5,
        "batch_size": min(256 * 1024, kafka.max_message_bytes),
        "max_request_size": kafka.max_message_bytes,
        "max_block_ms": 60_000,
    }
    config.update(overrides)
    return config


def consumer_config(kafka: KafkaSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """kafka-python consumer settings for `group_id`: manual commits, earliest reset, read_committed,
    kafka.max_poll_interval_ms allowed per batch. `overrides` replace any of them.
    """
    config: dict[str, Any] = {
        **kafka.client_kwargs(),
        "group_id": group_id,
        "enable_auto_commit": False,
        # A new group starts at the beginning: pairs published before a service first started are not skipped.
        "auto_offset_reset": "earliest",
        "max_poll_records": kafka.max_batch,
        "max_partition_fetch_bytes": max(kafka.max_message_bytes, 1024 * 1024),
        "fetch_max_bytes": max(kafka.max_message_bytes, 50 * 1024 * 1024),
        # Stages may be slow (LLM judges, RM scoring): the time a batch may take before a rebalance is the operator's.
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": max(100, min(3000, kafka.session_timeout_ms // 3)),
        # Don't read records of aborted or open transactions if anyone ever writes transactionally.
        "isolation_level": "read_committed",
    }
    config.update(overrides)
    return config


def make_producer(kafka: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A KafkaProducer with `producer_config(kafka, **overrides)`."""
    return KafkaProducer(**producer_config(kafka, **overrides))


def make_consumer(kafka: KafkaSettings, group_id: str, *topics: str, **overrides: Any) -> KafkaConsumer:
    """A KafkaConsumer in `group_id` with `consumer_config`, subscribed to `topics` if any are given."""
    return KafkaConsumer(*topics, **consumer_config(kafka, group_id, **overrides))


def poll_group(consumer: KafkaConsumer, timeout_ms: int, max_records: int | None = None) -> dict[Any, list[Any]]:
    """consumer.poll for a group member, then recover_lost_join: every group consumer of ours polls through this."""
    polled = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
    recover_lost_join(consumer)
    return polled


def recover_lost_join(consumer: KafkaConsumer) -> bool:
    """Rejoin if kafka-python (3.0.12) dropped a finished JoinGroup/SyncGroup; True when it did.

    Its join_group_async hands a join that outlives one poll's timeout to the next poll, but only
    while need_rejoin() holds. When the group leader rejoins because the metadata changed (a
    consumer's first seconds on new topics, say), performing the assignment makes need_rejoin()
    false, so a join that finished between polls is never processed: the member stays
    REBALANCING with heartbeats off and no partitions, the broker evicts it a session later, and
    poll() returns at once forever (a busy loop; tests/integration/test_kafka_lost_join.py).
    Asking for a rejoin sends a new JoinGroup, which the next poll does process.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or getattr(coordinator, "state", None) is not MemberState.REBALANCING:
        return False
    join = getattr(coordinator, "_join_task", None)
    if (join is not None and not join.is_done) or coordinator.need_rejoin():
        return False  # a join is in flight, or the next poll joins anyway
    log.warning("group %s: kafka-python lost a finished join (REBALANCING, no join in flight): rejoining",
                coordinator.group_id)  # fmt: skip
    coordinator.request_rejoin()
    return True


def make_admin(kafka: KafkaSettings, **overrides: Any) -> KafkaAdminClient:
    """A KafkaAdminClient for the configured cluster."""
    return KafkaAdminClient(**{**kafka.client_kwargs(), **overrides})


class Outbox:
    """Messages sent through one producer and not yet known to be acknowledged.

    A failed flush is final: every later send or flush raises the same DeliveryError, so a
    caller that swallowed it (a rebalance callback, say) cannot commit past the loss.
    """

    def __init__(self, producer: Any, timeout_s: float) -> None:
        self.producer = producer
        self.timeout_s = timeout_s
        # (topic, size) of each message beside its future, not the message: the outbox must not hold the payloads.
        self._futures: list[tuple[tuple[str, int], Any]] = []
        self._error: DeliveryError | None = None
        self._first_failure: tuple[tuple[str, int], Exception] | None = None

    def send(self, outgoing: Iterable[Outgoing]) -> None:
        """Hand `outgoing` to the producer without waiting; raises the earlier DeliveryError if a flush failed."""
        if self._error is not None:
            raise self._error
        for out in outgoing:
            future = self.producer.send(out.topic, key=out.key, value=out.value, headers=out.headers)
            sent = (out.topic, out.size)
            self._futures.append((sent, future))
            # kafka-python's idempotent producer fails for good on a refused message and aborts every other send
            # with the same exception: only the order the failures come in says which message the broker refused.
            future.add_errback(self._failed, sent)

    def _failed(self, sent: tuple[str, int], error: Exception) -> None:
        if self._first_failure is None:  # runs on the producer's IO thread, one callback at a time
            self._first_failure = (sent, error)

    def flush(self) -> int:
        """Wait for every message sent so far; DeliveryError unless all were acknowledged. Returns how many."""
        if self._error is not None:
            raise self._error
        futures, self._futures = self._futures, []
        if not futures:
            return 0
        deadline = time.monotonic() + self.timeout_s
        try:
            try:
                self.producer.flush(timeout=self.timeout_s)
            except UnknownError:
                # kafka-python 3.0.12 raises "Future not done" from flush once it splits a batch the broker refused as
                # too large, its records moved to the split batches: wait for them instead, as a split batch may pass.
                for _, future in futures:
                    try:
                        future.get(timeout=max(0.0, deadline - time.monotonic()))
                    except KafkaError:
                        if not future.is_done:
                            raise  # timed out; a message that failed is counted below
        except KafkaError as exc:
            # kafka-python gives up after the timeout with messages still unacknowledged. Their futures are
            # dropped above, so this fails for good like any other loss: a later flush that waited only for
            # newer messages would let the caller commit past these.
            self._error = DeliveryError(
                f"{len(futures)} messages not all acknowledged: {exc!r}", self._refused(futures)
            )
            raise self._error from exc
        failed = [(sent, f.exception) for sent, f in futures if not f.is_done or f.failed()]
        if failed:
            self._error = DeliveryError(f"{len(failed)} of {len(futures)} messages not acknowledged; "
                                        f"first: {failed[0][1]!r}", self._refused(futures))  # fmt: skip
            raise self._error
        return len(futures)

    def _refused(self, futures: list[tuple[tuple[str, int], Any]]) -> tuple[str, int] | None:
        """(topic, size) of the message the broker refused as too large, when that was the first failure."""
        # kafka-python's IO thread marks a future done and failed before it runs its errbacks (kafka/future.py,
        # failure()): after a flush that gave up, or a get() that returned once is_done was set, a failed future's
        # errback may not have run yet. Then the first failed future in send order is the best guess.
        first = self._first_failure or next(
            ((sent, f.exception) for sent, f in futures if f.is_done and f.failed()), None
        )
        if first is None or not isinstance(first[1], TOO_LARGE):
            return None
        return first[0]


def deliver(producer: Any, outgoing: Iterable[Outgoing], timeout_s: float) -> int:
    """Send and wait: DeliveryError unless every message was acknowledged."""
    outbox = Outbox(producer, timeout_s)
    outbox.send(outgoing)
    return outbox.flush()
