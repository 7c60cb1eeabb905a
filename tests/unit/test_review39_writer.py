"""Dataset writer (review 39): version names stay under the root, a shard is built a row group at a time, and a
version an older build wrote in another schema is not appended to."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from synpref.services.dataset_writer.dataset import MANIFEST, DatasetVersion, load_dataset_version, manifest_files
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import DECISION_KEEP, PairRecord


def rec(i: int, size: int = 10) -> PairRecord:
    r = new_record(
        new_pair(
            [{"role": "user", "content": f"q{i} " + "x" * size}],
            [{"role": "assistant", "content": "a" * size}],
            [{"role": "assistant", "content": "b" * size}],
            "s1",
            {"i": str(i)},
        )
    )
    r.decision.decision = DECISION_KEEP
    return r


@pytest.mark.parametrize(
    ("name", "version"),
    [("d", "../../escaped"), ("..", "escaped"), ("d", "<absolute>"), ("d", ""), ("d", "a/b")],
)
def test_a_name_or_version_that_is_not_one_folder_name_is_refused(tmp_path: Path, name: str, version: str) -> None:
    root = tmp_path / "datasets"
    root.mkdir()
    version = str(tmp_path / "absolute") if version == "<absolute>" else version
    with pytest.raises(ValueError, match="one plain folder name"):
        DatasetVersion(root, name, version)
    with pytest.raises(ValueError, match="one plain folder name"):
        manifest_files(root, name, version)
    # Nothing written anywhere: before, "../../escaped" wrote its lock and shards beside the root, and an absolute
    # version wherever it named.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datasets"]
    assert [p for p in root.rglob("*")] == []


def test_a_large_shard_is_built_and_written_a_row_group_at_a_time(tmp_path: Path) -> None:
    # 4,000 pairs of ~24 KB of text: built whole, the shard's Python rows alone held ~96 MB (and Arrow ~3x more).
    records = [rec(i, size=8000) for i in range(4000)]
    with DatasetVersion(tmp_path, "d", "warm-up") as warm_up:  # pyarrow's lazy imports are no part of a shard
        warm_up.append(records[:1])
    tracemalloc.start()
    try:
        with DatasetVersion(tmp_path, "d", "v1", dedup=False) as dv:
            result = dv.append(records, {"t:0": 4000})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.written == 4000
    assert peak < 48_000_000, f"append held {peak / 1e6:.0f} MB of Python objects"
    shard = pq.ParquetFile(dv.files()[0])
    assert shard.metadata.num_row_groups > 1
    assert shard.read(columns=["id"]).column("id").to_pylist() == [r.pair.id for r in records]
    assert dv.stats["rows"] == 4000 and dv.stats["by_decision"] == {"keep": 4000}
    assert dv.stats["by_split"] == {"train": 4000} and dv.stats["by_category"] == {"unlabelled": 4000}


def test_a_version_an_older_build_wrote_in_another_schema_is_not_appended_to(tmp_path: Path) -> None:
    with DatasetVersion(tmp_path, "d", "v1") as dv:
        dv.append([rec(0)], {"t:0": 1})
        folder, shard = dv.dir, Path(dv.files()[0])
    # An older build's shard: no split column (added later), and its manifest's columns.
    older = pq.read_table(shard).drop_columns(["split"])
    pq.write_table(older, shard)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["columns"] = older.schema.names
    (folder / MANIFEST).write_text(json.dumps(manifest))
    for _ in range(2):  # the lock is released: a second try says the same, not "already held"
        with pytest.raises(ValueError, match="another schema"):
            DatasetVersion(tmp_path, "d", "v1")
    # Before, the new shard was appended in the new schema and `datasets` refused the whole version.
    assert load_dataset_version(tmp_path, "d", "v1").num_rows == 1
    assert sorted(p.name for p in folder.glob("part-*.parquet")) == ["part-00000.parquet"]
