"""`synpref ingest`: read pair files, normalize, drop empty / duplicate / contaminated pairs, publish.

Prints one JSON line of counts (read = published + empty + duplicate + contaminated +
unreadable) and writes every dropped row with its bucket and reason to --report.
Records go to the raw topic keyed by pair id; the command exits non-zero if any send is not
acknowledged. With --dry-run nothing is published.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from synpref.services.ingest.preprocess import Decontaminator, Preprocessor, benchmark_prompts
from synpref.shared.config import ConfigError, load_settings
from synpref.shared.sources import FORMATS, SourceError, SourceRow, iter_source

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="synpref ingest", description=__doc__)
    parser.add_argument("paths", nargs="+", help="pair files or folders")
    parser.add_argument("--format", choices=FORMATS, help="input format (default: detected per file)")
    parser.add_argument("--source", help="source name recorded on every pair (default: from the path)")
    parser.add_argument(
        "--decontaminate", action="append", default=[], help="benchmark prompts (.txt, one per line, or a pair file)"
    )
    parser.add_argument("--ngram", type=int, default=13, help="n-gram size of the overlap check (default 13)")
    parser.add_argument(
        "--seen", help="file of pair ids published by earlier runs (one per line): dedup across runs; new ids appended"
    )
    parser.add_argument("--limit", type=int, default=0, help="read at most this many rows (0 = all)")
    parser.add_argument("--report", help="write dropped rows (JSON lines: locator, bucket, reason) here")
    parser.add_argument("--dry-run", action="store_true", help="count only; publish nothing")
    parser.add_argument("--config", help="YAML config file (default: $SYNPREF_CONFIG)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    prompts = [p for path in args.decontaminate for p in benchmark_prompts(path)]
    seen: set[str] = set()
    if args.seen and Path(args.seen).exists():
        seen = {line.strip() for line in Path(args.seen).read_text().splitlines() if line.strip()}
    already = set(seen)
    pre = Preprocessor(Decontaminator(prompts, args.ngram), seen=seen)
    rows: Iterator[SourceRow] = itertools.chain.from_iterable(
        iter_source(p, args.format, args.source) for p in args.paths
    )
    if args.limit:
        rows = itertools.islice(rows, args.limit)

    producer = None
    futures = []
    if not args.dry_run:
        from synpref.shared.kafka.clients import make_producer
        from synpref.shared.kafka.codec import encode_record

        producer = make_producer(settings.kafka)
    try:
        for record in pre.run(rows):
            if producer is not None:
                out = encode_record(record, settings.topics.raw)
                futures.append(producer.send(out.topic, key=out.key, value=out.value, headers=out.headers))
        if producer is not None:
            producer.flush(timeout=300)
    except SourceError as exc:
        print(f"synpref ingest: {exc}", file=sys.stderr)
        return 2
    finally:
        if producer is not None:
            producer.close(timeout=60)
    unacked = sum(1 for f in futures if not f.is_done or f.failed())
    if args.seen and not args.dry_run and not unacked:
        # Only after every send was acknowledged: a failed run must not hide its pairs from the next.
        with Path(args.seen).open("a") as fh:
            fh.writelines(f"{pair_id}\n" for pair_id in pre.seen - already)
    if args.report:
        with Path(args.report).open("w") as fh:
            for r in pre.rejections:
                fh.write(json.dumps({"locator": r.locator, "bucket": r.bucket, "reason": r.reason}) + "\n")
    counts = pre.counts.as_dict()
    counts["reconciles"] = pre.counts.reconciles()
    counts["topic"] = None if args.dry_run else settings.topics.raw
    counts["unacknowledged"] = unacked
    print(json.dumps(counts, sort_keys=True), flush=True)
    if unacked:
        print(f"synpref ingest: {unacked} records were not acknowledged by Kafka", file=sys.stderr)
        return 1
    return 0
