"""`synpref passthrough`: the pass-through stage as a Kafka + gRPC service (tests, benchmarks)."""

from __future__ import annotations

import argparse

from synpref.shared.config import Settings
from synpref.shared.service import ServiceSpec, serve, service_parser
from synpref.v1 import pipeline_pb2_grpc

from .stage import passthrough


def make_spec(settings: Settings, args: argparse.Namespace) -> ServiceSpec:
    return ServiceSpec(
        name="passthrough",
        stage=passthrough(args.output_route),
        input_route=args.input_route,
        output_routes=[args.output_route],
        grpc_service="synpref.v1.PassthroughService",
        add_servicer=pipeline_pb2_grpc.add_PassthroughServiceServicer_to_server,
    )


def main(argv: list[str]) -> int:
    parser = service_parser("passthrough", __doc__)
    parser.add_argument("--input-route", default="raw", help="topics field to consume (default raw)")
    parser.add_argument("--output-route", default="annotated", help="topics field to emit to (default annotated)")
    return serve(make_spec, parser.parse_args(argv))
