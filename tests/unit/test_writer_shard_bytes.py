"""Dataset writer: a shard is due at writer.shard_bytes of buffered messages, not only at shard_rows (5,000 pairs of
8 MiB were 40 GB in one pod), a record over the bound is written alone, and a shard's row groups are bounded in
bytes too. The runner, its sink and the dataset are the real ones; the consumer and producer are fakes."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from synpref.services.dataset_writer import dataset as dataset_module
from synpref.services.dataset_writer.dataset import DatasetVersion, size_bounded
from synpref.services.dataset_writer.main import DatasetSink, ManifestSink, writable_only
from synpref.shared.config import Settings, TopicSettings, WriterSettings
from synpref.shared.kafka.clients import Outbox
from synpref.shared.kafka.codec import encode_record
from synpref.shared.kafka.runner import StageRunner
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import DECISION_KEEP, PairRecord
from tests.unit.test_kafka_sink import FakeConsumer, FakeProducer

TOPICS = TopicSettings(s2_raw="in", curated="out", dead_letter="dlq")
TP = TopicPartition("in", 0)


def long_pair(i: int, chars: int) -> PairRecord:
    record = new_record(new_pair([{"role": "user", "content": f"q{i} " + "x" * chars}],
                                 [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}],
                                 "long"))  # fmt: skip
    record.decision.decision = DECISION_KEEP
    return record


def consumed(record: PairRecord, offset: int) -> ConsumerRecord:
    out = encode_record(record, "in")
    return ConsumerRecord("in", 0, 0, offset, 0, 0, out.key, out.value, out.headers, None, 0, len(out.value), 0)


def writer_runner(
    tmp_path: Path, batches: list[list[ConsumerRecord]], shard_bytes: int, log: list[str]
) -> tuple[StageRunner, ManifestSink]:
    """The writer's stage and ManifestSink under the runner, rows and time never due: only shard_bytes is."""
    cfg = WriterSettings(root=str(tmp_path), name="d", version="v1", shard_bytes=shard_bytes, flush_interval_s=3600)
    sink = ManifestSink(DatasetSink(DatasetVersion(tmp_path, "d", "v1")), cfg)
    runner = StageRunner(Settings(topics=TOPICS), writable_only, service="writer", input_route="s2_raw", sink=sink)
    runner.consumer = FakeConsumer(log, batches)
    runner.producer = FakeProducer(log)
    runner.outbox = Outbox(runner.producer, 5)
    return runner, sink


def test_a_shard_is_written_with_its_offsets_once_the_buffered_messages_reach_shard_bytes(tmp_path: Path) -> None:
    messages = [consumed(long_pair(i, 100_000), i) for i in range(4)]
    size = len(messages[0].value)
    log: list[str] = []
    runner, sink = writer_runner(tmp_path, [[m] for m in messages], shard_bytes=3 * size - 10, log=log)
    dataset = sink.target.dataset
    for _ in range(2):
        runner.run_once()
    # Counted from the messages the runner hands over (write_sourced), not by serialising the records again.
    assert sink.buffered_bytes == 2 * size and dataset.stats["rows"] == 0 and log == []
    runner.run_once()
    assert dataset.stats["rows"] == 3 and dataset.offsets == {"in:0": 3}, "3 messages reach the bound: one shard"
    assert log == ["commit 0:3"] and sink.buffered_bytes == 0 and sink.buffer == []
    runner.run_once()
    assert dataset.stats["rows"] == 3 and sink.buffered_bytes == size, "the next one starts a new count"
    runner.checkpoint()
    assert dataset.stats["rows"] == 4 and dataset.offsets == {"in:0": 4}
    dataset.close()
    with DatasetVersion(tmp_path, "d", "v1") as reopened:  # exactly once: each pair in one shard, offsets with it
        assert [s["rows"] for s in reopened.manifest["shards"]] == [3, 1]
        ids = [i for f in reopened.files() for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
        assert ids == [long_pair(i, 100_000).pair.id for i in range(4)]


def test_a_record_larger_than_shard_bytes_is_written_as_a_shard_of_its_own(tmp_path: Path) -> None:
    big = consumed(long_pair(0, 50_000), 7)
    runner, sink = writer_runner(tmp_path, [[big]], shard_bytes=1024, log=[])
    runner.run_once()
    dataset = sink.target.dataset
    assert dataset.stats["rows"] == 1 and dataset.offsets == {"in:0": 8} and len(dataset.files()) == 1
    dataset.close()


def test_a_write_without_messages_counts_the_records_serialized_size(tmp_path: Path) -> None:
    records = [long_pair(i, 1000) for i in range(3)]
    cfg = WriterSettings(root=str(tmp_path), shard_bytes=2 * records[0].ByteSize() + 1, flush_interval_s=3600)
    sink = ManifestSink(DatasetSink(DatasetVersion(tmp_path, "d", "v1")), cfg)
    sink.write([("curated", r) for r in records[:2]])
    assert sink.buffered_bytes == records[0].ByteSize() + records[1].ByteSize() and not sink.due()
    sink.write([("curated", records[2])])
    assert sink.due()
    sink.target.dataset.close()


class Sized:
    """A record of a given serialized size: all size_bounded asks of a PairRecord."""

    def __init__(self, size: int) -> None:
        self.size = size

    def ByteSize(self) -> int:  # protobuf's name
        return self.size


@pytest.mark.parametrize(
    ("sizes", "max_rows", "max_bytes", "expected"),
    [
        ([10, 10, 10, 10, 10], 2, 1000, [[0, 1], [2, 3], [4]]),  # the rows bound
        ([10, 10, 10, 10, 10], 100, 25, [[0, 1, 2], [3, 4]]),  # cut once the bytes reach the bound
        ([5, 500, 5, 5], 100, 100, [[0, 1], [2, 3]]),  # a record over the bound ends its list, never dropped
        ([500], 100, 100, [[0]]),
        ([], 10, 10, []),
    ],
)
def test_size_bounded_cuts_at_rows_or_bytes_and_keeps_every_record(
    sizes: list[int], max_rows: int, max_bytes: int, expected: list[list[int]]
) -> None:
    records = [Sized(n) for n in sizes]
    chunks = list(size_bounded(records, max_rows, max_bytes))  # type: ignore[arg-type]
    assert [[records.index(r) for r in chunk] for chunk in chunks] == expected


def test_a_shard_of_long_pairs_is_written_in_row_groups_bounded_in_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1,000 rows of up to 8 MiB each were one row group, built whole (~5x its text) when the shard was written.
    monkeypatch.setattr(dataset_module, "ROW_GROUP_BYTES", 250_000)
    records = [long_pair(i, 100_000) for i in range(10)]
    with DatasetVersion(tmp_path, "d", "v1") as dv:
        dv.append(records, {"in:0": 10})
        shard = pq.ParquetFile(dv.files()[0])
    assert [shard.metadata.row_group(g).num_rows for g in range(shard.metadata.num_row_groups)] == [3, 3, 3, 1]
    assert shard.read(columns=["id"]).column("id").to_pylist() == [r.pair.id for r in records]
