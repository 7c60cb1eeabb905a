"""A versioned dataset of Parquet shards with a manifest that also holds consumed offsets.

Layout: <root>/<name>/<version>/part-00000.parquet ... and manifest.json.

Exactly-once results with at-least-once transport: a shard is written first (temp file,
fsync, rename), then the manifest (same dance) that lists it AND the Kafka offsets consumed
up to it. The manifest is the commit point:
- a crash before the manifest leaves an orphan shard, deleted on the next open, and the
  offsets in the manifest still point before its rows, so they are consumed again;
- a crash after it loses nothing, and the consumer seeks to the stored offsets;
- a pair id already in the version (re-delivery, or an upstream stage that produced twice
  before crashing) is counted as a duplicate and not written again; so is the other orientation
  of a written pair (dedup_keys: a flip changes the pair id and keeps the ingest id in
  lineage.original_id), or an upstream re-run that decided KEEP once and FLIP once would put both
  in the version. The version's ids are kept
  on disk (IdIndex, .dedup-ids.sqlite, updated after the manifest and caught up from the
  shards on open), not in memory: a 40M-pair version would need ~4 GB as a Python set.

One author at a time: opening a version takes its writer lock (.writer.lock, flock) and holds it
until close(). A second writer (a rolling update's new pod, the replacement of a force-deleted pod
whose container still runs, a second replica) waits for it, then reads the manifest the first one
left. Without it the two kept their own copy of the manifest and shared the id index: the second
overwrote the first's last shards out of the manifest, then skipped their re-delivered pairs as
duplicates (pairs lost; seen on a live cluster).

The row format (columns, conversion) is rows.py.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from synpref.services.dataset_writer.rows import (
    HELDOUT,
    SCHEMA,
    SPLITS,
    TRAIN,
    record_row,
    row_problem,
)
from synpref.shared.files import FileLock, write_atomic
from synpref.shared.idset import DiskIdSet
from synpref.v1.pair_pb2 import PairRecord

log = logging.getLogger(__name__)
__all__ = ["HELDOUT", "SCHEMA", "SPLITS", "TRAIN", "DatasetVersion", "record_row", "row_problem"]
MANIFEST = "manifest.json"
SHARD_GLOB = "part-*.parquet"
ID_INDEX = ".dedup-ids.sqlite"
WRITER_LOCK = ".writer.lock"
INDEX_FORMAT = 2
"""What the id index holds: 2, each row's dedup_keys; 1 (no format noted), pair ids only, rebuilt on open."""
ROW_GROUP_ROWS = 1000
"""Rows converted and written at a time (one Parquet row group each): a shard of 20,000 long pairs built whole
held ~5x its text (Python rows, an Arrow table with the conversation three times, the encoded row group)..."""
ROW_GROUP_BYTES = 32 * 1024 * 1024
"""...or fewer, once their records' serialized size reaches this: 1,000 pairs of 8 MiB would be 8 GB of text."""
MAX_CATEGORIES = 100
"""Task categories counted by name in the manifest's stats; the rest are summed under OTHER_CATEGORY. The labeller's
categories are an LLM's free text, thousands of distinct strings, and the manifest is rewritten on every flush."""
OTHER_CATEGORY = "other"


def version_dir(root: str | Path, name: str, version: str) -> Path:
    """<root>/<name>/<version>, where name and version are each one plain folder name: "../x", "a/b", an absolute
    path or "" would put the version outside `root` or over another one (and the writer deletes files there)."""
    for what, part in (("name", name), ("version", version)):
        if part in ("", ".", "..") or "/" in part or "\\" in part or "\0" in part:
            raise ValueError(f"dataset {what} must be one plain folder name, not {part!r}")
    return Path(root) / name / version


def dedup_keys(record: PairRecord) -> tuple[str, ...]:
    """The ids a pair is known by in a version: its pair id and, once flipped, its ingest id (lineage.original_id).
    A pair sharing either with a written one is a duplicate: both orientations of one pair must not be rows."""
    original = record.lineage.original_id
    return (record.pair.id, original) if original and original != record.pair.id else (record.pair.id,)


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class AppendResult:
    """What one `DatasetVersion.append` did.

    Attributes:
        written: new rows written (0 when the batch held none).
        duplicates: records skipped because their pair id or ingest id (dedup_keys) is already in the version or
            earlier in the batch.
        shard: the file name of the shard written, or None when no rows were written.
    """

    written: int
    duplicates: int
    shard: str | None


