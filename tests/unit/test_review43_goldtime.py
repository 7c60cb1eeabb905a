"""Review 43, the gold scorer's time per batch: one call of its stage must stay inside max.poll.interval.ms.

The runner bounds its own one-record retry (test_review43_batchretry.py), but the gold-scorer stage scored a failing
batch's pairs one at a time, and halved a batch too slow for one deadline, with no bound over the whole call: a
slow scorer took it past the 10-minute interval, the member was dropped, its commit failed, and the same batch was
read and scored again for ever. Each test runs the service's own stage (models_from_settings, grpc mode) with a
fake scorer client on a fake clock, through the StageRunner and a consumer that behaves like a group member.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, ClassVar

import grpc
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

import synpref.client
from synpref.client.client import PairScore
from synpref.services.gold_scorer import scoring
from synpref.shared.config import KafkaSettings, ScoringSettings, Settings, TopicSettings
from synpref.shared.kafka.clients import Outbox
from synpref.shared.kafka.codec import DLQ_OFFSET, decode_record, encode_record, header_map
from synpref.shared.kafka.runner import UNAVAILABLE_MAX_PAUSE_S, StageRunner
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord
from testing.group_consumer import Clock, GroupConsumer, RecordingProducer

TOPICS = TopicSettings(s2_raw="in", s2_scored="scored", dead_letter="dlq")
TP = TopicPartition("in", 0)
POLL_INTERVAL_MS = 600_000
"""What make_consumer sets (shared/kafka/clients.py)."""
BATCH = 256
"""kafka.max_batch's default."""
BAD = "UNRENDERABLE"
"""A pair the scorer refuses (INVALID_ARGUMENT), whatever it is batched with."""


def record(i: int, bad: frozenset[int] = frozenset()) -> PairRecord:
    answer = BAD if i in bad else f"answer {i}"
    chosen, rejected = [{"role": "assistant", "content": answer}], [{"role": "assistant", "content": "no"}]
    return new_record(new_pair([{"role": "user", "content": f"question {i}"}], chosen, rejected, source="unit"))


def consumed(offset: int, bad: frozenset[int]) -> ConsumerRecord:
    out = encode_record(record(offset, bad), "in")
    return ConsumerRecord("in", 0, 0, offset, 0, 0, out.key, out.value, out.headers, None, 0, len(out.value), 0)


