"""Review 43, `synpref eval`'s figures: the pairs scored on their truncated ends are counted in each input's metrics,
and `--truncation right` does not turn a pair whose conversation is over max_length into a tie."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from synpref.shared.batched_rewards import reward_of
from synpref.shared.modeling import encode_pair, load_reward_model, score_pairs
from synpref.training import eval_cli
from synpref.training.batching import encode_pairs
from synpref.training.data import write_jsonl
from testing.tiny import build_tiny_reward_model

MAX_LENGTH = 48


def pair(i: int, long_question: bool = False, long_history: bool = False) -> dict[str, Any]:
    history = [
        {"role": "user", "content": "earlier question " + "bread " * 60},
        {"role": "assistant", "content": "earlier answer " + "oven " * 60},
    ]
    question = "tell me about flour " + ("water " * 80 if long_question else f"salt {i}")
    return {
        "conversation": [*(history if long_history else []), {"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": f"gladly, yeast {i} and salt"}],
        "rejected": [{"role": "assistant", "content": f"no {i}"}],
        "source": "t",
    }


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    # Two CPUs shared with other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [
        m["content"]
        for p in (pair(0, True, True), pair(1))
        for k in ("conversation", "chosen", "rejected")
        for m in p[k]
    ]
    return build_tiny_reward_model(tmp_path_factory.mktemp("m"), layers=1, hidden=32, texts=texts, vocab_size=300)


def test_each_input_counts_its_pairs_scored_on_truncated_ends(model_dir: Path, tmp_path: Path, capsys: Any) -> None:
    # Before: a side over --max-length was scored on its left-truncated end and only a log warning said how many
    # (381 of 600 sequences on hh-rlhf at 128); the JSON had no count, where RM-Bench's has unfit_sequences.
    pairs = [pair(i, long_question=i % 3 == 0, long_history=i % 2 == 0) for i in range(9)]
    _, tok = load_reward_model(str(model_dir))
    sides = [encode_pair(tok, p, MAX_LENGTH) for p in pairs]
    unfit_sequences = sum(not s.fits for both in sides for s in both)
    unfit_pairs = sum(not all(s.fits for s in both) for both in sides)
    assert 0 < unfit_pairs < len(pairs)  # long histories alone are cut to fit; long questions do not fit
    files = write_jsonl(pairs, tmp_path / "eval.jsonl")
    hh = tmp_path / "test.jsonl.gz"
    long_prompt = "\n\nHuman: " + "water " * 80 + "?\n\nAssistant:"
    hh.write_bytes(
        gzip.compress(json.dumps({"chosen": f"{long_prompt} yes", "rejected": f"{long_prompt} no"}).encode())
    )
    argv = ["--model", str(model_dir), "--pairs", str(files), "--hh-rlhf", str(hh), "--max-length", str(MAX_LENGTH)]
    assert eval_cli.main([*argv, "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    got = result["eval.jsonl"]
    assert (got["pairs"], got["unfit_pairs"], got["unfit_sequences"]) == (9, unfit_pairs, unfit_sequences)
    hh_got = result["test.jsonl.gz"]
    assert (hh_got["pairs"], hh_got["unfit_pairs"], hh_got["unfit_sequences"]) == (1, 1, 2)


def test_score_pairs_adds_its_unfit_counts_to_the_callers_counter(model_dir: Path) -> None:
    model, tok = load_reward_model(str(model_dir))
    pairs = [pair(0, long_question=True), pair(1), pair(2, long_history=True)]
    counts: Counter[str] = Counter({"unfit_pairs": 5, "unfit_sequences": 7})  # a chunk before this one
    plain = score_pairs(model, tok, pairs, MAX_LENGTH, 8)
    counted = score_pairs(model, tok, pairs, MAX_LENGTH, 8, "left_turns", False, counts)
    assert counted == plain and counts == {"unfit_pairs": 6, "unfit_sequences": 9}


def test_right_truncation_scores_cut_off_responses_on_their_ends_as_the_trainer_does(model_dir: Path) -> None:
    # Before: `right` cut both responses off a conversation over max_length, so both sides were the same tokens:
    # equal rewards, a tie counted wrong whatever the model, and not counted as unfit. The trainer's evaluation
    # (batching.compared_sides) scores their left-token-truncated ends and counts them unfit.
    model, tok = load_reward_model(str(model_dir))
    pairs = [pair(i, long_question=True) for i in range(3)] + [pair(3)]
    rewards = score_pairs(model, tok, pairs, MAX_LENGTH, 8, "right")
    assert all(c != r for c, r in rewards), rewards
    trainer = encode_pairs(tok, pairs, MAX_LENGTH, "right", keep_unfit=True)
    assert trainer.unfit == 3 and trainer.kept == [0, 1, 2, 3]
    seqs = [ids for p in trainer.pairs for ids in (p.chosen, p.rejected)]
    theirs = reward_of(model, seqs, tok.pad_token_id)
    assert [r for both in rewards for r in both] == pytest.approx(theirs, rel=1e-4, abs=1e-5)
    counts: Counter[str] = Counter()
    score_pairs(model, tok, pairs, MAX_LENGTH, 8, "right", False, counts)
    assert counts == {"unfit_pairs": 3, "unfit_sequences": 6}
