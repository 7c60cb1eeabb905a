"""The pass-through stage, and a Kafka + gRPC service around it, for tests and benchmarks.

It measures what the service plumbing (decode, stage, produce, commit) costs on its own.
Run from the repo root: python -m testing.passthrough [--input-route raw] [--output-route annotated]
plus the options every service takes (--config, --grpc-only).
"""

from __future__ import annotations

import argparse
import sys

from synpref.shared.config import Settings
from synpref.shared.service import ServiceSpec, serve, service_parser
from synpref.shared.stage import Stage, StageResult
from synpref.v1 import pipeline_pb2_grpc
from synpref.v1.pair_pb2 import PairRecord


def passthrough(route: str) -> Stage:
    """A stage that emits every input record to `route` (a TopicSettings field)."""

    def stage(batch: list[PairRecord]) -> StageResult:
        result = StageResult()
        for record in batch:
            result.emit(route, record)
        return result

    return stage


def make_spec(settings: Settings, args: argparse.Namespace) -> ServiceSpec:
    return ServiceSpec(
        name="passthrough",
        stage=passthrough(args.output_route),
        input_route=args.input_route,
        output_routes=[args.output_route],
        grpc_service="synpref.v1.PassthroughService",
        add_servicer=pipeline_pb2_grpc.add_PassthroughServiceServicer_to_server,
    )


def main(argv: list[str] | None = None) -> int:
    parser = service_parser("passthrough", __doc__, input_route="raw")
    parser.add_argument("--output-route", default="annotated", help="topics field to emit to (default annotated)")
    return serve(make_spec, parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
