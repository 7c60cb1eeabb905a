"""Topic administration: create the pipeline's topics from config, idempotently.

Topics are created with max.message.bytes = kafka.max_message_bytes: without it they keep
the broker's message.max.bytes (1 MiB by default), and a stage that believes the config
produces what the topic refuses. message_limits reads the limit back, for topics that
existed before (or were auto-created) with a smaller one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import TopicAlreadyExistsError, for_code

from synpref.shared.config import KafkaSettings, TopicSettings
from synpref.shared.kafka.clients import make_admin

log = logging.getLogger(__name__)


MESSAGE_LIMIT = "max.message.bytes"


class TopicAdminError(RuntimeError):
    """A topic could not be created (other than because it exists)."""


def ensure_topics(
    kafka: KafkaSettings,
    topics: Iterable[str],
    *,
    partitions: int | None = None,
    replication_factor: int | None = None,
    configs: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> dict[str, str]:
    """Create each topic that does not exist yet; return {topic: "created" | "exists"}.

    Partitions and replication default to the kafka section of the config, and so does
    max.message.bytes (kafka.max_message_bytes; `configs` may override it). An existing
    topic is left as it is, whatever its partition count: changing that is a migration,
    not something a service should do on start. Returns only once every topic has a
    leader for every partition, so producers can write at once.
    """
    names = list(dict.fromkeys(topics))
    if not names:
        return {}
    spec = {
        "num_partitions": partitions or kafka.partitions,
        "replication_factor": replication_factor or kafka.replication_factor,
        "configs": {MESSAGE_LIMIT: str(kafka.max_message_bytes), **(configs or {})},
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
    finally:
        admin.close()
    for name in names:
        log.info("topic %s: %s", name, outcome.get(name, "exists"))
    return outcome


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
