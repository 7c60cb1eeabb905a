"""Review 46, area S: `synpref eval` prints strict JSON (null, not a bare NaN, for a slice that compared nothing or a
diverged model's rewards), and `--limit N` scores N pairs where the input holds that many compared ones."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from synpref.shared import modeling
from synpref.shared.strict_json import finite_or_null
from synpref.training import eval_cli, evaluation


def strict(text: str) -> Any:
    """`text` parsed as strict JSON: NaN, Infinity and -Infinity are refused, as Go's and JavaScript's parsers do."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def pair(i: int, same_tokens: bool = False) -> dict[str, Any]:
    """A pair; `same_tokens`: its rejected differs from its chosen as text only in what a tokenizer drops."""
    chosen = f"good answer {i}"
    return {
        "conversation": [{"role": "user", "content": f"question {i}"}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": f"  {chosen} " if same_tokens else f"bad {i}"}],
        "source": "t",
    }


def fake_model(monkeypatch: pytest.MonkeyPatch, reward: float = 1.0) -> list[int]:
    """A model with a tokenizer (so eval asks to leave same-token pairs out) that gives a chosen `reward` and a
    rejected 0.0, and reads a rejected that is its chosen padded with spaces as the same tokens. Returns the
    sizes of the chunks scored."""
    scored: list[int] = []

    def score(model: Any, tok: Any, pairs: Any, *args: Any, leave_out_identical: bool = False) -> list[Any]:
        counts: Counter[str] = args[4]
        scored.append(len(pairs))
        out: list[tuple[float, float] | None] = []
        for p in pairs:
            same = p["chosen"][0]["content"] == p["rejected"][0]["content"].strip()
            counts["identical_after_tokenizing"] += same
            out.append(None if same and leave_out_identical else (0.5, 0.5) if same else (reward, 0.0))
        return out

    monkeypatch.setattr(modeling, "load_reward_model", lambda *a, **k: (None, lambda *a, **k: None))
    monkeypatch.setattr(modeling, "score_pairs", score)
    return scored


def write_pairs(path: Path, pairs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def test_limit_scores_n_pairs_replacing_those_left_out_as_the_same_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: `--limit 4` read the first 4 pairs and scored the 2 that were not the same tokens: "pairs": 2 under
    # "limit": 4. Now the 2 left out are counted and the next 2 read in their place, and no pair past them is read.
    scored = fake_model(monkeypatch)
    pairs = [pair(i, same_tokens=i in (1, 2)) for i in range(8)]
    path = write_pairs(tmp_path / "eval.jsonl", pairs)
    assert eval_cli.main(["--model", "m", "--pairs", str(path), "--limit", "4", "--no-progress"]) == 0
    result = strict(capsys.readouterr().out)
    got = result["eval.jsonl"]
    assert (result["limit"], got["pairs"], got["identical_after_tokenizing"], got["accuracy"]) == (4, 4, 2, 1.0)
    assert scored == [4, 2]  # pairs 0-3, then 4-5: 6 and 7 are not read
    # An input with fewer compared pairs than N gives what it has.
    assert eval_cli.main(["--model", "m", "--pairs", str(path), "--limit", "7", "--no-progress"]) == 0
    got = strict(capsys.readouterr().out)["eval.jsonl"]
    assert (got["pairs"], got["identical_after_tokenizing"]) == (6, 2)


def test_stream_rewards_reads_no_further_than_the_limit_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluation, "EVAL_CHUNK_PAIRS", 3)
    read: list[int] = []

    def pairs() -> Any:
        for i in range(100):
            read.append(i)
            yield {"i": i, "source": "s"}

    def score(chunk: list[Any]) -> list[tuple[float, float] | None]:
        return [None if p["i"] % 2 else (float(p["i"]), 0.0) for p in chunk]  # odd pairs left out

    chosen, _, _, _ = evaluation.stream_rewards(score, pairs(), limit=5)
    assert chosen.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0] and read == list(range(9))
    chosen, _, _, _ = evaluation.stream_rewards(score, iter([{"i": 0}, {"i": 1}]), limit=5)
    assert chosen.tolist() == [0.0]
    with pytest.raises(ValueError, match="limit -1 is below 0"):
        evaluation.stream_rewards(score, pairs(), limit=-1)


