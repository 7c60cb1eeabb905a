"""`synpref ingest`: read pair files, normalize, drop empty / duplicate / contaminated pairs, publish.

Prints one JSON line of counts (read = published + empty + duplicate + contaminated +
unreadable + oversized) and writes every dropped row with its bucket and reason to --report,
its locator `file#row`. Records go to the raw topic keyed by pair id; a record larger than
the topic takes (its max.message.bytes, read from the broker, or kafka.max_message_bytes if
smaller) is reported as oversized instead of sent. A file that cannot be read on (corrupt
Parquet, truncated gzip, a JSON file nested too deeply) is reported by name, after the rows
read before the damage, and the other files are still read. The counts, the report and the
--seen file (the ids Kafka acknowledged) are written whatever failed, so a rerun publishes
none of them again. Exit status: 0, 1 if a send was not acknowledged, 2 if a file could not
be read. With --dry-run nothing is published.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synpref.services.ingest.preprocess import Decontaminator, Preprocessor, Rejection, builtin_sets
from synpref.shared.config import ConfigError, KafkaSettings, load_settings
from synpref.shared.idset import DiskIdSet
from synpref.shared.sources import FORMATS, SourceError, SourceRow, iter_source, source_files
from synpref.v1.pair_pb2 import PairRecord

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse `synpref ingest` options: the paths, --format, --source, --decontaminate, --ngram, --seen,
    --limit, --report, --dry-run and --config.
    """
    parser = argparse.ArgumentParser(prog="synpref ingest", description=__doc__)
    parser.add_argument("paths", nargs="+", help="pair files or folders")
    parser.add_argument("--format", choices=FORMATS, help="input format (default: detected per file)")
    parser.add_argument("--source", help="source name recorded on every pair (default: from the path)")
    parser.add_argument(
        "--decontaminate",
        action="append",
        default=None,
        help="a built-in benchmark set (" + ", ".join(builtin_sets()) + ") or benchmark prompts "
        "(.txt, one per line, or a pair file); repeatable (default: rmbench)",
    )
    parser.add_argument("--no-decontaminate", action="store_true", help="check against no benchmark at all")
    parser.add_argument("--ngram", type=int, default=13, help="n-gram size of the overlap check (default 13)")
    parser.add_argument(
        "--seen", help="file of pair ids published by earlier runs (one per line): dedup across runs; new ids appended"
    )
    parser.add_argument("--limit", type=int, default=0, help="read at most this many rows (0 = all)")
    parser.add_argument("--report", help="write dropped rows (JSON lines: locator, bucket, reason) here")
    parser.add_argument("--dry-run", action="store_true", help="count only; publish nothing")
    parser.add_argument("--config", help="YAML config file (default: $SYNPREF_CONFIG)")
    args = parser.parse_args(argv)
    # Decontamination is on unless turned off: a benchmark prompt in training data inflates every score.
    if args.no_decontaminate:
        args.decontaminate = []
    elif args.decontaminate is None:
        args.decontaminate = ["rmbench"]
    return args


READ_ERRORS = (OSError, EOFError, ValueError, TypeError, RuntimeError, zlib.error)
"""What a damaged file raises part-way (gzip, zlib, pyarrow, the JSON parser's RecursionError)."""
MESSAGE_LIMIT = "max.message.bytes"
FRAMING_BYTES = 256
SETTLE_EVERY = 10_000  # sends in flight before the completed ones at their head are settled
"""Over the record's, key's and headers' own bytes: the record batch header and varints."""


@dataclass(frozen=True)
class FileFailure:
    """A file (or path) that could not be read to its end.

    Attributes:
        path: the path given, or the file under it that failed.
        error: why, as reported on stderr and in --report.
    """

    path: str
    error: str


def read_rows(
    paths: list[str], fmt: str | None, source: str | None, failures: list[FileFailure]
) -> Iterator[SourceRow]:
    """The rows of every file, file by file; a file that fails part-way is noted in `failures`
    (after the rows it gave) and the next one is read."""
    for path in paths:
        try:
            files = source_files(Path(path))
        except SourceError as exc:
            failures.append(FileFailure(str(path), str(exc)))
            continue
        for file in files:
            where, done = file.as_posix(), 0
            try:
                for row in iter_source(file, fmt, source):
                    yield row
                    done += 1
            except SourceError as exc:
                failures.append(FileFailure(where, str(exc).removeprefix(f"{file}: ")))
            except READ_ERRORS as exc:
                failures.append(FileFailure(where, f"unreadable after {done} rows: {type(exc).__name__}: {exc}"))


def topic_message_limit(kafka: KafkaSettings, topic: str) -> int | None:
    """The topic's max.message.bytes, or None if the broker does not say (no such topic, no right)."""
    from kafka.admin import ConfigResource, ConfigResourceType
    from kafka.errors import KafkaError

    from synpref.shared.kafka.clients import make_admin

    admin = make_admin(kafka)
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs=[MESSAGE_LIMIT])
        found = admin.describe_configs([resource], config_filter="all").get("topic", {}).get(topic, {})
        value = found.get(MESSAGE_LIMIT, {}).get("value")
        return int(value) if value else None
    except (KafkaError, ValueError) as exc:
        log.warning("cannot read %s of topic %s (%s)", MESSAGE_LIMIT, topic, exc)
        return None
    finally:
        admin.close()


