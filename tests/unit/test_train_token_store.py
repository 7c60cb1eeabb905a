"""The trainer's encoded data: compact PairStores (4 bytes a token), streamed from files and cached."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from synpref.shared.modeling import encode_pair
from synpref.training import data_cache
from synpref.training.batching import encode_pairs
from synpref.training.data import load_pairs, split_pairs, write_jsonl
from synpref.training.data_cache import CACHE_DIR, prepare_data
from synpref.training.reward_config import RewardConfig
from synpref.training.token_store import PairEncoder, PairStore, pair_tokens, pair_widths
from testing.tiny import build_tiny_tokenizer

WORDS = ["apple", "river", "stone", "cloud", "music", "paper", "light", "green"]
MAX_LENGTH = 64


def make_pairs(n: int) -> list[dict]:
    """Pairs of 3-turn conversations (some shared by several pairs), a few too long, with margins."""
    out = []
    for i in range(n):
        words = " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 4 + i % 9))
        conv = [
            {"role": "user", "content": f"hello {i % 7}"},
            {"role": "assistant", "content": f"hi {WORDS[i % 7]}"},
            {"role": "user", "content": f"tell me about {words}"},
        ]
        rejected = f"no. {words}" + (" go away" * 60 if i % 11 == 0 else "")
        out.append(
            {
                "conversation": conv,
                "chosen": [{"role": "assistant", "content": f"gladly, {words[: 5 + i % 30]}"}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "source": ["a", "b", "c"][i % 3],
                "weight": (i % 5) / 4,
            }
        )
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [m["content"] for p in make_pairs(40) for part in ("conversation", "chosen", "rejected") for m in p[part]]
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), texts, vocab_size=300)


def assert_store_equals(store: PairStore, encoded: list) -> None:
    assert len(store) == len(encoded)
    for got, want in zip(store, encoded, strict=True):
        assert (got.chosen, got.rejected, got.margin) == (want.chosen, want.rejected, want.margin)
    assert list(store.widths) == [p.width for p in encoded]
    assert list(store.tokens) == [p.tokens for p in encoded]


@pytest.mark.parametrize("on_disk", [False, True])
def test_store_round_trips_every_sequence_and_is_4_bytes_a_token(tokenizer, tmp_path, on_disk):
    pairs = make_pairs(60)
    encoder = PairEncoder(tokenizer, MAX_LENGTH, "left_turns", "weight", folder=tmp_path / "s" if on_disk else None)
    for pair in pairs:
        encoder.add(pair)
    got = encoder.finish()
    want = encode_pairs(tokenizer, pairs, MAX_LENGTH, "left_turns", "weight")
    assert got.unfit == want.unfit > 0 and got.truncated == want.truncated > 0
    assert_store_equals(got.pairs, want.pairs)
    for i, k in enumerate(want.kept):  # every id equals encode_pair's, sequence by sequence
        chosen, rejected = encode_pair(tokenizer, pairs[k], MAX_LENGTH, "left_turns")
        assert got.pairs[i].chosen == chosen.input_ids and got.pairs[i].rejected == rejected.input_ids
    assert got.pairs.source_list() == [pairs[k]["source"] for k in want.kept]
    assert list(pair_widths(got.pairs)) == pair_widths(want.pairs)
    assert list(pair_tokens(got.pairs)) == pair_tokens(want.pairs)
    assert got.pairs[-1].chosen == want.pairs[-1].chosen
    with pytest.raises(IndexError):
        got.pairs[len(want.pairs)]
    # Memory: the ids are int32, the rest a fixed few bytes a pair (offsets 16, margin, width,
    # tokens 8 each, source 4), with no Python object per token or per pair.
    store = got.pairs
    tokens = sum(p.tokens for p in want.pairs)
    assert store.ids.dtype == np.int32 and store.ids.nbytes == 4 * tokens
    assert 4 * tokens <= store.nbytes <= 4 * tokens + 48 * len(store) + 64
    if on_disk:
        assert isinstance(store.ids, np.memmap) and isinstance(store.offsets, np.memmap)
        assert os.path.getsize(tmp_path / "s" / "ids.int32") == 4 * tokens


def test_empty_store(tmp_path):
    for folder in (None, tmp_path / "e"):
        encoder = PairEncoder(None, MAX_LENGTH, "left_turns", folder=folder)
        store = encoder.finish().pairs
        assert len(store) == 0 and not store and list(store) == [] and store.source_list() == []


def files_config(tmp_path, tokenizer_pairs, **kw) -> RewardConfig:
    train = write_jsonl(tokenizer_pairs, tmp_path / "train.jsonl")
    with open(train, "a") as fh:  # an unreadable row and a pair with an empty message
        fh.write("{not json\n")
        fh.write(json.dumps({**tokenizer_pairs[0], "chosen": [{"role": "assistant", "content": " "}]}) + "\n")
    base = dict(
        output_dir=str(tmp_path / "out"),
        train_files=[str(train)],
        max_length=MAX_LENGTH,
        margin_column="weight",
    )
    return RewardConfig(**{**base, **kw})


@pytest.mark.parametrize("eval_fraction", [0.0, 0.3])
def test_files_stream_into_the_split_and_encoding_of_the_old_reader(tokenizer, tmp_path, eval_fraction):
    cfg = files_config(tmp_path, make_pairs(70), eval_fraction=eval_fraction, split_seed=5)
    got = prepare_data(cfg, tokenizer, tmp_path / "out")
    # What the trainer did before: every pair loaded, split by conversation, then encoded.
    loaded = load_pairs(cfg.train_files, ("weight",))
    train, evals = split_pairs(loaded.pairs, eval_fraction, 5)
    assert (len(evals) > 0) == (eval_fraction > 0)
    want_train = encode_pairs(tokenizer, train, MAX_LENGTH, "left_turns", "weight")
    want_eval = encode_pairs(tokenizer, evals, MAX_LENGTH, "left_turns", keep_unfit=True)
    assert_store_equals(got.train.pairs, want_train.pairs)
    assert_store_equals(got.eval.pairs, want_eval.pairs)
    assert got.eval.pairs.source_list() == [evals[i].get("source", "unknown") for i in want_eval.kept]
    assert got.report == {
        "train_pairs": len(want_train.pairs),
        "train_unfit": want_train.unfit,
        "train_truncated": want_train.truncated,
        "eval_pairs": len(want_eval.pairs),
        "eval_unfit": want_eval.unfit,
        "unreadable_rows": 2,
    }
    assert got.eval.truncated == want_eval.truncated
    assert got.problems == loaded.problems and len(got.problems) == 2
    assert got.folder is not None and got.folder.parent == tmp_path / "out" / CACHE_DIR


def test_cache_is_reused_for_the_same_inputs_and_rebuilt_for_others(tokenizer, tmp_path, monkeypatch):
    cfg = files_config(tmp_path, make_pairs(30), eval_fraction=0.2)
    first = prepare_data(cfg, tokenizer, tmp_path / "out")
    built = list(first.train.pairs)

    def no_encoding(self, pair):
        raise AssertionError("encoded again")

    with monkeypatch.context() as m:
        m.setattr(PairEncoder, "add", no_encoding)
        again = prepare_data(cfg, tokenizer, tmp_path / "out")
    assert again.folder == first.folder and list(again.train.pairs) == built
    assert again.report == first.report and again.problems == first.problems
    # Another max_length, truncation or file content is another key; building it drops the old folder.
    key = data_cache.cache_key(cfg, tokenizer)[0]
    for change in ({"max_length": 48}, {"truncation": "left_tokens"}, {"eval_fraction": 0.3}):
        assert data_cache.cache_key(RewardConfig(**{**cfg.to_dict(), **change}), tokenizer)[0] != key
    train = tmp_path / "train.jsonl"
    write_jsonl(make_pairs(31), train)
    os.utime(train, ns=(1, 1))
    rebuilt = prepare_data(cfg, tokenizer, tmp_path / "out")
    assert rebuilt.folder != first.folder and not first.folder.exists()
    assert rebuilt.report["unreadable_rows"] == 0 and rebuilt.report["train_pairs"] + rebuilt.report["eval_pairs"] > 0
    folders = [p.name for p in (tmp_path / "out" / CACHE_DIR).iterdir() if p.is_dir()]
    assert folders == [rebuilt.folder.name]


@pytest.mark.parametrize("keep", [False, True])
def test_the_token_cache_is_removed_once_training_ends_unless_kept(tmp_path, keep):
    # Each curation iteration trains in its own output_dir: at ~4 bytes a token a cache left behind
    # by every run would fill the volume at scale. It serves resumes, so it lives as long as the run.
    from synpref.training.reward_trainer import RewardTrainer
    from testing.tiny import build_tiny_reward_model
    from tests.unit.test_train import config, make_pairs, texts

    pairs = make_pairs(16, seed=0)
    path = build_tiny_reward_model(tmp_path / "m", arch="qwen3", seed=3, texts=texts(pairs), vocab_size=300)
    write_jsonl(pairs, tmp_path / "train.jsonl")
    out = tmp_path / "out"
    cfg = config(path, out, max_steps=1, train_files=[str(tmp_path / "train.jsonl")], keep_token_cache=keep)
    trainer = RewardTrainer(cfg)
    assert trainer.token_cache is not None and trainer.token_cache.is_dir()
    trainer.train()
    assert (out / "final").is_dir() and trainer.token_cache.exists() == keep