@pytest.fixture
def fake_rmbench(monkeypatch: pytest.MonkeyPatch) -> None:
    """No model: a response's tokens are its characters; "good ..." beats "bad", and "good B" beats "good A"."""

    def encode(tokenizer: Any, msgs: Any, max_length: int, truncation: str = "left_turns") -> Any:
        return SimpleNamespace(input_ids=[ord(c) for c in msgs[-1]["content"]], fits=True, truncated=False)

    def score(model: Any, seqs: Any, pad_id: int, batch_size: int = 16, **kwargs: Any) -> list[float]:
        return [float(bytes(s).startswith(b"good")) + float(bytes(s).endswith(b"B")) for s in seqs]

    monkeypatch.setattr(evaluation, "encode_conversation", encode)
    monkeypatch.setattr(evaluation, "score_sequences", score)
    monkeypatch.setattr(modeling, "load_reward_model", lambda *a, **k: (None, SimpleNamespace(pad_token_id=0)))


NO_HARD = {"id": 0, "prompt": "q", "chosen": ["good A", "good A", "good B"], "rejected": ["bad", "good A", "good A"]}
"""Each hard cell (chosen i < rejected j) pits a response against itself: all left out."""


def test_an_rmbench_slice_that_compared_nothing_is_null_not_nan(
    fake_rmbench: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the hard slice and its domain average were NaN, printed as a bare NaN that strict JSON parsers refuse
    # (the whole result).
    folder = tmp_path / "rmb"
    folder.mkdir()
    (folder / "chat_filtered.json").write_text(json.dumps([NO_HARD]))
    out = tmp_path / "result.json"
    assert eval_cli.main(["--model", "m", "--rmbench", str(folder), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert strict(out.read_text()) == strict(printed)
    got = strict(printed)["rmbench"]
    assert got["hard"] is None and got["hard_domain_average"] is None and got["domains"]["chat"]["hard"] is None
    # The other slices compare what they can: normal (0, 0) and (2, 2), (1, 1) left out; easy all three.
    assert (got["normal"], got["easy"], got["identical_comparisons"]) == (1.0, 1.0, 4)
    assert got["normal_domain_average"] == got["easy_domain_average"] == 1.0


def test_a_domain_average_is_over_the_domains_that_compare_the_slice(fake_rmbench: None) -> None:
    # Before: one domain's NaN made the average of every domain NaN.
    plain = {"id": 1, "prompt": "q", "chosen": ["good A"] * 3, "rejected": ["bad"] * 3}
    items = [{**NO_HARD, "domain": "chat"}, {**plain, "domain": "math"}]
    got = evaluation.rmbench_eval(None, SimpleNamespace(pad_token_id=0), items)
    assert (got["domains"]["chat"]["hard"], got["domains"]["math"]["hard"]) == (None, 1.0)
    assert got["hard"] == got["hard_domain_average"] == 1.0


def test_a_diverged_models_nan_rewards_print_as_null(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # reward_metrics gives NaN means and std for NaN rewards (the trainer must not lose its run to them): eval
    # printed them as bare NaN. Now null, and the accuracy (NaN > r is False) stays a number.
    fake_model(monkeypatch, reward=math.nan)
    path = write_pairs(tmp_path / "eval.jsonl", [pair(i) for i in range(3)])
    assert eval_cli.main(["--model", "m", "--pairs", str(path), "--no-progress"]) == 0
    got = strict(capsys.readouterr().out)["eval.jsonl"]
    assert got["reward_mean"] is None and got["chosen_mean"] is None and got["reward_std"] is None
    assert (got["accuracy"], got["rejected_mean"]) == (0.0, 0.0)
    assert finite_or_null({"a": [math.inf, -math.inf, 1.5], "b": (math.nan,)}) == {
        "a": [None, None, 1.5],
        "b": [None],
    }
