"""FeatureCache: the frozen backbone's [CLS] state per encoded sequence, for the head trainer (trainer = head).

The states live on disk in one SQLite file per backbone (its weights and max_length in the name), two tables:
`features` (sequence key -> float32 blob, ~1.5 KB for MiniLM) and `pairs` (pair content digest -> its two
sequence keys). A features() call looks up its own keys only (in chunks of `IN (...)` parameters) and appends what
it computed in one transaction, so neither memory nor the cost of a write grows with the pool: Stage 2 scores the
whole unverified pool (40M pairs would be ~120 GB of states). In memory there is only a bounded LRU front of
`FRONT_ENTRIES` sequences (and as many pair digests), which keeps repeated scoring of the same small sets (the gold
set, evaluation, the demo) free of SQLite. A cache from before (features-<digest>.npz) is not read.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

Pair = dict[str, Any]

FRONT_ENTRIES = 100_000
"""Sequences (and, separately, pair digests) kept in memory: ~150 MB of MiniLM states."""

# Bound parameters per `IN (...)` lookup: under SQLite's old default limit of 999.
_CHUNK = 500

# A big call's transaction (the prepare step's chunks) must not leave a -wal file of its size behind.
_WAL_KEEP_BYTES = 64 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (digest TEXT PRIMARY KEY, chosen TEXT NOT NULL, rejected TEXT NOT NULL) WITHOUT ROWID;
"""


