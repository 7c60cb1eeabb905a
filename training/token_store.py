"""Encoded training pairs as flat arrays: 4 bytes per token, a few dozen per pair, no Python objects.

A `PairStore` holds every token id of every sequence in one int32 array and, per pair, the int64
offsets of its chosen and rejected sequences plus its margin, padded width, real tokens and
source (numpy arrays). Written to a folder, each array is a file that readers memory-map: ranks
share the page cache and the resident size does not grow with the data. A pair is made into an
`EncodedPair` (Python lists) only when a micro-batch needs it.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from synpref.shared.modeling import Encoded, compared_sides, encode_pair
from synpref.training.batching import EncodedPair, pair_margin

IDS_FILE = "ids.int32"
ARRAYS = ("offsets", "margins", "widths", "tokens", "sources")
META_FILE = "store.json"
# Token ids buffered (as C ints) before they are written out or frozen into an in-memory chunk: 4 MiB.
CHUNK_IDS = 1 << 20


class PairStore(Sequence[EncodedPair]):
    """Encoded pairs in compact arrays; `store[i]` is pair i as an EncodedPair.

    Attributes:
        ids: int32 token ids of all sequences, back to back (pair i's chosen, then its rejected).
        offsets: int64, 2n+1: sequence k is ids[offsets[k]:offsets[k+1]] (k = 2i chosen, 2i+1 rejected).
        margins: float64 margin per pair. widths: int64 longer side per pair. tokens: int64 both sides.
        sources: int32 code per pair into `source_names`.
    """

    def __init__(
        self,
        ids: np.ndarray,
        offsets: np.ndarray,
        margins: np.ndarray,
        widths: np.ndarray,
        tokens: np.ndarray,
        sources: np.ndarray,
        source_names: list[Any],
    ) -> None:
        self.ids, self.offsets, self.margins = ids, offsets, margins
        self.widths, self.tokens, self.sources, self.source_names = widths, tokens, sources, source_names

    def __len__(self) -> int:
        return len(self.margins)

    @overload
    def __getitem__(self, i: int) -> EncodedPair: ...
    @overload
    def __getitem__(self, i: slice) -> list[EncodedPair]: ...
    def __getitem__(self, i: int | slice) -> EncodedPair | list[EncodedPair]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pair {i} of {n}")
        i %= n
        a, b, c = (int(x) for x in self.offsets[2 * i : 2 * i + 3])
        return EncodedPair(self.ids[a:b].tolist(), self.ids[b:c].tolist(), float(self.margins[i]))

    def __iter__(self) -> Iterator[EncodedPair]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        """Bytes of all the arrays (mapped or in memory)."""
        return int(self.ids.nbytes) + sum(int(getattr(self, name).nbytes) for name in ARRAYS)

    def source_list(self) -> list[Any]:
        """The source of every pair, in order."""
        return [self.source_names[c] for c in self.sources.tolist()]

    @classmethod
    def open(cls, folder: Path) -> PairStore:
        """Memory-map a store that `PairStoreWriter(folder)` wrote."""
        meta = json.loads((folder / META_FILE).read_text())
        count = int(meta["ids"])
        ids = np.memmap(folder / IDS_FILE, dtype=np.int32, mode="r", shape=(count,)) if count else _empty(np.int32)
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        # Files cut or swapped after the fact (a removal killed part way) would index past the ids or mix pairs.
        pairs, offsets = int(meta["pairs"]), arrays["offsets"]
        sizes = [len(offsets), *(len(arrays[name]) for name in ARRAYS if name != "offsets")]
        if sizes != [2 * pairs + 1, *[pairs] * (len(ARRAYS) - 1)] or int(offsets[-1]) != count:
            raise ValueError(f"{folder}: the arrays do not match {META_FILE} ({pairs} pairs, {count} ids)")
        return cls(ids, source_names=meta["source_names"], **arrays)


def _empty(dtype: Any) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


class PairStoreWriter:
    """Appends pairs to a store: into `folder` (files, memory-mapped by `finish`) or, without one, in memory."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._pending = array("i")
        self._chunks: list[np.ndarray] = []
        self._count = 0
        self._fh = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self._fh = open(folder / IDS_FILE, "wb")  # noqa: SIM115 -- closed by finish()
        self._lengths = array("q")
        self._margins = array("d")
        self._sources = array("i")
        self._codes: dict[Hashable, int] = {}

    def add(self, chosen: Sequence[int], rejected: Sequence[int], margin: float = 0.0, source: Any = "unknown") -> None:
        """Append one pair."""
        self._pending.extend(chosen)
        self._pending.extend(rejected)
        self._lengths.append(len(chosen))
        self._lengths.append(len(rejected))
        self._margins.append(margin)
        self._sources.append(self._codes.setdefault(source, len(self._codes)))
        if len(self._pending) >= CHUNK_IDS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        self._count += len(self._pending)
        if self._fh is not None:
            self._pending.tofile(self._fh)
        else:  # the chunk keeps the buffer: a new one takes the next ids
            self._chunks.append(np.frombuffer(self._pending, dtype=np.int32))
        self._pending = array("i")

    def finish(self) -> PairStore:
        """The store of everything added (written and fsynced first when there is a folder)."""
        self._flush()
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if self._lengths else _empty(np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        chosen, rejected = lengths[0::2], lengths[1::2]
        arrays = {
            "offsets": offsets,
            "margins": np.frombuffer(self._margins, dtype=np.float64) if self._margins else _empty(np.float64),
            "widths": np.maximum(chosen, rejected).astype(np.int64),
            "tokens": (chosen + rejected).astype(np.int64),
            "sources": np.frombuffer(self._sources, dtype=np.int32) if self._sources else _empty(np.int32),
        }
        names = list(self._codes)
        if self._fh is None or self.folder is None:
            chunks, self._chunks = self._chunks, []
            ids = chunks[0] if len(chunks) == 1 else np.concatenate(chunks) if chunks else _empty(np.int32)
            return PairStore(ids, source_names=names, **arrays)
        _sync_close(self._fh)
        for name, values in arrays.items():
            with open(self.folder / f"{name}.npy", "wb") as fh:
                np.save(fh, values)
                _sync_close(fh)
        with open(self.folder / META_FILE, "w", encoding="utf-8") as fh:
            json.dump({"ids": self._count, "pairs": len(arrays["margins"]), "source_names": names}, fh)
            _sync_close(fh)
        return PairStore.open(self.folder)


def _sync_close(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


@dataclass
class EncodedSet:
    """Pairs encoded under the trainer's truncation policy.

    Attributes:
        pairs: the encoded pairs, in input order (unfit ones left out unless kept).
        unfit: pairs with a side that does not fit under the policy.
        truncated: encoded pairs with at least one side cut.
        identical: pairs left out because their chosen and rejected are the same.
    """

    pairs: PairStore
    unfit: int = 0
    truncated: int = 0
    identical: int = 0


class PairEncoder:
    """Encodes pair dicts one at a time into a PairStoreWriter, as batching.encode_pairs does:
    unfit pairs are counted and left out unless keep_unfit (then their left-token-truncated fallback
    is kept); pairs whose chosen and rejected are the same are counted and left out (modeling.compared_sides);
    the margin is read from margin_column (0.0 without one, and for a pair without a value: counted)."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        truncation: str,
        margin_column: str = "",
        keep_unfit: bool = False,
        folder: Path | None = None,
    ) -> None:
        self.tokenizer, self.max_length, self.truncation = tokenizer, max_length, truncation
        self.margin_column, self.keep_unfit = margin_column, keep_unfit
        self.writer = PairStoreWriter(folder)
        self.unfit = 0
        self.truncated = 0
        self.identical = 0
        # Stored pairs whose margin_column holds no value: a misspelt column trained every pair without its margin.
        self.margin_missing = 0

    def add(self, pair: Mapping[str, Any]) -> None:
        """Encode one pair and append it (or count it as unfit)."""
        self.add_encoded(pair, encode_pair(self.tokenizer, pair, self.max_length, self.truncation))  # type: ignore[arg-type]

    def add_encoded(self, pair: Mapping[str, Any], sides: tuple[Encoded, Encoded]) -> None:
        """Append a pair encoded elsewhere (training/parallel_encoding.py) with this encoder's settings."""
        compared = compared_sides(self.tokenizer, pair, sides, self.max_length, self.keep_unfit)
        if compared is None:
            self.identical += 1
            return
        chosen, rejected = compared
        if not (chosen.fits and rejected.fits):
            self.unfit += 1
            if not self.keep_unfit:
                return
        self.truncated += chosen.truncated or rejected.truncated
        margin = pair_margin(pair, self.margin_column)
        self.margin_missing += bool(self.margin_column) and pair.get(self.margin_column) is None
        self.writer.add(chosen.input_ids, rejected.input_ids, margin, pair.get("source", "unknown"))

    def finish(self) -> EncodedSet:
        """The encoded set."""
        return EncodedSet(self.writer.finish(), self.unfit, self.truncated, self.identical)


def pair_widths(encoded: Sequence[EncodedPair]) -> Sequence[int]:
    """Padded width of every pair: a store's array, else read off each EncodedPair."""
    return encoded.widths if isinstance(encoded, PairStore) else [p.width for p in encoded]  # type: ignore[return-value]


def pair_tokens(encoded: Sequence[EncodedPair]) -> Sequence[int]:
    """Real tokens (both sides) of every pair: a store's array, else read off each EncodedPair."""
    return encoded.tokens if isinstance(encoded, PairStore) else [p.tokens for p in encoded]  # type: ignore[return-value]
