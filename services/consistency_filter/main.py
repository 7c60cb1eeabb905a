"""`synpref filter`: Stage-1 routing or the Stage-2 KEEP / FLIP / DISCARD rule, from the scored topic."""

from __future__ import annotations

import argparse
import threading
from collections import Counter

from prometheus_client import Counter as PromCounter

from synpref.services.consistency_filter.rules import make_filter_stage
from synpref.shared.config import Settings
from synpref.shared.service import ServiceSpec, serve, service_parser
from synpref.shared.stage import Stage, StageResult
from synpref.v1 import pipeline_pb2_grpc
from synpref.v1.pair_pb2 import Decision, PairRecord

DECISIONS = PromCounter("synpref_filter_decisions", "Decisions of the consistency filter", ["decision", "rule"])


def counted(stage: Stage, counts: Counter[str], lock: threading.Lock) -> Stage:
    """The stage, counting its decisions for Status and Prometheus."""

    def consistency_filter(batch: list[PairRecord]) -> StageResult:
        result = stage(batch)
        with lock:
            for _, record in result.routed:
                name = Decision.Name(record.decision.decision).removeprefix("DECISION_").lower()
                counts[f"decision.{name}"] += 1
                DECISIONS.labels(name, record.decision.rule).inc()
        return result

    return consistency_filter


def make_spec(settings: Settings, args: argparse.Namespace) -> ServiceSpec:
    """The filter service: the filter stage (counting decisions for Status), writing curated, review or discarded."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def snapshot() -> dict[str, int]:
        with lock:
            return dict(counts)

    return ServiceSpec(
        name="filter",
        stage=counted(make_filter_stage(settings.filter), counts, lock),
        input_route=args.input_route,
        output_routes=["curated", "review", "discarded"],
        grpc_service="synpref.v1.ConsistencyFilterService",
        add_servicer=pipeline_pb2_grpc.add_ConsistencyFilterServiceServicer_to_server,
        counters=snapshot,
    )


def main(argv: list[str]) -> int:
    """`synpref filter`: run the consistency filter service until SIGTERM."""
    return serve(make_spec, service_parser("filter", __doc__, input_route="scored").parse_args(argv))
