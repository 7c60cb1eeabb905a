"""The controller's retrieval over the pool: one vector per store row on disk, a FAISS index over D_un.

`embed_pool` writes the retrieval embedding of every pair to be curated (conversation and
attributes, `pair_text`) into a float16 `VectorFile` indexed by store row, a batch at a time.
`train_index` trains the AnnIndex kind its size calls for on a fixed sample and saves the
empty trained index; `fill_index` adds D_un to it and saves that once. `PoolRetrieval` maps
the filled file (FAISS `IO_FLAG_MMAP`: the lists stay on disk, paged in as searched, ~2.2 GB
at 40M pairs) and searches only the rows still in D_un (`LiveRows`, a bitmap built from the
store on start), so a restarted controller reads no vector and builds no index again. Rows
leave D_un by a bit; the pool is fixed after ingest, so the rows in D_un are always a subset
of those filled. Searches order ties by row (`AnnIndex.search`), so hits depend on the rows
alone, not on how the index was filled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from synpref.services.annotator.prompts import attributes_dict
from synpref.services.gold_scorer.scoring import pair_dict
from synpref.shared.ann import AnnIndex, LiveRows, TextDigests, VectorFile, training_rows
from synpref.shared.pairs import message_dicts
from synpref.shared.pairstore import PairStore
from synpref.shared.retrieval import pair_text
from synpref.v1.pair_pb2 import PairRecord

VECTORS_FILE = "retrieval/vectors.f16"
TRAINED_INDEX_FILE = "retrieval/trained.faiss"
FILLED_INDEX_FILE = "retrieval/d_un.faiss"
UNVERIFIED = "unverified"


def embedded_attributes(record: PairRecord) -> dict[str, Any] | None:
    """The attributes retrieval embeds with the conversation (DESIGN.md 1: embed (x, attributes)); None when the
    pair has none yet (a study's pairs, or pairs the labeller has not seen)."""
    return attributes_dict(record.attributes) if record.attributes.task_category else None


def retrieval_text(record: PairRecord) -> str:
    """What retrieval embeds for a pair: its conversation and, where labelled, its attributes."""
    return pair_text(message_dicts(record.pair.conversation), embedded_attributes(record))


COMMIT_EVERY = 100
"""Embedding batches between two durable progress points: a restart re-embeds at most this many (~100k pairs)."""


def embed_pool(
    store: PairStore,
    path: Path,
    pools: Sequence[str],
    embed: Callable[[list[str]], np.ndarray],
    say: Callable[[str], None],
    batch: int = 1024,
    resume: tuple[int, int] = (-1, 0),
    commit: Callable[[int, int], None] | None = None,
) -> VectorFile:
    """Embed every pair of `pools` into a VectorFile at `path` (rows 0..max_row), streaming the store.

    Every COMMIT_EVERY batches the file is flushed to disk and `commit(last row embedded, pairs embedded)` records
    the progress: a restart passes it back as `resume` and goes on from there in the same file (at 40M pairs the
    pool takes hours to embed; a crash near the end re-embedded all of it). Each row's text digest goes beside
    its vector (known_vectors.TextDigests), so the loop reuses the vector for that very text later."""
    total = sum(store.count(p) for p in pools)
    after, done = resume
    vectors = VectorFile(path) if after >= 0 and path.exists() else None
    digests = TextDigests.beside(vectors) if vectors is not None else None
    if vectors is None:
        after, done = -1, 0
    say(f"prepare: embedding {total - done} of {total} conversations for retrieval")
    for n, chunk in enumerate(store.scan(pools, batch=batch, after=after), 1):
        texts = [retrieval_text(r) for _, r in chunk]
        out = np.asarray(embed(texts), dtype=np.float32)
        if vectors is None:
            vectors = VectorFile.create(path, store.max_row() + 1, out.shape[1])
            digests = TextDigests.beside(vectors, create=True)
        # Rows of one scan batch are increasing but not always adjacent (other pools in between).
        rows = np.array([row for row, _ in chunk], dtype=np.int64)
        vectors.write_rows(rows, out)
        if digests is not None:  # None: a prepare resumed from before digests were written (nothing is reused)
            digests.write(rows, texts)
        done += len(chunk)
        if n % COMMIT_EVERY == 0:
            if digests is not None:
                digests.flush()
            vectors.flush()  # on disk before the progress that says so
            if commit is not None:
                commit(int(rows[-1]), done)
            say(f"prepare: embedded {done}/{total}")
    if vectors is None:
        raise ValueError("nothing to embed: the pool is empty")
    if digests is not None:
        digests.flush()  # a digest lost to a crash is 0: that row's vector is not reused, never misused
    vectors.flush()
    return vectors


def train_index(store: PairStore, vectors: VectorFile, path: Path) -> None:
    """Train the AnnIndex kind D_un's size calls for on an evenly spaced sample of it; save it empty."""
    rows = np.fromiter(store.all_rows(UNVERIFIED), dtype=np.int64)
    wanted = training_rows(len(rows), vectors.dim)
    # Spread over the whole pool: rows follow the sources' order, and a whole-number stride cut to `wanted`
    # rows left the last sources out (up to half the pool), whose pairs then fell into lists not made for them.
    sample = vectors.read(rows[np.arange(wanted, dtype=np.int64) * len(rows) // wanted]) if wanted else None
    AnnIndex.build(len(rows), vectors.dim, sample).save(path)


def fill_index(store: PairStore, vectors: VectorFile, trained: Path, path: Path, chunk: int = 50_000) -> None:
    """Add every row of D_un to the trained index and save it to `path` (atomically). The lists are built in
    memory, once per run (~2.2 GB at 40M pairs, in the prepare step); every later use maps the file."""
    index = AnnIndex.load(trained)
    pending: list[int] = []
    for row in store.all_rows(UNVERIFIED):
        pending.append(row)
        if len(pending) == chunk:
            index.add(pending, vectors.read(pending))
            pending = []
    if pending:
        index.add(pending, vectors.read(pending))
    index.save(path)


class PoolRetrieval:
    """Nearest unverified pairs of given pairs, over the filled AnnIndex of D_un, mapped from disk.

    Args:
        store: the run's PairStore.
        vectors: the VectorFile of `embed_pool`.
        trained: the trained empty index of `train_index`.
        filled: the index `fill_index` wrote; filled here first when missing (a workdir prepared before it
            existed).
    """

    def __init__(self, store: PairStore, vectors: VectorFile, trained: Path, filled: Path) -> None:
        self.store = store
        self.vectors = vectors
        if not filled.exists():
            fill_index(store, vectors, trained, filled)
        self.index = AnnIndex.load(filled, mmap=True)
        self.live = LiveRows(store.max_row() + 1, store.all_rows(UNVERIFIED))

    def leave(self, rows: Iterable[int]) -> None:
        """Rows that left D_un are no longer returned."""
        self.live.discard(list(rows))

    def nearest_rows(
        self, queries: np.ndarray | Sequence[int], ks: np.ndarray | Sequence[int], batch: int = 10_000
    ) -> np.ndarray:
        """The union of each query row's `ks[i]` nearest unverified rows, as sorted unique int64 rows.

        The union is a byte per store row (~40 MB at 40M), not a Python set of the hits (~60 bytes a row: GBs
        when D_silver has grown to millions of queries)."""
        queries = np.asarray(queries, dtype=np.int64)
        ks = np.asarray(ks, dtype=np.int64)
        found = np.zeros(self.live.size, dtype=bool)
        for start in range(0, len(queries), batch):
            k = ks[start : start + batch]
            vectors = self.vectors.read(queries[start : start + batch])
            hits, _ = self.index.search(vectors, int(k.max(initial=0)), live=self.live)
            wanted = (np.arange(hits.shape[1]) < k[:, None]) & (hits >= 0)
            found[hits[wanted]] = True
        return np.flatnonzero(found).astype(np.int64)


class PairView(Sequence[dict]):
    """The pairs of some store rows as pair dicts (`pair_dict`), read from the store as they are used.

    What the RM trainers are given: `len`, indexing, slicing and iteration work without
    holding every pair. `transform(record, row)` replaces `pair_dict` (the as-given baseline).
    """

    def __init__(
        self,
        store: PairStore,
        rows: Iterable[int],
        transform: Callable[[Sequence[PairRecord], Sequence[int]], list[dict]] | None = None,
        batch: int = 2048,
    ) -> None:
        self.store = store
        self.rows = np.fromiter(rows, dtype=np.int64)
        self.transform = transform
        self.batch = batch

    def __len__(self) -> int:
        return len(self.rows)

    def _dicts(self, rows: Sequence[int]) -> list[dict]:
        records = self.store.get(rows)
        return self.transform(records, rows) if self.transform else [pair_dict(r) for r in records]

    @overload
    def __getitem__(self, index: int) -> dict: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict]: ...

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        if isinstance(index, slice):
            return self._dicts(self.rows[index].tolist())
        return self._dicts([int(self.rows[index])])[0]

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self.rows), self.batch):
            yield from self._dicts(self.rows[start : start + self.batch].tolist())
