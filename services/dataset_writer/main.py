"""`synpref writer`: kept and flipped pairs from the curated topic into a versioned Parquet dataset.

The writer is the stage runner with a sink: the stage dead-letters what is not KEEP or
FLIP, the runner hands the rest to ManifestSink, and a checkpoint (shard_rows or shard_bytes
buffered, or flush_interval_s since the oldest) writes one shard. Its offsets are committed WITH
the shard: the manifest written after it stores the next offset of every partition, and
on (re)assignment the runner seeks to those stored offsets, so a pair is written once
even across crashes. Order of a checkpoint: dead letters acknowledged, shard, manifest
(the commit point), then Kafka's committed offsets (best effort, for lag monitoring).

Run one writer per dataset version (one replica): the manifest has a single author. Its
consumer group is the version's own (synpref-writer-<name>-<version>, unless service.group_id
is set), and it is a static member named after the version, so a restarted writer takes its
partitions back at once instead of after kafka.session_timeout_ms.

A version holds every curated pair the topic has (from its earliest retained offset), whatever
other versions were written before it: a partition the manifest has no offset for (a new
version, or one that never saw that partition) starts at offset 0, never at a committed group
offset (one set by hand, or by a writer of another version in the same group, as all were once).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import grpc
from kafka.structs import TopicPartition
from prometheus_client import Counter as PromCounter

from synpref.services.dataset_writer.dataset import AppendResult, DatasetVersion, row_problem
from synpref.shared.config import Settings, WriterSettings
from synpref.shared.kafka.codec import Message
from synpref.shared.kafka.runner import RunnerStats
from synpref.shared.service import Service, ServiceSpec, serve, service_parser
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
    """`topic:partition`, the key of a partition's offset in the manifest."""
    return f"{topic}:{partition}"


def writable_only(batch: list[PairRecord]) -> StageResult:
    """The writer's stage: KEEP and FLIP go on to the dataset, anything else to the dead-letter topic,
    and so does a record that cannot become a Parquet row (an out-of-range timestamp): caught here,
    per record, it would otherwise fail the shard's flush and stop the writer on every restart."""
    result = StageResult()
    for record in batch:
        if record.decision.decision not in WRITABLE:
            result.fail(record, "only KEEP and FLIP decisions are written to the dataset")
            continue
        problem = row_problem(record)
        if problem is not None:
            result.fail(record, f"not writable as a dataset row: {problem}")
            continue
        result.emit("curated", record)
    return result


class DatasetSink:
    """The dataset plus a lock: the Kafka runner and gRPC ProcessBatch both append."""

    def __init__(self, dataset: DatasetVersion) -> None:
        self.dataset = dataset
        self.lock = threading.Lock()

    def write(self, records: list[PairRecord], offsets: dict[str, int] | None = None) -> AppendResult:
        """Append the new pairs of `records` as one shard, committed with `offsets` if given, under the lock;
        counts rows by decision and duplicates in Prometheus.
        """
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

    def stored_offsets(self) -> dict[TopicPartition, int]:
        """The next offset of each partition, as stored in the current manifest."""
        with self.lock:
            stored = dict(self.dataset.offsets)
        out = {}
        for key, offset in stored.items():
            topic, partition = key.rsplit(":", 1)
            out[TopicPartition(topic, int(partition))] = offset
        return out


class ResumeAt(dict[TopicPartition, int]):
    """Where each partition resumes: its manifest offset, else 0, the topic's beginning (an offset retention
    removed is reset to the earliest one: the consumers' auto_offset_reset). Never the group's committed offset,
    which another version's writer (same group) moved."""

    def __contains__(self, tp: object) -> bool:
        return True

    def __missing__(self, tp: TopicPartition) -> int:
        return 0


