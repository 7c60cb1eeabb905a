"""Review 41, the controller's PairStore and run state: a second writer, a full disk, the WAL's size."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from synpref.services.controller.state import RunState, StateStore
from synpref.shared import pairstore
from synpref.shared.pairstore import PairStore, PairStoreError
from synpref.v1.pair_pb2 import Message, Pair, PairRecord


def record(i: int, text: int = 20) -> PairRecord:
    return PairRecord(
        pair=Pair(
            id=f"p{i}",
            conversation=[Message(role="user", content=f"question {i} " + "q" * text)],
            chosen=[Message(role="assistant", content=f"good {i}")],
            rejected=[Message(role="assistant", content=f"bad {i}")],
        )
    )


def ingested(workdir: Path, n: int = 4) -> tuple[StateStore, RunState]:
    """A controller that opened `workdir`, read its state and committed the ingest step."""
    store = StateStore(workdir)
    state = store.load()
    with store.pairs.transaction():
        store.pairs.add((f"k{i}", "unverified", record(i)) for i in range(n))
        state.done.append("ingest")
        store.save(state)
    return store, state


def seed(store: StateStore, state: RunState, row: int) -> None:
    """The seed step as a controller runs it: its pool move and the state naming it done, in one transaction."""
    with store.pairs.transaction():
        store.pairs.move([row], "gold", step="seed")
        state.done.append("seed")
        store.save(state)


def test_a_controller_whose_store_another_one_took_over_stops_instead_of_redoing_its_steps(tmp_path):
    # A force-deleted pod's replacement (or a second `synpref run`) opens the store the old one still runs on.
    old, old_state = ingested(tmp_path)
    new = StateStore(tmp_path)
    new_state = new.load()
    seed(new, new_state, row=1)
    # The old controller goes on from its own state, which does not list the seed the new one committed.
    with pytest.raises(PairStoreError, match="written by another process"):
        seed(old, old_state, row=2)
    with PairStore(tmp_path / "pairs.sqlite") as store:
        assert store.transitions("seed") == [(1, "unverified", "gold", "seed")], "the seed ran once"
    assert StateStore(tmp_path).load().done == ["ingest", "seed"]
    with new.pairs.transaction():  # the one that took over goes on
        new.save(new.load())


def test_a_controller_that_read_the_state_before_another_committed_cannot_commit_over_it(tmp_path):
    old, old_state = ingested(tmp_path)
    new = StateStore(tmp_path)  # opened and read while the old one runs: its state lists only the ingest
    new_state = new.load()
    seed(old, old_state, row=1)
    with pytest.raises(PairStoreError, match="written by another process"):
        seed(new, new_state, row=2)
    with PairStore(tmp_path / "pairs.sqlite") as store:
        assert store.rows("gold") == [1]
    # Readers (audits, tests, a progress probe) are not writers: the old controller is not stopped by them.
    assert StateStore(tmp_path).load().done == ["ingest", "seed"]
    with old.pairs.transaction():
        old.save(old_state)
    # A restart opens the store afresh and goes on.
    old.close()
    restarted = StateStore(tmp_path)
    with restarted.pairs.transaction():
        restarted.save(restarted.load())


def test_a_full_disk_mid_step_raises_the_full_disk_and_keeps_the_committed_batches(tmp_path):
    with PairStore(tmp_path / "s.sqlite") as store:
        store.add((f"k{i}", "unverified", record(i)) for i in range(10))
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages + 3}")  # SQLITE_FULL, as a full volume gives it
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"), store.transaction():
            store.move([1], "gold", step="s1.1")
            store.set_meta("progress:s1.1", "1")
            store.commit_point()
            store.add((f"big{i}", "unverified", record(i, text=4000)) for i in range(200))
        assert store.rows("gold") == [1] and store.meta("progress:s1.1") == "1"
        assert store.size() == 10, "the batch that did not fit was rolled back"
        store._db.execute("PRAGMA max_page_count=1073741823")  # space freed: the store goes on
        with store.transaction():
            store.move([2], "gold", step="s1.1")
        assert store.rows("gold") == [1, 2]


def test_the_wal_gives_back_the_space_of_a_large_transaction(tmp_path, monkeypatch):
    # Ingest writes the whole pool in one transaction: at 40M pairs a -wal file of the store's size (~100 GB).
    monkeypatch.setattr(pairstore, "_WAL_KEEP_BYTES", 1 << 20, raising=False)
    path = tmp_path / "s.sqlite"
    with PairStore(path) as store:
        with store.transaction():
            store.add((f"k{i}", "unverified", record(i, text=1000)) for i in range(8000))
        wal = Path(f"{path}-wal")
        assert wal.stat().st_size > 8 << 20
        store.set_meta("next", "step")  # the next commit after the checkpoint
        assert wal.stat().st_size <= 1 << 20, f"-wal keeps {wal.stat().st_size >> 20} MiB"