class Pauses(threading.Event):
    """The runner's stop event: its back-off passes on the fake clock instead of the real one."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock, self.pauses = clock, []

    def wait(self, timeout: float | None = None) -> bool:
        self.pauses.append(timeout)
        self.clock.now += timeout or 0.0
        return False


class Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name


def fake_client(clock: Clock, seconds: Any) -> type:
    """A RewardClient whose ScorePairs takes seconds(n pairs) of the fake clock, or its deadline where that is less
    (DEADLINE_EXCEEDED); a request holding the BAD pair is refused. calls lists (model, n pairs) of each call."""

    class Client:
        calls: ClassVar[list[tuple[str, int]]] = []

        def __init__(self, address: str, timeout: float) -> None:
            pass

        def info(self, model: str, timeout: float) -> Any:
            raise Status(grpc.StatusCode.UNAVAILABLE)

        def score_pairs(self, pairs: list[dict], model: str, timeout: float) -> list[PairScore]:
            Client.calls.append((model, len(pairs)))
            took = seconds(len(pairs))
            clock.now += min(took, timeout)
            if took > timeout:
                raise Status(grpc.StatusCode.DEADLINE_EXCEEDED)
            if any(BAD in str(p) for p in pairs):
                raise Status(grpc.StatusCode.INVALID_ARGUMENT)
            return [PairScore(float(len(str(p))), 1.0, 0.5, f"{model}-1") for p in pairs]

    return Client


def run_service(
    monkeypatch: pytest.MonkeyPatch, clock: Clock, client: type, timeout_s: float, bad: frozenset[int]
) -> tuple[GroupConsumer, RecordingProducer]:
    """The gold-scorer service's stage and runner over one partition of BATCH pairs (those `bad` refused), for up to
    8 batches."""
    monkeypatch.setattr(scoring, "time", SimpleNamespace(monotonic=clock))
    monkeypatch.setattr(synpref.client, "RewardClient", client)
    models = scoring.models_from_settings(ScoringSettings(mode="grpc", scorer_address="x", timeout_s=timeout_s))
    consumer, producer = (
        GroupConsumer([consumed(i, bad) for i in range(BATCH)], clock, TP, POLL_INTERVAL_MS),
        RecordingProducer(),
    )
    settings = Settings(kafka=KafkaSettings(max_batch=BATCH), topics=TOPICS)
    runner = StageRunner(settings, scoring.make_scoring_stage(models), service="review43-goldtime", stop=Pauses(clock))
    runner.consumer, runner.producer, runner.outbox = consumer, producer, Outbox(producer, 5)
    runner.clock = clock
    for _ in range(8):
        runner.run_once()
        if consumer.committed == BATCH:
            break
    return consumer, producer


def assert_each_pair_once(consumer: GroupConsumer, producer: RecordingProducer, bad: frozenset[int]) -> None:
    assert consumer.failed_commits == 0, f"a batch outran max.poll.interval.ms ({consumer.longest_gap:.0f}s)"
    assert consumer.committed == BATCH, f"stuck at offset {consumer.committed}"
    # The stage's half of the interval, and a back-off before the batch's next read: the rest sends and commits.
    assert consumer.longest_gap <= scoring.STAGE_BUDGET_S + UNAVAILABLE_MAX_PAUSE_S, "no time left to commit"
    scored = [decode_record(v, h) for topic, v, h in producer.sent if topic == "scored"]
    want = sorted(record(i, bad).pair.id for i in range(BATCH) if i not in bad)
    assert sorted(r.pair.id for r in scored) == want, "each scored pair sent once"
    assert all([s.model for s in r.scores] == ["gold", "best"] for r in scored)
    assert [header_map(h)[DLQ_OFFSET] for topic, _, h in producer.sent if topic == "dlq"] == [str(i) for i in bad]


def test_a_batch_scored_one_pair_at_a_time_by_a_slow_scorer_gets_through_inside_the_poll_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found in review: one pair the scorer refuses has its batch of 256 scored one pair at a time, gold then best:
    # 511 calls. At 2 s a call (a loaded scorer) that is 17 minutes: the member was dropped, the commit failed and
    # the batch was read and scored again (its outputs sent again) for ever.
    clock = Clock()
    client = fake_client(clock, lambda n: 2.0)
    consumer, producer = run_service(monkeypatch, clock, client, timeout_s=60, bad=frozenset({3}))
    assert_each_pair_once(consumer, producer, frozenset({3}))
    # Nothing scored twice for a model across the re-reads: each read went on from where the last one stopped.
    alone = [c for c in client.calls if c[1] == 1]
    assert len(alone) <= 2 * BATCH - 1 + 4, f"{len(alone)} calls for single pairs"


def test_a_stage_two_batch_scored_in_halves_by_both_models_stays_inside_the_poll_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found in review: each model may spend SPLIT_TIMEOUTS of scoring.timeout_s halving a batch, and its halves
    # then take up to a deadline each; Stage 2 scores with gold, then best. At timeout_s 120 (allowed) a batch of
    # 256 that misses its deadline, and halves of 128 that take 100 s each, took 640 s: past the interval, for ever.
    clock = Clock()
    client = fake_client(clock, lambda n: 1000.0 if n > BATCH // 2 else 100.0)
    consumer, producer = run_service(monkeypatch, clock, client, timeout_s=120, bad=frozenset())
    assert_each_pair_once(consumer, producer, frozenset())


def test_the_controllers_own_scoring_stage_has_no_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the controller's process no poll interval runs: a slow model there is waited for, as before."""
    clock = Clock()
    monkeypatch.setattr(scoring, "time", SimpleNamespace(monotonic=clock))

    def slow(pairs: list[dict]) -> list[tuple[float, float]]:
        clock.now += 1000.0
        return [(1.0, 0.0)] * len(pairs)

    stage = scoring.make_scoring_stage(
        [scoring.ScoringModel("gold", "g1", slow), scoring.ScoringModel("best", "b1", slow)]
    )
    assert len(stage([record(i) for i in range(3)]).by_route()["scored"]) == 3
