"""Topic admin against the real broker: idempotent creation, from code and from `synpref topics`."""

import os
import subprocess
import sys

import pytest
from kafka_broker import unique_name

from synpref.shared.config import TopicSettings
from synpref.shared.kafka.admin import describe_partitions, ensure_pipeline_topics, ensure_topics

pytestmark = pytest.mark.integration


def test_ensure_topics_creates_once_then_reports_exists(kafka_settings):
    kafka = kafka_settings.kafka
    names = [unique_name("t-admin-a"), unique_name("t-admin-b")]
    assert ensure_topics(kafka, names, partitions=3) == {names[0]: "created", names[1]: "created"}
    # Again, even asking for another partition count: existing topics are left alone.
    assert ensure_topics(kafka, names, partitions=5) == {names[0]: "exists", names[1]: "exists"}
    assert describe_partitions(kafka, names) == {names[0]: 3, names[1]: 3}


def test_pipeline_topics_follow_the_config(kafka_settings):
    base = unique_name("t-pipe")
    topics = TopicSettings(**{route: f"{base}.{route}" for route in TopicSettings.model_fields})
    kafka = kafka_settings.kafka.model_copy(update={"partitions": 2})
    outcome = ensure_pipeline_topics(kafka, topics)
    assert sorted(outcome) == sorted(topics.all()) and set(outcome.values()) == {"created"}
    assert set(describe_partitions(kafka, topics.all()).values()) == {2}


@pytest.mark.slow  # 5-8 s: `synpref topics` processes
def test_topics_cli_is_idempotent(kafka_settings):
    base = unique_name("t-cli")
    env = {
        **os.environ,
        "SYNPREF_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.kafka.bootstrap_servers,
        **{f"SYNPREF_TOPICS__{route.upper()}": f"{base}.{route}" for route in TopicSettings.model_fields},
    }
    cmd = [sys.executable, "-m", "synpref.shared.cli", "topics", "--partitions", "3"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.strip().splitlines()
    assert len(lines) == len(TopicSettings.model_fields)
    assert all(line.endswith("\tcreated\tpartitions=3") for line in lines), first.stdout
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert all("\texists\t" in line for line in second.stdout.strip().splitlines()), second.stdout


@pytest.mark.slow  # 5-8 s: `synpref topics` processes
def test_topics_cli_fails_clearly_without_a_cluster():
    env = {**os.environ, "SYNPREF_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1", "SYNPREF_KAFKA__REQUEST_TIMEOUT_MS": "2000"}
    cmd = [sys.executable, "-m", "synpref.shared.cli", "topics", "--timeout", "3", "t-never"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "synpref topics:" in run.stderr
