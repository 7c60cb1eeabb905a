"""`synpref gold-scorer`: p_gold and p_best for each pair, from the raw to the scored topics (each stage's own)."""

from __future__ import annotations

import argparse

from synpref.services.gold_scorer.scoring import make_scoring_stage, models_from_settings
from synpref.shared.config import Settings
from synpref.shared.service import ServiceSpec, serve, service_parser
from synpref.v1 import pipeline_pb2_grpc


def make_spec(settings: Settings, args: argparse.Namespace) -> ServiceSpec:
    """The gold-scorer service; exits when no scoring model is configured."""
    models = models_from_settings(settings.scoring, settings.scorer, settings.kafka)
    if not models:
        raise SystemExit("gold-scorer: set scoring.gold.path (and scoring.best.path), or scoring.mode=grpc")
    return ServiceSpec(
        name="gold-scorer",
        stage=make_scoring_stage(models),
        input_route=args.input_route,
        output_routes=["scored"],
        grpc_service="synpref.v1.GoldScorerService",
        add_servicer=pipeline_pb2_grpc.add_GoldScorerServiceServicer_to_server,
    )


def main(argv: list[str]) -> int:
    """`synpref gold-scorer`: run the gold scorer service until SIGTERM."""
    return serve(make_spec, service_parser("gold-scorer", __doc__, input_route="raw").parse_args(argv))
