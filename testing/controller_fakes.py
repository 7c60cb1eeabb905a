"""Small, real stand-ins for tests: a bag-of-words Bradley–Terry RM and a hashing embedder.

They implement the same interfaces as the real pieces (RewardModels, an embed function)
and really learn, so a loop test can fail; they only trade quality for milliseconds.
Also: synthetic pairs whose better response is recognisable by its words.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from synpref.services.controller.models import ModelHandle, save_npz

DIM = 256
_WORD = re.compile(r"\w+")


def hashed_bow(text: str, dim: int = DIM) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    for word in _WORD.findall(text.lower()):
        v[int(hashlib.md5(word.encode()).hexdigest()[:8], 16) % dim] += 1.0
    n = np.linalg.norm(v)
    return v / n if n else v


def embed(texts: list[str]) -> np.ndarray:
    """Normalized hashed bag of words: a retrieval embedder for tests."""
    return np.stack([hashed_bow(t) for t in texts]) if texts else np.zeros((0, DIM), dtype=np.float32)


def _response(pair: dict, side: str) -> np.ndarray:
    return hashed_bow(" ".join(m["content"] for m in pair[side]))


class BagOfWordsModels:
    """RewardModels: linear BT model on hashed response words, full-batch gradient descent."""

    def __init__(self, steps: int = 200, lr: float = 0.5) -> None:
        self.steps = steps
        self.lr = lr
        self.trained = 0

    def train(self, name: str, train: list[dict], valid: list[dict], out_dir: Path) -> ModelHandle:
        self.trained += 1
        w = np.zeros(DIM, dtype=np.float64)
        if train:
            d = np.stack([_response(p, "chosen") - _response(p, "rejected") for p in train])
            for _ in range(self.steps):
                z = d @ w
                grad = -(d * (1.0 / (1.0 + np.exp(z)))[:, None]).mean(0)
                w -= self.lr * grad
        path = out_dir / f"{name}.npz"
        save_npz(path, w=w)
        digest = hashlib.sha256(w.tobytes()).hexdigest()[:10]
        handle = ModelHandle(name, str(path), f"{name}-{digest}")
        if valid:
            rewards = self.score(handle, valid)
            handle.metrics["valid_accuracy"] = float(np.mean([c > r for c, r in rewards]))
        return handle

    def score(self, handle: ModelHandle, pairs: list[dict]) -> list[tuple[float, float]]:
        w = np.load(handle.path)["w"]
        return [(float(_response(p, "chosen") @ w), float(_response(p, "rejected") @ w)) for p in pairs]

    def export(self, handle: ModelHandle, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bow_model.json").write_text(json.dumps({"weights": np.load(handle.path)["w"].tolist()}))
        return out_dir


GOOD = ["correct", "clear", "helpful", "accurate", "precise", "thorough", "polite", "relevant"]
BAD = ["wrong", "vague", "rude", "irrelevant", "sloppy", "confusing", "false", "lazy"]
TOPICS = ["rivers", "stars", "bread", "chess", "taxes", "birds", "python", "music", "tea", "trains"]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Pairs whose chosen response uses GOOD words and rejected BAD words, over a few topics."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        filler = " ".join(rng.choice(TOPICS) for _ in range(3))
        good = " ".join(rng.sample(GOOD, 3))
        bad = " ".join(rng.sample(BAD, 3))
        rows.append(
            {
                "prompt": f"Question {i} about {topic}: tell me about {topic} please",
                "chosen": f"A {good} answer about {topic} {filler}",
                "rejected": f"A {bad} answer about {topic} {filler}",
            }
        )
    return rows


def write_synthetic(path: Path, n: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(n, seed)))
    return path
