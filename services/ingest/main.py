"""`synpref ingest`: read pair files, normalize, drop empty / duplicate / contaminated pairs, publish.

Prints one JSON line of counts (read = published + empty + identical + duplicate + contaminated +
unreadable + oversized) and writes every dropped row with its bucket and reason to --report,
its locator `file#row`. Records go to the raw topic keyed by pair id; a record larger than
the topic takes (its max.message.bytes, read from the broker, or kafka.max_message_bytes if
smaller) is reported as oversized instead of sent. A file that cannot be read on (corrupt
Parquet, truncated gzip, a JSON file nested too deeply) is reported by name, after the rows
read before the damage, and the other files are still read. The counts, the report and the
--seen file (the ids Kafka acknowledged, appended within about a second of their
acknowledgement) are written whatever failed, so a rerun publishes none of them again. SIGTERM or
SIGINT stops sending, waits up to STOP_TIMEOUT_S for the sends in flight and records them. Exit
status: 0, 1 if a send was not acknowledged or publishing stopped, 2 if a file could not be read (or the
--report or --seen file cannot be written).
With --dry-run nothing is published.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from synpref.services.ingest.preprocess import Decontaminator, Preprocessor, Rejection, builtin_sets
from synpref.shared.config import ConfigError, KafkaSettings, load_settings
from synpref.shared.idset import DiskIdSet
from synpref.shared.kafka.message_limit import MessageLimit
from synpref.shared.sources import FORMATS, SourceError, SourceRow, iter_source, source_files

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse `synpref ingest` options: the paths, --format, --source, --decontaminate, --ngram, --seen,
    --limit, --report, --dry-run and --config.
    """
    parser = argparse.ArgumentParser(prog="synpref ingest", description=__doc__)
    parser.add_argument("paths", nargs="+", help="pair files or folders")
    parser.add_argument("--format", choices=FORMATS, help="input format (default: detected per file)")
    parser.add_argument(
        "--source", help="source name of the pairs whose row names none in a `source` field (default: from the path)"
    )
    parser.add_argument(
        "--decontaminate",
        action="append",
        default=None,
        help="a built-in benchmark set (" + ", ".join(builtin_sets()) + ") or benchmark prompts "
        "(.txt, one per line, or a pair file); repeatable (default: rmbench)",
    )
    parser.add_argument("--no-decontaminate", action="store_true", help="check against no benchmark at all")
    parser.add_argument("--ngram", type=positive, default=13, help="n-gram size of the overlap check (default 13)")
    parser.add_argument(
        "--seen", help="file of pair ids published by earlier runs (one per line): dedup across runs; new ids appended"
    )
    parser.add_argument("--limit", type=int, default=0, help="read at most this many rows (0 = all)")
    parser.add_argument("--report", help="write dropped rows (JSON lines: locator, bucket, reason) here")
    parser.add_argument("--dry-run", action="store_true", help="count only; publish nothing")
    parser.add_argument("--config", help="YAML config file (default: $SYNPREF_CONFIG)")
    args = parser.parse_args(argv)
    if args.limit < 0:
        parser.error(f"--limit must be 0 (all rows) or more, not {args.limit}")
    # Decontamination is on unless turned off: a benchmark prompt in training data inflates every score.
    if args.no_decontaminate:
        args.decontaminate = []
    elif args.decontaminate is None:
        args.decontaminate = ["rmbench"]
    return args


def positive(text: str) -> int:
    """An --ngram of at least 1: a 0-gram is in every text, so every pair was dropped as contaminated."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


READ_ERRORS = (OSError, EOFError, ValueError, TypeError, RuntimeError, zlib.error)
"""What a damaged file raises part-way (gzip, zlib, pyarrow, the JSON parser's RecursionError)."""
MESSAGE_LIMIT = "max.message.bytes"
HAND_OVER_S = 1.0
"""Acknowledged ids wait at most this long (while the loop runs) before going to on_acked / --seen."""
HAND_OVER_IDS = 1000
"""...or until this many have gathered: one buffered write (and flush) of --seen per group."""
FLUSH_TIMEOUT_S = 300.0
"""After the last send, how long the sends in flight may take to be acknowledged."""
STOP_TIMEOUT_S = 10.0
"""The same after SIGTERM / SIGINT, plus STOP_CLOSE_S to close: well inside Kubernetes' 30 s grace period."""
STOP_CLOSE_S = 2.0
PROGRESS_S = 60.0
"""How often a run logs how far it got: 40M pairs take hours, and a silent run cannot be told from a stuck one."""


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
    paths: list[str],
    fmt: str | None,
    source: str | None,
    failures: list[FileFailure],
    outputs: Iterable[str] = (),
) -> Iterator[SourceRow]:
    """The rows of every file, file by file; a file that fails part-way is noted in `failures`
    (after the rows it gave) and the next one is read. The run's own `outputs` (--report, --seen) are skipped:
    a report inside an input folder, read back, gave a line for each line read, and the run never ended."""
    own = {Path(out).resolve() for out in outputs}
    for path in paths:
        try:
            files = source_files(Path(path))
        except SourceError as exc:
            failures.append(FileFailure(str(path), str(exc)))
            continue
        for file in files:
            if file.resolve() in own:
                log.warning("%s is an output of this run (--report or --seen): not read as input", file)
                continue
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

    admin = make_admin(kafka)  # a broker it cannot reach raises: main says so
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


