"""Session 41's review of how the gold-scorer stage fails and what the Kafka runner makes of it.

Each finding runs the real gold-scorer stage (grpc mode) against a real scorer on loopback whose fake model
(a real tiny tokenizer, token-count rewards) fails or answers NaN as the test says, through plan_batch and the
StageRunner with recording fakes instead of a broker.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from synpref.services.gold_scorer.scoring import ScoringModel, make_scoring_stage, models_from_settings
from synpref.services.scorer.server import BackgroundScorer
from synpref.shared.config import ModelRef, ScorerSettings, ScoringSettings, Settings, TopicSettings
from synpref.shared.kafka.batch import plan_batch
from synpref.shared.kafka.clients import Outbox
from synpref.shared.kafka.codec import DLQ_KIND, DLQ_REASON, decode_record, encode_record, header_map
from synpref.shared.kafka.runner import StageRunner
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.stage import Stage, StageUnavailable
from synpref.v1.pair_pb2 import PairRecord
from testing.group_consumer import Clock, GroupConsumer, RecordingProducer
from testing.scorer_fakes import LengthBackend
from testing.tiny import build_tiny_tokenizer

TOPICS = TopicSettings(s2_raw="in", s2_scored="scored", dead_letter="dlq")
TP = TopicPartition("in", 0)
POISON = "POISONPAIR"
"""A pair whose forward fails on its own (the scorer's memory, say, cannot take it), whatever it is batched with."""
NAN = "NANPAIR"
"""A pair the model scores NaN."""


class MarkedBackend(LengthBackend):
    """Token-count rewards; a forward holding a POISON item fails, a NAN item scores NaN; `broken` fails every one."""

    broken = False

    def forward(self, batch: list[list[int]]) -> list[float]:
        texts = [self.tokenizer.decode(ids) for ids in batch]
        if self.broken or any(POISON in t for t in texts):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return [math.nan if NAN in t else float(len(ids)) for t, ids in zip(texts, batch, strict=True)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def scorer(tokenizer: Any) -> Iterator[BackgroundScorer]:
    MarkedBackend.broken = False
    served = {"gold": ModelRef(path="/m/gold", version="g1"), "best": ModelRef(path="/m/best", version="b1")}
    settings = ScorerSettings(port=0, http_port=0, metrics_port=0, models=served, device="cpu", max_wait_ms=0.0)
    with BackgroundScorer(settings, lambda *args: MarkedBackend(tokenizer)) as bg:
        yield bg
    MarkedBackend.broken = False


def grpc_stage(bg: BackgroundScorer) -> Stage:
    return make_scoring_stage(models_from_settings(ScoringSettings(mode="grpc", scorer_address=bg.address)))


def record(i: int, answer: str = "") -> PairRecord:
    pair = new_pair([{"role": "user", "content": f"question {i}"}],
                    [{"role": "assistant", "content": answer or "a fine answer " + "word " * i}],
                    [{"role": "assistant", "content": "no"}], source="unit")  # fmt: skip
    return new_record(pair)


def consumed(rec: PairRecord, offset: int) -> ConsumerRecord:
    out = encode_record(rec, "in")
    return ConsumerRecord("in", 0, 0, offset, 0, 0, out.key, out.value, out.headers, None, 0, len(out.value), 0)


# --- 1. a scorer that fails every forward dead-lettered every pair ---------------------------------------------


@pytest.mark.parametrize("size", [4, 1])
def test_a_scorer_failing_every_forward_has_the_batch_read_again_not_dead_lettered(
    scorer: BackgroundScorer, size: int
) -> None:
    """INTERNAL (a forward that failed: CUDA out of memory, a lost device) on every pair, alone too, is the
    scorer's state: the stage raised the batch's error, plan_batch then called it one record at a time, and a
    lone pair's failure came back as result.failed, so every pair of the batch was dead-lettered."""
    stage = grpc_stage(scorer)
    MarkedBackend.broken = True
    messages = [consumed(record(i), i) for i in range(size)]
    with pytest.raises(StageUnavailable, match="INTERNAL"):
        plan = plan_batch(messages, stage, TOPICS, "gold-scorer")
        pytest.fail(f"dead-lettered {plan.failed} of {size}: {header_map(plan.outgoing[0].headers)[DLQ_REASON]}")
    MarkedBackend.broken = False  # the scorer recovers: the same batch, read again, is scored in full
    plan = plan_batch(messages, stage, TOPICS, "gold-scorer")
    assert plan.emitted == {"scored": size} and plan.dead_lettered == 0


class RecordedPauses(threading.Event):
    """The runner's stop event: records each back-off instead of waiting it out."""

    def __init__(self) -> None:
        super().__init__()
        self.pauses: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.pauses.append(timeout)
        return False


def test_the_runner_backs_off_on_a_broken_scorer_and_sends_nothing_until_it_recovers(
    scorer: BackgroundScorer,
) -> None:
    records = [record(i) for i in range(3)]
    consumer, producer, stop = (
        GroupConsumer([consumed(r, i) for i, r in enumerate(records)], Clock(), TP, 600_000),
        RecordingProducer(),
        RecordedPauses(),
    )
    runner = StageRunner(Settings(topics=TOPICS), grpc_stage(scorer), service="review41-gold", stop=stop)
    runner.consumer, runner.producer = consumer, producer
    runner.outbox = Outbox(producer, 5)
    MarkedBackend.broken = True
    for _ in range(7):
        runner.run_once()
    # Nothing dead-lettered or committed; the batch was put back each time, after 1, 2, 4 ... at most 30 s.
    assert producer.sent == [] and consumer.commits == [] and consumer.seeks == [0] * 7
    assert stop.pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    MarkedBackend.broken = False
    assert runner.run_once() == 3
    assert producer.sent_topics == ["scored"] * 3 and consumer.commits == [3]


# --- scores stay on their pairs when a batch is split; one pair's own failure is dead-lettered alone ----------


def test_a_pair_that_fails_alone_is_dead_lettered_alone_and_the_others_keep_their_own_scores(
    scorer: BackgroundScorer,
) -> None:
    records = [record(0), record(1, f"{POISON} " * 3), record(2), record(3, f"an answer {NAN}"), record(4)]
    plan = plan_batch([consumed(r, i) for i, r in enumerate(records)], grpc_stage(scorer), TOPICS, "gold-scorer")
    assert plan.emitted == {"scored": 4} and plan.failed == {"failed": 1}
    (dead,) = [o for o in plan.outgoing if o.topic == "dlq"]
    headers = header_map(dead.headers)
    assert decode_record(dead.value, dead.headers).pair.id == records[1].pair.id
    assert headers[DLQ_KIND] == "failed" and "INTERNAL" in headers[DLQ_REASON]
    scored = {r.pair.id: r for r in (decode_record(o.value, o.headers) for o in plan.outgoing if o.topic == "scored")}
    # Each pair's own rewards, as scoring it alone gives them; NaN stays on the pair the model scored NaN.
    alone = grpc_stage(scorer)
    for i in (0, 2, 3, 4):
        (want,) = alone([records[i]]).by_route()["scored"]
        got = scored[records[i].pair.id]
        for mine, its in zip(got.scores, want.scores, strict=True):
            assert (mine.model, mine.version) == (its.model, its.version)
            pairs = [(mine.reward_chosen, its.reward_chosen), (mine.reward_rejected, its.reward_rejected)]
            assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in pairs)
        assert math.isnan(got.scores[0].reward_chosen) == (i == 3)
    assert len({s.reward_chosen for i in (0, 2, 4) for s in scored[records[i].pair.id].scores}) == 3


def test_a_pair_the_scorer_refuses_is_dead_lettered_even_alone(scorer: BackgroundScorer) -> None:
    """INVALID_ARGUMENT names the pair: it goes to the dead-letter topic at once, not back to the topic."""
    bad = record(0)
    bad.pair.chosen[0].role = "user"  # the scored side must end with the assistant's response
    plan = plan_batch([consumed(bad, 0)], grpc_stage(scorer), TOPICS, "gold-scorer")
    assert plan.failed == {"failed": 1} and "INVALID_ARGUMENT" in header_map(plan.outgoing[0].headers)[DLQ_REASON]


# --- a scorer that answers the wrong number of scores ---------------------------------------------------------


def test_a_scorer_answering_the_wrong_number_of_scores_has_the_batch_read_again() -> None:
    """ScoreCountError is the scorer's fault, yet plan_batch's one-record retry dead-lettered every pair with it."""
    stage = make_scoring_stage([ScoringModel("gold", "g", lambda pairs: [])])
    with pytest.raises(StageUnavailable, match=r"returned 0 scores for \d pairs"):
        plan = plan_batch([consumed(record(i), i) for i in range(3)], stage, TOPICS, "gold-scorer")
        pytest.fail(f"dead-lettered {plan.failed}")


def test_an_in_process_model_out_of_memory_has_the_batch_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """In process (scoring.mode local: the controller's own gold scorer), a device out of memory for every pair was
    a RuntimeError per pair: each dead-lettered, lost to curation. One pair too large alone is still dead-lettered."""
    import torch

    from synpref.services.gold_scorer.scoring import in_process_scorer
    from synpref.shared import modeling

    oom_for: dict[str, bool] = {"all": True}

    def score_pairs(model: Any, tokenizer: Any, pairs: list[dict], *args: Any) -> list[tuple[float, float]]:
        if oom_for["all"] or any(POISON in str(p) for p in pairs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return [(1.0, 0.0)] * len(pairs)

    monkeypatch.setattr(modeling, "load_reward_model", lambda path: (None, None))
    monkeypatch.setattr(modeling, "score_pairs", score_pairs)
    scorer = in_process_scorer(ModelRef(path="/m/gold"), ScoringSettings())
    stage = make_scoring_stage([ScoringModel("gold", "g1", scorer)])
    for size in (3, 1):
        with pytest.raises(StageUnavailable, match="out of memory"):
            plan = plan_batch([consumed(record(i), i) for i in range(size)], stage, TOPICS, "gold-scorer")
            pytest.fail(f"dead-lettered {plan.failed}")
    oom_for["all"] = False
    plan = plan_batch([consumed(record(0), 0), consumed(record(1, POISON), 1)], stage, TOPICS, "gold-scorer")
    assert plan.failed == {"failed": 1} and plan.emitted == {"scored": 1}
