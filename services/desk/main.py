"""`synpref desk`: serve the human verification desk over the Kafka review topic.

Reads `synpref.pairs.review` as consumer group desk.group_id and writes decisions to the
verified (D_gold) and discarded topics; create them first with `synpref topics`. For the
single-machine loop, `synpref run` embeds ReviewDesk with in-memory queues instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from synpref.shared.config import ConfigError, load_settings


def parser() -> argparse.ArgumentParser:
    """The `synpref desk` argument parser; each option overrides a desk setting."""
    p = argparse.ArgumentParser(prog="synpref desk", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML settings file (else SYNPREF_CONFIG, then defaults)")
    p.add_argument("--host", help="listen address (desk.host)")
    p.add_argument("--port", type=int, help="listen port (desk.port)")
    p.add_argument("--overlap", type=int, help="annotators per pair (desk.overlap)")
    p.add_argument("--tokens-file", help="file of annotator:token lines (desk.tokens_file)")
    return p


def main(argv: list[str]) -> int:
    """`synpref desk`: serve the review desk over Kafka until SIGINT/SIGTERM; 2 for a bad config or no tokens."""
    args = parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        overrides = {
            k: v
            for k, v in {
                "host": args.host,
                "port": args.port,
                "overlap": args.overlap,
                "tokens_file": args.tokens_file,
            }.items()
            if v is not None
        }
        desk_settings = settings.desk.model_validate({**settings.desk.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"synpref desk: invalid option: {problems}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"synpref desk: {exc}", file=sys.stderr)
        return 2
    try:
        from synpref.services.desk.tokens import check_overlap, load_tokens

        tokens = load_tokens(desk_settings)
        check_overlap(desk_settings.overlap, len(tokens))
    except ConfigError as exc:
        print(f"synpref desk: {exc}", file=sys.stderr)
        return 2
    if not tokens:
        print("synpref desk: no annotator tokens (set SYNPREF_DESK__TOKENS or desk.tokens_file)", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from aiohttp import web

    from synpref.services.desk.kafka_queue import KafkaDeskQueues
    from synpref.services.desk.web import ReviewDesk, make_app

    queues = KafkaDeskQueues(
        settings.kafka,
        settings.topics,
        desk_settings.group_id,
        max_pending=desk_settings.max_pending,
        unready_after_s=desk_settings.unready_after_s,
    )
    desk = ReviewDesk(queues.source, queues.sink, desk_settings, tokens=tokens)
    logging.getLogger("synpref.desk").info(
        "desk for %d annotators, overlap %d, on http://%s:%d",
        len(tokens),
        desk_settings.overlap,
        desk_settings.host,
        desk_settings.port,
    )
    # run_app stops on SIGINT/SIGTERM; the app's cleanup flushes pending decisions and closes Kafka clients.
    # /readyz asks queues.source.problem() whether Kafka has failed for longer than desk.unready_after_s.
    web.run_app(make_app(desk), host=desk_settings.host, port=desk_settings.port, print=None, access_log=None)
    return 0
