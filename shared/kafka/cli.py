"""`synpref topics`: create the pipeline's topics on the configured cluster (idempotent)."""

from __future__ import annotations

import argparse
import logging
import sys

from synpref.shared.config import ConfigError, load_settings
from synpref.shared.kafka.admin import describe_partitions, ensure_topics


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse `synpref topics` options."""
    parser = argparse.ArgumentParser(prog="synpref topics", description=__doc__)
    parser.add_argument("--config", help="YAML config file (default: $SYNPREF_CONFIG)")
    parser.add_argument("--partitions", type=int, help="partitions per topic (default: kafka.partitions)")
    parser.add_argument(
        "--replication-factor", type=int, help="replicas per partition (default: kafka.replication_factor)"
    )
    parser.add_argument("--bootstrap-servers", help="override kafka.bootstrap_servers")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the cluster (default 30)")
    parser.add_argument("topics", nargs="*", help="topic names (default: every topic of the topics section)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Create the topics that are missing and print each topic's outcome and partition count.

    Returns 0 on success, 1 when the cluster calls fail, 2 for a bad config.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.bootstrap_servers:
        kafka = settings.kafka.model_copy(update={"bootstrap_servers": args.bootstrap_servers})
        settings = settings.model_copy(update={"kafka": kafka})
    names = args.topics or settings.topics.all()
    try:
        outcome = ensure_topics(
            settings.kafka,
            names,
            partitions=args.partitions,
            replication_factor=args.replication_factor,
            timeout_s=args.timeout,
        )
        partitions = describe_partitions(settings.kafka, names, timeout_s=args.timeout)
    except Exception as exc:  # TopicAdminError, or kafka-python's errors for an unreachable cluster
        print(f"synpref topics: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for name in names:
        print(f"{name}\t{outcome.get(name, 'exists')}\tpartitions={partitions.get(name, '?')}")
    return 0
