"""A set of string ids on disk (SQLite): membership and adds in bounded memory.

For dedup over inputs too large for a Python set (~100 B an id: ~4 GB at the paper's 40M
pairs). Adds are buffered and written in transactions of `flush_every`; lookups see them
at once. `bulk_load` adds millions at once (ingest's --seen file) by sorting them first.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path


class DiskIdSet:
    """Ids in an SQLite table; a temporary file (removed on close) unless `path` is given."""

    _CHUNK = 500  # ids per IN (...) query, under SQLite's bound-parameter limit

    def __init__(self, path: str | Path | None = None, flush_every: int = 10_000) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="synpref-ids-") if path is None else None
        self.path = Path(self._tmp.name) / "ids.sqlite" if self._tmp is not None else Path(path or "")
        # Callers serialise their use (the writer's DatasetSink holds a lock), from any one thread.
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=OFF" if self._tmp is not None else "PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA cache_size=-65536")  # 64 MiB of pages
        self.db.execute("CREATE TABLE IF NOT EXISTS ids (id TEXT PRIMARY KEY) WITHOUT ROWID")
        self.flush_every = flush_every
        self.pending: set[str] = set()

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, str):
            return False
        if item in self.pending:
            return True
        return self.db.execute("SELECT 1 FROM ids WHERE id = ?", (item,)).fetchone() is not None

    def known(self, ids: Sequence[str]) -> set[str]:
        """Which of `ids` the set holds: one query per 500 ids instead of one per id."""
        found = {i for i in ids if i in self.pending}
        for start in range(0, len(ids), self._CHUNK):
            chunk = ids[start : start + self._CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.db.execute(f"SELECT id FROM ids WHERE id IN ({marks})", chunk))
        return found

    def add(self, item: str) -> None:
        self.pending.add(item)
        if len(self.pending) >= self.flush_every:
            self.flush()

    def update(self, items: Iterable[str]) -> None:
        for item in items:
            self.add(item)

    def flush(self) -> None:
        """Write the buffered adds in one transaction."""
        if not self.pending:
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO ids VALUES (?)", ((i,) for i in self.pending))
        self.pending.clear()

    def bulk_load(self, ids: Iterable[str]) -> None:
        """Add many ids (duplicates ignored), several times faster than `update` from a few million on.

        `update` puts each id at a random place in the B-tree: once the tree outgrows the page cache,
        every insert reads and rewrites a page. Here the ids are appended to an unindexed table in a
        scratch file beside the set, sorted once by SQLite (an external merge sort: memory bounded by
        cache_size, runs spilled to SQLite's temporary directory) and inserted in key order, which fills
        the pages one after another. Peak disk is about three times the set's size (scratch table, sort
        runs, the set); the scratch file is removed at the end.
        """
        self.flush()
        scratch = self.path.with_name(self.path.name + ".load")
        scratch.unlink(missing_ok=True)  # left by a killed load: not ours to add
        # A rollback journal, not WAL, for the one big insert: the -wal file would grow to the set's size and stay.
        self.db.execute("PRAGMA journal_mode=DELETE")
        self.db.execute("ATTACH DATABASE ? AS load", (str(scratch),))
        try:
            self.db.execute("PRAGMA load.journal_mode=OFF")  # a scratch table: nothing to roll back to
            self.db.execute("PRAGMA load.synchronous=OFF")
            self.db.execute("CREATE TABLE load.staged (id TEXT NOT NULL)")
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany("INSERT INTO load.staged VALUES (?)", ((i,) for i in ids))
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("INSERT OR IGNORE INTO ids SELECT id FROM load.staged ORDER BY id")
        finally:
            self.db.execute("DETACH DATABASE load")
            scratch.unlink(missing_ok=True)
            self.db.execute("PRAGMA journal_mode=WAL")

    def __len__(self) -> int:
        self.flush()
        return int(self.db.execute("SELECT count(*) FROM ids").fetchone()[0])

    def close(self) -> None:
        self.flush()
        self.db.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> DiskIdSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
