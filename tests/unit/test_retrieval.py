"""Retrieval: the k rule, MiniLM embeddings, a FAISS index that persists and grows."""

from __future__ import annotations

import numpy as np
import pytest

from synpref.shared.retrieval import Embedder, PairRetriever, VectorIndex, k_rule
from testing.numerics import FP32_EPS

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(("p", "k"), [(0.0, 8), (0.5, 8), (0.51, 4), (0.75, 2), (0.9, 1), (0.99, 1), (1.0, 0)])
def test_k_rule(p, k):
    assert k_rule(p) == k


def test_vector_index_persists_grows_and_skips_known_ids(tmp_path):
    index = VectorIndex(3)
    eye = np.eye(3, dtype=np.float32)
    assert index.add(["a", "b"], eye[:2], [{"x": 1}, None]) == 2
    assert index.add(["b", "c"], eye[1:]) == 1
    assert index.search(eye[2:], 2)[0][0] == ("c", 1.0)  # products of 0s and 1s: exact in fp32
    index.save(tmp_path)
    loaded = VectorIndex.load(tmp_path)
    assert len(loaded) == 3 and loaded.payload("a") == {"x": 1}
    loaded.add(["d"], np.array([[0.6, 0.8, 0.0]], dtype=np.float32))
    hits = loaded.search(np.array([[0.0, 1.0, 0.0]], dtype=np.float32), 2)[0]
    assert [h[0] for h in hits] == ["b", "d"]
    assert hits[1][1] == float(np.float32(0.8))  # 1 * 0.8f plus exact zeros, in any order
    assert loaded.search(eye[:1], 0) == [[]]


@pytest.fixture(scope="module")
def embedder():
    torch.set_num_threads(1)
    return Embedder(batch_size=8)


def conv(text):
    return [{"role": "user", "content": text}]


def test_minilm_retrieval_finds_the_similar_topic(embedder, tmp_path):
    vectors = embedder.embed(["hello world", "a much longer sentence about cooking pasta"])
    assert vectors.shape == (2, 384)
    # fp32 normalize: a 384-term sum of squares errs by at most 384 roundings (gamma_n, each
    # FP32_EPS / 2), the square root halves that and each divided component rounds once:
    # about (384 / 4 + 1) * FP32_EPS at worst; allow twice that. Checked in fp64.
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    assert np.abs(norms - 1.0).max() <= (384 / 2 + 2) * FP32_EPS
    retriever = PairRetriever(embedder, folder=tmp_path / "idx")
    items = [
        {"id": "py", "conversation": conv("How do I reverse a list in Python?"),
         "attributes": {"task_category": "coding"}, "preferred": "Use reversed() or slicing.",
         "dispreferred": "You cannot."},
        {"id": "cake", "conversation": conv("Give me a recipe for chocolate cake."), "preferred": "Mix...",
         "dispreferred": "No."},
        {"id": "tide", "conversation": conv("Why does the ocean have tides?"), "preferred": "The moon.",
         "dispreferred": "Wind."},
    ]  # fmt: skip
    keys = ("conversation", "attributes", "preferred", "dispreferred")
    assert retriever.add(items, payload_keys=keys) == 3
    assert retriever.add(items[:1], payload_keys=keys) == 0
    retriever.save()
    reopened = PairRetriever(embedder, folder=tmp_path / "idx")
    (hits,) = reopened.query([conv("How can I sort a Python list backwards?")], [{"task_category": "coding"}], [2])
    assert hits[0][0] == "py" and len(hits) == 2
    examples = reopened.examples(conv("baking a chocolate dessert"), {}, 1)
    assert [e.id for e in examples] == ["cake"] and examples[0].preferred == "Mix..."


def test_gold_records_become_judge_examples(embedder):
    from synpref.shared.pairs import new_pair, new_record
    from synpref.shared.retrieval import EXAMPLE_KEYS, record_item

    record = new_record(new_pair(conv("Is the earth flat?"), [{"role": "assistant", "content": "No, it is round."}],
                                 [{"role": "assistant", "content": "Yes."}], "gold"))  # fmt: skip
    record.attributes.task_category = "science"
    record.attributes.annotation_guideline = "Prefer facts."
    retriever = PairRetriever(embedder)
    retriever.add([record_item(record)], EXAMPLE_KEYS)
    (example,) = retriever.examples(conv("What shape is the earth?"), {}, 3)
    assert example.id == record.pair.id and example.preferred == "No, it is round." and example.dispreferred == "Yes."
    assert example.attributes["annotation_guideline"] == "Prefer facts."
