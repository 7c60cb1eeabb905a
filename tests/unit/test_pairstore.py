"""PairStore: pools, moves with their audit log, step cursors, crash safety, streaming."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from synpref.shared.pairstore import PairStore, PairStoreError
from synpref.v1.pair_pb2 import Message, Pair, PairRecord


def record(i: int) -> PairRecord:
    return PairRecord(
        pair=Pair(
            id=f"p{i}",
            conversation=[Message(role="user", content=f"question {i}")],
            chosen=[Message(role="assistant", content=f"good {i}")],
            rejected=[Message(role="assistant", content=f"bad {i}")],
        )
    )


def fill(store: PairStore, n: int, pool: str = "unverified") -> None:
    store.add((f"k{i:05d}", pool, record(i)) for i in range(n))


def test_rows_are_dense_in_insert_order_and_keys_are_unique(tmp_path):
    with PairStore(tmp_path / "s.sqlite") as store:
        fill(store, 5)
        assert store.add([("k00001", "unverified", record(99)), ("new", "holdout", record(7))]) == 1
        assert store.rows_of(["k00000", "k00004", "new"]) == {"k00000": 1, "k00004": 5, "new": 6}
        assert [r.pair.id for r in store.get([6, 2])] == ["p7", "p1"]
        assert store.counts()["unverified"] == 5 and store.count("holdout") == 1


def test_moves_are_logged_once_and_unknown_pools_or_rows_are_refused(tmp_path):
    with PairStore(tmp_path / "s.sqlite") as store:
        fill(store, 4)
        assert store.move([1, 2, 2], "gold", step="seed") == 2
        assert store.move([2, 3], "gold", step="s1.1") == 1  # row 2 is already there: no second log line
        assert store.transitions() == [
            (1, "unverified", "gold", "seed"),
            (2, "unverified", "gold", "seed"),
            (3, "unverified", "gold", "s1.1"),
        ]
        assert store.rows("gold") == [1, 2, 3] and store.rows("unverified") == [4]
        with pytest.raises(PairStoreError, match="unknown pool 'golden'"):
            store.move([1], "golden", step="x")
        with pytest.raises(PairStoreError, match=r"no such rows: \[77\]"):
            store.move([1, 77], "silver", step="x")
        assert store.rows("silver") == []  # the failed move left nothing behind


def test_scan_streams_a_pool_in_row_order_from_a_cursor(tmp_path):
    with PairStore(tmp_path / "s.sqlite") as store:
        fill(store, 25)
        store.move(range(2, 26, 2), "silver", step="x")
        batches = list(store.scan("unverified", batch=4))
        assert [len(b) for b in batches] == [4, 4, 4, 1]
        rows = [row for b in batches for row, _ in b]
        assert rows == list(range(1, 26, 2))
        assert [row for b in store.scan("unverified", batch=4, after=17) for row, _ in b] == [19, 21, 23, 25]


def test_a_transaction_commits_records_moves_and_cursor_together_or_not_at_all(tmp_path):
    path = tmp_path / "s.sqlite"
    with PairStore(path) as store:
        fill(store, 3)
        with pytest.raises(RuntimeError, match="boom"), store.transaction():
            changed = record(1)
            changed.pair.id = "flipped"
            store.put([(1, changed)])
            store.move([1], "silver", step="s1.1")
            store.set_meta("cursor:s1.1", "1")
            raise RuntimeError("boom")
        assert store.get([1])[0].pair.id == "p0" and store.count("silver") == 0 and store.meta("cursor:s1.1") == ""


def _crash_mid_step(path: str) -> None:
    store = PairStore(path)
    with store.transaction():
        store.move([1], "gold", step="seed")
        store.set_meta("cursor:seed", "1")
    with store.transaction():
        store.move([2], "gold", step="seed")
        os._exit(9)  # killed before this batch's commit


def test_a_killed_writer_leaves_only_committed_batches(tmp_path):
    path = tmp_path / "s.sqlite"
    with PairStore(path) as store:
        fill(store, 3)
    proc = multiprocessing.get_context("spawn").Process(target=_crash_mid_step, args=(str(path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9
    with PairStore(path) as store:
        assert store.rows("gold") == [1] and store.meta("cursor:seed") == "1"
        assert store.transitions("seed") == [(1, "unverified", "gold", "seed")]
