"""Cheap, named stand-ins for scale benchmarks: a hashed-feature embedder and a hashed-feature linear RM.

Both hash word unigrams and bigrams into a fixed number of signed buckets (feature hashing).
Words are lower-cased runs of word characters (non-ASCII letters included); a unigram's hash is
zlib.crc32 of its UTF-8 bytes, a bigram's is mixed from its two unigram hashes, so the
features are the same in every process and on every machine (Python's own str hash is salted
per process). They are stand-ins for MiniLM retrieval embeddings and for a trained reward
model, for measuring how the loop scales on CPUs, never for measuring curation quality.

- HashedEmbedder: texts -> L2-normalised float32 vectors (dim 384, MiniLM's width).
- HashedModels: the controller's RewardModels. A Bradley–Terry linear model, reward
  r(x, y) = w · phi(x, y), where phi is the hashed features of the conversation x and the
  response y (2^18 buckets, scaled by 1/sqrt(word count)). Trained with Adam on
  -log sigmoid(r(x, y_chosen) - r(x, y_rejected)), streaming batches of the pairs it is given:
  it only takes len() of them and slices, never a copy of the whole sequence, so its memory
  is one batch's features plus the weights, whatever the pool size.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synpref.services.controller.models import ModelHandle, save_npz

EMBED_DIM = 384
RM_DIM = 1 << 18
_WORD = re.compile(rb"[\w\x80-\xff]+")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_MASK32 = np.uint64(0xFFFFFFFF)
Pair = dict[str, Any]


def word_hashes(text: str) -> np.ndarray:
    """uint64 hashes of the text's unigrams, then of its bigrams (adjacent unigram pairs)."""
    words = _WORD.findall(text.lower().encode())
    uni = np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=len(words))
    if len(uni) < 2:
        return uni
    # A bigram hash from its two unigram hashes (ordered, so "a b" and "b a" differ), no second pass over bytes.
    bi = (uni[:-1] * _MIX + uni[1:]) & np.uint64((1 << 63) - 1)
    bi ^= bi >> np.uint64(29)
    return np.concatenate([uni, bi])


