"""Retrieval vectors the prepare step computed, handed back where the in-process loop would embed the same text again.

`embed_pool` embeds every D_un pair's retrieval text once, into the run's VectorFile, and writes a digest
of each row's text beside it (shared/ann.TextDigests). Afterwards the in-process annotator embeds each pair it
judges (to look up the judges' examples: one encoder forward per pair, a batch of one) and every rewrite
of the example index embeds all of D_gold again: mostly the very texts whose vectors are on disk.
`KnownVectors.note` names the rows about to be embedded; its `embed` reads a named row's vector when the
text asked for is the one that row embedded (the digests agree: a pair the labeller gave attributes since
has another text) and embeds the rest. Entries live until used or `forget`: a batch's worth, never the pool's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from synpref.services.controller.embeddings import retrieval_text
from synpref.shared.ann import TextDigests, VectorFile, text_digest
from synpref.shared.examples import write_example_index
from synpref.v1.pair_pb2 import PairRecord


class KnownVectors:
    """`embed` for the loop's judges and example index that reuses the VectorFile for the rows `note` named.

    Args:
        vectors: the run's VectorFile (called on first reuse: it exists once prepare ran).
        embed: what embeds the texts no noted row embedded (the loop's encoder).
        text_of: a record's text as prepare embedded it (embeddings.retrieval_text).
    """

    def __init__(
        self,
        vectors: Callable[[], VectorFile],
        embed: Callable[[list[str]], np.ndarray],
        text_of: Callable[[PairRecord], str] = retrieval_text,
    ) -> None:
        self._vectors = vectors
        self._embed = embed
        self._text_of = text_of
        self._rows: dict[int, int] = {}
        self._digests: TextDigests | None = None
        self._looked = False
        self._lock = threading.Lock()  # the annotator embeds on its retrieval thread
        self.reused = 0
        """Texts answered from the VectorFile so far."""

    def expect(self, rows: Iterable[tuple[int, PairRecord]]) -> Iterator[PairRecord]:
        """Yield each record after noting its row (for a consumer that embeds as it reads, a batch at a time)."""
        for row, record in rows:
            key = text_digest(self._text_of(record))
            with self._lock:
                self._rows[key] = row
            yield record

    def note(self, rows: Sequence[int], records: Sequence[PairRecord]) -> None:
        """Note a batch's rows, their records about to be judged."""
        for _ in self.expect(zip(rows, records, strict=True)):
            pass

    def write_examples(self, folder: Path, gold: Iterable[tuple[int, PairRecord]], dim: int) -> int:
        """examples.write_example_index of D_gold's (row, record)s, reusing their vectors; their number."""
        try:
            return write_example_index(folder, self.expect(gold), self.embed, dim)
        finally:
            self.forget()  # a repeated id is not embedded: its entry would stay

    def forget(self) -> None:
        """Drop the rows noted and not embedded (pairs the annotator skipped)."""
        with self._lock:
            self._rows.clear()

    def embed(self, texts: list[str]) -> np.ndarray:
        """Vectors of `texts` in order: read where a noted row embedded that very text (each noted row used once),
        embedded for the rest."""
        keys = [text_digest(t) for t in texts]
        with self._lock:
            rows = [self._rows.pop(k, -1) for k in keys]
        known = [i for i, row in enumerate(rows) if row >= 0]
        digests = self._digest_file() if known else None
        if digests is not None:
            on_disk = digests.read([rows[i] for i in known])
            known = [i for i, d in zip(known, on_disk, strict=True) if int(d) == keys[i]]
        else:
            known = []
        if not known:
            return self._embed(texts)
        vectors = self._vectors()
        out = np.empty((len(texts), vectors.dim), dtype=np.float32)
        out[known] = vectors.read([rows[i] for i in known])
        taken = set(known)
        if unknown := [i for i in range(len(texts)) if i not in taken]:
            out[unknown] = self._embed([texts[i] for i in unknown])
        self.reused += len(known)
        return out

    def _digest_file(self) -> TextDigests | None:
        if not self._looked:
            self._digests, self._looked = TextDigests.beside(self._vectors()), True
        return self._digests
