"""The token cache encoded in worker processes: the same stores, in the same order, as one process makes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synpref.shared.cpus import allowed_cpus, usable_cpu_count
from synpref.training import data_cache, parallel_encoding
from synpref.training.parallel_encoding import PairEncoding, resolve_workers
from synpref.training.reward_config import RewardConfig
from testing.tiny import build_tiny_tokenizer
from tests.unit.test_train_token_store import make_pairs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [m["content"] for p in make_pairs(40) for part in ("conversation", "chosen", "rejected") for m in p[part]]
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), texts, vocab_size=300)


def write_rows(path, pairs, bad_every: int) -> None:
    with open(path, "w") as fh:
        for i, pair in enumerate(pairs):
            fh.write("{not json\n" if i % bad_every == 5 else json.dumps(pair) + "\n")


def store_arrays(store) -> dict[str, list]:
    return {name: np.asarray(getattr(store, name)).tolist() for name in ("ids", *data_cache.token_store.ARRAYS)}


@pytest.mark.parametrize("eval_fraction", [0.0, 0.25])
def test_workers_build_the_cache_one_process_builds(tokenizer, tmp_path, monkeypatch, eval_fraction):
    # 0.6 ms a pair in one process is ~7 hours at 40M pairs before the first step; the cache's ids must not
    # depend on how many processes made them (its key does not name the count).
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_rows(train, make_pairs(300), bad_every=37)
    write_rows(evals, make_pairs(70)[::-1], bad_every=1000)
    monkeypatch.setattr(parallel_encoding, "INLINE_PAIRS", 20)
    monkeypatch.setattr(parallel_encoding, "CHUNK_PAIRS", 7)
    built = {}
    for workers in (1, 2):
        cfg = RewardConfig(
            train_files=[str(train)],
            eval_files=[] if eval_fraction else [str(evals)],
            eval_fraction=eval_fraction,
            max_length=64,
            margin_column="weight",
            encode_workers=workers,
        )
        got = data_cache.prepare_data(cfg, tokenizer, tmp_path / f"out{workers}")
        built[workers] = (got.report, store_arrays(got.train.pairs), store_arrays(got.eval.pairs))
    assert built[1] == built[2]
    report = built[2][0]
    assert report["unreadable_rows"] == 8 and report["train_unfit"] > 0 and report["eval_pairs"] > 0


def test_rows_come_back_in_input_order_with_unreadable_ones_in_place(tokenizer, monkeypatch):
    monkeypatch.setattr(parallel_encoding, "INLINE_PAIRS", 3)
    monkeypatch.setattr(parallel_encoding, "CHUNK_PAIRS", 4)
    pairs = make_pairs(40)
    rows = [None if i % 9 == 4 else pair for i, pair in enumerate(pairs)]
    with PairEncoding(tokenizer, 64, "left_turns", workers=2) as encoding:
        got = list(encoding.map(rows))
        again = list(encoding.map(rows[:10]))  # a second input on the started workers
        assert encoding.pool is not None
    assert encoding.pool is None
    assert [row for row, _ in got] == rows and [row for row, _ in again] == rows[:10]
    for row, sides in got:
        assert (sides is None) == (row is None)
        if row is not None:
            want = parallel_encoding.encode_pair(tokenizer, row, 64, "left_turns")
            assert [s.input_ids for s in sides] == [s.input_ids for s in want]  # type: ignore[union-attr]


def test_a_small_input_starts_no_worker(tokenizer):
    with PairEncoding(tokenizer, 64, "left_turns", workers=4) as encoding:
        assert len(list(encoding.map(make_pairs(50)))) == 50
        assert encoding.pool is None


def test_a_pair_that_fails_in_a_worker_fails_the_build(tokenizer, monkeypatch):
    monkeypatch.setattr(parallel_encoding, "INLINE_PAIRS", 2)
    rows = make_pairs(12)
    del rows[9]["chosen"]
    with PairEncoding(tokenizer, 64, "left_turns", workers=2) as encoding, pytest.raises(KeyError, match="chosen"):
        list(encoding.map(rows))


def test_worker_count_follows_the_cpu_quota(tmp_path):
    assert resolve_workers(3) == 3
    assert resolve_workers(0) == min(usable_cpu_count(), parallel_encoding.AUTO_MAX_WORKERS)
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a pod limited to 1.5 CPUs
    assert usable_cpu_count(str(tmp_path)) == min(2, len(allowed_cpus()))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpu_count(str(tmp_path)) == len(allowed_cpus())
    assert usable_cpu_count(str(tmp_path / "missing")) == len(allowed_cpus())
    with pytest.raises(ValueError, match="encode_workers"):
        RewardConfig(encode_workers=-1)


class KillsTheWorker:
    """Unpickled in a worker, ends it (as the OOM killer would); encoding never reads it."""

    def __reduce__(self):
        import os

        return (os._exit, (1,))


def test_a_worker_that_dies_loses_no_pair(tokenizer, monkeypatch):
    monkeypatch.setattr(parallel_encoding, "INLINE_PAIRS", 2)
    monkeypatch.setattr(parallel_encoding, "CHUNK_PAIRS", 3)
    rows = make_pairs(30)
    rows[17] = {**rows[17], "meta": KillsTheWorker()}
    with PairEncoding(tokenizer, 64, "left_turns", workers=2) as encoding:
        got = list(encoding.map(rows))
        assert encoding.workers == 1 and encoding.pool is None
    assert [row for row, _ in got] == rows
    want = [parallel_encoding.encode_pair(tokenizer, row, 64, "left_turns") for row in rows]
    assert [[s.input_ids for s in sides] for _, sides in got] == [[s.input_ids for s in w] for w in want]
