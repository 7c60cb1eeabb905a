"""Session 45, area C: a gold scorer whose own device broke (a sticky CUDA error in scoring.mode in_process) ends its
process, its batch uncommitted, instead of reading the batch again for ever: only a new process clears a broken
CUDA context. A scorer replica failing over gRPC stays StageUnavailable (restarting the gold scorer would not help).

The stage is the real gold-scorer stage over a real tiny reward model (or shared/modeling's score_pairs faked);
the Kafka runner and the service run with recording fakes instead of a broker.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from synpref.services.gold_scorer.scoring import ScorerFailed, ScoringModel, in_process_scorer, make_scoring_stage
from synpref.shared import modeling
from synpref.shared import service as service_module
from synpref.shared.config import KafkaSettings, ModelRef, ScoringSettings, Settings, TopicSettings, load_settings
from synpref.shared.kafka.batch import plan_batch
from synpref.shared.kafka.clients import Outbox
from synpref.shared.kafka.codec import encode_record
from synpref.shared.kafka.runner import StageRunner
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.service import Service, ServiceSpec
from synpref.shared.stage import Stage, StageBroken, StageUnavailable
from synpref.v1 import pipeline_pb2, pipeline_pb2_grpc
from synpref.v1.pair_pb2 import PairRecord
from testing.group_consumer import Clock, GroupConsumer, RecordingProducer

TOPICS = TopicSettings(s2_raw="in", s2_scored="scored", dead_letter="dlq")
TP = TopicPartition("in", 0)
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def record(i: int) -> PairRecord:
    pair = new_pair([{"role": "user", "content": f"question {i}"}], [{"role": "assistant", "content": f"answer {i}"}],
                    [{"role": "assistant", "content": "no"}], source="unit")  # fmt: skip
    return new_record(pair)


def consumed(rec: PairRecord, offset: int) -> ConsumerRecord:
    out = encode_record(rec, "in")
    return ConsumerRecord("in", 0, 0, offset, 0, 0, out.key, out.value, out.headers, None, 0, len(out.value), 0)


def device_error(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError(ILLEGAL_ACCESS)


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from testing.tiny import build_tiny_reward_model

    return build_tiny_reward_model(tmp_path_factory.mktemp("rm"), layers=1, hidden=32, heads=2, kv_heads=1)


@pytest.mark.parametrize("size", [3, 1])
def test_a_canary_failing_on_the_in_process_device_raises_stage_broken(
    monkeypatch: pytest.MonkeyPatch, tiny_rm: Path, size: int
) -> None:
    loaded: list[Any] = []
    load = modeling.load_reward_model

    def load_and_keep(path: str) -> tuple[Any, Any]:
        model, tokenizer = load(path)
        loaded.append(model)
        return model, tokenizer

    monkeypatch.setattr(modeling, "load_reward_model", load_and_keep)
    settings = ScoringSettings(gold=ModelRef(path=str(tiny_rm), version="tiny"), max_length=128)
    stage = make_scoring_stage([ScoringModel("gold", "tiny", in_process_scorer(settings.gold, settings))])
    messages = [consumed(record(i), i) for i in range(size)]
    assert plan_batch(messages, stage, TOPICS, "gold-scorer").emitted == {"scored": size}  # a working model first

    (model,) = loaded
    model.forward = device_error  # the CUDA context broke: every forward fails from now on, whatever its input
    with pytest.raises(StageBroken, match="illegal memory access") as broken:
        plan = plan_batch(messages, stage, TOPICS, "gold-scorer")
        pytest.fail(f"dead-lettered {plan.failed} of {size}")  # old code: StageUnavailable, read again for ever
    assert "small ordinary pair" in str(broken.value)


def test_a_scorer_replica_failing_over_grpc_or_out_of_memory_stays_unavailable_not_broken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def replica_failed(pairs: list[dict]) -> list[tuple[float, float]]:
        raise ScorerFailed(f"scorer failed {len(pairs)} pair(s) with 'gold': INTERNAL: {ILLEGAL_ACCESS}")

    with pytest.raises(StageUnavailable, match="a small ordinary pair fails as well") as away:
        make_scoring_stage([ScoringModel("gold", "g", replica_failed)])([record(0)])
    assert not isinstance(away.value, StageBroken)  # restarting the gold scorer would not mend the replica

    import torch

    def out_of_memory(*_args: Any) -> list[tuple[float, float]]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(modeling, "load_reward_model", lambda path: (None, None))
    monkeypatch.setattr(modeling, "score_pairs", out_of_memory)
    scorer = in_process_scorer(ModelRef(path="/m/gold"), ScoringSettings())
    with pytest.raises(StageUnavailable, match="out of memory") as full:
        make_scoring_stage([ScoringModel("gold", "g", scorer)])([record(0)])
    assert not isinstance(full.value, StageBroken)  # memory another process holds may come free: no restart


def breaks_after_first_batch(monkeypatch: pytest.MonkeyPatch) -> Stage:
    """The real gold-scorer stage, in process, whose device breaks after its first forward."""
    calls = {"n": 0}

    def score_pairs(model: Any, tokenizer: Any, pairs: list[dict], *args: Any) -> list[tuple[float, float]]:
        calls["n"] += 1
        if calls["n"] > 1:
            device_error()
        return [(1.0, 0.0)] * len(pairs)

    monkeypatch.setattr(modeling, "load_reward_model", lambda path: (None, None))
    monkeypatch.setattr(modeling, "score_pairs", score_pairs)
    scorer = in_process_scorer(ModelRef(path="/m/gold"), ScoringSettings())
    return make_scoring_stage([ScoringModel("gold", "g1", scorer)])


def fakes(n: int) -> tuple[GroupConsumer, RecordingProducer]:
    return GroupConsumer([consumed(record(i), i) for i in range(n)], Clock(), TP, 600_000), RecordingProducer()


def test_stage_broken_stops_the_runner_without_committing_its_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    consumer, producer = fakes(5)
    settings = Settings(topics=TOPICS, kafka=KafkaSettings(max_batch=2))
    runner = StageRunner(settings, breaks_after_first_batch(monkeypatch), service="review45-gold")
    runner.consumer, runner.producer, runner.outbox = consumer, producer, Outbox(producer, 5)
    waits: list[float | None] = []

    def pause(timeout: float | None = None) -> bool:  # old code: the batch is read again after a pause, for ever
        waits.append(timeout)
        runner.stop.set()
        return True

    monkeypatch.setattr(runner.stop, "wait", pause)
    with pytest.raises(StageBroken, match="illegal memory access"):
        runner.run()
    # The first batch went through and was committed; the broken one was neither sent nor committed, the
    # position was put back to its first offset, and the clients closed without an auto-commit.
    assert producer.sent_topics == ["scored", "scored"] and consumer.commits == [2]
    assert consumer.seeks == [2] and consumer.pos == 2 and waits == []
    assert consumer.closes == [False] and producer.closed and runner.consumer is None


@pytest.fixture
def no_synpref_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.upper().startswith("SYNPREF_")]:
        monkeypatch.delenv(name)


def gold_spec(stage: Stage) -> ServiceSpec:
    return ServiceSpec(
        name="gold-scorer",
        stage=stage,
        input_route="raw",
        output_routes=["scored"],
        grpc_service="synpref.v1.GoldScorerService",
        add_servicer=pipeline_pb2_grpc.add_GoldScorerServiceServicer_to_server,
    )


@pytest.mark.usefixtures("no_synpref_env")
def test_the_gold_scorer_service_exits_1_on_a_broken_device_with_the_batch_uncommitted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "service: {host: 127.0.0.1, grpc_port: 0, metrics_port: 0, shutdown_grace_s: 1}\n"
        "kafka: {max_batch: 2}\n"
        "topics: {s2_raw: in, s2_scored: scored, dead_letter: dlq}\n"
    )
    consumer, producer = fakes(4)

    def connect(runner: StageRunner) -> None:  # no broker: the fakes
        runner.consumer, runner.producer, runner.outbox = consumer, producer, Outbox(producer, 5)

    monkeypatch.setattr(StageRunner, "open", connect)
    monkeypatch.setattr(service_module, "install_signal_handlers", lambda stop: None)  # leave pytest's alone
    stage = breaks_after_first_batch(monkeypatch)
    args = argparse.Namespace(config=str(config), grpc_only=False)
    codes: list[int] = []
    served = threading.Thread(
        target=lambda: codes.append(service_module.serve(lambda settings, _args: gold_spec(stage), args)), daemon=True
    )
    served.start()
    served.join(timeout=20)  # old code: the service went on reading the batch again, and never exited
    assert codes == [1]
    assert "synpref gold-scorer: exiting to be restarted" in capsys.readouterr().err
    assert consumer.commits == [2] and consumer.closes == [False] and producer.sent_topics == ["scored", "scored"]


@pytest.mark.usefixtures("no_synpref_env")
def test_process_batch_on_a_broken_device_answers_unavailable_and_stops_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(service={"host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0, "shutdown_grace_s": 1})
    service = Service(gold_spec(breaks_after_first_batch(monkeypatch)), settings, kafka=False)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            service.run()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not service.serving and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.serving
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pipeline_pb2_grpc.GoldScorerServiceStub(channel)
        stub.ProcessBatch(pipeline_pb2.ProcessBatchRequest(records=[record(0)]), timeout=5)  # a working device
        with pytest.raises(grpc.RpcError) as err:
            stub.ProcessBatch(pipeline_pb2.ProcessBatchRequest(records=[record(1)]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "illegal memory access" in err.value.details()
    thread.join(timeout=10)  # old code: INTERNAL, and the service serves on with its broken device
    assert not thread.is_alive() and len(raised) == 1 and isinstance(raised[0], StageBroken)
