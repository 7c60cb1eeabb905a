"""AnnIndex and VectorFile: index kind by size, recall against exact search, removal, files."""

from __future__ import annotations

import numpy as np

from synpref.shared.ann import AnnIndex, VectorFile, index_spec, normalise, training_rows


def test_index_kind_follows_the_size():
    assert index_spec(5_000, 384) == "IDMap,Flat"
    assert index_spec(1_000_000, 384) == "IVF3968,SQ8"
    assert index_spec(40_000_000, 384) == "IVF25280,PQ48"
    assert (training_rows(5_000, 384), training_rows(1_000_000, 384), training_rows(30_000, 8)) == (0, 158_720, 28_160)


def test_index_training_work_grows_no_faster_than_the_pairs():
    # k-means work = training rows x lists; 10x the pairs must not cost more than 10x (it was 16x
    # from 100k to 1M when the list count was rounded to a power of two).
    def work(n: int) -> int:
        return training_rows(n, 384) * int(index_spec(n, 384)[3:].split(",")[0])

    for small in (30_000, 100_000, 200_000):
        assert work(10 * small) <= 10 * work(small), small


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim))
    return centres[rng.integers(0, 64, n)] + 0.3 * rng.normal(size=(n, dim))


def test_ivf_recall_against_exact_search_and_removal():
    n, dim = 30_000, 32
    vectors = clustered(n, dim, seed=0).astype(np.float32)
    ids = np.arange(100, 100 + n)
    index = AnnIndex.build(n, dim, sample=vectors[::5])  # the default nprobe (32)
    assert "IVF" in type(index.index).__name__
    for start in range(0, n, 7_000):
        index.add(ids[start : start + 7_000], vectors[start : start + 7_000])
    queries = clustered(200, dim, seed=1)
    got, _ = index.search(queries, 8)
    exact = np.argsort(-(normalise(queries) @ normalise(vectors).T), axis=1)[:, :8] + 100
    recall = np.mean([len(set(g) & set(e)) / 8 for g, e in zip(got, exact, strict=True)])
    assert recall >= 0.9, recall
    # Rows that leave D_un leave the index: no later search returns them.
    gone = np.unique(got[:, :4])
    assert index.remove(gone) == len(gone)
    again, _ = index.search(queries, 8)
    assert not set(again.ravel()) & set(gone.tolist())
    assert len(index) == n - len(gone)


def test_equal_scores_are_ordered_by_id_whatever_the_insert_order():
    # Pairs that share a conversation embed identically: which of them is the k-th hit must not
    # depend on the order they entered the index (a rebuilt index against one rows left).
    vectors = np.repeat(np.eye(4, dtype=np.float32)[:1], 6, axis=0)
    forward, backward = AnnIndex.build(6, 4), AnnIndex.build(6, 4)
    forward.add(np.arange(10, 16), vectors)
    backward.add(np.arange(15, 9, -1), vectors)
    query = np.eye(4, dtype=np.float32)[:1]
    assert forward.search(query, 3)[0].tolist() == backward.search(query, 3)[0].tolist() == [[10, 11, 12]]


def test_exact_index_saves_loads_and_pads_missing_hits(tmp_path):
    vectors = np.eye(4, dtype=np.float32)
    index = AnnIndex.build(4, 4)
    index.add([10, 11, 12, 13], vectors)
    index.save(tmp_path / "d_un.faiss")
    loaded = AnnIndex.load(tmp_path / "d_un.faiss")
    ids, scores = loaded.search(vectors[[2]], 6)
    assert ids[0, 0] == 12 and scores[0, 0] == 1.0  # basis vectors: products of 0s and 1s, exact in fp32
    assert list(ids[0, 4:]) == [-1, -1]


def test_vector_file_round_trips_float16_by_row(tmp_path):
    vf = VectorFile.create(tmp_path / "vectors.f16", rows=10, dim=3)
    vf.write(4, np.array([[1.0, 2.0, 3.0], [0.5, 0.25, -1.0]]))
    vf.flush()
    again = VectorFile(tmp_path / "vectors.f16")
    assert again.read([5, 4]).tolist() == [[0.5, 0.25, -1.0], [1.0, 2.0, 3.0]]  # exact in float16
    assert again.read([0]).tolist() == [[0.0, 0.0, 0.0]]