class IdIndex(DiskIdSet):
    """The dedup keys (dedup_keys) of a version's first `shards` shards, on disk: membership without holding them.

    The manifest is the commit point, and this index follows it: ids are added after the manifest
    lists their shard, in one transaction with the count of shards indexed. So a crash, or an update
    that failed, leaves the index behind the manifest, never ahead of it, and `catch_up` (on open and
    before each append) indexes the missing shards (`shard_ids` reads one shard's ids). An index
    ahead of the manifest (a manifest restored by hand) is rebuilt.
    """

    def __init__(self, path: Path, shard_files: Sequence[str], shard_ids: Callable[[str], list[str]]) -> None:
        super().__init__(path)
        self.shard_ids = shard_ids
        try:
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            self._check_format()
            self.catch_up(shard_files)
        except BaseException:
            self.close()  # a listed shard missing or unreadable: no connection left open behind the error
            raise

    def _check_format(self) -> None:
        """Empty an index of another INDEX_FORMAT (an older build's, of pair ids only), so catch_up rebuilds it."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if row is not None and row[0] == INDEX_FORMAT:
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM ids")
            self.db.execute("DELETE FROM meta")
            self.db.execute("INSERT INTO meta VALUES ('format', ?)", (INDEX_FORMAT,))

    def catch_up(self, shard_files: Sequence[str]) -> None:
        """Index the listed shards after the ones indexed (all of them again if more are indexed than listed)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'shards'").fetchone()
        indexed = row[0] if row else 0
        if indexed > len(shard_files):
            self.db.execute("DELETE FROM ids")
            indexed = 0
        if indexed == 0 and shard_files:
            # A full rebuild (no index file, or one ahead of the manifest): inserted shard by shard, 40M ids went
            # one random B-tree place at a time; bulk_load sorts them first. Its ids and the count are two
            # transactions, so a crash between them leaves the count behind and the next open loads them again.
            self.bulk_load(i for file in shard_files for i in self.shard_ids(file))
            self.add_shard((), len(shard_files))
            return
        for number in range(indexed, len(shard_files)):
            self.add_shard(self.shard_ids(shard_files[number]), number + 1)

    def add_shard(self, ids: Iterable[str], shards: int) -> None:
        """Add one shard's ids and record that the first `shards` shards are indexed, in one transaction."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO ids VALUES (?)", ((i,) for i in ids))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('shards', ?)", (shards,))


class DatasetVersion:
    """One version of a dataset: append batches, read the manifest, stored offsets and stats.

    dedup: skip pairs whose id the version already holds (IdIndex on disk: the writer service
    needs it for redelivered messages). A writer whose input has unique ids and that starts from
    an empty version (the loop's dataset step) turns it off.

    Opening waits for the version's writer lock (lock_timeout_s None: as long as it takes, else
    TimeoutError); close() or the end of the process releases it. Readers use manifest_files.
    """

    def __init__(
        self, root: str | Path, name: str, version: str, dedup: bool = True, lock_timeout_s: float | None = None
    ) -> None:
        self.dir = version_dir(root, name, version)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name, self.version = name, version
        self.lock = FileLock(self.dir / WRITER_LOCK, lock_timeout_s)
        self.index: IdIndex | None = None
        self.uncommitted = False
        """The in-memory manifest may be newer than the one on disk, or not yet durable (its write failed)."""
        try:
            self.manifest = self._load()
            self._check_schema()
            if dedup:
                files = [s["file"] for s in self.manifest["shards"]]
                self.index = IdIndex(self.dir / ID_INDEX, files, self._shard_ids)
        except BaseException:
            # A corrupt manifest or a listed shard gone: the exception's traceback keeps this half-built object,
            # and with it the lock, so a retry in this process would fail as "already held by this process".
            self.lock.release()
            raise

    def _shard_ids(self, file: str) -> list[str]:
        """The dedup keys of one shard's rows: ids and the non-empty lineage.original_id."""
        table = pq.read_table(self.dir / file, columns=["id", "lineage"])
        originals = table.column("lineage").combine_chunks().field("original_id").to_pylist()
        return table.column("id").to_pylist() + [o for o in originals if o]

    def close(self) -> None:
        """Close the id index and release the writer lock (the version stays readable; appending needs a new
        DatasetVersion)."""
        if self.index is not None:
            self.index.close()
            self.index = None
        self.lock.release()

    def __enter__(self) -> DatasetVersion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self) -> dict:
        path = self.dir / MANIFEST
        if path.exists():
            manifest = json.loads(path.read_text())
        else:
            manifest = {
                "name": self.name,
                "version": self.version,
                "format": "parquet",
                "columns": SCHEMA.names,
                "created_at": _utc(),
                "rows": 0,
                "shards": [],
                "offsets": {},
                "stats": {"by_decision": {}, "by_source": {}, "by_category": {}, "by_split": {}},
            }
        listed = {s["file"] for s in manifest["shards"]}
        for orphan in self.dir.glob(SHARD_GLOB):
            # Written by a run that crashed before its manifest: its rows will be re-consumed.
            if orphan.name not in listed:
                orphan.unlink()
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink()
        return manifest

    def _check_schema(self) -> None:
        # `datasets` refuses a whole version whose shards differ in columns or types, so a shard in this build's
        # schema must not join ones an older build wrote (e.g. before the split column): that version is closed.
        if not self.manifest["shards"]:
            return
        last = self.manifest["shards"][-1]["file"]
        found = pq.read_schema(self.dir / last).remove_metadata()
        if not found.equals(SCHEMA):
            raise ValueError(
                f"{self.dir}: {last} has another schema than this build writes (columns {found.names}, "
                f"not {SCHEMA.names}): appending would make the version unreadable; write a new version"
            )

    @property
    def offsets(self) -> dict[str, int]:
        """ "topic:partition" -> next offset to consume, as of the last committed shard."""
        return dict(self.manifest["offsets"])

    @property
    def stats(self) -> dict:
        """The manifest's row count and its counts by decision, source, task category and split."""
        return {"rows": self.manifest["rows"], **self.manifest["stats"]}

    def files(self) -> list[str]:
        """Paths of the version's shards, in the order they were written."""
        return [str(self.dir / s["file"]) for s in self.manifest["shards"]]

    def append(
        self, records: Iterable[PairRecord], offsets: dict[str, int] | None = None, split: str = TRAIN
    ) -> AppendResult:
        """Write the new pairs of `records` as one shard in split `split` and commit it with `offsets`."""
        if not self.lock.held:
            raise RuntimeError(f"{self.dir} was closed: open a new DatasetVersion to append")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        records = list(records)
        if self.uncommitted:
            # The last manifest write failed, maybe after its rename: commit it again before anything relies on it
            # (a retry's pairs found in it are answered as duplicates, which must not be lost to a machine crash).
            self._commit(self.manifest)
        if self.index is not None:
            # An index update that failed after its manifest (below) left a shard out: without this its pairs were
            # written again, and the next shard's update counted it as indexed, so no open caught up on it either.
            self.index.catch_up([s["file"] for s in self.manifest["shards"]])
        keys = [dedup_keys(r) for r in records]
        known = self.index.known([k for ks in keys for k in ks]) if self.index is not None else set()
        new, duplicates, batch_keys = [], 0, set[str]()
        for record, record_keys in zip(records, keys, strict=True):
            if any(k in known or k in batch_keys for k in record_keys):
                duplicates += 1
                continue
            batch_keys.update(record_keys)
            new.append(record)
        stats: dict[str, Counter[str]] = {}
        shard_name = None
        if new:
            shard_name = f"part-{len(self.manifest['shards']):05d}.parquet"
            write_atomic(self.dir / shard_name, lambda p: _write_shard(p, new, split, stats))
        if not new and not offsets:
            return AppendResult(0, duplicates, None)
        manifest = json.loads(json.dumps(self.manifest))
        if shard_name:
            manifest["shards"].append(
                {
                    "file": shard_name,
                    "rows": len(new),
                    "written_at": _utc(),
                }
            )
            manifest["rows"] += len(new)
            for key, counted in stats.items():
                counts = manifest["stats"].setdefault(key, {})  # by_split is missing from older manifests
                for value, n in counted.items():
                    counts[value] = counts.get(value, 0) + n
            manifest["stats"]["by_category"] = top_counts(manifest["stats"]["by_category"], MAX_CATEGORIES)
        if offsets:
            manifest["offsets"].update(offsets)
        manifest["updated_at"] = _utc()
        self._commit(manifest)
        if self.index is not None and shard_name:
            try:
                self.index.add_shard(batch_keys, len(manifest["shards"]))
            except sqlite3.Error as exc:
                # The manifest (the commit point) lists the shard: its rows are written, and a caller told otherwise
                # sends them again. The next append, or open, catches the index up from the shard.
                log.warning("%s: %s is written, its ids not indexed yet (%s)", self.dir, shard_name, exc)
        return AppendResult(len(new), duplicates, shard_name)

    def _commit(self, manifest: dict) -> None:
        """Write `manifest` over the version's (the commit point); it is this object's manifest even if that fails.

        Its shard is already written and durable, so listing it is safe whether or not the rename happened: kept
        behind a rename whose folder fsync failed, the next append reused the shard's name (its committed rows
        overwritten) or wrote a manifest without that shard. Until a write succeeds, appends commit it first.
        """
        self.manifest, self.uncommitted = manifest, True
        write_atomic(self.dir / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1, sort_keys=True)))
        self.uncommitted = False


