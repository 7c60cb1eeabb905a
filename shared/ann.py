"""Retrieval at pool scale: a float16 vector file by store row, and a FAISS index over D_un.

`VectorFile` keeps one embedding per PairStore row in a memory-mapped float16 file, so a
query's vector is read from disk, not held for the whole pool (40M x 384 x 2 B = 31 GB on
the volume, paged in as used).

`AnnIndex` is the nearest-neighbour index over the unverified pool. Its type follows the
size it is built for, as FAISS's own guidance does: exact `Flat` for up to 20k vectors,
`IVF<nlist>,SQ8` up to 2M (one byte a dimension: 1M x 384-d = 384 MB in memory),
`IVF<nlist>,PQ<m>` beyond (nlist ~ 4 sqrt(n) in steps of 64, trained on a sample). Ids are store rows;
rows leave the index when they leave D_un, so every hit is an unverified pair. Vectors are
L2-normalised and compared by inner product (cosine).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synpref.shared.files import fsync_folder, write_text_atomic

EXACT_UP_TO = 20_000
FLAT_LISTS_UP_TO = 2_000_000
HITS_PER_SEARCH = 1 << 22
"""Most (id, score) hits one FAISS search call returns (48 MB): queries that tie widely are searched in parts."""
NO_FALLOCATE = (errno.EOPNOTSUPP, errno.EINVAL)
"""What posix_fallocate raises where the filesystem cannot allocate ahead (a sparse file is made there instead)."""

log = logging.getLogger(__name__)


def allocated_zeros(path: Path, size: int) -> None:
    """Make `path` `size` zero bytes with their space allocated on disk, or raise OSError naming the path and the
    bytes: a sparse file on a volume that filled while it was written killed the process with SIGBUS at the first
    page the memory map could not get, hours into embedding. Where the filesystem cannot allocate ahead, the file
    is sparse (a warning says so). On failure no file is left."""
    with open(path, "wb") as fh:  # outside the try: a file that could not be opened is not ours to remove
        try:
            fh.truncate(size)
            fallocate = getattr(os, "posix_fallocate", None)  # not on macOS
            if size and fallocate is not None:
                try:
                    fallocate(fh.fileno(), 0, size)
                except OSError as e:
                    if e.errno not in NO_FALLOCATE:
                        raise OSError(e.errno, f"cannot allocate the {size} bytes {path} needs: {e.strerror}") from e
                    log.warning(
                        "%s: sparse, the filesystem cannot allocate ahead (%s): a full volume ends "
                        "the process with SIGBUS when a page of it is written",
                        path,
                        e.strerror,
                    )
        except BaseException:
            fh.close()
            path.unlink(missing_ok=True)
            raise


def normalise(vectors: np.ndarray) -> np.ndarray:
    """`vectors` as contiguous float32 rows scaled to unit length (zero rows stay zero)."""
    out = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


class VectorFile:
    """Float16 vectors by row in one memory-mapped file, `<path>` plus a `<path>.json` shape note.

    Args:
        path: the file; created with `create`, opened read-write with the constructor.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        note = self.path.with_suffix(self.path.suffix + ".shape")
        try:
            rows, dim = (int(x) for x in note.read_text().split())
        except ValueError:
            raise ValueError(f"{note} is not a shape note (two integers, rows and dim)") from None
        self.rows, self.dim = rows, dim
        # np.memmap in r+ mode silently extends a short file with zeros: a truncated or foreign file would read
        # as zero vectors (retrieval then ties every pair) instead of failing.
        size, wanted = self.path.stat().st_size, rows * dim * 2
        if size != wanted:
            raise ValueError(f"{self.path} holds {size} bytes, not the {wanted} of its shape note ({rows} x {dim})")
        self._map = np.memmap(self.path, dtype=np.float16, mode="r+", shape=(rows, dim))

    @classmethod
    def create(cls, path: str | Path, rows: int, dim: int) -> VectorFile:
        """A zero-filled file for rows 0..rows-1, its space allocated (allocated_zeros: OSError where the volume
        lacks it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        allocated_zeros(path, rows * dim * 2)
        # Durable (fsynced, with its folder): the prepare step that wrote it commits next, and a shape note
        # lost to a machine crash after that left a run that could neither go on nor redo the step.
        write_text_atomic(path.with_suffix(path.suffix + ".shape"), f"{rows} {dim}\n")
        return cls(path)

    def write(self, first_row: int, vectors: np.ndarray) -> None:
        """Store `vectors` (as float16) at rows `first_row` onwards."""
        self._map[first_row : first_row + len(vectors)] = vectors.astype(np.float16)

    def write_rows(self, rows: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Store `vectors` (as float16) at the given rows, in order."""
        self._map[np.asarray(rows, dtype=np.int64)] = vectors.astype(np.float16)

    def read(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """The vectors at `rows`, as float32."""
        return np.asarray(self._map[np.asarray(rows, dtype=np.int64)], dtype=np.float32)

    def flush(self) -> None:
        """Flush the memory map to disk, and the file's size and name with it (fsync of file and folder)."""
        self._map.flush()
        fsync_folder(self.path)
        fsync_folder(self.path.parent)


def text_digest(text: str) -> int:
    """A 64-bit digest of `text`, never 0 (0 marks a row whose text is not known)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") or 1


class TextDigests:
    """The digest of the text each row of a VectorFile embeds: `<vectors>.digests`, 8 bytes a row, memory-mapped."""

    def __init__(self, path: Path, rows: int) -> None:
        self.path = path
        self._map = np.memmap(path, dtype=np.uint64, mode="r+", shape=(rows,))

    @classmethod
    def beside(cls, vectors: VectorFile, create: bool = False) -> TextDigests | None:
        """The digests of `vectors`; a zero-filled file first when `create`, its space allocated (allocated_zeros);
        None when there is none (a workdir prepared before digests were written: nothing is reused there)."""
        path = vectors.path.with_name(vectors.path.name + ".digests")
        if create:
            allocated_zeros(path, vectors.rows * 8)
        elif not path.exists():
            return None
        return cls(path, vectors.rows)

    def write(self, rows: np.ndarray, texts: Sequence[str]) -> None:
        self._map[rows] = np.array([text_digest(t) for t in texts], dtype=np.uint64)

    def read(self, rows: Sequence[int]) -> np.ndarray:
        return np.asarray(self._map[np.asarray(rows, dtype=np.int64)])

    def flush(self) -> None:
        self._map.flush()


def index_spec(n: int, dim: int) -> str:
    """The FAISS factory string for an index meant to hold about `n` vectors of `dim`."""
    if n <= EXACT_UP_TO:
        return "IDMap,Flat"
    # nlist ~ 4 sqrt(n) in steps of 64 (not a power of two): k-means work (training rows x nlist, with
    # 40 rows a list) then grows as n, where rounding to powers of two made it 16x for 10x the pairs.
    nlist = max(64, 64 * round(4 * math.sqrt(n) / 64))
    if n <= FLAT_LISTS_UP_TO:
        return f"IVF{nlist},SQ8"
    m = next(m for m in (48, 32, 24, 16, 12, 8, 4, 2, 1) if dim % m == 0)
    return f"IVF{nlist},PQ{m}"


def training_rows(n: int, dim: int) -> int:
    """Rows to train the index for `n` vectors on: 40 per inverted list (FAISS asks for >= 39), at most n."""
    spec = index_spec(n, dim)
    if not spec.startswith("IVF"):
        return 0
    nlist = int(spec[3:].split(",")[0])
    return min(n, 40 * nlist)


class LiveRows:
    """The rows a search may return, as a bitmap of `size` bits (5 MB at 40M rows): FAISS skips the others
    while it scans (`IDSelectorBitmap`), so rows leave a search without the index file changing."""

    def __init__(self, size: int, rows: Iterable[int] = ()) -> None:
        self.size = size
        self._bits = np.zeros((size + 7) // 8, dtype=np.uint8)  # row r: bit r % 8 of byte r // 8 (FAISS's order)
        chunk: list[int] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == 1 << 20:
                self._set(chunk)
                chunk = []
        self._set(chunk)
        self.count = int(np.bitwise_count(self._bits).sum())

    def _set(self, rows: list[int]) -> None:
        wanted = np.asarray(rows, dtype=np.int64)
        np.bitwise_or.at(self._bits, wanted >> 3, (1 << (wanted & 7)).astype(np.uint8))

    def _alive(self, rows: np.ndarray) -> np.ndarray:
        return ((self._bits[rows >> 3] >> (rows & 7)) & 1).astype(bool)

    def discard(self, rows: Sequence[int]) -> None:
        """Rows no search returns from now on (rows already gone or past `size` are ignored)."""
        wanted = np.unique(np.asarray(rows, dtype=np.int64))
        wanted = wanted[(wanted >= 0) & (wanted < self.size)]
        wanted = wanted[self._alive(wanted)]
        if len(wanted):
            self.count -= len(wanted)
            np.bitwise_and.at(self._bits, wanted >> 3, ~(1 << (wanted & 7)).astype(np.uint8))

    def __contains__(self, row: int) -> bool:
        return 0 <= row < self.size and bool(self._alive(np.array([row], dtype=np.int64))[0])

    def selector(self) -> Any:
        """A FAISS selector over the bitmap; it reads the array in place, which must outlive the search."""
        import faiss

        # FAISS takes the bitmap's length in bytes: given the bits, it read past the array for ids beyond `size`.
        return faiss.IDSelectorBitmap(len(self._bits), faiss.swig_ptr(self._bits))


class AnnIndex:
    """Inner-product nearest neighbours over int64 ids, persisted to one file.

    Build with `AnnIndex.build(n, dim, sample)`, then `add` in chunks; `remove` takes ids out;
    `search` returns the k best ids per query (-1 pads where fewer exist).

    Args:
        index: a FAISS index (built here or read from disk).
        nprobe: inverted lists visited per query (IVF only): recall against speed.
    """

    def __init__(self, index: Any, nprobe: int = 32) -> None:
        import faiss

        self.index = index
        ivf = faiss.try_extract_index_ivf(index) if "IVF" in type(index).__name__ else None
        self.nprobe = 0
        if ivf is not None:
            self.nprobe = ivf.nprobe = min(nprobe, ivf.nlist)

    @classmethod
    def build(cls, n: int, dim: int, sample: np.ndarray | None = None, nprobe: int = 32) -> AnnIndex:
        """An empty index sized for `n` vectors; IVF kinds are trained on `sample` (~30 x nlist rows)."""
        import faiss

        spec = index_spec(n, dim)
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            if sample is None or len(sample) == 0:
                raise ValueError(f"{spec} needs a training sample")
            index.train(normalise(sample))
        return cls(index, nprobe)

    @classmethod
    def load(cls, path: str | Path, nprobe: int = 32, mmap: bool = False) -> AnnIndex:
        """Read an index written by `save`; `mmap` maps it (read-only: search it with `live` instead of
        `remove`) instead of reading it into memory."""
        import faiss

        flags = faiss.IO_FLAG_MMAP if mmap else 0
        return cls(faiss.read_index(str(path), flags), nprobe)

    def save(self, path: str | Path) -> None:
        """Write through a temp file and rename, so a reader never sees half an index."""
        import faiss

        from synpref.shared.files import write_atomic

        write_atomic(Path(path), lambda tmp: faiss.write_index(self.index, str(tmp)))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Add `vectors` (normalised here) under the given integer ids."""
        self.index.add_with_ids(normalise(vectors), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove the given ids from the index; returns how many were removed."""
        import faiss

        wanted = np.asarray(ids, dtype=np.int64)
        if len(wanted) == 0:
            return 0
        return int(self.index.remove_ids(faiss.IDSelectorBatch(wanted)))

    def search(
        self, queries: np.ndarray, k: int, slack: int = 8, live: LiveRows | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (len(queries), k), best first; ids are -1 (and scores 0) where the index had fewer
        hits.
        With `live`, only ids in it are returned (the index holds others).

        Equal scores are ordered by id: pairs that share a conversation embed identically, and an
        IVF list's order depends on its history of adds and removes, so without this a resumed
        run (index rebuilt) and an uninterrupted one (rows removed) could pick different ties.
        `slack` extra hits are fetched so a tie at the k-th place is decided by id, not by position;
        a query whose last fetched hit still ties its k-th is searched again, twice as wide, until
        the tie ends inside what was fetched (FAISS keeps whichever equal hits it met first).
        """
        size = len(self) if live is None else min(len(self), live.count)
        if k <= 0 or len(queries) == 0 or size == 0:
            return np.full((len(queries), max(k, 0)), -1, dtype=np.int64), np.zeros((len(queries), max(k, 0)))
        selector = live.selector() if live is not None else None  # held here: the params only point to it
        params = self._params(selector)
        queries = normalise(queries)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        out_scores = np.zeros((len(queries), k), dtype=np.float32)
        pending = np.arange(len(queries))
        wide = min(k + max(slack, 0), size)
        while len(pending):
            tied: list[np.ndarray] = []
            step = max(1, HITS_PER_SEARCH // wide)  # a wide search holds queries x wide hits
            for start in range(0, len(pending), step):
                part = pending[start : start + step]
                scores, ids = self.index.search(queries[part], wide, params=params)
                out_ids[part], out_scores[part] = _best_by_id(ids, scores, k)
                if wide < size:  # then wide >= k + slack
                    # FAISS returns hits best first: a last hit scoring as high as the k-th may hide more ties.
                    tied.append(part[(ids[:, -1] >= 0) & (scores[:, -1] >= scores[:, k - 1])])
            pending = np.concatenate(tied) if tied else pending[:0]
            wide = min(2 * wide, size)
        return out_ids, out_scores

    def _params(self, selector: Any) -> Any:
        import faiss

        if selector is None:
            return None
        if not self.nprobe:
            flat = faiss.SearchParameters()
            flat.sel = selector
            return flat
        ivf = faiss.SearchParametersIVF()
        ivf.sel, ivf.nprobe = selector, self.nprobe
        return ivf


def _best_by_id(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of FAISS's (ids, scores) rows, equal scores by id, -1 (and score 0) padded to k columns."""
    # -1 pads sort last: FAISS gives them -3.4e38 (-FLT_MAX) for inner product; push them explicitly.
    keyed_scores = np.where(ids < 0, -np.inf, scores)
    order = np.lexsort((ids, -keyed_scores), axis=1)[:, :k]
    ids = np.take_along_axis(ids, order, axis=1)
    # Score 0 at every -1, as where there are fewer than k columns and where search finds nothing: FAISS's
    # -3.4e38 came through where it returned a -1 itself (an IVF probe short of hits).
    scores = np.where(ids < 0, 0, np.take_along_axis(scores, order, axis=1))
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)))
    return ids, scores
