"""A group consumer survives kafka-python 3.0.12 dropping a finished join (shared/kafka/clients.recover_lost_join).

A consumer that leads its group on freshly created topics rejoins once its metadata catches up.
When that join outlives one poll's timeout, kafka-python never processes it: the member stays
REBALANCING with heartbeats off, the broker evicts it a session later and poll() spins. It stalled
the end-to-end pipeline test in CI (the filter: partitions revoked, never assigned again). With
polls of a few ms most consumers here lose a join without the recovery (this test failed 2 of 2
runs without it); with it, none.
"""

from __future__ import annotations

import time

import pytest
from kafka import ConsumerRebalanceListener
from kafka.coordinator.base import MemberState

from synpref.shared.kafka.clients import make_admin, make_consumer, poll_group

pytestmark = pytest.mark.integration

CONSUMERS = 3
SESSION_MS = 6000


class Assignments(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self.assigned: set = set()

    def on_partitions_revoked(self, revoked) -> None:
        self.assigned -= set(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        self.assigned |= set(assigned)


def test_consumers_polling_with_tiny_timeouts_stay_in_their_groups(kafka_settings, unique_topics, unique_group):
    kafka = kafka_settings.kafka.model_copy(update={"session_timeout_ms": SESSION_MS})
    consumers = []
    try:
        for _ in range(CONSUMERS):
            # New topics: the group leader's metadata changes after its first assignment, so it rejoins.
            topics = unique_topics(partitions=2)
            inputs = [topics.s2_raw, topics.s2_scored]
            consumer = make_consumer(kafka, unique_group())
            for topic in inputs:
                consumer.partitions_for_topic(topic)
            listener = Assignments()
            consumer.subscribe(inputs, listener=listener)
            consumers.append((consumer, listener))
            polled_until = time.monotonic() + 3
            while time.monotonic() < polled_until:
                poll_group(consumer, timeout_ms=1)
        # Past two session timeouts: a member that lost its join has been evicted by then.
        deadline = time.monotonic() + 2 * SESSION_MS / 1000
        while time.monotonic() < deadline:
            for consumer, _ in consumers:
                poll_group(consumer, timeout_ms=1)
        admin = make_admin(kafka)
        try:
            groups = admin.describe_groups([c.config["group_id"] for c, _ in consumers])
        finally:
            admin.close()
        for consumer, listener in consumers:
            group = consumer.config["group_id"]
            assert consumer._coordinator.state is MemberState.STABLE, (group, consumer._coordinator.state)
            assert len(listener.assigned) == 4 and consumer.assignment() == listener.assigned, group
            assert groups[group]["group_state"] == "Stable" and len(groups[group]["members"]) == 1, groups[group]
    finally:
        for consumer, _ in consumers:
            consumer.close(autocommit=False)