def top_counts(counts: dict[str, int], keep: int) -> dict[str, int]:
    """`counts` with at most `keep` keys: the largest keep - 1 (ties by name), the rest summed under OTHER_CATEGORY.

    A name folded in stays there: if it grows later, only its new pairs are counted under its own name."""
    if len(counts) <= keep:
        return counts
    named = sorted((k for k in counts if k != OTHER_CATEGORY), key=lambda k: (-counts[k], k))[: keep - 1]
    out = {k: counts[k] for k in named}
    out[OTHER_CATEGORY] = sum(counts.values()) - sum(out.values())
    return out


def size_bounded(records: Iterable[PairRecord], max_rows: int, max_bytes: int) -> Iterator[list[PairRecord]]:
    """`records` in consecutive lists of max_rows records, or fewer once their serialized size reaches max_bytes
    (a record over it is a list of its own): the shards or row groups of a writer whose records may be long."""
    chunk: list[PairRecord] = []
    size = 0
    for record in records:
        chunk.append(record)
        size += record.ByteSize()
        if len(chunk) >= max_rows or size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _write_shard(path: Path, records: Sequence[PairRecord], split: str, stats: dict[str, Counter[str]]) -> None:
    """Write `records` as one Parquet file, a row group (ROW_GROUP_ROWS, ROW_GROUP_BYTES) converted at a time,
    counting them into `stats`."""
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for group in size_bounded(records, ROW_GROUP_ROWS, ROW_GROUP_BYTES):
            rows = [record_row(r, split) for r in group]
            for row in rows:
                for key, value in (
                    ("by_decision", row["decision"]["decision"]),
                    ("by_source", row["source"]),
                    ("by_category", row["attributes"]["task_category"] or "unlabelled"),
                    ("by_split", row["split"]),
                ):
                    stats.setdefault(key, Counter())[value] += 1
            writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
            del rows  # else it lives on while the next slice's rows are built: two slices at a time


def manifest_files(root: str | Path, name: str, version: str) -> list[str]:
    """Shard paths of a version, read from its manifest only (safe while a writer runs)."""
    folder = version_dir(root, name, version)
    manifest = json.loads((folder / MANIFEST).read_text())
    return [str(folder / s["file"]) for s in manifest["shards"]]


def load_dataset_version(root: str | Path, name: str, version: str):
    """The version as a `datasets.Dataset`, from the manifest's shards."""
    import datasets

    return datasets.load_dataset("parquet", data_files=manifest_files(root, name, version), split="train")
