"""PairStore: every pair record of a curation run and the pool it is in, on disk.

One SQLite file (WAL journal, `synchronous=FULL`) holds, per pair, a dense integer `row`
(also the pair's id in the ANN index and the vector file), its `key` (the ingest id; a flip
never changes it), its `pool`, the pair id it was `given` with (its label as it came in, to
train the as-given baseline) and the serialized PairRecord. Pool moves are appended to a
`transitions` table, the run's audit log. Long steps record how far they got in `meta`, in
the same transaction as the rows they wrote, so a process killed mid-step resumes after the
last committed batch and never applies a batch twice.

One writer at a time: each commit counts itself in `meta`, and a store refuses to begin a write
transaction when the count moved since its own last commit (or, before any, since it opened):
another process (a second controller: a force-deleted pod's replacement, a second `synpref run`
on the same workdir) committed meanwhile, so this one's idea of the run is stale. Open the store
before reading the run state from it, so that what was read is never newer than the count. While
the other one holds its write transaction (a controller's whole step), a write here waits SQLite's
busy timeout and then stops with a PairStoreError naming the store.

Memory stays bounded whatever the pool size: pools are streamed in row order in batches,
and SQLite keeps only its page cache (`cache_mib`). See docs/architecture.md for the sizes
at 40M pairs. SQLite needs a local file system or block storage (a RWO volume); NFS locking
is not safe for it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

from synpref.v1.pair_pb2 import PairRecord

POOLS = ("unverified", "holdout", "gold", "silver", "stage2", "discarded")
"""Pools a pair can be in: D_un, held-out, D_gold, D_silver, Stage-2 decided, discarded."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    row INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    pool TEXT NOT NULL,
    given TEXT NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS pairs_by_pool ON pairs (pool, row);
CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY,
    row INTEGER NOT NULL,
    from_pool TEXT NOT NULL,
    to_pool TEXT NOT NULL,
    step TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# SQLite's default limit on bound parameters is 32766 in current releases, 999 in old ones.
_CHUNK = 900

_COMMITS = "store_commits"
"""Meta row counting the store's commits (see the module docstring)."""

# The WAL keeps the size of the largest transaction until the last connection closes: ingest writes the
# whole pool in one, so without a limit a 100 GB store carries a 100 GB -wal file beside it for the run.
_WAL_KEEP_BYTES = 64 * 1024 * 1024

# How long a write waits for another connection's write transaction (SQLite's busy timeout): enough for a short
# one (an audit with the sqlite3 shell); past it the holder is taken for a second controller (see `_begin`).
_BUSY_TIMEOUT_S = 5.0


class PairStoreError(RuntimeError):
    """A store operation that cannot be done as asked (unknown pool, row or key)."""


def _check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise PairStoreError(f"unknown pool {pool!r}; pools are {', '.join(POOLS)}")
    return pool


def _record(blob: bytes) -> PairRecord:
    record = PairRecord()
    record.ParseFromString(blob)
    return record


def _pools(pool: str | Sequence[str]) -> tuple[str, ...]:
    pools = (pool,) if isinstance(pool, str) else tuple(pool)
    for name in pools:
        _check_pool(name)
    return pools


