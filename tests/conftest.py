"""Fixtures shared by the whole test suite.

Kafka, for integration tests (`@pytest.mark.integration`). The broker starts only when
a test first asks for one of these fixtures, and stops at the end of the session:
a real single-node Apache Kafka 4.x (KRaft) on a free loopback port, from the jars that
`make kafka` fetched into .cache/kafka; or, if SYNPREF_KAFKA_BOOTSTRAP is set, that
cluster (SASL/SSL settings then come from SYNPREF_KAFKA__* variables as usual).
The terminal summary names the broker the session ran against.

  kafka_bootstrap  session   "host:port" of the broker.
  kafka_settings   session   Settings whose kafka.bootstrap_servers points at the broker.
  unique_topics    function  factory: unique_topics(partitions=1) -> TopicSettings with a fresh
                             name for every route (raw, annotated, ..., dead_letter), all created.
  unique_group     function  factory: unique_group() -> a fresh consumer-group id.

Typical use:
    def test_stage(kafka_settings, unique_topics, unique_group):
        settings = kafka_settings.model_copy(update={"topics": unique_topics(partitions=3)})
tests/kafka_broker.py has helpers to produce records and read topics back.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from synpref.shared.config import Settings, TopicSettings, load_settings

log = logging.getLogger("synpref.tests.kafka")
EXTERNAL_ENV = "SYNPREF_KAFKA_BOOTSTRAP"
_BROKER: dict[str, Any] = {}
"""The session's kafka_broker.Broker, once a test asked for it. kafka_broker (and so kafka-python)
is imported only then, after pytest_configure has set the warning filters."""


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3.0 loads its protocol schemas with importlib.resources APIs deprecated in 3.11:
    # two hundred identical warnings per run that say nothing about this project.
    config.addinivalue_line("filterwarnings", "ignore:read_text is deprecated:DeprecationWarning:kafka")
    config.addinivalue_line("filterwarnings", "ignore:open_text is deprecated:DeprecationWarning:importlib")
    # transformers gives its loggers one StreamHandler on the sys.stderr of the moment it first logs: inside a
    # test using capsys that stream is closed after the test, and every later transformers warning printed
    # "--- Logging error ---" and a traceback into whichever test came next. Made now, on the session's stderr.
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")


def pytest_report_header(config: pytest.Config) -> str:
    external = os.environ.get(EXTERNAL_ENV)
    if external:
        return f"kafka: the external cluster {EXTERNAL_ENV}={external}"
    try:
        from testing.local_kafka import kafka_home, kafka_version

        return f"kafka: Apache Kafka {kafka_version()} from {kafka_home()} (started when an integration test needs it)"
    except Exception as exc:  # jars not fetched: unit tests still run
        return f"kafka: no local broker available ({exc})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    broker = _BROKER.get("broker")
    if broker is not None and broker.description:
        terminalreporter.write_sep("-", "kafka broker")
        terminalreporter.write_line(f"ran against {broker.description}")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    from kafka_broker import Broker

    broker = _BROKER["broker"] = Broker()
    bootstrap = broker.start()
    log.info("Kafka broker for this session: %s", broker.description)
    yield bootstrap
    broker.stop()


@pytest.fixture(scope="session")
def kafka_settings(kafka_bootstrap: str) -> Settings:
    base = load_settings()
    return base.model_copy(update={"kafka": base.kafka.model_copy(update={"bootstrap_servers": kafka_bootstrap})})


@pytest.fixture
def unique_topics(kafka_settings: Settings, request: pytest.FixtureRequest) -> Callable[..., TopicSettings]:
    label = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-").lower()[:40]

    def make(partitions: int = 1) -> TopicSettings:
        from kafka_broker import make_unique_topics

        return make_unique_topics(kafka_settings.kafka, label, partitions)

    return make


@pytest.fixture
def unique_group(request: pytest.FixtureRequest) -> Callable[[], str]:
    label = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-").lower()[:40]
    return lambda: f"g-{label}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths `os.fsync` is called on from here on, in order (durability tests)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    return synced


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A CLI's logging.basicConfig binds a handler to the test's captured stderr: left on the root logger, the next
    test's log records go to that closed stream ("--- Logging error ---" and a traceback in its stderr)."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


@pytest.fixture
def light_run(monkeypatch):
    """`synpref run` with the test stand-ins for the MiniLM head and the retrieval embedder (seconds, not minutes)."""
    import synpref.services.controller.models as models
    import synpref.shared.retrieval as retrieval
    from testing import controller_fakes as fakes

    class Embedder:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def embed(self, texts):
            return fakes.embed(texts)

    monkeypatch.setattr(models, "make_models", lambda *args, **kwargs: fakes.BagOfWordsModels())
    monkeypatch.setattr(retrieval, "Embedder", Embedder)

    def config(tmp_path: Path, workdir: Path, pairs: int, **controller) -> Path:
        import yaml

        data = fakes.write_synthetic(tmp_path / f"pairs-{pairs}.jsonl", pairs, seed=1)
        judges = [{"name": "sim-a", "accuracy": 0.85}, {"name": "sim-b", "accuracy": 0.75}]
        settings = {
            "workdir": str(workdir),
            "sources": [str(data)],
            "seed_fraction": 0.1,
            "iterations": 1,
            "patience": 1,
            "human_budget": 4,
            "study": {"human": "oracle", "label_noise": 0.3, "judges": judges},
        } | controller
        path = tmp_path / f"run-{pairs}.yaml"
        path.write_text(yaml.safe_dump({"controller": settings}))
        return path

    return config