def size_check(limit: int, topic: str) -> Callable[[PairRecord], str | None]:
    """Why a record would be refused by a topic taking messages of up to `limit` bytes, or None."""
    from synpref.shared.kafka.codec import record_headers

    headers = sum(len(name.encode()) + len(value) + 10 for name, value in record_headers())

    def too_large(record: PairRecord) -> str | None:
        size = record.ByteSize() + len(record.pair.id.encode()) + headers + FRAMING_BYTES
        if size <= limit:
            return None
        return f"record of {size} bytes is over the {limit}-byte message limit of topic {topic}"

    return too_large


def main(argv: list[str]) -> int:
    """`synpref ingest`: preprocess the files, publish to the raw topic and print the counts as one
    JSON line; 0, 1 if a send was not acknowledged (or publishing stopped), 2 for a bad config or
    --decontaminate source, or a file that could not be read.
    """
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        decontaminator = Decontaminator.from_sources(args.decontaminate, args.ngram)
    except (OSError, ValueError, SourceError) as exc:
        print(f"--decontaminate: {exc}", file=sys.stderr)
        return 2
    failures: list[FileFailure] = []
    rows: Iterator[SourceRow] = read_rows(args.paths, args.format, args.source, failures)
    if args.limit:
        rows = itertools.islice(rows, args.limit)

    topic = settings.topics.s2_raw  # a stream with no controller is Stage 2: the automatic stage
    limit = settings.kafka.max_message_bytes
    producer = None
    if not args.dry_run:
        from synpref.shared.kafka.clients import make_producer

        limit = min(limit, topic_message_limit(settings.kafka, topic) or limit)
        producer = make_producer(settings.kafka, batch_size=min(256 * 1024, limit))
    # Nothing here grows with the input: the seen ids are on disk, the report and the --seen file are
    # written as rows are dropped and sends acknowledged (a killed run keeps what it had acknowledged).
    with ExitStack() as stack:
        seen = stack.enter_context(DiskIdSet())
        if args.seen and Path(args.seen).exists():
            with Path(args.seen).open() as fh:
                seen.update(line.strip() for line in fh if line.strip())
        report = stack.enter_context(Path(args.report).open("w")) if args.report else None
        acked_file = stack.enter_context(Path(args.seen).open("a")) if args.seen else None

        def on_reject(r: Rejection) -> None:
            if report is not None:
                report.write(json.dumps({"locator": r.locator, "bucket": r.bucket, "reason": r.reason}) + "\n")

        def on_acked(pair_ids: list[str]) -> None:
            # Only acknowledged ids, but those always: a rerun must neither skip a lost pair nor resend a kept one.
            if acked_file is not None:
                acked_file.writelines(f"{pair_id}\n" for pair_id in pair_ids)
                acked_file.flush()

        pre = Preprocessor(decontaminator, seen=seen, too_large=size_check(limit, topic), keep_rejections=0,
                           on_reject=on_reject)  # fmt: skip
        unacked, stopped = publish(pre, rows, producer, topic, on_acked)
        if report is not None:
            for f in failures:
                report.write(json.dumps({"locator": f.path, "bucket": "unreadable-file", "reason": f.error}) + "\n")
    counts: dict[str, Any] = pre.counts.as_dict()
    counts["reconciles"] = pre.counts.reconciles()
    counts["topic"] = None if args.dry_run else topic
    counts["unacknowledged"] = unacked
    counts["failed_files"] = [{"path": f.path, "error": f.error} for f in failures]
    print(json.dumps(counts, sort_keys=True), flush=True)
    for f in failures:
        print(f"synpref ingest: cannot read {f.path}: {f.error}", file=sys.stderr)
    if stopped:
        print(f"synpref ingest: publishing stopped: {stopped}", file=sys.stderr)
    if unacked:
        print(f"synpref ingest: {unacked} records were not acknowledged by Kafka", file=sys.stderr)
    if failures:
        return 2
    return 1 if unacked or stopped else 0


def publish(
    pre: Preprocessor,
    rows: Iterator[SourceRow],
    producer: Any,
    topic: str,
    on_acked: Callable[[list[str]], None] = lambda ids: None,
) -> tuple[int, str]:
    """Send every record; the number not acknowledged, and why sending stopped early ("" if it did not).

    on_acked gets the ids of acknowledged records as their sends complete; only sends in flight are held.
    """
    from kafka.errors import KafkaError

    from synpref.shared.kafka.codec import encode_record

    in_flight: deque[tuple[str, Any]] = deque()
    unacked = 0

    def settle(everything: bool) -> None:
        nonlocal unacked
        acked = []
        while in_flight and (everything or in_flight[0][1].is_done):
            pair_id, future = in_flight.popleft()
            if future.is_done and future.succeeded():
                acked.append(pair_id)
            else:
                unacked += 1
        if acked:
            on_acked(acked)

    stopped = ""
    try:
        for record in pre.run(rows):
            if producer is not None:
                out = encode_record(record, topic)
                in_flight.append(
                    (record.pair.id, producer.send(out.topic, key=out.key, value=out.value, headers=out.headers))
                )
                if len(in_flight) >= SETTLE_EVERY:
                    settle(everything=False)
        if producer is not None:
            producer.flush(timeout=300)
    except KafkaError as exc:
        stopped = f"{type(exc).__name__}: {exc}"
    finally:
        if producer is not None:
            producer.close(timeout=60)
        settle(everything=True)
    return unacked, stopped
