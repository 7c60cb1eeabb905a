"""Dataset writer (review 43): an id-index update that fails after the manifest committed its shard (a full disk,
an I/O error in SQLite) neither reports the committed write as failed nor lets that shard's pairs in twice."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from synpref.services.dataset_writer.dataset import DatasetVersion, IdIndex
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import DECISION_KEEP, PairRecord


def records(start: int, stop: int) -> list[PairRecord]:
    out = []
    for i in range(start, stop):
        r = new_record(new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "a"}],
                                [{"role": "assistant", "content": "b"}], "review43"))  # fmt: skip
        r.decision.decision = DECISION_KEEP
        out.append(r)
    return out


@pytest.fixture
def index_fails_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The next IdIndex.add_shard raises as SQLite does on a full disk; the ones after it work. Yields the shard
    counts of the failed calls."""
    real = IdIndex.add_shard
    failed: list[int] = []

    def add_shard(self: IdIndex, ids: object, shards: int) -> None:
        if not failed:
            failed.append(shards)
            raise sqlite3.OperationalError("database or disk is full")
        real(self, ids, shards)  # type: ignore[arg-type]

    monkeypatch.setattr(IdIndex, "add_shard", add_shard)
    yield failed


def all_ids(ds: DatasetVersion) -> list[str]:
    return [i for f in ds.files() for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


def test_a_write_whose_manifest_committed_is_reported_written_though_the_index_update_failed(
    tmp_path: Path, index_fails_once: list[int]
) -> None:
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        # Before: OperationalError, so the runner's sink kept the rows buffered and a gRPC caller sent them again.
        result = ds.append(records(0, 3), {"t:0": 3})
        assert index_fails_once == [1]
        assert (result.written, result.shard) == (3, "part-00000.parquet")
        assert ds.stats["rows"] == 3 and ds.offsets == {"t:0": 3}


def test_pairs_of_a_shard_the_index_missed_are_duplicates_when_sent_again(
    tmp_path: Path, index_fails_once: list[int]
) -> None:
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        with contextlib.suppress(sqlite3.OperationalError):  # the old code raised, though the manifest listed the shard
            ds.append(records(0, 3))
        assert index_fails_once == [1] and ds.stats["rows"] == 3
        retried = ds.append(records(0, 5))  # the caller's retry, with two new pairs
        assert (retried.written, retried.duplicates) == (2, 3), "before: the 3 committed pairs were written again"
        assert sorted(all_ids(ds)) == sorted(r.pair.id for r in records(0, 5))


def test_an_index_that_missed_a_shard_does_not_skip_it_for_good(tmp_path: Path, index_fails_once: list[int]) -> None:
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        with contextlib.suppress(sqlite3.OperationalError):
            ds.append(records(0, 3))
        ds.append(records(3, 5))
    # Before: the second shard's update counted 2 shards indexed, so opening did not catch up on the first one and
    # an upstream re-delivery of its pairs was written again, in this run or any later one.
    with DatasetVersion(tmp_path, "d", "v1") as reopened:
        result = reopened.append(records(0, 5))
        assert (result.written, result.duplicates) == (0, 5)
        assert reopened.stats["rows"] == 5 and len(all_ids(reopened)) == 5