class _Stored(Mapping[str, np.ndarray]):
    """The states on disk as a read-only mapping (key -> float32 vector); len counts them."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def __iter__(self) -> Iterator[str]:
        return (key for (key,) in self._db.execute("SELECT key FROM features"))

    def __getitem__(self, key: str) -> np.ndarray:
        row = self._db.execute("SELECT value FROM features WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return np.frombuffer(row[0], dtype=np.float32)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' log lines below errors and its progress bars off inside the block, as they were after it."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class FeatureCache:
    """[CLS] states of the frozen backbone per encoded sequence, cached on disk by backbone weights and token ids."""

    def __init__(self, backbone: str, max_length: int, folder: Path, batch_size: int = 32) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.backbone = backbone
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(backbone)
        with quiet_transformers():  # its "classifier MISSING, consider training" report: training it is the point
            model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, dtype=torch.float32)
        if not hasattr(model, "bert") or getattr(model.bert, "pooler", None) is None:
            raise ValueError(f"trainer = head needs a BERT-family backbone with a pooler; {backbone} is not one")
        self.model = model.eval()
        self.batch_size = batch_size
        key = hashlib.sha256(f"{backbone}:{max_length}".encode())
        # The weights, not the path alone: a checkpoint replaced there has other states. Only those the [CLS] state
        # is computed from: the classifier is newly (randomly) initialised on every load of a plain encoder such as
        # MiniLM, and with it in the name no process ever found the cache an earlier one wrote.
        for part in (model.bert.embeddings, model.bert.encoder):
            for tensor in part.state_dict().values():
                key.update(tensor.detach().contiguous().numpy())
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"features-{key.hexdigest()[:12]}.sqlite"
        # check_same_thread=False with a lock of our own: a scoring thread may call features() too.
        self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        # Before anything is written (a page size is set on creation): 8 KB pages hold five MiniLM states, 4 KB
        # pages two, which would leave a quarter of a 40M-pair cache (~130 GB) empty.
        self._db.execute("PRAGMA page_size=8192")
        self._db.execute("PRAGMA journal_mode=WAL")
        # A cache: a power loss may lose the last calls' states (they are computed again), never corrupt the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA journal_size_limit={_WAL_KEEP_BYTES}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self.limit = FRONT_ENTRIES
        self.cache: Mapping[str, np.ndarray] = _Stored(self._db)
        self.front: OrderedDict[str, np.ndarray] = OrderedDict()
        # Pair content digest -> its two sequences' keys. Scoring the same pairs again (every Stage-2 batch, every
        # evaluation) then costs a hash, not a tokenizer pass, which was three quarters of a curation study's time.
        self._pair_keys: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def close(self) -> None:
        """Close the store (its WAL is checkpointed into the file)."""
        self._db.close()

    def pooler_params(self) -> dict[str, np.ndarray]:
        """A copy of the backbone's pooler dense layer: W (weight) and b (bias)."""
        pooler = self.model.bert.pooler.dense
        return {"W": pooler.weight.detach().numpy().copy(), "b": pooler.bias.detach().numpy().copy()}

    def _encode(self, pairs: Sequence[Pair]) -> list[list[int]]:
        from synpref.shared.modeling import encode_pair

        seqs = []
        for pair in pairs:
            for enc in encode_pair(self.tokenizer, pair, self.max_length, "left_turns"):
                seqs.append(enc.input_ids)
        return seqs

    def features(self, pairs: Sequence[Pair], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(chosen, rejected) [CLS] states, each (n, hidden)."""
        with self._lock:
            return self._features(list(pairs), progress)

    def _features(self, pairs: list[Pair], progress: bool) -> tuple[np.ndarray, np.ndarray]:
        digests = [_pair_digest(pair) for pair in pairs]
        known = self._known_pairs(digests)
        seqs: list[list[int]] = [[] for _ in range(2 * len(pairs))]
        keys = [key for d in digests for key in known.get(d, ("", ""))]
        new_pairs: dict[str, tuple[str, str]] = {}
        self._encode_into([i for i, d in enumerate(digests) if d not in known], pairs, digests, seqs, keys, new_pairs)
        found = self._lookup(keys)
        # A remembered pair whose states are not stored (never so when written by this class): encode it again.
        lost = [
            i
            for i in range(len(pairs))
            if not seqs[2 * i] and (keys[2 * i] not in found or keys[2 * i + 1] not in found)
        ]
        if lost:
            self._encode_into(lost, pairs, digests, seqs, keys, new_pairs)
        todo = sorted({k: i for i, k in enumerate(keys) if k not in found}.values())
        computed = self._forward([seqs[i] for i in todo], progress)
        for i, row in zip(todo, computed, strict=True):
            found[keys[i]] = row
            self._remember(self.front, keys[i], row)
        if todo or new_pairs:
            self._append([(keys[i], found[keys[i]]) for i in todo], new_pairs)
        for digest, pair_keys in new_pairs.items():
            self._remember(self._pair_keys, digest, pair_keys)
        stacked = np.stack([found[k] for k in keys]) if keys else np.zeros((0, self.hidden))
        return stacked[0::2], stacked[1::2]

    def _encode_into(
        self,
        rows: list[int],
        pairs: list[Pair],
        digests: list[str],
        seqs: list[list[int]],
        keys: list[str],
        new_pairs: dict[str, tuple[str, str]],
    ) -> None:
        encoded = self._encode([pairs[i] for i in rows])
        for j, i in enumerate(rows):
            seqs[2 * i], seqs[2 * i + 1] = encoded[2 * j], encoded[2 * j + 1]
            keys[2 * i], keys[2 * i + 1] = _ids_key(seqs[2 * i]), _ids_key(seqs[2 * i + 1])
            new_pairs[digests[i]] = (keys[2 * i], keys[2 * i + 1])

    def _known_pairs(self, digests: list[str]) -> dict[str, tuple[str, str]]:
        known: dict[str, tuple[str, str]] = {}
        for d in digests:
            if (pair_keys := self._pair_keys.get(d)) is not None:
                self._pair_keys.move_to_end(d)
                known[d] = pair_keys
        rest = [d for d in dict.fromkeys(digests) if d not in known]
        for digest, chosen, rejected in self._select("SELECT digest, chosen, rejected FROM pairs WHERE digest", rest):
            known[digest] = (chosen, rejected)
            self._remember(self._pair_keys, digest, (chosen, rejected))
        return known

    def _lookup(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for k in keys:
            if k and (row := self.front.get(k)) is not None:
                self.front.move_to_end(k)
                found[k] = row
        rest = [k for k in dict.fromkeys(keys) if k and k not in found]
        for key, value in self._select("SELECT key, value FROM features WHERE key", rest):
            found[key] = row = np.frombuffer(value, dtype=np.float32)
            self._remember(self.front, key, row)
        return found

    def _select(self, query: str, values: list[str]) -> Iterable[tuple[Any, ...]]:
        for start in range(0, len(values), _CHUNK):
            chunk = values[start : start + _CHUNK]
            yield from self._db.execute(f"{query} IN ({','.join('?' * len(chunk))})", chunk).fetchall()

    def _forward(self, seqs: list[list[int]], progress: bool) -> list[np.ndarray]:
        import torch

        from synpref.shared.batched_rewards import length_batches, pad_batch

        rows: list[np.ndarray] = [np.empty(0, np.float32)] * len(seqs)
        if not seqs:
            return rows
        pad = int(self.tokenizer.pad_token_id or 0)
        batches = length_batches([len(s) for s in seqs], self.batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"encoding {len(seqs)} sequences", unit="batch")
        for batch in batches:
            ids, mask = pad_batch([seqs[j] for j in batch], pad)
            with torch.inference_mode():
                hidden = self.model.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            for j, row in zip(batch, hidden.numpy(), strict=True):
                rows[j] = row.copy()  # not a view: it would keep the whole batch alive in the front
        return rows

    def _append(self, rows: list[tuple[str, np.ndarray]], new_pairs: dict[str, tuple[str, str]]) -> None:
        """One transaction: the new states and pair keys; rows another process stored meanwhile are kept."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("INSERT OR IGNORE INTO features VALUES (?, ?)", ((k, v.tobytes()) for k, v in rows))
            self._db.executemany(
                "INSERT OR IGNORE INTO pairs VALUES (?, ?, ?)", ((d, c, r) for d, (c, r) in new_pairs.items())
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _remember(self, lru: OrderedDict[str, Any], key: str, value: Any) -> None:
        lru[key] = value
        lru.move_to_end(key)
        while len(lru) > self.limit:
            lru.popitem(last=False)

    @property
    def hidden(self) -> int:
        """The backbone's hidden size."""
        return int(self.model.config.hidden_size)


def _ids_key(ids: Sequence[int]) -> str:
    return hashlib.sha1(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()


def _pair_digest(pair: Pair) -> str:
    """What encode_pair reads of a pair (conversation, chosen, rejected), hashed."""
    content = [pair.get("conversation") or [], pair["chosen"], pair["rejected"]]
    return hashlib.sha1(json.dumps(content, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