def main(argv: list[str]) -> int:
    """`synpref ingest`: preprocess the files, publish to the raw topic and print the counts as one
    JSON line; 0, 1 if a send was not acknowledged (or publishing stopped), 2 for a bad config or
    --decontaminate source, a file that could not be read, or a --report / --seen file it cannot write.
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
    outputs = [out for out in (args.report, args.seen) if out]
    rows: Iterator[SourceRow] = read_rows(args.paths, args.format, args.source, failures, outputs)
    if args.limit:
        rows = itertools.islice(rows, args.limit)

    topic = settings.topics.s2_raw  # a stream with no controller is Stage 2: the automatic stage
    limit = settings.kafka.max_message_bytes
    producer = None
    # Nothing here grows with the input: the seen ids are on disk, the report and the --seen file are
    # written as rows are dropped and sends acknowledged (a killed run keeps what was acknowledged up to
    # about HAND_OVER_S before; SIGTERM and SIGINT stop it with everything acknowledged recorded).
    with ExitStack() as stack:
        seen = stack.enter_context(DiskIdSet())
        try:
            report = stack.enter_context(Path(args.report).open("w")) if args.report else None
            acked_file = stack.enter_context(open_seen(Path(args.seen))) if args.seen else None
        except OSError as exc:  # a bad path is a bad command (2), said before any producer is made: not a traceback
            option = "--report" if args.report and exc.filename == args.report else "--seen"
            print(f"synpref ingest: {option}: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
            return 2
        if acked_file is not None:
            stack.callback(sync, acked_file)  # before it closes: on disk, not only with the kernel
        if not args.dry_run:
            from kafka.errors import KafkaError

            from synpref.shared.kafka.clients import make_producer

            try:
                limit = min(limit, topic_message_limit(settings.kafka, topic) or limit)
                producer = make_producer(settings.kafka, batch_size=min(256 * 1024, limit))
            except KafkaError as exc:  # no broker reachable (yet): worth another try, unlike a bad config (2)
                servers = settings.kafka.bootstrap_servers
                print(f"synpref ingest: cannot reach Kafka at {servers}: {exc!r}", file=sys.stderr)
                return 1
        if args.seen:  # after Kafka answered: 40M ids take minutes to load, a retried Job finds an absent broker first
            with Path(args.seen).open() as fh:
                seen.bulk_load(stripped for line in fh if (stripped := line.strip()))

        def on_reject(r: Rejection) -> None:
            if report is not None:
                report.write(json.dumps({"locator": r.locator, "bucket": r.bucket, "reason": r.reason}) + "\n")

        def on_acked(pair_ids: list[str]) -> None:
            # Only acknowledged ids, but those always: a rerun must neither skip a lost pair nor resend a kept one.
            # publish() hands them over in groups (HAND_OVER_S, HAND_OVER_IDS), each written, then flushed.
            if acked_file is not None:
                acked_file.writelines(f"{pair_id}\n" for pair_id in pair_ids)
                acked_file.flush()

        too_large = MessageLimit(limit, f"topic {topic}")
        pre = Preprocessor(decontaminator, seen=seen, too_large=too_large, keep_rejections=0, on_reject=on_reject)
        with stop_on_signals() as stop:
            unacked, stopped = publish(pre, rows, producer, topic, on_acked, stop)
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


def open_seen(path: Path) -> IO[str]:
    """The --seen file, open to append ids; a last line cut short by a killed run is ended first, so the
    next id starts a line of its own (the cut one reads back as an id no pair has)."""
    fh = path.open("a")
    if fh.tell() > 0:
        with path.open("rb") as tail:
            tail.seek(-1, os.SEEK_END)
            if tail.read(1) != b"\n":
                fh.write("\n")
    return fh


def sync(fh: IO[str]) -> None:
    """Flush `fh` and fsync it (the end of a run: its --seen ids survive a crash of the machine too)."""
    fh.flush()
    try:
        os.fsync(fh.fileno())
    except OSError as exc:  # a pipe or a file system without fsync: the ids are written all the same
        log.warning("cannot fsync %s: %s", getattr(fh, "name", fh), exc)


@contextmanager
def stop_on_signals(signums: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[Callable[[], str]]:
    """While in effect, SIGTERM and SIGINT ask publish() to stop: the callable this gives says which came
    ("" before). The stop is bounded (STOP_TIMEOUT_S), so a second signal is not needed (nor special), as
    in shared/service.py. Off the main thread, where Python takes no signals, it changes nothing."""
    reason = ""
    previous: dict[int, Any] = {}

    def handle(signum: int, frame: Any) -> None:
        nonlocal reason  # only a flag: the loop may be anywhere, in a write to --seen, in kafka-python
        reason = reason or f"{signal.Signals(signum).name} received"

    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            before = signal.signal(signum, handle)
            previous[signum] = signal.SIG_DFL if before is None else before
    try:
        yield lambda: reason
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


def publish(
    pre: Preprocessor,
    rows: Iterable[SourceRow],
    producer: Any,
    topic: str,
    on_acked: Callable[[list[str]], None] = lambda ids: None,
    stop: Callable[[], str] = lambda: "",
) -> tuple[int, str]:
    """Send every record; the number not acknowledged, and why sending stopped early ("" if it did not).

    on_acked gets the ids of acknowledged records as their sends complete, in groups: at least every
    HAND_OVER_S while rows are read and sent (or every HAND_OVER_IDS ids), and the rest at the end; only
    sends in flight are held. Before each row the finished sends at the head of those in flight are
    settled (no flush of the producer). When stop() says why (a signal), no row is read after it and
    the sends in flight get STOP_TIMEOUT_S to be acknowledged. Every PROGRESS_S it logs how far it got.
    """
    from kafka.errors import KafkaError, KafkaTimeoutError

    from synpref.shared.kafka.codec import encode_record

    in_flight: deque[tuple[str, Any]] = deque()
    acked: list[str] = []
    unacked = acked_total = 0
    handed_at = told_at = time.monotonic()

    def settle(everything: bool = False) -> None:
        nonlocal unacked, acked_total
        while in_flight and (everything or in_flight[0][1].is_done):
            pair_id, future = in_flight.popleft()
            if future.is_done and future.succeeded():
                acked.append(pair_id)
                acked_total += 1
            else:
                unacked += 1
                if unacked == 1 or unacked % 10_000 == 0:  # why, not only how many (the first, then now and then)
                    log.warning("%d sends not acknowledged; %s: %r", unacked, pair_id, future.exception)

    def tell() -> None:
        nonlocal told_at
        if (clock := time.monotonic()) - told_at >= PROGRESS_S:
            told_at, c = clock, pre.counts
            log.info("%d rows read: %d to publish, %d dropped; %d acknowledged, %d not, %d in flight",
                     c.read, c.published, c.read - c.published, acked_total, unacked, len(in_flight))  # fmt: skip

    def hand_over(now: bool = False) -> None:
        nonlocal handed_at
        clock = time.monotonic()
        if acked and (now or len(acked) >= HAND_OVER_IDS or clock - handed_at >= HAND_OVER_S):
            on_acked(acked.copy())
            acked.clear()
            handed_at = clock

    def ticking(rows: Iterable[SourceRow]) -> Iterator[SourceRow]:
        # Per row, so dropped rows (no send) hand over too: a peek at the head, a clock read.
        it = iter(rows)
        while not stop():
            settle()
            hand_over()
            tell()
            row = next(it, None)
            if row is None:
                return
            yield row

    def drain() -> None:
        # Wait for the sends in flight in short flushes, settling between them; a signal shortens the wait.
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        stopping = False
        while in_flight:
            clock = time.monotonic()
            if not stopping and stop():
                stopping, deadline = True, min(deadline, clock + STOP_TIMEOUT_S)
                log.warning("%s: sending stopped; waiting up to %.0f s for %d sends in flight",
                            stop(), deadline - clock, len(in_flight))  # fmt: skip
            if clock >= deadline:
                return
            with suppress(KafkaTimeoutError):  # 1 s at a time: the acknowledged ones go to --seen meanwhile
                producer.flush(timeout=min(1.0, deadline - clock))
            settle()
            hand_over()
            tell()

    stopped = ""
    try:
        for record in pre.run(ticking(rows)):
            if producer is not None:
                out = encode_record(record, topic)
                try:
                    future = producer.send(out.topic, key=out.key, value=out.value, headers=out.headers)
                except KafkaError:
                    unacked += 1  # counted as published, never sent: published - unacknowledged is what Kafka has
                    raise
                in_flight.append((record.pair.id, future))
        if producer is not None:
            drain()
    except KafkaError as exc:
        stopped = f"{type(exc).__name__}: {exc}"
    finally:
        if producer is not None:
            producer.close(timeout=STOP_CLOSE_S if stop() else 60)
        settle(everything=True)
        hand_over(now=True)
    return unacked, "; ".join(filter(None, (stop(), stopped)))