def buckets_and_signs(hashes: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket index (hash mod dim) and sign (+1/-1 from bit 31 of the hash's low word) of each hash."""
    index = (hashes % np.uint64(dim)).astype(np.int64)
    sign = np.where(((hashes & _MASK32) >> np.uint64(31)) == 1, -1.0, 1.0)
    return index, sign


class HashedEmbedder:
    """Texts -> L2-normalised float32 vectors of signed, hashed word unigrams and bigrams (see the module)."""

    def __init__(self, dim: int = EMBED_DIM, batch: int = 4096) -> None:
        self.dim = dim
        self.batch = batch

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One (len(texts), dim) float32 row per text; a text without words is the zero vector."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch):
            chunk = texts[start : start + self.batch]
            hashes = [word_hashes(t) for t in chunk]
            index, sign = buckets_and_signs(np.concatenate(hashes) if hashes else np.zeros(0, np.uint64), self.dim)
            rows = np.repeat(np.arange(len(chunk)), [len(h) for h in hashes])
            flat = np.bincount(rows * self.dim + index, weights=sign, minlength=len(chunk) * self.dim)
            block = flat.reshape(len(chunk), self.dim)
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            out[start : start + len(chunk)] = block / np.where(norms > 0, norms, 1.0)
        return out

    __call__ = embed


def _text(messages: Sequence[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


@dataclass
class Part:
    """The hashed words of one part (conversation, chosen or rejected) of a batch of pairs, flattened."""

    owner: np.ndarray
    """Which pair of the batch each word belongs to."""
    index: np.ndarray
    sign: np.ndarray
    count: np.ndarray
    """Words per pair."""

    @classmethod
    def of(cls, texts: list[str], dim: int) -> Part:
        hashes = [word_hashes(t) for t in texts]
        count = np.array([len(h) for h in hashes], dtype=np.int64)
        index, sign = buckets_and_signs(np.concatenate(hashes) if hashes else np.zeros(0, np.uint64), dim)
        return cls(np.repeat(np.arange(len(texts)), count), index, sign, count)

    def dot(self, w: np.ndarray, n: int) -> np.ndarray:
        """Per pair: the sum of w over its words' signed buckets."""
        return np.bincount(self.owner, weights=w[self.index] * self.sign, minlength=n)

    def scatter(self, coef: np.ndarray, dim: int) -> np.ndarray:
        """Sum over words of coef[owner] * sign into its bucket: this part's share of a gradient."""
        return np.bincount(self.index, weights=coef[self.owner] * self.sign, minlength=dim)


@dataclass
class Batch:
    """A batch of pairs as hashed features: phi(x, y) = (words of x + words of y) / sqrt(their count)."""

    conversation: Part
    chosen: Part
    rejected: Part

    @classmethod
    def of(cls, pairs: Sequence[Pair], dim: int) -> Batch:
        return cls(
            Part.of([_text(p["conversation"]) for p in pairs], dim),
            Part.of([_text(p["chosen"]) for p in pairs], dim),
            Part.of([_text(p["rejected"]) for p in pairs], dim),
        )

    def __len__(self) -> int:
        return len(self.conversation.count)

    def scales(self) -> tuple[np.ndarray, np.ndarray]:
        """1/sqrt(word count) of (x, chosen) and of (x, rejected), per pair."""
        x = self.conversation.count
        return 1.0 / np.sqrt(np.maximum(1, x + self.chosen.count)), 1.0 / np.sqrt(
            np.maximum(1, x + self.rejected.count)
        )

    def rewards(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(reward of chosen, reward of rejected) per pair."""
        n = len(self)
        sc, sr = self.scales()
        x = self.conversation.dot(w, n)
        return (x + self.chosen.dot(w, n)) * sc, (x + self.rejected.dot(w, n)) * sr

    def gradient(self, w: np.ndarray) -> tuple[np.ndarray, float]:
        """Gradient of the mean Bradley–Terry loss over the batch, and that loss."""
        n, dim = len(self), len(w)
        rc, rr = self.rewards(w)
        margin = rc - rr
        loss = float(np.mean(np.logaddexp(0.0, -margin)))
        d_margin = -1.0 / (1.0 + np.exp(margin)) / n  # d loss / d margin, per pair
        sc, sr = self.scales()
        grad = self.conversation.scatter(d_margin * (sc - sr), dim)
        grad += self.chosen.scatter(d_margin * sc, dim)
        grad -= self.rejected.scatter(d_margin * sr, dim)
        return grad, loss


def batches(pairs: Sequence[Pair], size: int) -> Iterator[Sequence[Pair]]:
    """Consecutive slices of `pairs` (a list or a lazy sequence: only len() and slicing are used)."""
    for start in range(0, len(pairs), size):
        yield pairs[start : start + size]


class HashedModels:
    """RewardModels: a Bradley–Terry linear model over hashed features of (conversation + response); see the module.

    Args:
        dim: hash buckets (weights).
        epochs: passes over the training pairs (the checkpoint with the best validation accuracy is kept when
            there are validation pairs, else the last).
        batch: pairs per Adam step, and per scoring slice.
        lr, weight_decay: Adam's step size and L2 penalty.
        seed: orders the training batches; the same seed and pairs give the same weights.
    """

    def __init__(
        self,
        dim: int = RM_DIM,
        epochs: int = 2,
        batch: int = 4096,
        lr: float = 0.05,
        weight_decay: float = 1e-6,
        seed: int = 0,
    ) -> None:
        self.dim = dim
        self.epochs = epochs
        self.batch = batch
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed
        self._weights: dict[tuple[str, str], np.ndarray] = {}
        """Loaded weights by (file, version) (the in-process executor scores 64 pairs a call); a few, newest last."""

    def weights(self, handle: ModelHandle) -> np.ndarray:
        """The handle's weights, read once and kept for the last few handles scored."""
        key = (handle.path, handle.version)
        w = self._weights.pop(key, None)
        if w is None:
            w = np.load(handle.path)["w"]
        self._weights[key] = w
        while len(self._weights) > 4:
            del self._weights[next(iter(self._weights))]
        return w

    def train(self, name: str, train: Sequence[Pair], valid: Sequence[Pair], out_dir: Path) -> ModelHandle:
        """Train on `train` (checkpoint chosen on `valid` when it is not empty); saves `<name>.npz` in out_dir."""
        w = np.zeros(self.dim)
        m, v = np.zeros(self.dim), np.zeros(self.dim)
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        rng = np.random.default_rng(self.seed)
        starts = np.arange(0, len(train), self.batch)
        step, losses = 0, []
        best: tuple[float, int, np.ndarray] = (-1.0, 0, w.copy())
        for epoch in range(1, self.epochs + 1):
            epoch_loss = 0.0
            for start in rng.permutation(starts):
                grad, loss = Batch.of(train[start : start + self.batch], self.dim).gradient(w)
                epoch_loss += loss
                grad += self.weight_decay * w
                step += 1
                m = beta1 * m + (1 - beta1) * grad
                v = beta2 * v + (1 - beta2) * grad * grad
                w -= self.lr * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + eps)
            losses.append(epoch_loss / max(1, len(starts)))
            if len(valid):
                acc = self._accuracy(w, valid)
                if acc > best[0]:
                    best = (acc, epoch, w.copy())
        metrics: dict[str, Any] = {"train_pairs": len(train), "epochs": self.epochs, "train_loss": losses}
        if len(valid):
            metrics["valid_accuracy"], metrics["picked_epoch"], w = best
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.npz"
        save_npz(path, w=w)
        digest = hashlib.sha256(w.tobytes()).hexdigest()[:10]
        return ModelHandle(name, str(path), f"{name}-{digest}", metrics)

    def _accuracy(self, w: np.ndarray, pairs: Sequence[Pair]) -> float:
        right = 0
        for chunk in batches(pairs, self.batch):
            rc, rr = Batch.of(chunk, self.dim).rewards(w)
            right += int(np.sum(rc > rr))
        return right / len(pairs)

    def score(self, handle: ModelHandle, pairs: Sequence[Pair]) -> list[tuple[float, float]]:
        """(reward_chosen, reward_rejected) per pair, computed a batch at a time."""
        w = self.weights(handle)
        out: list[tuple[float, float]] = []
        for chunk in batches(pairs, self.batch):
            rc, rr = Batch.of(chunk, self.dim).rewards(w)
            out.extend(zip(rc.tolist(), rr.tolist(), strict=True))
        return out

    def export(self, handle: ModelHandle, out_dir: Path) -> Path:
        """out_dir with the weights (hashed_rm.npz) and what they are (hashed_rm.json); not an HF checkpoint."""
        out_dir.mkdir(parents=True, exist_ok=True)
        save_npz(out_dir / "hashed_rm.npz", w=self.weights(handle))
        about = {
            "kind": "hashed-feature Bradley-Terry linear RM (benchmark stand-in, testing/hashed.py)",
            "name": handle.name,
            "version": handle.version,
            "dim": self.dim,
        }
        (out_dir / "hashed_rm.json").write_text(json.dumps(about, indent=1))
        return out_dir
