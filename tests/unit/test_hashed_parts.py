"""The named cheap parts of the scale benchmark (testing/hashed.py): they must be deterministic, learn, and
touch the pairs they are given only in batches."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pytest

from testing import REPO_ROOT
from testing.controller_fakes import BAD, GOOD, TOPICS
from testing.hashed import HashedEmbedder, HashedModels

Pair = dict[str, Any]


def toy_pairs(n: int, seed: int = 0) -> list[Pair]:
    """Separable pairs: the chosen response uses GOOD words, the rejected one BAD words, same topic and filler."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        filler = " ".join(rng.choice(TOPICS, 4))
        pairs.append(
            {
                "conversation": [{"role": "user", "content": f"question {i}: tell me about {topic}"}],
                "chosen": [{"role": "assistant", "content": f"{' '.join(rng.choice(GOOD, 3))} {topic} {filler}"}],
                "rejected": [{"role": "assistant", "content": f"{' '.join(rng.choice(BAD, 3))} {topic} {filler}"}],
            }
        )
    return pairs


class LazyPairs(Sequence[Pair]):
    """A sequence that only allows len() and slices (as the PairStore's lazy views), recording the largest slice."""

    def __init__(self, pairs: list[Pair]) -> None:
        self.pairs = pairs
        self.largest_slice = 0

    def __len__(self) -> int:
        return len(self.pairs)

    @overload
    def __getitem__(self, index: int) -> Pair: ...
    @overload
    def __getitem__(self, index: slice) -> list[Pair]: ...
    def __getitem__(self, index: int | slice) -> Pair | list[Pair]:
        if not isinstance(index, slice):
            raise AssertionError("the model indexed one pair at a time")
        chunk = self.pairs[index]
        self.largest_slice = max(self.largest_slice, len(chunk))
        return chunk

    def __iter__(self) -> Iterator[Pair]:
        raise AssertionError("the model iterated over the whole sequence (list(...) or for)")


# ---------------------------------------------------------------- embedder


def test_embedder_rows_are_unit_float32_and_words_decide_similarity() -> None:
    e = HashedEmbedder()
    v = e.embed(["the river flows to the sea", "the river flows to the ocean", "chess openings for beginners", ""])
    assert v.shape == (4, 384) and v.dtype == np.float32 and e.dim == 384
    assert np.allclose(np.linalg.norm(v[:3], axis=1), 1.0, atol=1e-6)
    assert not v[3].any()  # no words: the zero vector, not NaN
    assert v[0] @ v[1] > 0.5 > abs(float(v[0] @ v[2]))


def test_embedder_bigrams_tell_word_order_apart() -> None:
    v = HashedEmbedder().embed(["dog bites man", "man bites dog"])
    assert v[0] @ v[1] < 0.99


def test_embedder_is_the_same_in_another_process_with_another_hash_seed() -> None:
    texts = ["Hello world, it's a test", "Ünïcödé wörds and numbers 42"]
    here = HashedEmbedder().embed(texts)
    code = (
        "import sys, numpy as np; from testing.hashed import HashedEmbedder;"
        f"np.save(sys.stdout.buffer, HashedEmbedder().embed({texts!r}))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout
    import io

    assert np.array_equal(np.load(io.BytesIO(out)), here)


def test_embedder_batches_give_the_same_rows() -> None:
    texts = [f"text number {i} about {TOPICS[i % len(TOPICS)]}" for i in range(50)]
    assert np.array_equal(HashedEmbedder(batch=7).embed(texts), HashedEmbedder(batch=1000).embed(texts))


# ---------------------------------------------------------------- reward model


def test_model_learns_a_separable_toy_from_lazy_batches(tmp_path: Path) -> None:
    train, valid = LazyPairs(toy_pairs(600, seed=1)), LazyPairs(toy_pairs(200, seed=2))
    models = HashedModels(dim=1 << 12, epochs=3, batch=64, lr=0.05)
    handle = models.train("working-1", train, valid, tmp_path)
    assert handle.metrics["valid_accuracy"] >= 0.95
    assert train.largest_slice <= 64 and valid.largest_slice <= 64
    assert Path(handle.path) == tmp_path / "working-1.npz" and handle.version.startswith("working-1-")
    rewards = models.score(handle, LazyPairs(toy_pairs(100, seed=3)))
    assert np.mean([c > r for c, r in rewards]) >= 0.95


def test_untrained_model_is_at_chance_and_metrics_skip_valid_when_empty(tmp_path: Path) -> None:
    models = HashedModels(dim=1 << 12, epochs=0)
    handle = models.train("gold", toy_pairs(50), [], tmp_path)
    assert "valid_accuracy" not in handle.metrics
    assert all(c == r == 0.0 for c, r in models.score(handle, toy_pairs(10)))


def test_model_is_deterministic_given_the_seed(tmp_path: Path) -> None:
    pairs = toy_pairs(300)
    a = HashedModels(dim=1 << 12, batch=32, seed=7).train("a", pairs, [], tmp_path / "a")
    b = HashedModels(dim=1 << 12, batch=32, seed=7).train("a", pairs, [], tmp_path / "b")
    c = HashedModels(dim=1 << 12, batch=32, seed=8).train("a", pairs, [], tmp_path / "c")
    assert a.version == b.version != c.version  # the seed orders the batches
    assert np.array_equal(np.load(a.path)["w"], np.load(b.path)["w"])


def test_batched_scoring_equals_unbatched(tmp_path: Path) -> None:
    pairs = toy_pairs(101)
    handle = HashedModels(dim=1 << 12, batch=16).train("m", pairs, [], tmp_path)
    small = HashedModels(dim=1 << 12, batch=7).score(handle, pairs)
    whole = HashedModels(dim=1 << 12, batch=1000).score(handle, pairs)
    one_by_one = [HashedModels(dim=1 << 12).score(handle, [p])[0] for p in pairs]
    assert len(small) == 101
    assert np.allclose(small, whole, rtol=1e-12, atol=1e-12)
    assert np.allclose(small, one_by_one, rtol=1e-12, atol=1e-12)


def test_reward_depends_on_the_conversation_only_through_the_length_scale(tmp_path: Path) -> None:
    # phi(x, y) = (words of x + words of y) / sqrt(count): a chosen and rejected of equal length share the
    # conversation's contribution, so swapping the two responses exactly negates the margin.
    pairs = toy_pairs(200)
    models = HashedModels(dim=1 << 12, batch=50)
    handle = models.train("m", pairs, [], tmp_path)
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    for (c, r), (c2, r2) in zip(models.score(handle, pairs), models.score(handle, swapped), strict=True):
        assert (c, r) == pytest.approx((r2, c2))


def test_export_writes_weights_and_what_they_are(tmp_path: Path) -> None:
    models = HashedModels(dim=1 << 10)
    handle = models.train("final", toy_pairs(40), [], tmp_path / "models")
    out = models.export(handle, tmp_path / "registry" / handle.version)
    assert np.array_equal(np.load(out / "hashed_rm.npz")["w"], np.load(handle.path)["w"])
    assert handle.version in (out / "hashed_rm.json").read_text()
