"""Review 42, the trainer's data path: pairs with nothing to compare, and the token cache's key."""

from __future__ import annotations

import shutil

import pytest

from synpref.training import batching, data_cache
from synpref.training.data import write_jsonl
from synpref.training.data_cache import prepare_data
from synpref.training.reward_config import RewardConfig
from testing.tiny import build_tiny_tokenizer

LONG_PROMPT = " ".join(["apple river stone cloud"] * 40)


def _msg(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def _pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "conversation": _msg("user", prompt),
        "chosen": _msg("assistant", chosen),
        "rejected": _msg("assistant", rejected),
        "source": "s",
    }


GOOD = [_pair(f"question {i}", f"yes good {i}", f"no bad {i}") for i in range(4)]
SAME = _pair("hi there", "same answer", "same answer")
CUT_AWAY = _pair(LONG_PROMPT, "yes good", "no bad")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [LONG_PROMPT, "question yes good no bad hi there same answer 0 1 2 3"]
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), texts, vocab_size=200)


def _config(tmp_path, **kw) -> RewardConfig:
    return RewardConfig(output_dir=str(tmp_path / "out"), max_length=64, **kw)


def _same_sides(store) -> int:
    return sum(p.chosen == p.rejected for p in store)


def test_a_pair_with_the_same_chosen_and_rejected_is_neither_trained_nor_scored(tokenizer, tmp_path):
    # Its loss is log 2 whatever the model and, held out, no model gets it right: accuracy fell by its share.
    got = prepare_data(_config(tmp_path), tokenizer, tmp_path / "out", [*GOOD, SAME], [*GOOD, SAME])
    assert _same_sides(got.train.pairs) == 0 and _same_sides(got.eval.pairs) == 0
    assert (got.report["train_pairs"], got.report["eval_pairs"]) == (4, 4)
    assert (got.report["train_identical"], got.report["eval_identical"]) == (1, 1)
    assert got.report["train_unfit"] == 0


def test_right_truncation_that_cuts_both_responses_off_is_unfit_and_eval_scores_the_ends(tokenizer, tmp_path):
    cfg = _config(tmp_path, truncation="right")
    got = prepare_data(cfg, tokenizer, tmp_path / "out", [*GOOD, CUT_AWAY], [*GOOD, CUT_AWAY])
    # Both sides were the first 64 tokens of the prompt: trained as a pair, a comparison of nothing.
    assert _same_sides(got.train.pairs) == 0
    assert got.report["train_pairs"] == 4 and got.report["train_unfit"] == 1
    # The eval keeps every pair; this one as its left-token-truncated ends, where the responses are.
    assert len(got.eval.pairs) == 5 and _same_sides(got.eval.pairs) == 0
    assert got.report["eval_unfit"] == 1 and "eval_identical" not in got.report


def test_the_cached_data_keeps_the_identical_count(tokenizer, tmp_path):
    train = write_jsonl([*GOOD, SAME], tmp_path / "train.jsonl")
    cfg = _config(tmp_path, train_files=[str(train)], eval_fraction=0.0)
    built = prepare_data(cfg, tokenizer, tmp_path / "out")
    reused = prepare_data(cfg, tokenizer, tmp_path / "out")
    assert reused.folder == built.folder and reused.report == built.report
    assert reused.report["train_identical"] == 1 and reused.train.identical == 1
    assert _same_sides(reused.train.pairs) == 0 and len(reused.train.pairs) == 4


def test_the_cache_key_covers_the_code_that_reads_the_margin(tokenizer, tmp_path, monkeypatch):
    # pair_margin (batching.py) decides the margins stored in the cache: a change to it must rebuild the cache.
    train = write_jsonl(GOOD, tmp_path / "train.jsonl")
    cfg = _config(tmp_path, train_files=[str(train)], margin_column="weight")
    key = data_cache.cache_key(cfg, tokenizer)[0]
    changed = tmp_path / "batching.py"
    shutil.copy(batching.__file__, changed)
    with open(changed, "a", encoding="utf-8") as fh:
        fh.write("\n# another margin rule\n")
    monkeypatch.setattr(batching, "__file__", str(changed))
    assert data_cache.cache_key(cfg, tokenizer)[0] != key
