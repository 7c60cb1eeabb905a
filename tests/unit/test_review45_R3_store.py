"""Review 45, area R3: the controller's storage and retrieval layer on bad files, edge ids and racing writers."""

from __future__ import annotations

import os
import sqlite3

import numpy as np
import pytest

from synpref.shared import examples as examples_mod
from synpref.shared.ann import AnnIndex, LiveRows, VectorFile
from synpref.shared.examples import CURRENT_FILE, ReloadingExamples, write_example_index
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.pairstore import PairStore, PairStoreError


def test_bitmap_selector_never_reads_past_the_live_rows():
    # Ids past LiveRows.size must not be returned: FAISS checks them against the bitmap's length in bytes, and
    # was given the length in bits, so it read up to 8x past the array. The array sits at the start of a
    # larger buffer of set bits here, so what such a read finds is known.
    rng = np.random.default_rng(0)
    index = AnnIndex.build(200, 8)
    index.add(np.arange(200), rng.normal(size=(200, 8)).astype(np.float32))
    live = LiveRows(40, range(40))
    buffer = np.full(64, 0xFF, dtype=np.uint8)
    buffer[: len(live._bits)] = live._bits
    live._bits = buffer[: len(live._bits)]
    ids, _ = index.search(rng.normal(size=(16, 8)).astype(np.float32), 10, live=live)
    assert ids.min() >= 0 and ids.max() < 40


def test_vector_file_shorter_than_its_shape_note_is_refused(tmp_path):
    path = tmp_path / "vectors.f16"
    VectorFile.create(path, 10, 4).write(0, np.ones((10, 4), dtype=np.float32))
    os.truncate(path, 30)  # a partial copy or restore of the volume
    with pytest.raises(ValueError, match="holds 30 bytes, not the 80"):
        VectorFile(path)
    assert path.stat().st_size == 30  # not padded with zero vectors


def test_vector_file_with_a_broken_shape_note_names_it(tmp_path):
    path = tmp_path / "vectors.f16"
    VectorFile.create(path, 2, 4)
    path.with_suffix(".f16.shape").write_text("garbage\n")
    with pytest.raises(ValueError, match=r"vectors\.f16\.shape is not a shape note"):
        VectorFile(path)


def test_pairstore_on_a_file_that_is_not_sqlite_names_the_file(tmp_path):
    path = tmp_path / "pairs.sqlite"
    path.write_text("not a database " * 100)
    with pytest.raises(PairStoreError, match=r"pairs\.sqlite is not a readable PairStore"):
        PairStore(path)


def test_pairstore_refuses_another_programs_sqlite_file_and_leaves_it_alone(tmp_path):
    path = tmp_path / "verdicts.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE verdicts (key TEXT PRIMARY KEY, label TEXT)")
    before = path.read_bytes()
    with pytest.raises(PairStoreError, match="not a PairStore"):
        PairStore(path)
    assert path.read_bytes() == before  # not even its journal mode (WAL rewrites the header) changed
    with sqlite3.connect(path) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"verdicts"}


def test_pairstore_reopens_its_own_file(tmp_path):
    path = tmp_path / "pairs.sqlite"
    record = new_record(new_pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
                                 [{"role": "assistant", "content": "b"}], "src"))  # fmt: skip
    with PairStore(path) as store:
        store.add([("k1", "unverified", record)])
    with PairStore(path) as store:
        assert store.counts()["unverified"] == 1


def _embed(texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), 4), dtype=np.float32)
    out[:, 0] = 1.0
    return out


def test_example_reader_rereads_current_when_faiss_finds_its_version_gone(tmp_path, monkeypatch):
    # A writer removed the version after the reader had read its items: FAISS raises RuntimeError, not
    # FileNotFoundError, for the missing index file, and the annotator's call failed.
    import faiss

    pair = new_pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
                    [{"role": "assistant", "content": "b"}], "gold")  # fmt: skip
    write_example_index(tmp_path, [new_record(pair)], _embed, 4)
    old = (tmp_path / CURRENT_FILE).read_text().strip()
    real_read = faiss.read_index
    raced = []

    def read_after_a_write(path, *args):
        if not raced:  # the writer's next version goes live and this one is discarded, between items and index
            raced.append(path)
            other = new_pair([{"role": "user", "content": "z"}], [{"role": "assistant", "content": "c"}],
                             [{"role": "assistant", "content": "d"}], "gold")  # fmt: skip
            write_example_index(tmp_path, [new_record(other)], _embed, 4)
            examples_mod._discard(tmp_path / old)
        return real_read(path, *args)

    monkeypatch.setattr(faiss, "read_index", read_after_a_write)
    index = ReloadingExamples(tmp_path, _embed).current_index()
    assert raced and index is not None and len(index) == 1
    assert (tmp_path / CURRENT_FILE).read_text().strip() != old
