"""The in-process loop reuses the vectors prepare wrote for the texts it embedded, never for another text.

Before, every pair the in-process annotator judged was embedded again (one encoder forward each, a batch of one),
and every rewrite of the judges' example index embedded all of D_gold again: the demo spent ~10 s of its minute
on forwards whose results were on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synpref.services.controller.embeddings import embed_pool, retrieval_text
from synpref.services.controller.known_vectors import KnownVectors
from synpref.shared.ann import TextDigests, VectorFile
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.pairstore import PairStore
from synpref.v1.pair_pb2 import PairRecord
from testing import controller_fakes as fakes
from tests.unit.test_controller_loop import controller_for, settings_for


class CountingEmbed:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.texts.extend(texts)
        return fakes.embed(texts)


def records(n: int) -> list[PairRecord]:
    return [
        new_record(
            new_pair(
                [{"role": "user", "content": f"question {i} about topic {i % 7}"}],
                [{"role": "assistant", "content": f"good answer {i}"}],
                [{"role": "assistant", "content": f"bad answer {i}"}],
                source="unit",
            )
        )
        for i in range(n)
    ]


def prepared(tmp_path: Path, n: int = 12) -> tuple[PairStore, VectorFile, list[int], list[PairRecord]]:
    store = PairStore(tmp_path / "pairs.sqlite")
    store.add((r.pair.id, "unverified", r) for r in records(n))
    vectors = embed_pool(store, tmp_path / "vectors.f16", ("unverified",), fakes.embed, lambda _m: None)
    rows = store.rows("unverified")
    return store, vectors, rows, store.get(rows)


def test_noted_rows_are_read_not_embedded_and_each_is_used_once(tmp_path: Path) -> None:
    store, vectors, rows, recs = prepared(tmp_path)
    embed = CountingEmbed()
    known = KnownVectors(lambda: vectors, embed)
    known.note(rows[:4], recs[:4])
    texts = [retrieval_text(r) for r in recs[:6]]
    out = known.embed(texts)
    assert embed.texts == texts[4:]  # only the two not noted
    assert known.reused == 4
    np.testing.assert_allclose(out[:4], vectors.read(rows[:4]))
    np.testing.assert_allclose(out, fakes.embed(texts), atol=2e-3)  # float16 on disk
    assert known.embed(texts[:1]).shape == (1, vectors.dim) and embed.texts[-1] == texts[0]  # used once
    store.close()


def test_a_record_whose_text_changed_since_prepare_is_embedded_again(tmp_path: Path) -> None:
    store, vectors, rows, recs = prepared(tmp_path)
    changed = recs[0]
    changed.attributes.task_category = "coding"  # the labeller named it after prepare: another text
    embed = CountingEmbed()
    known = KnownVectors(lambda: vectors, embed)
    known.note(rows[:1], [changed])
    text = retrieval_text(changed)
    np.testing.assert_allclose(known.embed([text]), fakes.embed([text]))
    assert embed.texts == [text] and known.reused == 0
    store.close()


def test_a_vector_file_without_digests_is_never_read_for_reuse(tmp_path: Path) -> None:
    store, vectors, rows, recs = prepared(tmp_path)
    Path(str(vectors.path) + ".digests").unlink()  # a workdir prepared before digests were written
    embed = CountingEmbed()
    known = KnownVectors(lambda: vectors, embed)
    known.note(rows[:3], recs[:3])
    texts = [retrieval_text(r) for r in recs[:3]]
    known.embed(texts)
    assert embed.texts == texts and known.reused == 0
    assert TextDigests.beside(vectors) is None
    store.close()


def test_the_loop_embeds_after_prepare_only_what_it_has_no_vector_for(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    controller = controller_for(settings)
    embed = CountingEmbed()
    after_prepare: list[int] = []
    controller.embed = embed
    controller.on_step = lambda name: after_prepare.append(len(embed.texts)) if name == "prepare" else None
    controller.run()
    (prepared_texts,) = after_prepare
    later = len(embed.texts) - prepared_texts
    # The judges' example lookups and the example index read prepare's vectors: hundreds of texts before.
    assert controller.known.reused > 100
    assert later <= controller.known.reused // 10, (later, controller.known.reused)
