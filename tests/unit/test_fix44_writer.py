"""Dataset writer (fix 44): a manifest whose folder fsync failed after its rename, the id index's full rebuild and the
bound on the manifest's task categories."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from synpref.services.dataset_writer import dataset as dataset_module
from synpref.services.dataset_writer.dataset import ID_INDEX, MANIFEST, DatasetVersion, IdIndex
from synpref.shared import files
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import DECISION_KEEP, PairRecord


def records(start: int, stop: int, category: str = "coding") -> list[PairRecord]:
    out = []
    for i in range(start, stop):
        r = new_record(new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "a"}],
                                [{"role": "assistant", "content": "b"}], "fix44"))  # fmt: skip
        r.decision.decision = DECISION_KEEP
        r.attributes.task_category = category
        out.append(r)
    return out


def ids(rs: list[PairRecord]) -> list[str]:
    return sorted(r.pair.id for r in rs)


def all_ids(ds: DatasetVersion) -> list[str]:
    return sorted(i for f in ds.files() for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())


def listed_shards(folder: Path) -> int:
    path = folder / MANIFEST
    return len(json.loads(path.read_text())["shards"]) if path.exists() else 0


@pytest.fixture
def fsync_fails(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int, int], list[Path]]]:
    """arm(shards, times): the folder fsync fails (EIO) the next `times` times it runs while the manifest on disk
    lists `shards` shards, i.e. right after the rename that made it so; the list returned grows per failure."""
    real = files.fsync_folder
    failed: list[Path] = []
    armed: dict[str, int] = {}

    def fsync_folder(folder: Path) -> None:
        if armed.get("times", 0) > 0 and folder.is_dir() and listed_shards(folder) == armed["shards"]:
            armed["times"] -= 1
            failed.append(folder)
            raise OSError(errno.EIO, "Input/output error")
        real(folder)

    def arm(shards: int, times: int = 1) -> list[Path]:
        armed.update(shards=shards, times=times)
        return failed

    monkeypatch.setattr(files, "fsync_folder", fsync_folder)
    yield arm


def test_a_retry_after_the_manifest_fsync_failed_does_not_overwrite_the_committed_shard(
    tmp_path: Path, fsync_fails: Callable[[int, int], list[Path]]
) -> None:
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        ds.append(records(0, 3), {"t:0": 3})
        failed = fsync_fails(2, 1)
        with pytest.raises(OSError, match="Input/output error"):
            ds.append(records(3, 6), {"t:0": 6})
        assert len(failed) == 1 and listed_shards(ds.dir) == 2  # renamed: the disk's manifest lists the shard
        # A caller's next batch (the runner's, or another gRPC request): before, it was written as part-00001 over the
        # committed shard, whose three pairs were gone from the version while its offsets said they were consumed.
        result = ds.append(records(6, 8), {"t:0": 8})
        assert (result.written, result.shard) == (2, "part-00002.parquet")
        assert all_ids(ds) == ids(records(0, 8))
    with DatasetVersion(tmp_path, "d", "v1") as reopened:
        assert all_ids(reopened) == ids(records(0, 8))
        assert reopened.stats["rows"] == 8 and reopened.offsets == {"t:0": 8}


def test_offsets_after_the_manifest_fsync_failed_do_not_drop_the_committed_shard(
    tmp_path: Path, fsync_fails: Callable[[int, int], list[Path]]
) -> None:
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        ds.append(records(0, 3), {"t:0": 3})
        fsync_fails(2, 1)
        with pytest.raises(OSError):
            ds.append(records(3, 6), {"t:0": 6})
        # Only offsets (a batch of dead letters): before, its manifest, built from the stale one, left part-00001 out.
        ds.append([], {"t:0": 9})
        assert listed_shards(ds.dir) == 2 and all_ids(ds) == ids(records(0, 6))
    with DatasetVersion(tmp_path, "d", "v1") as reopened:
        assert all_ids(reopened) == ids(records(0, 6)) and reopened.offsets == {"t:0": 9}


def test_the_same_batch_sent_again_is_duplicates_once_the_manifest_is_durable(
    tmp_path: Path, fsync_fails: Callable[[int, int], list[Path]]
) -> None:
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        ds.append(records(0, 3))
        failed = fsync_fails(2, 2)
        with pytest.raises(OSError):
            ds.append(records(3, 6))
        # The fsync fails again: the retry must not answer "duplicates" (as good as written) for pairs whose manifest
        # a machine crash could still take back.
        with pytest.raises(OSError):
            ds.append(records(3, 6))
        assert len(failed) == 2
        retried = ds.append(records(3, 6))
        assert (retried.written, retried.duplicates, retried.shard) == (0, 3, None)
        assert all_ids(ds) == ids(records(0, 6)) and ds.stats["rows"] == 6


def test_a_full_rebuild_of_the_id_index_bulk_loads_the_same_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        for start in range(0, 12, 4):
            ds.append(records(start, start + 4))
        folder = ds.dir
    loads: list[int] = []
    real = IdIndex.bulk_load

    def bulk_load(self: IdIndex, loaded: object) -> None:
        loads.append(1)
        real(self, loaded)  # type: ignore[arg-type]

    monkeypatch.setattr(IdIndex, "bulk_load", bulk_load)
    for suffix in ("", "-wal", "-shm"):
        (folder / (ID_INDEX + suffix)).unlink(missing_ok=True)
    with DatasetVersion(tmp_path, "d", "v1") as rebuilt:
        assert loads == [1], "before: inserted shard by shard, one random B-tree place per id"
        assert rebuilt.index is not None and len(rebuilt.index) == 12
        result = rebuilt.append(records(10, 14))  # the index counts all 3 shards: nothing indexed twice or missed
        assert (result.written, result.duplicates) == (2, 2)
    with DatasetVersion(tmp_path, "d", "v1") as again:
        assert loads == [1]  # caught up, not rebuilt again
        assert again.append(records(0, 14)).duplicates == 14


def test_an_index_ahead_of_the_manifest_is_rebuilt_from_the_listed_shards(tmp_path: Path) -> None:
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        ds.append(records(0, 3))
        folder = ds.dir
        kept = (folder / MANIFEST).read_text()
        ds.append(records(3, 6))
    (folder / MANIFEST).write_text(kept)  # a manifest restored by hand: one shard, the index holds two
    with DatasetVersion(tmp_path, "d", "v1") as restored:
        assert restored.index is not None and len(restored.index) == 3
        result = restored.append(records(0, 6))
        assert (result.written, result.duplicates) == (3, 3)


def test_the_manifest_counts_a_bounded_number_of_task_categories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # raising=False: a build without the bound fails on the counts below, not here.
    monkeypatch.setattr(dataset_module, "MAX_CATEGORIES", 4, raising=False)
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        ds.append(records(0, 5, "coding") + records(5, 8, "math"))
        ds.append([r for i in range(8, 14) for r in records(i, i + 1, f"free text {i}")])
        # Before: every distinct string of the labeller's, rewritten into the manifest on each flush.
        assert ds.stats["by_category"] == {"coding": 5, "math": 3, "free text 10": 1, "other": 5}
        ds.append(records(14, 16, "math"))
        assert ds.stats["by_category"] == {"coding": 5, "math": 5, "free text 10": 1, "other": 5}
        assert sum(ds.stats["by_category"].values()) == ds.stats["rows"] == 16
