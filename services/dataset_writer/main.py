"""`synpref writer`: kept and flipped pairs from the curated topic into a versioned Parquet dataset.

The writer is a batching sink with its own loop (not the generic StageRunner) because its
offsets are committed WITH its shards: the manifest written after each shard stores the
next offset of every partition, and on (re)assignment the consumer seeks to those stored
offsets. Kafka's committed offsets are also updated, best effort, for lag monitoring.
Order of one flush: produce dead letters and wait for their acks, write the shard, write
the manifest (the commit point), commit to Kafka.

Run one writer per dataset version (one replica): the manifest has a single author.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc
from kafka import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import Counter as PromCounter

from synpref.services.dataset_writer.dataset import DatasetVersion
from synpref.shared.config import Settings
from synpref.shared.kafka import metrics
from synpref.shared.kafka.clients import make_consumer, make_producer
from synpref.shared.kafka.codec import PayloadError, dead_letter, decode_record, encode_record
from synpref.shared.kafka.runner import RunnerStats
from synpref.shared.service import Service, ServiceSpec, configure_logging, install_signal_handlers, service_parser
from synpref.shared.stage import StageResult
from synpref.v1 import pipeline_pb2_grpc
from synpref.v1.pair_pb2 import DECISION_FLIP, DECISION_KEEP, PairRecord
from synpref.v1.pipeline_pb2 import WriteBatchResponse

log = logging.getLogger(__name__)
SERVICE = "writer"
WRITTEN = PromCounter("synpref_writer_rows", "Rows written to the dataset, by decision", ["version", "decision"])
DUPLICATES = PromCounter("synpref_writer_duplicates", "Re-delivered pairs already in the version", ["version"])
WRITABLE = {DECISION_KEEP, DECISION_FLIP}


def tp_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


class DatasetSink:
    """The dataset plus a lock: the Kafka loop and gRPC ProcessBatch both append."""

    def __init__(self, dataset: DatasetVersion) -> None:
        self.dataset = dataset
        self.lock = threading.Lock()

    def write(self, records: list[PairRecord], offsets: dict[str, int] | None = None):
        with self.lock:
            before = dict(self.dataset.stats["by_decision"])
            result = self.dataset.append(records, offsets)
            after = self.dataset.stats["by_decision"]
        for name, n in after.items():
            if n > before.get(name, 0):
                WRITTEN.labels(self.dataset.version, name).inc(n - before.get(name, 0))
        if result.duplicates:
            DUPLICATES.labels(self.dataset.version).inc(result.duplicates)
        return result


class Seeker(ConsumerRebalanceListener):
    """On assignment, start each partition where the manifest says the dataset stopped."""

    def __init__(self, loop: WriterLoop) -> None:
        self.loop = loop

    def on_partitions_revoked(self, revoked: Any) -> None:
        # Whatever is buffered is flushed while we still own its partitions.
        self.loop.flush()

    def on_partitions_assigned(self, assigned: Any) -> None:
        stored = self.loop.sink.dataset.offsets
        for tp in assigned:
            offset = stored.get(tp_key(tp.topic, tp.partition))
            if offset is not None:
                self.loop.consumer.seek(tp, offset)
                log.info("writer: %s:%d resumes at stored offset %d", tp.topic, tp.partition, offset)


class WriterLoop:
    def __init__(self, settings: Settings, sink: DatasetSink, stop: threading.Event, stats: RunnerStats) -> None:
        self.settings = settings
        self.sink = sink
        self.stop = stop
        self.stats = stats
        self.topic = settings.topics.curated
        self.group = settings.service.group_id or f"synpref-{SERVICE}"
        self.consumer: Any = None
        self.producer: Any = None
        self.buffer: list[PairRecord] = []
        self.positions: dict[str, int] = {}
        self.dlq: list[Any] = []
        self.oldest = 0.0
        self.processed = 0

    def open(self) -> None:
        self.producer = make_producer(self.settings.kafka)
        self.consumer = make_consumer(self.settings.kafka, self.group)
        self.consumer.subscribe([self.topic], listener=Seeker(self))

    def _to_dlq(self, msg: Any, kind: str, reason: str, record: PairRecord | None = None) -> None:
        if record is not None:
            enc = encode_record(record, self.settings.topics.dead_letter)
            key, value, headers = enc.key, enc.value, enc.headers
        else:
            key, value, headers = msg.key, msg.value, msg.headers
        self.dlq.append(
            dead_letter(
                self.settings.topics.dead_letter,
                key=key,
                value=value,
                headers=headers,
                kind=kind,
                reason=reason,
                service=SERVICE,
                source_topic=msg.topic,
                source_partition=msg.partition,
                source_offset=msg.offset,
            )
        )

    def take(self, messages: list[Any]) -> None:
        for msg in messages:
            if not self.buffer and not self.dlq and not self.positions:
                self.oldest = time.monotonic()
            self.positions[tp_key(msg.topic, msg.partition)] = msg.offset + 1
            self.processed += 1
            try:
                record = decode_record(msg.value, msg.headers)
            except PayloadError as exc:
                self._to_dlq(msg, "undecodable", str(exc))
                continue
            if record.decision.decision not in WRITABLE:
                self._to_dlq(msg, "failed", "only KEEP and FLIP decisions are written to the dataset", record)
                continue
            self.buffer.append(record)

    def due(self) -> bool:
        if not self.positions:
            return False
        cfg = self.settings.writer
        return len(self.buffer) >= cfg.shard_rows or time.monotonic() - self.oldest >= cfg.flush_interval_s

    def flush(self) -> None:
        if not self.positions:
            return
        if self.dlq:
            futures = [self.producer.send(o.topic, key=o.key, value=o.value, headers=o.headers) for o in self.dlq]
            self.producer.flush(timeout=120)
            failed = [f for f in futures if not f.is_done or f.failed()]
            if failed:
                raise RuntimeError(f"{len(failed)} dead letters not acknowledged; nothing committed")
        result = self.sink.write(self.buffer, self.positions)
        offsets = {}
        for key, offset in self.positions.items():
            topic, partition = key.rsplit(":", 1)
            offsets[TopicPartition(topic, int(partition))] = OffsetAndMetadata(offset, "", -1)
        try:
            self.consumer.commit(offsets)
        except Exception as exc:  # the manifest is the truth; Kafka's copy only feeds lag dashboards
            log.warning("writer: Kafka offset commit failed (the manifest has them): %s", exc)
        with self.stats._lock:
            self.stats.processed += self.processed
            self.stats.dead_lettered += len(self.dlq)
            self.stats.failed += len(self.dlq)
            self.stats.batches += 1
            self.stats.counters["written"] += result.written
            self.stats.counters["duplicates"] += result.duplicates
        metrics.PROCESSED.labels(SERVICE).inc(self.processed)
        metrics.DEAD_LETTERED.labels(SERVICE).inc(len(self.dlq))
        metrics.BATCHES.labels(SERVICE).inc()
        log.info("writer: +%d rows (%d duplicates) -> %s", result.written, result.duplicates, result.shard)
        self.buffer, self.positions, self.dlq, self.processed = [], {}, [], 0

    def lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = self.consumer.position(tp, timeout_ms=0)
            except Exception:
                continue
            if position is not None:
                metrics.CONSUMER_LAG.labels(SERVICE, tp.topic, str(tp.partition)).set(max(0, high - position))

    def run(self) -> None:
        if self.consumer is None:
            self.open()
        try:
            while not self.stop.is_set():
                polled = self.consumer.poll(
                    timeout_ms=self.settings.kafka.consumer_poll_ms, max_records=self.settings.kafka.max_batch
                )
                self.take([m for batch in polled.values() for m in batch])
                if self.due():
                    self.flush()
                    self.lag()
            self.flush()
        finally:
            consumer, producer, self.consumer, self.producer = self.consumer, self.producer, None, None
            if producer is not None:
                producer.close(timeout=30)
            if consumer is not None:
                consumer.close(autocommit=False)


class WriterServicer:
    """ProcessBatch writes synchronously (no offsets: the caller owns delivery); Status reports counts."""

    def __init__(self, service: Service, sink: DatasetSink) -> None:
        self.service = service
        self.sink = sink

    def ProcessBatch(self, request: Any, context: grpc.ServicerContext) -> WriteBatchResponse:
        records = [r for r in request.records if r.decision.decision in WRITABLE]
        result = self.sink.write(records)
        self.service.count_grpc(len(request.records), len(request.records) - len(records))
        return WriteBatchResponse(
            dataset_version=self.sink.dataset.version, written=result.written, duplicates=result.duplicates
        )

    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.service.status()


def main(argv: list[str]) -> int:
    parser = service_parser(SERVICE, __doc__)
    args = parser.parse_args(argv)
    from synpref.shared.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, flush=True)
        return 2
    configure_logging(settings.log_level)
    cfg = settings.writer
    sink = DatasetSink(DatasetVersion(cfg.root, cfg.name, cfg.version))

    def counters() -> dict[str, int]:
        stats = sink.dataset.stats
        out = {"rows": stats["rows"]}
        out.update({f"decision.{k}": v for k, v in stats["by_decision"].items()})
        return out

    spec = ServiceSpec(
        name=SERVICE,
        stage=lambda batch: StageResult(),  # unused: the writer is a sink with its own loop
        input_route="curated",
        output_routes=[],
        grpc_service="synpref.v1.DatasetWriterService",
        add_servicer=pipeline_pb2_grpc.add_DatasetWriterServiceServicer_to_server,
        make_servicer=lambda service: WriterServicer(service, sink),
        counters=counters,
    )
    stop = threading.Event()
    install_signal_handlers(stop)
    service = Service(spec, settings, kafka=False, stop=stop)
    loop = None
    if not args.grpc_only:
        loop = WriterLoop(settings, sink, stop, service.stats)
        loop.open()
    errors: list[BaseException] = []

    def run_loop() -> None:
        assert loop is not None
        try:
            loop.run()
        except BaseException as exc:  # stop the whole service: a writer that cannot commit must not look healthy
            log.exception("writer: loop failed")
            errors.append(exc)
            stop.set()

    thread = threading.Thread(target=run_loop, name="writer-loop") if loop else None
    if thread:
        thread.start()
    try:
        code = service.run()
    finally:
        stop.set()
        if thread:
            thread.join()
    return 1 if errors else code
