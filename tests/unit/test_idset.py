"""DiskIdSet.bulk_load: the sorted load of many ids (ingest's --seen file) keeps the set's semantics."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from synpref.shared.idset import DiskIdSet


def hex_id(n: int) -> str:
    return f"{n * 2654435761 % 2**128:032x}"  # spread over the key space, like shared/pairs.pair_id


def test_bulk_load_adds_every_id_once_and_keeps_the_set_usable():
    ids = [hex_id(n) for n in range(3000)]
    with DiskIdSet(flush_every=1000) as held:
        held.add("pending")  # buffered, not yet written: the load must not lose it
        held.add(ids[5])
        held.flush()
        held.add(ids[7])
        held.bulk_load(ids + ids[:100] + ["pending"])  # repeats in the input and of held ids are harmless
        assert len(held) == 3001
        assert held.known([*ids[::7], "absent"]) == set(ids[::7])
        assert "pending" in held and "absent" not in held
        held.add("later")
        held.update(["later", ids[0]])
        assert "later" in held and len(held) == 3002
        assert held.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert not (held.path.parent / "ids.sqlite.load").exists()  # the scratch table's file is removed


def test_bulk_load_into_a_kept_set_survives_reopening(tmp_path):
    kept = tmp_path / "ids.sqlite"
    with DiskIdSet(kept) as held:
        held.add("x")
        held.bulk_load(["b", "a", "x", "a"])
    assert not (tmp_path / "ids.sqlite.load").exists()
    with DiskIdSet(kept) as held:
        assert len(held) == 3 and held.known(["a", "b", "x", "y"]) == {"a", "b", "x"}


def test_a_failed_bulk_load_leaves_the_set_as_it_was_and_usable():
    def broken() -> Iterator[str]:
        yield from ("a", "b")
        raise OSError("the --seen file went away")

    with DiskIdSet() as held:
        held.add("x")
        with pytest.raises(OSError):
            held.bulk_load(broken())
        assert len(held) == 1 and "a" not in held
        assert not (held.path.parent / "ids.sqlite.load").exists()
        held.bulk_load(["a"])
        assert held.known(["a", "x"]) == {"a", "x"}


def test_ingest_bulk_loads_the_seen_file(tmp_path, capsys, monkeypatch):
    from synpref.services.ingest.main import main

    loaded: list[str] = []
    real = DiskIdSet.bulk_load

    def spy(self: DiskIdSet, ids: Iterator[str]) -> None:
        got = list(ids)
        loaded.extend(got)
        real(self, got)

    monkeypatch.setattr(DiskIdSet, "bulk_load", spy)
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "y"}) + "\n")
    seen = tmp_path / "seen.txt"
    seen.write_text(f"{hex_id(1)}\n\n  {hex_id(2)} \n{hex_id(1)}\n")
    assert main([str(src), "--dry-run", "--seen", str(seen)]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["published"] == 1, counts
    assert loaded == [hex_id(1), hex_id(2), hex_id(1)]  # stripped, blank lines skipped
