"""D_un's index on disk: mapped, searched through a bitmap of live rows, never refilled on restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from synpref.shared.ann import AnnIndex, LiveRows, VectorFile, normalise


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, dim))
    return (centres[rng.integers(0, 32, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def test_live_rows_count_membership_and_discards():
    live = LiveRows(20, [1, 3, 5, 8, 19])
    assert live.count == 5 and 3 in live and 4 not in live and 25 not in live and -1 not in live
    live.discard([3, 3, 4, 19, 40, -2])  # a repeat, a row never live, rows outside: only 3 and 19 go
    assert live.count == 3 and 3 not in live and 19 not in live and 1 in live and 8 in live


@pytest.mark.parametrize("n", [3_000, 30_000])  # the exact Flat kind and an IVF kind
def test_a_mapped_index_searched_through_live_rows_finds_what_a_maintained_one_does(tmp_path: Path, n: int):
    dim = 16
    vectors = clustered(n, dim, seed=n)
    built = AnnIndex.build(n, dim, sample=vectors[::3])
    built.add(np.arange(n), vectors)
    built.save(tmp_path / "d_un.faiss")
    gone = np.arange(0, n, 3)
    built.remove(gone)  # the index kept up to date the old way

    mapped = AnnIndex.load(tmp_path / "d_un.faiss", mmap=True)
    live = LiveRows(n, range(n))
    live.discard(gone[: len(gone) // 2].tolist())
    live.discard(gone[len(gone) // 2 :].tolist())
    queries = clustered(50, dim, seed=7)
    want_ids, want_scores = built.search(queries, 10)
    got_ids, got_scores = mapped.search(queries, 10, live=live)
    assert (got_ids == want_ids).all() and np.allclose(got_scores, want_scores)
    assert not np.isin(got_ids, gone).any()
    assert len(mapped) == n  # the file is unchanged: rows left through the bitmap alone


def test_a_search_over_fewer_live_rows_than_k_pads_and_an_empty_live_set_finds_nothing(tmp_path: Path):
    dim = 8
    vectors = normalise(clustered(100, dim, seed=1))
    index = AnnIndex.build(100, dim)
    index.add(np.arange(100), vectors)
    live = LiveRows(100, [4, 50, 70])
    ids, _ = index.search(vectors[:2], 5, live=live)
    assert sorted(ids[0][:3]) == [4, 50, 70] and (ids[:, 3:] == -1).all()
    live.discard([4, 50, 70])
    ids, _ = index.search(vectors[:2], 5, live=live)
    assert (ids == -1).all()


class FailingVectors(VectorFile):
    """A VectorFile a restarted controller must not read at start (40M x 384 floats: ~31 GB)."""

    def read(self, rows):  # type: ignore[override]
        raise AssertionError("the vectors were read again on restart")


def test_the_controller_maps_the_filled_index_on_restart_without_reading_the_pool(tmp_path: Path):
    from synpref.services.controller.embeddings import PoolRetrieval, fill_index, train_index
    from synpref.shared.pairstore import PairStore
    from tests.unit.test_controller_parts import record

    store = PairStore(tmp_path / "pairs.sqlite")
    store.add((f"k{i}", "unverified", record(i)) for i in range(60))
    dim = 8
    vf = VectorFile.create(tmp_path / "v.f16", store.max_row() + 1, dim)
    vf.write(0, clustered(store.max_row() + 1, dim, seed=3))
    trained, filled = tmp_path / "trained.faiss", tmp_path / "d_un.faiss"
    train_index(store, vf, trained)
    fill_index(store, vf, trained, filled)
    rows = store.rows("unverified")
    store.move(rows[:20], "gold", step="test")  # left D_un while the controller was down

    again = PoolRetrieval(store, FailingVectors(tmp_path / "v.f16"), trained, filled)
    assert again.live.count == 40 and all(r not in again.live for r in rows[:20])
    again.vectors = vf  # queries read their own vectors
    hits = set(again.nearest_rows(rows[20:25], [10] * 5).tolist())
    assert hits and hits <= set(rows[20:])
    again.leave(rows[20:25])
    assert not set(again.nearest_rows(rows[25:30], [40] * 5).tolist()) & set(rows[:25])
    store.close()


def test_a_workdir_prepared_before_the_filled_index_existed_fills_it_once(tmp_path: Path):
    from synpref.services.controller.embeddings import PoolRetrieval, train_index
    from synpref.shared.pairstore import PairStore
    from tests.unit.test_controller_parts import record

    store = PairStore(tmp_path / "pairs.sqlite")
    store.add((f"k{i}", "unverified", record(i)) for i in range(30))
    vf = VectorFile.create(tmp_path / "v.f16", store.max_row() + 1, 8)
    vf.write(0, clustered(store.max_row() + 1, 8, seed=4))
    trained, filled = tmp_path / "trained.faiss", tmp_path / "d_un.faiss"
    train_index(store, vf, trained)
    assert not filled.exists()
    first = PoolRetrieval(store, vf, trained, filled)
    assert filled.exists() and len(first.index) == 30
    PoolRetrieval(store, FailingVectors(tmp_path / "v.f16"), trained, filled)  # the second start reads no vector
    store.close()