def _chunks(items: Sequence[int], size: int = _CHUNK) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class PairStore:
    """The run's pairs and pools in one SQLite file; see the module docstring.

    Args:
        path: the database file; created with its folder when missing.
        cache_mib: SQLite page cache, the store's only memory that grows with use.

    Writes outside `transaction()` commit at once; inside it they commit together at its end.
    """

    def __init__(self, path: str | Path, cache_mib: int = 64) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            self._check_foreign()  # first: journal_mode=WAL would rewrite a foreign file's header
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_KEEP_BYTES}")
            self._db.execute(f"PRAGMA cache_size=-{int(cache_mib) * 1024}")
            self._db.executescript(_SCHEMA)
            self._depth = 0
            self._commits = int(self.meta(_COMMITS, "0"))
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if isinstance(exc, sqlite3.OperationalError):
                raise  # locked, I/O: the file may be a fine store
            # sqlite3 says "file is not a database" or "database disk image is malformed", naming no file.
            raise PairStoreError(f"{self.path} is not a readable PairStore: {exc}") from exc
        except BaseException:
            self._db.close()
            raise

    def _check_foreign(self) -> None:
        """Refuse another program's SQLite file (a wrong path): the schema would be added into it."""
        tables = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return  # a new store
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(pairs)")}
        if not {"row", "key", "pool", "given", "record"} <= columns:
            raise PairStoreError(
                f"{self.path} is an SQLite file of something else (tables {', '.join(sorted(tables))}), not a "
                "PairStore: check the path"
            )

    def close(self) -> None:
        """Close the SQLite connection."""
        self._db.close()

    def __enter__(self) -> PairStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything written inside commits together, or not at all.

        Raises PairStoreError at the start when another process committed since this one last did (see the
        module docstring)."""
        outer = self._depth == 0
        if outer:
            self._begin()
        self._depth += 1
        try:
            yield
            if outer:
                self._commit()
        except BaseException:
            # SQLITE_FULL, IOERR and a failed COMMIT roll the transaction back themselves: a second ROLLBACK
            # would replace their error with "cannot rollback - no transaction is active".
            if outer and self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        finally:
            self._depth -= 1

    def _begin(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY"):
                raise
            # A controller's step holds the write transaction for as long as it runs: this is not contention that
            # waiting longer would end, and a bare "database is locked" names neither the file nor the cause.
            raise PairStoreError(
                f"{self.path} is held by another process: its write transaction did not end within "
                f"{_BUSY_TIMEOUT_S:g}s. A second controller on the same store (a force-deleted pod's replacement, "
                "a second `synpref run` on the same workdir)? This one stops rather than wait for it"
            ) from exc
        now = int(self.meta(_COMMITS, "0"))
        if now != self._commits:
            self._db.execute("ROLLBACK")
            raise PairStoreError(
                f"{self.path} was written by another process since this one read it (commit {now}, this process "
                f"knows {self._commits}): a second controller on the same store? This one stops rather than "
                "overwrite it with a stale run state"
            )

    def _commit(self) -> None:
        count = self._commits + 1
        self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (_COMMITS, str(count)))
        self._db.execute("COMMIT")
        self._commits = count

    def commit_point(self) -> None:
        """Inside the outermost `transaction()`: commit what is written so far and go on in a new one.

        Long steps call it after each batch (with the batch's cursor in `meta`), so a killed process
        keeps the batches before it; outside a transaction writes are already committed.
        """
        if self._depth > 1:
            raise PairStoreError("commit_point inside a nested transaction would split its caller's writes")
        if self._depth == 1:
            self._commit()
            self._begin()

    # ------------------------------------------------------------ writing

    def add(self, records: Iterable[tuple[str, str, PairRecord]]) -> int:
        """Append (key, pool, record) rows in order; keys already stored are skipped. Returns rows added.

        Each row's `given` is its record's pair id now: the label it came in with.
        """
        with self.transaction():
            cur = self._db.executemany(
                "INSERT OR IGNORE INTO pairs (key, pool, given, record) VALUES (?, ?, ?, ?)",
                (
                    (key, _check_pool(pool), rec.pair.id, rec.SerializeToString(deterministic=True))
                    for key, pool, rec in records
                ),
            )
        return max(cur.rowcount, 0)

    def put(self, rows: Iterable[tuple[int, PairRecord]]) -> None:
        """Replace the records of existing rows (their pools stay)."""
        with self.transaction():
            self._db.executemany(
                "UPDATE pairs SET record = ? WHERE row = ?",
                ((rec.SerializeToString(deterministic=True), row) for row, rec in rows),
            )

    def move(self, rows: Iterable[int], to: str, step: str) -> int:
        """Move rows to pool `to`, logging each real move under `step`. Returns how many moved."""
        _check_pool(to)
        wanted = sorted(set(rows))
        moved = 0
        with self.transaction():
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                found = self._db.execute(f"SELECT row, pool FROM pairs WHERE row IN ({marks})", chunk).fetchall()
                if len(found) != len(chunk):
                    missing = sorted(set(chunk) - {r for r, _ in found})
                    raise PairStoreError(f"no such rows: {missing[:10]}")
                changing = [(row, pool) for row, pool in found if pool != to]
                self._db.executemany(
                    "INSERT INTO transitions (row, from_pool, to_pool, step) VALUES (?, ?, ?, ?)",
                    ((row, pool, to, step) for row, pool in changing),
                )
                self._db.executemany("UPDATE pairs SET pool = ? WHERE row = ?", ((to, row) for row, _ in changing))
                moved += len(changing)
        return moved

    def drop(self, rows: Iterable[int]) -> int:
        """Delete rows (a sample taken at ingest). Returns rows deleted. A new row is numbered max(row) + 1 (no
        AUTOINCREMENT), so the numbers of dropped rows at the top are given again to rows added later.

        `rows` is read a chunk at a time: dropping most of a 40M-pair pool must not hold all its row numbers
        in a set (~60 B each); a row given twice is deleted once and counted once."""
        deleted = 0
        it = iter(rows)
        with self.transaction():
            while chunk := sorted(set(islice(it, _CHUNK))):
                marks = ",".join("?" * len(chunk))
                deleted += self._db.execute(f"DELETE FROM pairs WHERE row IN ({marks})", chunk).rowcount
        return deleted

    def set_meta(self, name: str, value: str) -> None:
        """Store `value` under `name` in the meta table, replacing any old value."""
        with self.transaction():
            self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))

    def meta(self, name: str, default: str = "") -> str:
        """The meta value stored under `name`, or `default` when none is."""
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else default

    # ------------------------------------------------------------ reading

    def size(self) -> int:
        """Number of pairs in the store, all pools together."""
        return int(self._db.execute("SELECT count(*) FROM pairs").fetchone()[0])

    def count(self, pool: str) -> int:
        """Number of pairs in `pool`; raises PairStoreError for an unknown pool."""
        return int(self._db.execute("SELECT count(*) FROM pairs WHERE pool = ?", (_check_pool(pool),)).fetchone()[0])

    def counts(self) -> dict[str, int]:
        """Number of pairs in each pool of POOLS, zero for an empty one."""
        found = dict(self._db.execute("SELECT pool, count(*) FROM pairs GROUP BY pool").fetchall())
        return {pool: int(found.get(pool, 0)) for pool in POOLS}

    def max_row(self) -> int:
        """The highest row stored now (0 when empty): the size a by-row file needs, less one."""
        return int(self._db.execute("SELECT coalesce(max(row), 0) FROM pairs").fetchone()[0])

    def rows(self, pool: str | Sequence[str], after: int = -1, limit: int = 10_000) -> list[int]:
        """Up to `limit` rows of `pool` (one or several) past row `after`, in row order (page with the last one)."""
        pools = _pools(pool)
        marks = ",".join("?" * len(pools))
        found = self._db.execute(
            f"SELECT row FROM pairs WHERE pool IN ({marks}) AND row > ? ORDER BY row LIMIT ?", (*pools, after, limit)
        )
        return [r for (r,) in found]

    def all_rows(self, pool: str | Sequence[str], page: int = 100_000) -> Iterator[int]:
        """Every row of `pool` (one or several) in row order, read a page at a time."""
        after = -1
        while found := self.rows(pool, after, page):
            yield from found
            after = found[-1]

    def scan(
        self, pool: str | Sequence[str], batch: int = 1000, after: int = -1
    ) -> Iterator[list[tuple[int, PairRecord]]]:
        """Batches of (row, record) of `pool` (one or several) in row order, from past row `after`; reads as it
        goes."""
        pools = _pools(pool)
        marks = ",".join("?" * len(pools))
        while True:
            found = self._db.execute(
                f"SELECT row, record FROM pairs WHERE pool IN ({marks}) AND row > ? ORDER BY row LIMIT ?",
                (*pools, after, batch),
            ).fetchall()
            if not found:
                return
            yield [(row, _record(blob)) for row, blob in found]
            after = found[-1][0]

    def _column(self, column: str, rows: Sequence[int]) -> dict[int, Any]:
        """Row -> `column` (one of the pairs table's) for each of `rows` the store holds."""
        out: dict[int, Any] = {}
        for chunk in _chunks(sorted(set(rows))):
            marks = ",".join("?" * len(chunk))
            out.update(self._db.execute(f"SELECT row, {column} FROM pairs WHERE row IN ({marks})", chunk).fetchall())
        return out

    def get(self, rows: Sequence[int]) -> list[PairRecord]:
        """The records of `rows`, in the order asked."""
        by_row = self._column("record", rows)
        missing = [r for r in rows if r not in by_row]
        if missing:
            raise PairStoreError(f"no such rows: {missing[:10]}")
        return [_record(by_row[r]) for r in rows]

    def given(self, rows: Sequence[int]) -> dict[int, str]:
        """The pair id each of `rows` came in with (its as-given label); rows not in the store are left out."""
        return self._column("given", rows)

    def keys_by_pool(self) -> dict[str, list[str]]:
        """Pool -> keys in row order, for every non-empty pool; for audits and tests, not for 40M."""
        out: dict[str, list[str]] = {}
        for key, pool in self._db.execute("SELECT key, pool FROM pairs ORDER BY row"):
            out.setdefault(pool, []).append(key)
        return out

    def records_by_key(self) -> dict[str, PairRecord]:
        """Key -> record of every pair; for audits and tests, not for 40M."""
        return {key: _record(blob) for key, blob in self._db.execute("SELECT key, record FROM pairs ORDER BY row")}

    def pools_of(self, rows: Sequence[int]) -> dict[int, str]:
        """The pool of each of `rows`; rows not in the store are left out."""
        return self._column("pool", rows)

    def rows_of(self, keys: Sequence[str]) -> dict[str, int]:
        """The row of each of `keys`; keys not in the store are left out."""
        out: dict[str, int] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = list(keys[start : start + _CHUNK])
            marks = ",".join("?" * len(chunk))
            out.update(self._db.execute(f"SELECT key, row FROM pairs WHERE key IN ({marks})", chunk).fetchall())
        return out

    def transitions(self, step: str | None = None) -> list[tuple[int, str, str, str]]:
        """(row, from, to, step) moves in the order they happened; for audits and tests, not for 40M."""
        query = "SELECT row, from_pool, to_pool, step FROM transitions"
        if step is None:
            found = self._db.execute(query + " ORDER BY seq")
        else:
            found = self._db.execute(query + " WHERE step = ? ORDER BY seq", (step,))
        return [(int(row), str(a), str(b), str(s)) for row, a, b, s in found]
