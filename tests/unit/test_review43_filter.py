"""Review 43 of the gold scorer and the consistency filter: failures that lost pairs or decided them wrongly."""

from __future__ import annotations

from typing import Any

import pytest
from kafka.consumer.fetcher import ConsumerRecord

from synpref.services.gold_scorer.scoring import ScoringModel, in_process_scorer, make_scoring_stage
from synpref.shared import modeling
from synpref.shared.config import ModelRef, ScoringSettings, TopicSettings
from synpref.shared.kafka.batch import plan_batch
from synpref.shared.kafka.codec import encode_record
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.stage import StageBroken
from synpref.v1.pair_pb2 import PairRecord

TOPICS = TopicSettings(s2_raw="in", s2_scored="scored", dead_letter="dlq")


def record(i: int) -> PairRecord:
    pair = new_pair([{"role": "user", "content": f"question {i}"}], [{"role": "assistant", "content": f"answer {i}"}],
                    [{"role": "assistant", "content": "no"}], source="unit")  # fmt: skip
    return new_record(pair)


def consumed(rec: PairRecord, offset: int) -> ConsumerRecord:
    out = encode_record(rec, "in")
    return ConsumerRecord("in", 0, 0, offset, 0, 0, out.key, out.value, out.headers, None, 0, len(out.value), 0)


def device_error() -> RuntimeError:
    """What a forward raises once the CUDA context is broken (an illegal memory access, a lost GPU): the same
    for every later forward, whatever the pairs. torch >= 2.8 raises AcceleratorError, older ones RuntimeError."""
    import torch

    error = getattr(torch, "AcceleratorError", RuntimeError)
    return error("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("size", [3, 1])
def test_an_in_process_device_failure_has_the_batch_read_again_not_every_pair_dead_lettered(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Found in review: the in-process gold scorer (a Kafka service with scoring.mode in_process) took only an
    out-of-memory error for the device's; any other CUDA error raised per pair alone too, so plan_batch
    dead-lettered every pair of every batch for as long as the GPU stayed broken: the stream went to the DLQ."""
    broken = {"device": True}

    def score_pairs(model: Any, tokenizer: Any, pairs: list[dict], *args: Any) -> list[tuple[float, float]]:
        if broken["device"]:
            raise device_error()
        return [(1.0, 0.0)] * len(pairs)

    monkeypatch.setattr(modeling, "load_reward_model", lambda path: (None, None))
    monkeypatch.setattr(modeling, "score_pairs", score_pairs)
    stage = make_scoring_stage(
        [ScoringModel("gold", "g1", in_process_scorer(ModelRef(path="/m/gold"), ScoringSettings()))]
    )
    messages = [consumed(record(i), i) for i in range(size)]
    with pytest.raises(StageBroken, match="CUDA error"):  # the service exits and Kubernetes restarts it
        plan = plan_batch(messages, stage, TOPICS, "gold-scorer")
        pytest.fail(f"dead-lettered {plan.failed} of {size}")
    broken["device"] = False  # the device is back (the pod restarted on a good GPU): the same batch scores in full
    plan = plan_batch(messages, stage, TOPICS, "gold-scorer")
    assert plan.emitted == {"scored": size} and plan.dead_lettered == 0


def test_a_pair_the_model_refuses_in_process_is_still_dead_lettered_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device check must not swallow a pair's own error: a chat template's refusal stays the pair's."""

    def score_pairs(model: Any, tokenizer: Any, pairs: list[dict], *args: Any) -> list[tuple[float, float]]:
        if any("answer 1" in str(p) for p in pairs):
            raise RuntimeError("Conversation roles must alternate user/assistant/user/assistant/...")
        return [(1.0, 0.0)] * len(pairs)

    monkeypatch.setattr(modeling, "load_reward_model", lambda path: (None, None))
    monkeypatch.setattr(modeling, "score_pairs", score_pairs)
    stage = make_scoring_stage(
        [ScoringModel("gold", "g1", in_process_scorer(ModelRef(path="/m/gold"), ScoringSettings()))]
    )
    plan = plan_batch([consumed(record(i), i) for i in range(3)], stage, TOPICS, "gold-scorer")
    assert plan.emitted == {"scored": 2} and plan.failed == {"failed": 1}


def test_a_cuda_error_counts_as_the_devices_on_torch_before_accelerator_error_too() -> None:
    from synpref.services.gold_scorer.scoring import device_failure

    assert device_failure(device_error())
    assert device_failure(RuntimeError("CUDA error: unspecified launch failure"))  # torch < 2.8
    assert not device_failure(RuntimeError("Conversation roles must alternate user/assistant/..."))
