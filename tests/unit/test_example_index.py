"""The judges' example index: written whole by the loop, re-read by every annotator on each call."""

from __future__ import annotations

import hashlib
import re
import threading

import numpy as np

from synpref.shared.examples import CURRENT_FILE, VERSION_PREFIX, ReloadingExamples, write_example_index
from synpref.shared.pairs import message_dicts, new_pair, new_record
from synpref.shared.retrieval import EXAMPLE_KEYS, ITEMS_FILE, VectorIndex, attributes_dict, pair_text
from synpref.v1.pair_pb2 import OBJECTIVITY_OBJECTIVE, PairRecord

DIM = 256


def fake_hashed_bow_embed(texts: list[str]) -> np.ndarray:
    """Test fake for a sentence encoder: a normalised bag of words, each word hashed to one of DIM rows."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in re.findall(r"[a-z]+", text.lower()):
            out[i, int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little") % DIM] += 1.0
        norm = np.linalg.norm(out[i])
        if norm > 0:
            out[i] /= norm
    return out


def record(question: str, good: str, bad: str, category: str = "") -> PairRecord:
    r = new_record(new_pair([{"role": "user", "content": question}], [{"role": "assistant", "content": good}],
                            [{"role": "assistant", "content": bad}], "gold"))  # fmt: skip
    if category:
        r.attributes.task_category = category
        r.attributes.objectivity = OBJECTIVITY_OBJECTIVE
        r.attributes.desired_attributes.extend(["correct", "concise"])
        r.attributes.annotation_guideline = "Prefer the answer that runs."
    return r


PYTHON = record("How do I reverse a list in Python?", "Use reversed() or slicing.", "You cannot.", "coding")
CAKE = record("Give me a recipe for chocolate cake.", "Mix flour, cocoa and eggs.", "No.")
TIDES = record("Why does the ocean have tides?", "The moon pulls the water.", "Wind.")
BIKE = record("How do I fix a flat bicycle tire?", "Patch the inner tube.", "Buy a car.")
SOUP = record("What is a good tomato soup recipe?", "Roast tomatoes, then blend.", "Open a can.")
FIRST = [PYTHON, CAKE, TIDES]
SECOND = [PYTHON, CAKE, TIDES, BIKE, SOUP]


def conv(text):
    return [{"role": "user", "content": text}]


def ids(records):
    return {r.pair.id for r in records}


def versions(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(VERSION_PREFIX))


def test_written_index_gives_the_nearest_examples_with_their_payloads(tmp_path):
    assert write_example_index(tmp_path / "gold", [*FIRST, CAKE], fake_hashed_bow_embed, DIM) == 3  # CAKE once
    source = ReloadingExamples(tmp_path / "gold", fake_hashed_bow_embed)
    (example,) = source.examples(conv("reverse a Python list"), {"task_category": "coding"}, 1)
    assert example.id == PYTHON.pair.id
    assert example.conversation == conv("How do I reverse a list in Python?")
    assert (example.preferred, example.dispreferred) == ("Use reversed() or slicing.", "You cannot.")
    assert example.attributes == attributes_dict(PYTHON.attributes)
    assert example.attributes["objectivity"] == "objective"
    assert example.attributes["desired_attributes"] == ["correct", "concise"]
    nearest = source.examples(conv("a chocolate cake recipe please"), {}, 3)
    assert nearest[0].id == CAKE.pair.id and {e.id for e in nearest} == ids(FIRST)
    assert nearest[0].attributes == {}  # a record without a task category shows none
    assert source.examples(conv("tides"), {}, 0) == []


def test_each_vector_embeds_the_conversation_and_attributes_and_each_payload_is_an_example(tmp_path):
    write_example_index(tmp_path, FIRST, fake_hashed_bow_embed, DIM)
    index = VectorIndex.load(tmp_path / (tmp_path / CURRENT_FILE).read_text().strip())
    assert index.ids == [r.pair.id for r in FIRST]
    for row, r in enumerate(FIRST):
        attributes = attributes_dict(r.attributes) if r.attributes.task_category else None
        expected = fake_hashed_bow_embed([pair_text(message_dicts(r.pair.conversation), attributes)])[0]
        assert np.array_equal(index.index.reconstruct(row), expected)
        assert list(index.payload(r.pair.id)) == list(EXAMPLE_KEYS)
    assert "category: coding" in pair_text(conv("q"), attributes_dict(PYTHON.attributes))


def test_the_same_source_sees_each_rewrite(tmp_path):
    folder = tmp_path / "gold"
    write_example_index(folder, FIRST, fake_hashed_bow_embed, DIM)
    source = ReloadingExamples(folder, fake_hashed_bow_embed)
    assert {e.id for e in source.examples(conv("bicycle tire"), {}, 10)} == ids(FIRST)
    assert write_example_index(folder, SECOND, fake_hashed_bow_embed, DIM) == 5
    after = source.examples(conv("fix a flat bicycle tire"), {}, 10)
    assert after[0].id == BIKE.pair.id and {e.id for e in after} == ids(SECOND)
    write_example_index(folder, [SOUP], fake_hashed_bow_embed, DIM)
    assert [e.id for e in source.examples(conv("bicycle tire"), {}, 10)] == [SOUP.pair.id]
    assert len(versions(folder)) == 2  # the live one and the one before it; older ones are removed


def test_no_index_gives_no_examples_until_one_is_written(tmp_path):
    folder = tmp_path / "gold"
    source = ReloadingExamples(folder, fake_hashed_bow_embed)
    assert source.examples(conv("cake"), {}, 8) == []
    folder.mkdir()
    assert source.examples(conv("cake"), {}, 8) == []
    assert write_example_index(folder, [], fake_hashed_bow_embed, DIM) == 0
    assert source.examples(conv("cake"), {}, 8) == []
    write_example_index(folder, FIRST, fake_hashed_bow_embed, DIM)
    assert source.examples(conv("chocolate cake"), {}, 1)[0].id == CAKE.pair.id


def test_same_records_give_identical_files_and_no_reload(tmp_path):
    batches: list[int] = []

    def recording_embed(texts):
        batches.append(len(texts))
        return fake_hashed_bow_embed(texts)

    write_example_index(tmp_path / "a", SECOND, recording_embed, DIM, batch=2)
    assert batches == [2, 2, 1]
    write_example_index(tmp_path / "b", SECOND, fake_hashed_bow_embed, DIM)
    current = (tmp_path / "a" / CURRENT_FILE).read_text()
    assert current == (tmp_path / "b" / CURRENT_FILE).read_text()
    for name in ("index.faiss", ITEMS_FILE):
        assert (tmp_path / "a" / current.strip() / name).read_bytes() == (
            tmp_path / "b" / current.strip() / name
        ).read_bytes()
    source = ReloadingExamples(tmp_path / "a", fake_hashed_bow_embed)
    loaded = source.current_index()
    write_example_index(tmp_path / "a", SECOND, fake_hashed_bow_embed, DIM)
    assert source.current_index() is loaded and versions(tmp_path / "a") == [current.strip()]


def test_a_reader_whose_version_is_removed_while_it_loads_reads_the_pointer_again(tmp_path, monkeypatch):
    folder = tmp_path / "gold"
    write_example_index(folder, FIRST, fake_hashed_bow_embed, DIM)
    source = ReloadingExamples(folder, fake_hashed_bow_embed)
    real_load = VectorIndex.load
    writes_during_load = [[BIKE], SECOND]

    def load_racing_two_writes(path):
        # The reader has read CURRENT; two writes land before it opens the files, the second removing them.
        while writes_during_load:
            write_example_index(folder, writes_during_load.pop(0), fake_hashed_bow_embed, DIM)
        return real_load(path)

    monkeypatch.setattr(VectorIndex, "load", staticmethod(load_racing_two_writes))
    assert {e.id for e in source.examples(conv("tire"), {}, 10)} == ids(SECOND)


def test_concurrent_readers_see_whole_indexes_while_it_is_rewritten(tmp_path):
    folder = tmp_path / "gold"
    write_example_index(folder, FIRST, fake_hashed_bow_embed, DIM)
    source = ReloadingExamples(folder, fake_hashed_bow_embed)
    seen: list[frozenset[str]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read():
        try:
            while not done.is_set():
                seen.append(frozenset(e.id for e in source.examples(conv("soup recipe"), {}, 10)))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for i in range(12):
            write_example_index(folder, SECOND if i % 2 == 0 else FIRST, fake_hashed_bow_embed, DIM)
    finally:
        done.set()
        for t in readers:
            t.join(timeout=60)
    assert not errors and seen
    assert set(seen) <= {frozenset(ids(FIRST)), frozenset(ids(SECOND))}


def test_build_annotator_reads_the_examples_index_written_after_start_up(tmp_path, monkeypatch):
    import synpref.shared.retrieval as retrieval
    from synpref.services.annotator.main import build_annotator
    from synpref.shared.config import load_settings

    class FakeEmbedder:
        """Test fake for Embedder: the hashed bag of words, without loading a model."""

        def __init__(self, model_path=""):
            self.dim = DIM

        def embed(self, texts):
            return fake_hashed_bow_embed(list(texts))

    monkeypatch.setattr(retrieval, "Embedder", FakeEmbedder)
    folder = tmp_path / "gold"
    settings = load_settings(annotator={"examples_index": str(folder), "cache_dir": str(tmp_path / "cache")})
    annotator = build_annotator(settings)
    assert annotator.examples is not None and annotator.examples.examples(conv("cake"), {}, 8) == []
    write_example_index(folder, FIRST, fake_hashed_bow_embed, DIM)
    assert annotator.examples.examples(conv("chocolate cake"), {}, 1)[0].id == CAKE.pair.id
