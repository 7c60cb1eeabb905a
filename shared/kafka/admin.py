"""Topic administration: create the pipeline's topics from config, idempotently.

Topics are created with max.message.bytes = kafka.max_message_bytes: without it they keep
the broker's message.max.bytes (1 MiB by default), and a stage that believes the config
produces what the topic refuses. message_limits reads the limit back, for topics that
existed before (or were auto-created) with a smaller one.

They are also created without a retention limit (see topic_configs), and with min.insync.replicas=2
when replicated three times or more; an existing topic gets whichever of these configs it has no
topic-level value for, so a re-run brings topics of an older release up to date without undoing
what an operator set on a topic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import TopicAlreadyExistsError, for_code

from synpref.shared.config import KafkaSettings, TopicSettings
from synpref.shared.kafka.clients import make_admin

log = logging.getLogger(__name__)


MESSAGE_LIMIT = "max.message.bytes"
MIN_INSYNC = "min.insync.replicas"
TOPIC_LEVEL = "DYNAMIC_TOPIC_CONFIG"
"""The config source of a value set on the topic itself (not inherited from the broker)."""


class TopicAdminError(RuntimeError):
    """A topic could not be created (other than because it exists)."""


def topic_configs(
    kafka: KafkaSettings, replication_factor: int, configs: dict[str, str] | None = None
) -> dict[str, str]:
    """The configs a pipeline topic replicated `replication_factor` times is created with; `configs` override them."""
    wanted = {
        MESSAGE_LIMIT: str(kafka.max_message_bytes),
        # The topics are the stages' queues, the curated one the dataset's source ("from its earliest retained
        # offset") and the dead-letter one the only copy of a refused pair. A 40M-pair run lasts weeks: an age
        # limit (7 days by broker default) or a size limit would delete records nobody has read yet.
        "retention.ms": "-1",
        "retention.bytes": "-1",
    }
    if replication_factor >= 3:
        # acks=all waits for the in-sync replicas only: with the broker's default of 1, an acknowledged record
        # may be on the leader alone and go with it. 2 of 3 survive one broker's loss and still take writes.
        wanted[MIN_INSYNC] = "2"
    return {**wanted, **(configs or {})}


def ensure_topics(
    kafka: KafkaSettings,
    topics: Iterable[str],
    *,
    partitions: int | None = None,
    replication_factor: int | None = None,
    configs: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> dict[str, str]:
    """Create each topic that does not exist yet; return {topic: "created" | "exists" | "updated"}.

    Partitions and replication default to the kafka section of the config; the topics'
    configs are topic_configs (`configs` override them). An existing topic keeps its
    partition count (changing that is a migration, not something a service should do on
    start) and every config it has a topic-level value for; the others are set ("updated").
    Returns only once every topic has a leader for every partition, so producers can write at once.
    """
    names = list(dict.fromkeys(topics))
    if not names:
        return {}
    replicas = replication_factor or kafka.replication_factor
    spec = {
        "num_partitions": partitions or kafka.partitions,
        "replication_factor": replicas,
        "configs": topic_configs(kafka, replicas, configs),
    }
    admin = make_admin(kafka, bootstrap_timeout_ms=int(timeout_s * 1000))
    try:
        response = admin.create_topics(
            {name: spec for name in names}, timeout_ms=int(timeout_s * 1000), raise_errors=False
        )
        outcome: dict[str, str] = {}
        problems: list[str] = []
        for topic in response["topics"]:
            error = for_code(topic["error_code"])
            if topic["error_code"] == 0:
                outcome[topic["name"]] = "created"
            elif error is TopicAlreadyExistsError:
                outcome[topic["name"]] = "exists"
            else:
                problems.append(f"{topic['name']}: {error.__name__} {topic.get('error_message') or ''}".strip())
        if problems:
            raise TopicAdminError("could not create topics: " + "; ".join(problems))
        admin.wait_for_topics(names, timeout_ms=int(timeout_s * 1000))
        existing = [name for name in names if outcome.get(name) != "created"]
        for name in _fill_in_configs(admin, kafka, existing, configs) if existing else []:
            outcome[name] = "updated"
    finally:
        admin.close()
    for name in names:
        log.info("topic %s: %s", name, outcome.get(name, "exists"))
    return outcome


def _fill_in_configs(admin: Any, kafka: KafkaSettings, names: list[str], configs: dict[str, str] | None) -> list[str]:
    """Set the topic_configs that the existing topics `names` have no topic-level value for; returns those updated."""
    replicas = {t["name"]: len(t["partitions"][0]["replica_nodes"]) for t in admin.describe_topics(names)
                if t.get("error_code", 0) == 0 and t["partitions"]}  # fmt: skip
    # Each topic's own replication factor: min.insync.replicas above it would refuse every acks=all write.
    wanted = {name: topic_configs(kafka, replicas.get(name, 1), configs) for name in names}
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, configs=list(wanted[name])) for name in names]
    found = admin.describe_configs(resources, config_filter="all").get("topic", {})
    changes: dict[str, dict[str, str]] = {}
    for name in names:
        have = found.get(name, {})
        missing = {
            key: value
            for key, value in wanted[name].items()
            if have.get(key, {}).get("config_source") != TOPIC_LEVEL and have.get(key, {}).get("value") != value
        }
        if missing:
            changes[name] = missing
    if not changes:
        return []
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, configs=missing) for name, missing in changes.items()]
    results = admin.alter_configs(resources).get("topic", {})
    problems = [f"{name}: {result}" for name, result in results.items() if result != "OK"]
    if problems:
        raise TopicAdminError("could not update the configs of existing topics: " + "; ".join(problems))
    for name, missing in changes.items():
        was = {key: found.get(name, {}).get(key, {}).get("value") for key in missing}
        log.warning("topic %s: set %s (was %s)", name, missing, was)
    return list(changes)


def ensure_pipeline_topics(
    kafka: KafkaSettings,
    topics: TopicSettings,
    *,
    partitions: int | None = None,
    replication_factor: int | None = None,
    timeout_s: float = 30.0,
) -> dict[str, str]:
    """Every topic named in the topics section (raw, annotated, ..., dead_letter)."""
    return ensure_topics(
        kafka, topics.all(), partitions=partitions, replication_factor=replication_factor, timeout_s=timeout_s
    )


def describe_partitions(kafka: KafkaSettings, topics: Iterable[str], timeout_s: float = 30.0) -> dict[str, int]:
    """{topic: partition count} for the topics that exist."""
    admin = make_admin(kafka, bootstrap_timeout_ms=int(timeout_s * 1000))
    try:
        found = admin.describe_topics(list(topics))
    finally:
        admin.close()
    return {t["name"]: len(t["partitions"]) for t in found if t.get("error_code", 0) == 0}


def message_limits(kafka: KafkaSettings, topics: Iterable[str], timeout_s: float = 30.0) -> dict[str, int]:
    """{topic: max.message.bytes} for the topics that exist."""
    names = list(dict.fromkeys(topics))
    admin = make_admin(kafka, bootstrap_timeout_ms=int(timeout_s * 1000))
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, name, configs=[MESSAGE_LIMIT]) for name in names]
        found = admin.describe_configs(resources, config_filter="all").get("topic", {})
    finally:
        admin.close()
    return {name: int(configs[MESSAGE_LIMIT]["value"]) for name, configs in found.items() if MESSAGE_LIMIT in configs}
