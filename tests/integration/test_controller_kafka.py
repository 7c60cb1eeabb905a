"""The cluster controller's loop over a real Kafka broker: stages run as Kafka stage runners.

Four runners stand in for the services (same stage functions, same topics): annotator
(raw -> annotated, simulated judges, skipping pairs the best RM already gets right),
gold-scorer (annotated -> scored, scoring with the models the controller registered, as the
scorer service would serve them), consistency filter (scored -> curated / discarded) and the
desk (review -> verified / discarded, oracle verdicts). The controller publishes and
collects through KafkaExecutor and KafkaDeskHumans. The run must end exactly as the
in-process run on the same data does.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from synpref.services.annotator.annotate import Annotator
from synpref.services.consistency_filter.rules import make_filter_stage
from synpref.services.controller.executors import KafkaExecutor
from synpref.services.controller.loop import Controller
from synpref.services.controller.providers import KafkaDeskHumans, OracleHumans
from synpref.services.controller.simulated import SimulatedJudge
from synpref.services.controller.state import StateStore
from synpref.services.gold_scorer.scoring import make_scoring_stage
from synpref.shared.config import load_settings
from synpref.shared.kafka.runner import StageRunner
from synpref.shared.stage import StageResult
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
        "pools": state.pools,
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
        return make_scoring_stage(controller._stage2_models)(batch)

    def desk(batch):  # the desk service, with oracle annotators
        out = StageResult()
        for route, record in OracleHumans().review(batch):
            out.emit(route, record)
        return out

    f2 = settings.filter.model_copy(update={"stage": 2})
    services = {
        "annotator": (
            Annotator([SimulatedJudge(j) for j in base.controller.study.judges], skip_confident=True).stage(),
            "raw",
        ),
        "gold-scorer": (scorer, "annotated"),
        "filter": (make_filter_stage(f2), "scored"),
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
