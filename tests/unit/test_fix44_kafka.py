"""Fix 44, Kafka time bounds: max.poll.interval.ms is a setting, and a commit that times out does not end a stage.

1. The consumers' max.poll.interval.ms was hard-coded to 10 minutes: an operator with slower batches could not
   raise it, one wanting faster failure detection could not lower it, and the gold scorer's per-call budget
   (half of it) was a constant of its own. kafka.max_poll_interval_ms now feeds all three.
2. A blocking offset commit that timed out (KafkaTimeoutError: no coordinator answered within request_timeout_ms)
   was re-raised by the runner of a service without a sink, so the stage service exited. It is logged now: the
   batch's outputs are acknowledged, and its offsets are committed with a later batch or read again (at-least-once).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaTimeoutError
from kafka.structs import OffsetAndMetadata, TopicPartition

import synpref.client
from synpref.services.gold_scorer import scoring
from synpref.shared.config import ConfigError, KafkaSettings, ScoringSettings, Settings, TopicSettings, load_settings
from synpref.shared.kafka.clients import Outbox, consumer_config
from synpref.shared.kafka.codec import decode_record, encode_record
from synpref.shared.kafka.runner import RETRY_SHARE, StageRunner
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord
from testing.group_consumer import Clock, GroupConsumer, RecordingProducer
from testing.passthrough import passthrough

TOPICS = TopicSettings(s2_raw="in", s2_annotated="out", dead_letter="dlq")
TP = TopicPartition("in", 0)


def record(i: int) -> PairRecord:
    return new_record(new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": f"a{i}"}],
                               [{"role": "assistant", "content": f"b{i}"}], source="unit"))  # fmt: skip


def consumed(offset: int) -> ConsumerRecord:
    out = encode_record(record(offset), "in")
    return ConsumerRecord("in", 0, 0, offset, 0, 0, out.key, out.value, out.headers, None, 0, len(out.value), 0)


# -- 1. max.poll.interval.ms -------------------------------------------------------------------------------------


def test_the_consumers_poll_interval_is_the_kafka_setting() -> None:
    assert consumer_config(KafkaSettings(), "g")["max_poll_interval_ms"] == 600_000, "the default stays 10 minutes"
    slow = KafkaSettings(max_poll_interval_ms=1_800_000)  # a judge at tens of seconds a call, 256 records a batch
    assert consumer_config(slow, "g")["max_poll_interval_ms"] == 1_800_000
    assert consumer_config(KafkaSettings(max_poll_interval_ms=60_000), "g")["max_poll_interval_ms"] == 60_000


def test_the_poll_interval_is_set_from_the_environment_and_refused_below_its_floor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SYNPREF_CONFIG", raising=False)
    monkeypatch.setenv("SYNPREF_KAFKA__MAX_POLL_INTERVAL_MS", "1200000")
    assert load_settings().kafka.max_poll_interval_ms == 1_200_000
    monkeypatch.setenv("SYNPREF_KAFKA__MAX_POLL_INTERVAL_MS", "500")  # under one poll of a slow broker
    with pytest.raises(ConfigError, match=r"kafka\.max_poll_interval_ms"):
        load_settings()


def test_the_runners_retry_deadline_follows_the_setting() -> None:
    kafka = KafkaSettings(max_poll_interval_ms=1_200_000)
    runner = StageRunner(Settings(kafka=kafka, topics=TOPICS), passthrough("annotated"), service="fix44")
    runner.consumer = SimpleNamespace(config=consumer_config(kafka, "g"))
    runner.clock = lambda: 1000.0
    assert runner._retry_deadline() == 1000.0 + RETRY_SHARE * 1200.0


def test_the_gold_scorers_budget_per_stage_call_follows_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    class Client:  # no scorer behind it: models_from_settings only asks it for the served versions
        def __init__(self, address: str, timeout: float) -> None:
            pass

        def info(self, model: str, timeout: float) -> Any:
            raise RuntimeError("no scorer")

    monkeypatch.setattr(synpref.client, "RewardClient", Client)
    grpc_mode = ScoringSettings(mode="grpc", scorer_address="x")
    slow = KafkaSettings(max_poll_interval_ms=1_800_000)
    assert [m.budget_s for m in scoring.models_from_settings(grpc_mode, None, slow)] == [900.0, 900.0]
    fast = KafkaSettings(max_poll_interval_ms=120_000)
    assert [m.budget_s for m in scoring.models_from_settings(grpc_mode, kafka=fast)] == [60.0, 60.0]
    assert [m.budget_s for m in scoring.models_from_settings(grpc_mode)] == [300.0, 300.0], "default: half of 10 min"
    assert scoring.STAGE_BUDGET_S == 300.0


# -- 2. a blocking commit that times out ---------------------------------------------------------------------------


class SlowCoordinator(GroupConsumer):
    """A group member whose first `timeouts` blocking commits time out, as kafka-python's commit does when no
    coordinator answers within request_timeout_ms; `stop` is set once a poll finds nothing left."""

    def __init__(self, messages: list[ConsumerRecord], timeouts: int, stop: threading.Event) -> None:
        super().__init__(messages, Clock(), TP, 600_000)
        self.timeouts, self.stop, self.closed = timeouts, stop, False

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        polled = super().poll(timeout_ms, max_records)
        if not polled:
            self.stop.set()
        return polled

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        if self.timeouts > 0:
            self.timeouts -= 1
            raise KafkaTimeoutError("Timeout after waiting for 30000 ms")
        super().commit(offsets)

    def close(self, autocommit: bool = True) -> None:
        self.closed = True


class ClosingProducer(RecordingProducer):
    def close(self, timeout: float) -> None:
        pass


def stage_runner(consumer: SlowCoordinator, stop: threading.Event, sink: Any = None) -> StageRunner:
    runner = StageRunner(Settings(kafka=KafkaSettings(max_batch=2), topics=TOPICS), passthrough("annotated"),
                         service="fix44-commit", stop=stop, sink=sink)  # fmt: skip
    producer = ClosingProducer()
    runner.consumer, runner.producer, runner.outbox = consumer, producer, Outbox(producer, 5)
    return runner


def test_a_stage_service_goes_on_after_a_commit_that_timed_out() -> None:
    stop = threading.Event()
    consumer = SlowCoordinator([consumed(i) for i in range(6)], timeouts=1, stop=stop)
    runner = stage_runner(consumer, stop)
    producer = runner.producer
    runner.run()  # what a stage service runs until SIGTERM: it raised KafkaTimeoutError, and the service exited
    assert consumer.closed and stop.is_set(), "the runner stopped because it was asked to, not on the timeout"
    assert consumer.committed == 6, "the later batches' commits cover the batch whose commit timed out"
    outputs = [decode_record(v, h).pair.id for topic, v, h in producer.sent if topic == "out"]
    assert outputs == [record(i).pair.id for i in range(6)], "every batch went through, once"
    assert runner.stats.snapshot()["batches"] == 3


def test_the_last_commit_timing_out_leaves_the_offsets_to_read_again_without_raising() -> None:
    stop = threading.Event()
    consumer = SlowCoordinator([consumed(0), consumed(1)], timeouts=1, stop=stop)
    runner = stage_runner(consumer, stop)
    assert runner.run_once() == 2
    assert consumer.committed == 0, "not committed: the partition's next owner reads the batch again"


class DeskLikeSink:
    """A sink that hands back the offsets it lets the runner commit and wants to hear of a failed commit (the desk's
    inbox offers its offsets again then, and /readyz reports it)."""

    keeps_offsets = False

    def write(self, routed: list[tuple[str, PairRecord]]) -> None:
        pass

    def due(self) -> bool:
        return True

    def flush(self, offsets: Mapping[TopicPartition, int]) -> Mapping[TopicPartition, int] | None:
        return None

    def stored_offsets(self) -> Mapping[TopicPartition, int]:
        return {}


def test_a_sink_that_needs_to_know_still_hears_of_a_commit_that_timed_out() -> None:
    stop = threading.Event()
    consumer = SlowCoordinator([consumed(0)], timeouts=1, stop=stop)
    runner = stage_runner(consumer, stop, sink=DeskLikeSink())
    with pytest.raises(KafkaTimeoutError):
        runner.run_once()


def test_the_annotators_batch_deadline_is_bounded_by_the_poll_interval_it_runs_under() -> None:
    from synpref.services.annotator import main as annotator_main

    args = SimpleNamespace(input_route="s2_raw")
    late = Settings(annotator={"batch_deadline_s": 900})
    with pytest.raises(SystemExit, match=r"batch_deadline_s \(900\) must be at most 95% of kafka.max_poll_interval_ms"):
        annotator_main.make_spec(late, args)  # type: ignore[arg-type]
    # A longer interval lets a slower panel judge its batch (before: refused at 570 s whatever the interval).
    slower = Settings(annotator={"batch_deadline_s": 900}, kafka={"max_poll_interval_ms": 1_800_000})
    try:
        annotator_main.make_spec(slower, args)  # type: ignore[arg-type]
    except SystemExit as exc:
        assert "batch_deadline_s" not in str(exc)
