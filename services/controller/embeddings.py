"""The controller's retrieval table: one embedding per pool pair, and the searches on it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from synpref.services.annotator.prompts import Example, attributes_dict
from synpref.shared.pairs import message_dicts
from synpref.shared.retrieval import pair_text
from synpref.v1.pair_pb2 import PairRecord

Records = dict[str, PairRecord]


class EmbeddingTable:
    """Retrieval embeddings of every pool pair's conversation, computed once at prepare.

    Only the conversation is embedded (pair_text without attributes: the table is built
    before any pair is labelled). Backs both retrieval uses: nearest unverified pairs of an
    RM error, and human-verified examples for the judges (an annotator ExampleSource, whose
    query is the pair's own conversation row; its `attributes` argument is not used).
    """

    def __init__(self, keys: list[str], vectors: np.ndarray, records: Callable[[], Records]) -> None:
        self.keys = keys
        self.row = {k: i for i, k in enumerate(keys)}
        self.vectors = vectors
        self.records = records
        self.by_text: dict[str, int] = {}
        self.example_keys: list[str] = []
        self._index: tuple[list[str], Any] | None = None

    def nearest(self, queries: list[str], ks: list[int], among: list[str]) -> list[list[str]]:
        """For each query key, its `ks[i]` nearest keys among `among` (unknown keys ignored).

        The index over `among` is cached while `among` stays the same.
        """
        from synpref.shared.retrieval import VectorIndex

        among = [k for k in among if k in self.row]
        if not among or not queries:
            return [[] for _ in queries]
        cached = self._index
        if cached is None or cached[0] != among:
            index = VectorIndex(self.vectors.shape[1])
            index.add(among, self.vectors[[self.row[k] for k in among]])
            self._index = cached = (among, index)
        index = cached[1]
        hits = index.search(self.vectors[[self.row[q] for q in queries]], max(ks, default=0))
        return [[item for item, _ in h[:k]] for h, k in zip(hits, ks, strict=True)]

    def examples(self, conversation: list[dict[str, str]], attributes: dict, k: int) -> list[Example]:
        """Up to `k` example pairs nearest to this conversation (found by its exact text); [] when unknown."""
        text = json.dumps(conversation, ensure_ascii=False)
        row = self.by_text.get(text)
        if row is None or not self.example_keys or k <= 0:
            return []
        (hits,) = self.nearest([self.keys[row]], [k], self.example_keys)
        records = self.records()
        out = []
        for key in hits:
            r = records[key]
            out.append(
                Example(
                    id=r.pair.id,
                    conversation=message_dicts(r.pair.conversation),
                    preferred="\n".join(m.content for m in r.pair.chosen),
                    dispreferred="\n".join(m.content for m in r.pair.rejected),
                    attributes=attributes_dict(r.attributes) if r.attributes.task_category else {},
                )
            )
        return out


def load_or_embed_table(
    path: Path,
    keys: list[str],
    records: Callable[[], Records],
    embed: Callable[[list[str]], np.ndarray],
    say: Callable[[str], None],
) -> EmbeddingTable:
    """The table of `keys`: vectors from the npz cache at `path`, or embedded now and cached there."""
    from synpref.services.controller.models import save_npz

    if path.exists():
        data = np.load(path)
        vectors = data["vectors"]
        if data["keys"].tolist() != keys:
            raise RuntimeError(f"{path} does not match the pool; remove it to recompute")
    else:
        by_key = records()
        texts = [pair_text(message_dicts(by_key[k].pair.conversation), embedded_attributes(by_key[k])) for k in keys]
        say(f"prepare: embedding {len(texts)} conversations for retrieval")
        vectors = embed(texts)
        save_npz(path, keys=np.array(keys), vectors=vectors)
    table = EmbeddingTable(keys, vectors, records)
    by_key = records()
    for i, k in enumerate(keys):
        table.by_text[json.dumps(message_dicts(by_key[k].pair.conversation), ensure_ascii=False)] = i
    return table


def embedded_attributes(record: PairRecord) -> dict[str, Any] | None:
    """The attributes retrieval embeds with the conversation (DESIGN.md 1: embed (x, attributes)); None when the
    pair has none yet (a study's pairs, or pairs the labeller has not seen)."""
    return attributes_dict(record.attributes) if record.attributes.task_category else None
