"""Dataset writer, review 45: a pair and its flip are one pair in a version (dedup on the ingest id too)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pyarrow.parquet as pq

from synpref.services.dataset_writer.dataset import ID_INDEX, DatasetVersion
from synpref.shared.pairs import flipped, new_pair, new_record
from synpref.v1.pair_pb2 import DECISION_FLIP, DECISION_KEEP, PairRecord


def kept(i: int) -> PairRecord:
    r = new_record(new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "a"}],
                            [{"role": "assistant", "content": "b"}], "s1", {}))  # fmt: skip
    r.decision.decision = DECISION_KEEP
    return r


def flip_of(i: int) -> PairRecord:
    out = flipped(kept(i))
    out.decision.decision = DECISION_FLIP
    return out


def rows(ds: DatasetVersion) -> list[str]:
    return [i for f in ds.files() for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


def test_a_pair_and_its_flip_are_one_row_whichever_comes_first(tmp_path: Path) -> None:
    # An annotator batch re-run after a crash asks the judges again: the filter can then decide KEEP once and FLIP
    # once for the same ingest pair, and the writer got two records whose pair ids differ.
    assert flip_of(1).pair.id != kept(1).pair.id and flip_of(1).lineage.original_id == kept(1).pair.id
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        assert ds.append([kept(1), flip_of(2)]).written == 2
        again = ds.append([flip_of(1), kept(2), kept(3)])
        assert (again.written, again.duplicates) == (1, 2), "before: both orientations of pairs 1 and 2 were written"
        same_batch = ds.append([kept(4), flip_of(4)])
        assert (same_batch.written, same_batch.duplicates) == (1, 1)
        assert ds.stats["rows"] == 4 and ds.stats["by_decision"] == {"keep": 3, "flip": 1}
        assert sorted(rows(ds)) == sorted([kept(1).pair.id, flip_of(2).pair.id, kept(3).pair.id, kept(4).pair.id])


def test_a_rebuilt_index_knows_the_ingest_ids_of_flipped_rows(tmp_path: Path) -> None:
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        ds.append([flip_of(1)])
        folder = ds.dir
    for suffix in ("", "-wal", "-shm"):
        (folder / (ID_INDEX + suffix)).unlink(missing_ok=True)
    with DatasetVersion(tmp_path, "d", "v1") as rebuilt:
        assert rebuilt.append([kept(1)]).duplicates == 1


def test_an_index_an_older_build_wrote_is_rebuilt_with_the_ingest_ids(tmp_path: Path) -> None:
    with DatasetVersion(tmp_path, "d", "v1") as ds:
        ds.append([flip_of(1)])
        ds.append([kept(2)])
        folder = ds.dir
    # What an older build left: the pair ids only, both shards counted as indexed, no format noted.
    db = sqlite3.connect(folder / ID_INDEX, isolation_level=None)
    db.execute("DELETE FROM ids WHERE id = ?", (kept(1).pair.id,))
    db.execute("DELETE FROM meta WHERE key = 'format'")
    db.close()
    with DatasetVersion(tmp_path, "d", "v1") as reopened:
        result = reopened.append([kept(1), kept(2), kept(3)])
        assert (result.written, result.duplicates) == (1, 2), "before: the old index let pair 1's KEEP in"
