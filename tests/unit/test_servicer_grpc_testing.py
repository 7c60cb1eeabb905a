"""The consistency filter's ProcessBatch / Status servicer under grpc_testing: the real
servicer and stage, with requests delivered in memory (no sockets, no Kafka)."""

from __future__ import annotations

import argparse

import grpc
import grpc_testing

from synpref.services.consistency_filter.main import make_spec
from synpref.shared.config import Settings, load_settings
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.service import Service, ServiceSpec, StageServicer
from synpref.shared.stage import StageResult
from synpref.v1 import pipeline_pb2
from synpref.v1.pair_pb2 import DECISION_FLIP, DECISION_KEEP, PREFERENCE_CHOSEN, JudgeVote, ModelScore, PairRecord
from synpref.v1.pipeline_pb2 import ProcessBatchRequest, StatusRequest

SERVICE = pipeline_pb2.DESCRIPTOR.services_by_name["ConsistencyFilterService"]


def record(text: str, p_gold: float | None = None, p_best: float | None = None) -> PairRecord:
    pair = new_pair([{"role": "user", "content": text}], [{"role": "assistant", "content": "a"}],
                    [{"role": "assistant", "content": "b"}], "test")  # fmt: skip
    rec = new_record(pair)
    if p_gold is not None and p_best is not None:
        rec.scores.append(ModelScore(model="gold", version="g1", reward_chosen=1.0, reward_rejected=0.0, p=p_gold))
        rec.scores.append(ModelScore(model="best", version="b1", p=p_best))
        rec.judge_aggregate.preference = PREFERENCE_CHOSEN
        rec.votes.append(JudgeVote(judge="j", preference=PREFERENCE_CHOSEN))
    return rec


def served(spec: ServiceSpec, settings: Settings | None = None) -> tuple[grpc_testing.Server, Service]:
    service = Service(spec, settings or load_settings(), kafka=False)
    server = grpc_testing.server_from_dictionary({SERVICE: StageServicer(service)}, grpc_testing.strict_real_time())
    return server, service


def call(server: grpc_testing.Server, method: str, request):
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name[method], (), request, 5)
    response, _trailing, code, details = rpc.termination()
    return response, code, details


def test_process_batch_decides_routes_and_counts():
    settings = load_settings(filter={"stage": 2, "on_disagreement": "flip"})
    server, _ = served(make_spec(settings, argparse.Namespace(input_route="annotated")), settings)
    keep, flip, unscored = record("keep", 0.9, 0.2), record("flip", 0.4, 0.9), record("unscored")
    response, code, _ = call(server, "ProcessBatch", ProcessBatchRequest(records=[keep, flip, unscored]))
    assert code == grpc.StatusCode.OK
    assert [r.decision.decision for r in response.records] == [DECISION_KEEP, DECISION_FLIP]
    assert response.records[1].lineage.original_id == flip.pair.id != response.records[1].pair.id
    assert list(response.failed_ids) == [unscored.pair.id]  # no scores: dead-lettered, not guessed

    status, code, _ = call(server, "Status", StatusRequest())
    assert code == grpc.StatusCode.OK
    topics = settings.topics
    assert status.service == "filter" and status.input_topic == f"{topics.s1_annotated},{topics.s2_annotated}"
    assert list(status.output_topics) == [topics.s1_decided, topics.s2_decided]
    assert status.counters["grpc.processed"] == 3 and status.counters["grpc.failed"] == 1
    assert status.counters["decision.keep"] == 1 and status.counters["decision.flip"] == 1


def test_a_stage_that_raises_aborts_with_internal():
    def broken(batch: list[PairRecord]) -> StageResult:
        raise ValueError("boom")

    spec = ServiceSpec(
        name="broken",
        stage=broken,
        input_route="scored",
        output_routes=["curated"],
        grpc_service=SERVICE.full_name,
        add_servicer=lambda servicer, server: None,
    )
    server, service = served(spec)
    _, code, details = call(server, "ProcessBatch", ProcessBatchRequest(records=[record("x")]))
    assert code == grpc.StatusCode.INTERNAL and details == "stage raised ValueError: boom"
    assert service.status().counters["grpc.processed"] == 0  # nothing counted as processed
