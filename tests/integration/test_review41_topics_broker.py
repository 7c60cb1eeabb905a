"""Review 41, topics: retention and configs of the pipeline's topics on a real (one-broker) cluster."""

import pytest
from kafka.admin import ConfigResource, ConfigResourceType
from kafka_broker import unique_name

from synpref.shared.config import KafkaSettings, TopicSettings
from synpref.shared.kafka.admin import MESSAGE_LIMIT, ensure_pipeline_topics, ensure_topics
from synpref.shared.kafka.clients import make_admin

pytestmark = pytest.mark.integration

KEYS = ["retention.ms", "retention.bytes", "min.insync.replicas", MESSAGE_LIMIT]


def topic_configs(kafka: KafkaSettings, names: list[str]) -> dict[str, dict[str, str]]:
    admin = make_admin(kafka)
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, name, configs=KEYS) for name in names]
        found = admin.describe_configs(resources, config_filter="all")["topic"]
    finally:
        admin.close()
    return {name: {key: entry["value"] for key, entry in configs.items()} for name, configs in found.items()}


def test_pipeline_topics_are_created_without_a_retention_limit(kafka_settings):
    """A stage down for a week, or a backlog of weeks, must not lose its input to the broker's 7-day default;
    the curated topic is the dataset's source and the dead-letter topic the only copy of a refused pair."""
    kafka = kafka_settings.kafka
    base = unique_name("t-r41")
    topics = TopicSettings(**{route: f"{base}.{route}" for route in TopicSettings.model_fields})
    assert set(ensure_pipeline_topics(kafka, topics, partitions=1).values()) == {"created"}
    found = topic_configs(kafka, topics.all())
    for name in topics.all():
        assert found[name]["retention.ms"] == "-1", (name, found[name])
        assert found[name]["retention.bytes"] == "-1", (name, found[name])


def test_rerun_brings_topics_of_an_older_release_up_to_date_and_keeps_what_an_operator_set(kafka_settings):
    kafka = kafka_settings.kafka
    old, tuned = unique_name("t-r41-old"), unique_name("t-r41-tuned")
    admin = make_admin(kafka)
    try:  # as the Job of an older release created them; an operator then chose 14 days for one
        spec = {"num_partitions": 1, "replication_factor": 1, "configs": {MESSAGE_LIMIT: str(kafka.max_message_bytes)}}
        tuned_spec = {**spec, "configs": {**spec["configs"], "retention.ms": "1209600000"}}
        admin.create_topics({old: spec, tuned: tuned_spec})
        admin.wait_for_topics([old, tuned])
    finally:
        admin.close()
    assert topic_configs(kafka, [old])[old]["retention.ms"] == "604800000"  # the broker's default: 7 days

    # Asked for 3 replicas on a 1-replica topic: min.insync.replicas must follow the topic's own factor.
    # The tuned one lacks nothing: its retention.bytes is the broker's -1 already.
    assert ensure_topics(kafka, [old, tuned], replication_factor=3) == {old: "updated", tuned: "exists"}
    found = topic_configs(kafka, [old, tuned])
    assert found[old]["retention.ms"] == "-1" and found[old]["retention.bytes"] == "-1"
    assert found[tuned]["retention.ms"] == "1209600000"
    assert found[old]["min.insync.replicas"] == "1"
    assert ensure_topics(kafka, [old, tuned]) == {old: "exists", tuned: "exists"}