class ManifestSink:
    """The runner's sink: rows buffered until due, then one shard committed with its offsets.

    Due is checked after each polled batch, so a buffer holds at most shard_bytes plus one batch (the consumer
    fetches at most kafka.max_batch records and about 50 MiB at a time: shared/kafka/clients.py).
    """

    keeps_offsets = True

    def __init__(self, target: DatasetSink, cfg: WriterSettings, stats: RunnerStats | None = None) -> None:
        self.target = target
        self.cfg = cfg
        self.stats = stats
        self.buffer: list[PairRecord] = []
        self.buffered_bytes = 0
        """The size of the buffered records' Kafka message values (serialized size where none is known)."""
        self.oldest: float | None = None
        """When the first record (or offset) since the last flush arrived."""

    def write(self, routed: list[tuple[str, PairRecord]]) -> None:
        """Buffer the routed records, each counted at its serialized size (write_sourced, with no messages)."""
        self.write_sourced(routed, [None] * len(routed))

    def write_sourced(self, routed: list[tuple[str, PairRecord]], sources: list[Message | None]) -> None:
        """Buffer the routed records, each counted at the length of its input message's value (free to count; the
        runner calls this instead of write); the first write since the last flush starts the flush clock."""
        if self.oldest is None:
            # Offsets advance even when no row does (dead letters, duplicates): they are due too.
            self.oldest = time.monotonic()
        for (_, record), source in zip(routed, sources, strict=True):
            # Only the length is kept: holding the message would keep its value alive beside the decoded record.
            self.buffered_bytes += len(source.value) if source is not None and source.value else record.ByteSize()
            self.buffer.append(record)

    def due(self) -> bool:
        """True when shard_rows records or shard_bytes of them are buffered, or flush_interval_s has passed since
        the oldest write (a record over shard_bytes makes it due at once: written, never dropped)."""
        if self.oldest is None:
            return False
        full = len(self.buffer) >= self.cfg.shard_rows or self.buffered_bytes >= self.cfg.shard_bytes
        return full or time.monotonic() - self.oldest >= self.cfg.flush_interval_s

    def flush(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Write the buffer as one shard whose manifest stores `offsets`, then empty the buffer."""
        result = self.target.write(self.buffer, {tp_key(tp.topic, tp.partition): n for tp, n in offsets.items()})
        if self.stats is not None:
            self.stats.count("written", result.written)
            self.stats.count("duplicates", result.duplicates)
        log.info("writer: +%d rows (%d duplicates) -> %s", result.written, result.duplicates, result.shard)
        self.buffer, self.buffered_bytes, self.oldest = [], 0, None

    def stored_offsets(self) -> ResumeAt:
        """Where the runner seeks each assigned partition: the manifest's offset, else the beginning (ResumeAt)."""
        return ResumeAt(self.target.stored_offsets())


class WriterServicer:
    """ProcessBatch writes synchronously (no offsets: the caller owns delivery); Status reports counts."""

    def __init__(self, service: Service, sink: DatasetSink) -> None:
        self.service = service
        self.sink = sink

    def ProcessBatch(self, request: Any, context: grpc.ServicerContext) -> WriteBatchResponse:
        """Write the request's writable records (writable_only) at once; answers the version, rows written,
        duplicates and the pair ids of the records not written (a caller could not tell them from duplicates)."""
        stage = writable_only(list(request.records))
        records = [r for _, r in stage.routed]
        result = self.sink.write(records)
        self.service.count_grpc(len(request.records), len(request.records) - len(records))
        return WriteBatchResponse(
            dataset_version=self.sink.dataset.version,
            written=result.written,
            duplicates=result.duplicates,
            failed_ids=[r.pair.id for r, _ in stage.failed],
        )

    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The service's status and counters."""
        return self.service.status()


def make_spec(settings: Settings, args: argparse.Namespace) -> ServiceSpec:
    """The writer service: `writable_only` on the curated topic, with ManifestSink as the runner's sink and a
    static group member named after the dataset version.
    """
    cfg = settings.writer
    target = DatasetSink(DatasetVersion(cfg.root, cfg.name, cfg.version))
    manifest_sink = ManifestSink(target, cfg)

    def counters() -> dict[str, int]:
        stats = target.dataset.stats
        out = {"rows": stats["rows"]}
        out.update({f"decision.{k}": v for k, v in stats["by_decision"].items()})
        return out

    def make_servicer(service: Service) -> WriterServicer:
        manifest_sink.stats = service.stats
        return WriterServicer(service, target)

    return ServiceSpec(
        name=SERVICE,
        stage=writable_only,
        input_route="curated",
        output_routes=[],
        grpc_service="synpref.v1.DatasetWriterService",
        add_servicer=pipeline_pb2_grpc.add_DatasetWriterServiceServicer_to_server,
        make_servicer=make_servicer,
        counters=counters,
        sink=manifest_sink,
        instance_id=f"{SERVICE}-{cfg.name}-{cfg.version}",
        # A group per version: versions written side by side would otherwise split the partitions between them
        # (each missing the other's until one stops), and the group's lag would mix versions.
        group_id=f"synpref-{SERVICE}-{cfg.name}-{cfg.version}",
    )


def main(argv: list[str]) -> int:
    """`synpref writer`: run the dataset writer until SIGTERM."""
    return serve(make_spec, service_parser(SERVICE, __doc__).parse_args(argv))
