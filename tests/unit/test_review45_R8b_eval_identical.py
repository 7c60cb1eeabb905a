"""Review 45, area R8b: `synpref eval` leaves out the pairs the trainer leaves out as the same tokens, and RM-Bench
under `--truncation right` compares responses cut off a long prompt on their ends, not as ties counted wrong."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from synpref.shared.batched_rewards import reward_of
from synpref.shared.modeling import encode_conversation, load_reward_model, score_pairs
from synpref.training import eval_cli
from synpref.training.batching import encode_pairs
from synpref.training.data import write_jsonl
from synpref.training.evaluation import pairwise_metrics, rmbench_eval
from testing.tiny import QWEN_TEMPLATE, build_tiny_reward_model

MAX_LENGTH = 32
WORDS = ["flour", "water", "salt", "yeast", "oven", "bread", "knead", "rise"]


def pair(i: int, rejected: str | None = None) -> dict[str, Any]:
    chosen = f"Knead the {WORDS[i % 8]} and {WORDS[(i + 3) % 8]}"
    return {
        "conversation": [{"role": "user", "content": f"how do I bake with {WORDS[i % 8]}?"}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected if rejected is not None else f"no {WORDS[i % 8]}"}],
        "source": "t",
    }


def texts() -> list[str]:
    return [m["content"] for i in range(8) for k in ("conversation", "chosen", "rejected") for m in pair(i)[k]]


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two CPUs shared with other work
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["bert", "trimming template"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny RM whose tokenizer makes some different texts the same tokens: an uncased WordPiece (case, runs of
    spaces), or a chat template that trims each message's content, as Llama 3's does."""
    folder = tmp_path_factory.mktemp("m")
    arch = "bert" if request.param == "bert" else "qwen3"
    build_tiny_reward_model(folder, arch=arch, layers=1, hidden=32, texts=texts(), vocab_size=300)
    if request.param == "trimming template":
        _, tok = load_reward_model(str(folder))
        tok.chat_template = QWEN_TEMPLATE.replace("message['content']", "(message['content'] | trim)")
        tok.save_pretrained(str(folder))
    return folder


def same_tokens_rejected(i: int) -> str:
    """The chosen of pair(i) in a form the tokenizers above read as the same tokens."""
    return "  " + pair(i)["chosen"][0]["content"] + " \n"


