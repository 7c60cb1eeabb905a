"""`synpref filter`: the rule of each record's stage (Stage 1: REVIEW / SKIP; Stage 2: KEEP / FLIP / DISCARD),
from the annotated topics to the decided topic of the record's stage, which the controller reads.

With --by-decision (a stream without a controller: `synpref ingest` -> ... -> `synpref writer`)
decisions go to their own topics instead: KEEP / FLIP to curated (the writer), REVIEW to review
(the desk), DISCARD / SKIP to discarded.
"""

from __future__ import annotations

import argparse
import threading
from collections import Counter

from prometheus_client import Counter as PromCounter

from synpref.services.consistency_filter.rules import make_filter_stage
from synpref.shared.config import FilterSettings, Settings
from synpref.shared.service import ServiceSpec, serve, service_parser
from synpref.shared.stage import Stage, StageResult
from synpref.v1 import pipeline_pb2_grpc
from synpref.v1.pair_pb2 import STAGE_ONE, STAGE_TWO, Decision, PairRecord

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


def by_stage(settings: FilterSettings, by_decision: bool = False) -> Stage:
    """The filter with the rule of each record's lineage.stage (settings.stage for a record without one),
    routing every decision to "decided" (the stage's decided topic), or by decision when `by_decision`."""
    rules: dict[int, Stage] = {
        STAGE_ONE: make_filter_stage(settings.model_copy(update={"stage": 1})),
        STAGE_TWO: make_filter_stage(settings.model_copy(update={"stage": 2})),
    }
    default = make_filter_stage(settings)

    def consistency_filter(batch: list[PairRecord]) -> StageResult:
        out = StageResult()
        groups: dict[int, list[PairRecord]] = {}
        for record in batch:
            groups.setdefault(record.lineage.stage, []).append(record)
        for stage, records in groups.items():
            result = rules.get(stage, default)(records)
            out.failed.extend(result.failed)
            out.routed.extend(result.routed if by_decision else [("decided", r) for _, r in result.routed])
        return out

    return consistency_filter


def make_spec(settings: Settings, args: argparse.Namespace) -> ServiceSpec:
    """The filter service: the filter stage (counting decisions for Status), writing decided (or, with
    --by-decision, curated, review or discarded)."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    by_decision = getattr(args, "by_decision", False)

    def snapshot() -> dict[str, int]:
        with lock:
            return dict(counts)

    return ServiceSpec(
        name="filter",
        stage=counted(by_stage(settings.filter, by_decision), counts, lock),
        input_route=args.input_route,
        output_routes=["curated", "review", "discarded"] if by_decision else ["decided"],
        grpc_service="synpref.v1.ConsistencyFilterService",
        add_servicer=pipeline_pb2_grpc.add_ConsistencyFilterServiceServicer_to_server,
        counters=snapshot,
    )


def main(argv: list[str]) -> int:
    """`synpref filter`: run the consistency filter service until SIGTERM."""
    parser = service_parser("filter", __doc__, input_route="annotated")
    no_controller = "route decisions to curated / review / discarded (no controller) instead of decided"
    parser.add_argument("--by-decision", action="store_true", help=no_controller)
    return serve(make_spec, parser.parse_args(argv))
