"""The cluster controller's loop over a real Kafka broker: stages run as Kafka stage runners.

Four runners stand in for the services (same stage functions, same topics, each stage's
own): gold-scorer (raw -> scored, scoring with the models the controller registered, as the
scorer service would serve them), annotator (scored -> annotated, simulated judges, skipping
Stage-2 pairs the best RM already gets right), consistency filter (annotated -> decided, the
rule of each record's stage) and the desk (review -> verified / discarded, oracle verdicts).
The controller publishes and collects through KafkaExecutor and KafkaDeskHumans. The run must
end exactly as the in-process run on the same data does.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from kafka_broker import read_topic, topic_size

from synpref.services.annotator.annotate import Annotator
from synpref.services.consistency_filter.main import by_stage
from synpref.services.controller.executors import KafkaExecutor
from synpref.services.controller.loop import Controller
from synpref.services.controller.providers import KafkaDeskHumans, OracleHumans
from synpref.services.controller.simulated import SimulatedJudge, mark_truth
from synpref.services.controller.state import StateStore, read_pools
from synpref.services.gold_scorer.scoring import ScoringModel, make_scoring_stage
from synpref.shared.config import STAGE_ROUTES, SimulatedJudgeSettings, load_settings
from synpref.shared.kafka.codec import decode_record
from synpref.shared.kafka.runner import StageRunner
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.stage import StageResult
from synpref.v1.pair_pb2 import DECISION_REVIEW, DECISION_SKIP, STAGE_ONE, STAGE_TWO, PairRecord
from testing import controller_fakes as fakes

pytestmark = pytest.mark.integration


def controller_settings(tmp_path: Path, name: str, **extra):
    data = fakes.write_synthetic(tmp_path / "pairs.jsonl", 100, seed=5)
    controller = {
        "workdir": str(tmp_path / name),
        "sources": [str(data)],
        "seed_fraction": 0.1,
        "iterations": 2,
        "human_budget": 4,
        "study": {
            "human": "oracle",
            "label_noise": 0.3,
            "judges": [{"name": "sim-a", "accuracy": 0.85}, {"name": "sim-b", "accuracy": 0.75}],
        },
    }
    return load_settings(controller=controller, **extra)


def summary(workdir: Path) -> dict:
    state = StateStore(workdir).load()
    return {
        "pools": read_pools(workdir),
        "history": state.history,
        "stage1": state.results["stage1"],
        "stage2": state.results["stage2"]["decisions"],
        "holdout": state.results["holdout_accuracy"],
    }


@pytest.mark.slow  # about 20 s: the loop twice, once through four runners on a broker
def test_loop_over_kafka_matches_the_in_process_loop(tmp_path, kafka_settings, unique_topics, unique_group):
    reference = controller_settings(tmp_path, "in-process")
    judges = [SimulatedJudge(j) for j in reference.controller.study.judges]
    Controller(
        reference, fakes.BagOfWordsModels(), OracleHumans(), judges, embed=fakes.embed, progress=lambda _m: None
    ).run()

    base = controller_settings(tmp_path, "kafka")
    settings = base.model_copy(update={"kafka": kafka_settings.kafka, "topics": unique_topics(partitions=2)})
    controller = Controller(
        settings,
        fakes.BagOfWordsModels(),
        KafkaDeskHumans(settings, timeout_s=120),
        [],
        executor=KafkaExecutor(settings, timeout_s=120),
        embed=fakes.embed,
        progress=lambda _m: None,
    )

    def scorer(batch):  # what the gold-scorer service does with the models the scorer serves
        return make_scoring_stage(controller._stage_models)(batch)

    def desk(batch):  # the desk service, with oracle annotators
        out = StageResult()
        for route, record in OracleHumans().review(batch):
            out.emit(route, record)
        return out

    judges = [SimulatedJudge(j) for j in base.controller.study.judges]
    services = {
        "gold-scorer": (scorer, "raw"),
        "annotator": (Annotator(judges, skip_confident=True).stage(), "scored"),
        "filter": (by_stage(settings.filter), "annotated"),
        "desk": (desk, "review"),
    }
    stop = threading.Event()
    runners = [
        StageRunner(settings, stage, service=name, input_route=route, group_id=unique_group(), stop=stop)
        for name, (stage, route) in services.items()
    ]
    threads = [threading.Thread(target=r.run, name=r.service, daemon=True) for r in runners]
    for t in threads:
        t.start()
    try:
        controller.run()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not [t.name for t in threads if t.is_alive()], "a stage runner did not stop within 30 s"
    assert summary(tmp_path / "kafka") == summary(tmp_path / "in-process")
    # Every stage really ran over Kafka: an executor that fell back to in-process work would leave one idle.
    processed = {r.service: r.stats.snapshot().get("processed", 0) for r in runners}
    assert all(n > 0 for n in processed.values()), processed


def length_rm(pairs: list[dict]) -> list[tuple[float, float]]:
    """Rewards by response length: sure of long-chosen pairs, wrong about short-chosen ones."""
    return [(len(p["chosen"][-1]["content"]) / 10, len(p["rejected"][-1]["content"]) / 10) for p in pairs]


def staged(n: int, stage: int) -> list[PairRecord]:
    records = []
    for i in range(n):
        long, short = f"a careful, complete answer number {i} " * 3, f"short {i}"
        chosen, rejected = (long, short) if i % 2 else (short, long)
        pair = new_pair([{"role": "user", "content": f"question {i} of stage {stage}"}],
                        [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}],
                        source="unit")  # fmt: skip
        record = new_record(pair)
        mark_truth(record)
        record.lineage.stage = stage
        records.append(record)
    return records


@pytest.mark.slow  # about 15 s: three runners on a broker, one batch per stage
def test_each_stage_runs_score_annotate_filter_on_its_own_topics(kafka_settings, unique_topics, unique_group):
    settings = kafka_settings.model_copy(update={"topics": unique_topics(partitions=2)})
    topics, kafka = settings.topics, settings.kafka
    # The services as the chart runs them: one gold-scorer serving gold and best (Stage 1's working
    # RM is served as best), an annotator that skips confident Stage-2 pairs, the filter by stage.
    models = [ScoringModel("gold", "g1", length_rm), ScoringModel("best", "b1", length_rm)]
    judges = [SimulatedJudge(SimulatedJudgeSettings(name="sim", accuracy=1.0, samples=1))]
    services = {
        "gold-scorer": (make_scoring_stage(models), "raw"),
        "annotator": (Annotator(judges, skip_confident=True).stage(), "scored"),
        "filter": (by_stage(settings.filter), "annotated"),
    }
    stop = threading.Event()
    runners = [StageRunner(settings, stage, service=name, input_route=route, group_id=unique_group(), stop=stop)
               for name, (stage, route) in services.items()]  # fmt: skip
    threads = [threading.Thread(target=r.run, name=r.service, daemon=True) for r in runners]
    for t in threads:
        t.start()
    executor = KafkaExecutor(settings, timeout_s=300)
    try:
        one = executor.run("stage1", staged(8, STAGE_ONE))
        s2_sizes = [topic_size(kafka, getattr(topics, f"s2_{route}")) for route in STAGE_ROUTES]
        two = executor.run("stage2", staged(8, STAGE_TWO))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not one.failed and not two.failed
    # Stage 1: every pair scored (the working RM as best), judged whatever its p, decided by the stage-1 rule.
    assert len(one.routed) == 8
    for route, record in one.routed:
        assert [s.model for s in record.scores] == ["best"] and len(record.votes) == 1
        assert record.lineage.steps[-3:] == ["gold-scorer", "annotator", "consistency-filter"]
        assert record.decision.decision in (DECISION_REVIEW, DECISION_SKIP) and record.lineage.stage == STAGE_ONE
        assert route == ("review" if record.decision.decision == DECISION_REVIEW else "discarded")
    assert {r.decision.decision for _, r in one.routed} == {DECISION_REVIEW, DECISION_SKIP}
    assert s2_sizes == [0, 0, 0, 0], "a Stage-1 record reached a Stage-2 topic"
    # Stage 2 needs no scores from the controller: the gold-scorer adds gold and best, and the
    # annotator asks no judges about the pairs the best RM already gets right.
    assert len(two.routed) == 8
    for _, record in two.routed:
        assert sorted(s.model for s in record.scores) == ["best", "gold"]
        assert record.decision.rule == "stage2.consistency"
    judged = sorted(len(r.votes) for _, r in two.routed)
    assert judged == [0, 0, 0, 0, 1, 1, 1, 1]
    # Each stage's records went through its own four topics, and only through them.
    for route in STAGE_ROUTES:
        for stage, topic in ((STAGE_ONE, getattr(topics, f"s1_{route}")), (STAGE_TWO, getattr(topics, f"s2_{route}"))):
            found = [decode_record(m.value, m.headers) for m in read_topic(kafka, topic)]
            assert len(found) == 8 and {r.lineage.stage for r in found} == {stage}, topic