def test_eval_leaves_out_pairs_that_are_the_same_tokens_as_the_trainer_does(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: eval left out only pairs whose texts are equal; these were scored as ties and counted wrong
    # (accuracy and pairs 8 here, not the trainer's 5), with nothing in the record saying so.
    pairs = [pair(i, same_tokens_rejected(i) if i in (1, 4, 6) else None) for i in range(8)]
    path = write_jsonl(pairs, tmp_path / "eval.jsonl")
    assert eval_cli.main(["--model", str(model_dir), "--pairs", str(path), "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)["eval.jsonl"]
    model, tok = load_reward_model(str(model_dir))
    trainer = encode_pairs(tok, pairs, 4096, "left_turns", keep_unfit=True)
    assert trainer.identical == got["identical_after_tokenizing"] == 3 and trainer.kept == [0, 2, 3, 5, 7]
    assert "identical_pairs" not in got  # no pair's texts are equal: a separate count
    rewards = reward_of(model, [ids for p in trainer.pairs for ids in (p.chosen, p.rejected)], tok.pad_token_id)
    want = pairwise_metrics(list(zip(rewards[::2], rewards[1::2], strict=True)))
    assert got["pairs"] == want["pairs"] == 5
    assert got["accuracy"] == want["accuracy"] and got["margin_mean"] == pytest.approx(want["margin_mean"], abs=1e-5)
    # Data with no such pair keeps its record as it was: no count.
    path = write_jsonl([pair(i) for i in range(4)], tmp_path / "plain.jsonl")
    assert eval_cli.main(["--model", str(model_dir), "--pairs", str(path), "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)["plain.jsonl"]
    assert got["pairs"] == 4 and "identical_after_tokenizing" not in got


def rmbench_item(i: int, prompt: str) -> dict[str, Any]:
    return {
        "id": i,
        "domain": "chat",
        "prompt": prompt,
        "chosen": [f"Knead the {w} well" for w in WORDS[:3]],
        "rejected": [f"no {w}" for w in WORDS[3:6]],
    }


def test_rmbench_right_truncation_compares_responses_cut_off_a_long_prompt_on_their_ends(model_dir: Path) -> None:
    # Before: `right` cut all six responses off a prompt over max_length, to the same tokens: nine ties counted
    # wrong (every slice 0.0 here) and unfit_sequences 0. Now, as the trainer compares such a pair
    # (compared_sides), each response is scored on its left-token-truncated ends and counted unfit.
    model, tok = load_reward_model(str(model_dir))
    long_prompt = " ".join(WORDS * 8)
    items = [rmbench_item(0, long_prompt)]
    got = rmbench_eval(model, tok, items, MAX_LENGTH, truncation="right")
    assert got["unfit_sequences"] == 6 and "identical_comparisons" not in got
    answers = [*items[0]["chosen"], *items[0]["rejected"]]
    msgs = [[{"role": "user", "content": long_prompt}, {"role": "assistant", "content": a}] for a in answers]
    ends = [encode_conversation(tok, m, MAX_LENGTH, truncation="left_tokens").input_ids for m in msgs]
    assert len(set(map(tuple, ends))) == 6  # the ends differ, so the comparisons mean something
    r = reward_of(model, ends, tok.pad_token_id)
    wins = [[float(r[i] > r[3 + j]) for j in range(3)] for i in range(3)]
    assert got["normal"] == sum(wins[i][i] for i in range(3)) / 3
    assert got["hard"] == (wins[0][1] + wins[0][2] + wins[1][2]) / 3
    assert got["easy"] == (wins[1][0] + wins[2][0] + wins[2][1]) / 3
    # A prompt that fits is scored as before: nothing unfit.
    assert (
        rmbench_eval(model, tok, [rmbench_item(1, "how do I bake?")], MAX_LENGTH, truncation="right")["unfit_sequences"]
        == 0
    )


def test_rmbench_leaves_out_comparisons_whose_sides_are_the_same_tokens(model_dir: Path) -> None:
    # Before: a rejected response that is a chosen one's tokens (here in its normal cell, 0 vs 0) was a tie
    # counted wrong: normal could not reach 1.0. Now that cell is left out and counted.
    model, tok = load_reward_model(str(model_dir))
    item = rmbench_item(0, "how do I bake?")
    item["rejected"][0] = "  " + item["chosen"][0] + "\n"
    got = rmbench_eval(model, tok, [item], 4096)
    assert got["identical_comparisons"] == 1 and got["unfit_sequences"] == 0
    answers = [*item["chosen"], *item["rejected"]]
    msgs = [[{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": a}] for a in answers]
    r = reward_of(model, [encode_conversation(tok, m, 4096).input_ids for m in msgs], tok.pad_token_id)
    wins = [[float(r[i] > r[3 + j]) for j in range(3)] for i in range(3)]
    # The normal slice is the mean of its two compared cells' accuracies; hard and easy are as before.
    assert got["normal"] == (wins[1][1] + wins[2][2]) / 2
    assert got["hard"] == (wins[0][1] + wins[0][2] + wins[1][2]) / 3
    assert got["easy"] == (wins[1][0] + wins[2][0] + wins[2][1]) / 3


def test_score_pairs_leaves_out_same_token_pairs_only_when_asked(model_dir: Path) -> None:
    """One scoring path for both callers: the gold scorer and the loop take a same-token pair as the tie it is;
    `synpref eval` (leave_out_identical) leaves it out and counts it, as the trainer's evaluation does."""
    model, tok = load_reward_model(str(model_dir))
    pairs = [pair(0), pair(1, same_tokens_rejected(1)), pair(2)]
    as_given, counted = Counter[str](), Counter[str]()
    tie = score_pairs(model, tok, pairs, 4096, 8, counts=as_given)
    left_out = score_pairs(model, tok, pairs, 4096, 8, counts=counted, leave_out_identical=True)
    assert tie[1][0] == pytest.approx(tie[1][1])
    assert left_out[1] is None and counted["identical_after_tokenizing"] == 1
    assert as_given["identical_after_tokenizing"] == 0
    for i in (0, 2):
        assert left_out[i] == pytest.approx(tie[i], abs=1e-5)
