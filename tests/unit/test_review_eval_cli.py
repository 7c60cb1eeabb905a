"""`synpref eval` at scale: a --pairs input is read, encoded and scored a chunk at a time, never held whole."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from synpref.shared.modeling import load_reward_model, score_pairs
from synpref.training import eval_cli, evaluation
from synpref.training.data import write_jsonl
from testing.numerics import near_ties
from testing.tiny import build_tiny_reward_model

WORDS = [
    "bread",
    "oven",
    "flour",
    "water",
    "salt",
    "yeast",
    "paris",
    "france",
    "email",
    "landlord",
    "fox",
    "dog",
    "numbers",
    "add",
]


def pair(i: int) -> dict[str, Any]:
    words = [WORDS[(i * k) % len(WORDS)] for k in range(1, 2 + i % 6)]
    return {
        "conversation": [{"role": "user", "content": f"tell me about {' '.join(words)}"}],
        "chosen": [{"role": "assistant", "content": f"gladly: {' '.join(words[: 1 + i % 3])}"}],
        "rejected": [{"role": "assistant", "content": f"no. {words[-1]} {i % 7}"}],
        "source": f"src{i % 3}",
    }


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    # Two CPUs shared with other work: two torch threads made these forwards 5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [m["content"] for i in range(50) for part in ("conversation", "chosen", "rejected") for m in pair(i)[part]]
    return build_tiny_reward_model(tmp_path_factory.mktemp("m"), layers=1, hidden=32, texts=texts, vocab_size=300)


def run_eval(model: Path, path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert eval_cli.main(["--model", str(model), "--pairs", str(path), "--batch-size", "64", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)[path.name]


def test_eval_streams_a_pair_file_in_chunks_with_the_whole_file_figures(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: every pair dict and both token lists of every pair of an input were held as Python objects until it
    # was scored (3.4 KB a pair here, tens of GB for a multi-million-pair file). Now a chunk at a time.
    n = 2400
    pairs = [pair(i) for i in range(n)]
    path = write_jsonl(pairs, tmp_path / "eval.jsonl")
    run_eval(model_dir, write_jsonl(pairs[:5], tmp_path / "warm.jsonl"), capsys)  # imports, caches
    monkeypatch.setattr(evaluation, "EVAL_CHUNK_PAIRS", 64, raising=False)
    tracemalloc.start()
    try:
        got = run_eval(model_dir, path, capsys)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Measured: 3405 bytes a pair before, 207 now (20 of them the pair's rewards and source code, the rest a chunk
    # and the model's loading spread over the pairs).
    assert peak / n < 1000, f"{peak / n:.0f} bytes a pair at the peak of synpref eval"

    # The same figures as the whole input scored at once: keys and counts exactly, rewards to the rounding of their
    # padding (measured: at most 1.4e-6 of the largest |reward|, tiny Qwen3, fp32 CPU), accuracy to near ties.
    model, tokenizer = load_reward_model(str(model_dir))

    def score(chunk: list[dict[str, Any]]) -> list[tuple[float, float]]:
        return score_pairs(model, tokenizer, chunk, 4096, 64)

    whole = score(pairs)
    chosen, rejected, codes, names = evaluation.stream_rewards(score, iter(pairs))
    expect = np.array(whole)
    tol = 1e-5 * float(np.abs(expect).max())
    assert np.abs(np.stack([chosen, rejected], 1) - expect).max() <= tol
    assert names == ["src0", "src1", "src2"] and codes.tolist() == [i % 3 for i in range(n)]
    want = evaluation.pairwise_metrics(whole, [p["source"] for p in pairs])
    assert list(got) == [*want, "unreadable_rows", "unfit_pairs", "unfit_sequences"]
    assert got["unreadable_rows"] == got["unfit_pairs"] == 0
    assert got["pairs"] == n and got["pairs_by_source"] == want["pairs_by_source"] == {
        f"src{k}": n // 3 for k in range(3)
    }
    assert abs(got["accuracy"] - want["accuracy"]) * n <= near_ties(whole, tol)
    for key in ("reward_mean", "chosen_mean", "rejected_mean", "margin_mean"):
        assert abs(got[key] - want[key]) <= tol, key
    assert got["reward_std"] == pytest.approx(want["reward_std"], rel=1e-3)


def test_eval_refuses_a_missing_input_before_scoring_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the inputs were found one at a time, so a mistyped second --pairs or --rmbench raised a traceback
    # only after the first input was scored (hours on a large file), and no result was printed.
    import synpref.shared.modeling as modeling

    scored: list[int] = []
    monkeypatch.setattr(modeling, "load_reward_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(
        modeling, "score_pairs", lambda m, t, pairs, *a: scored.append(len(pairs)) or [(1.0, 0.0)] * len(pairs)
    )
    good = str(write_jsonl([pair(i) for i in range(4)], tmp_path / "good.jsonl"))
    for extra in (["--pairs", str(tmp_path / "typo.jsonl")], ["--rmbench", str(tmp_path / "RM-Bench")]):
        assert eval_cli.main(["--model", "m", "--pairs", good, *extra, "--no-progress"]) == 2
        assert scored == [] and Path(extra[1]).name in capsys.readouterr().err
    assert eval_cli.main(["--model", "m", "--pairs", good, "--no-progress"]) == 0 and scored == [4]


def test_eval_writes_out_into_a_folder_it_makes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: --out in a folder that did not exist failed the write after all the scoring (FileNotFoundError).
    import synpref.shared.modeling as modeling

    monkeypatch.setattr(modeling, "load_reward_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(modeling, "score_pairs", lambda m, t, pairs, *a: [(1.0, 0.0)] * len(pairs))
    good = str(write_jsonl([pair(i) for i in range(4)], tmp_path / "good.jsonl"))
    out = tmp_path / "results" / "run-1" / "eval.json"
    assert eval_cli.main(["--model", "m", "--pairs", good, "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["model"] == "m"
