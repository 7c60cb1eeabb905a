"""Fix 44, pair readers and `synpref eval`: compressed JSON files are read (not skipped), an RM-Bench item with an empty
side is one bad row (not the whole file's format), and eval's result says how it was cut and leaves out identical
pairs as the trainer's evaluation does."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from synpref.shared.source_files import SourceError, source_files
from synpref.shared.sources import iter_source
from synpref.training import eval_cli


def pair(i: int) -> dict[str, Any]:
    return {
        "conversation": [{"role": "user", "content": f"question {i}"}],
        "chosen": [{"role": "assistant", "content": f"good answer {i}"}],
        "rejected": [{"role": "assistant", "content": f"bad {i}"}],
        "source": "t",
    }


def write_zst(path: Path, data: bytes) -> None:
    with pa.CompressedOutputStream(str(path), "zstd") as out:
        out.write(data)


WRITERS: dict[str, Callable[[Path, bytes], Any]] = {
    ".gz": lambda path, data: path.write_bytes(gzip.compress(data)),
    ".bz2": lambda path, data: path.write_bytes(bz2.compress(data)),
    ".xz": lambda path, data: path.write_bytes(lzma.compress(data)),
    ".zst": write_zst,
    ".ZST": write_zst,  # the suffix is matched in any case, as .GZ is
}


def encoded(pairs: list[dict[str, Any]], kind: str) -> bytes:
    if kind == ".jsonl":
        return "".join(json.dumps(p) + "\n" for p in pairs).encode()
    return json.dumps(pairs).encode()


@pytest.mark.parametrize("kind", [".jsonl", ".json"])
@pytest.mark.parametrize("compression", list(WRITERS))
def test_compressed_files_are_read_in_a_folder_and_alone(tmp_path: Path, kind: str, compression: str) -> None:
    # Before: only .gz was read; a folder of .bz2/.xz/.zst files listed no file at all ("scored 0 pairs", exit 0),
    # and such a file named alone failed as invalid JSON (its compressed bytes read as text).
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / f"pairs{kind}{compression}"
    WRITERS[compression](path, encoded([pair(i) for i in range(5)], kind))
    assert source_files(folder) == [path]
    for given in (folder, path):
        rows = list(iter_source(given))
        assert [r.error for r in rows] == [None] * 5, given
        assert [r.pair["chosen"] for r in rows if r.pair] == [pair(i)["chosen"] for i in range(5)]


@pytest.mark.parametrize("compression", [".bz2", ".xz", ".zst"])
def test_a_corrupt_compressed_file_is_a_source_error_naming_it(tmp_path: Path, compression: str) -> None:
    # Before: skipped in a folder (silently); an xz error (lzma.LZMAError) is no OSError, so it left the reader bare.
    good = encoded([pair(i) for i in range(200)], ".jsonl")
    whole = tmp_path / f"whole.jsonl{compression}"
    WRITERS[compression](whole, good)
    cut = tmp_path / "in" / f"cut.jsonl{compression}"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    garbage = tmp_path / "bad" / f"garbage.jsonl{compression}"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not compressed at all\n" * 20)
    for path in (cut, garbage):
        with pytest.raises(SourceError, match=path.name):
            list(iter_source(path.parent))


def test_eval_scores_a_folder_of_zst_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The reported symptom: `synpref eval --pairs folder` with only .zst files said 0 pairs and exited 0.
    fake_model(monkeypatch)
    folder = tmp_path / "eval"
    folder.mkdir()
    for n in range(2):
        write_zst(folder / f"part-{n}.jsonl.zst", encoded([pair(10 * n + i) for i in range(3)], ".jsonl"))
    assert eval_cli.main(["--model", "m", "--pairs", str(folder), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["eval"]["pairs"] == 6


# ---------------------------------------------------------------- RM-Bench with an empty side

RMB = {"id": 1, "subset": "chat", "prompt": "hi", "chosen": ["a", "b", "c"], "rejected": ["d", "e", "f"]}


@pytest.mark.parametrize(
    "empty", [{"chosen": []}, {"rejected": []}, {"chosen": [], "rejected": []}], ids=["chosen", "rejected", "both"]
)
def test_an_rmbench_item_with_an_empty_side_is_one_bad_row(tmp_path: Path, empty: dict[str, Any]) -> None:
    # Before: the format was detected from the first item, and an empty side made RM-Bench's lists of strings look
    # like message lists: the whole file was read as "pairs", every item an error ("not a {role, content}
    # message"), not one pair read. Now that item is a counted non-pair naming its row, the others 9 pairs each.
    path = tmp_path / "chat_filtered.json"
    path.write_text(json.dumps([{**RMB, **empty}, RMB, {**RMB, "id": 3}]))
    rows = list(iter_source(path))
    errors = [(r.locator, r.error) for r in rows if r.error]
    assert errors == [(f"{path.as_posix()}#0", "chosen and rejected must each list 3 styled responses")]
    assert sum(r.pair is not None for r in rows) == 18
    assert {r.pair["source"] for r in rows if r.pair} == {"RM-Bench/chat"}


def test_a_later_rmbench_item_with_an_empty_side_is_one_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "chat_filtered.json"
    path.write_text(json.dumps([RMB, {**RMB, "chosen": []}, {**RMB, "rejected": []}]))
    rows = list(iter_source(path))
    assert [r.row for r in rows if r.error] == [1, 2] and sum(r.pair is not None for r in rows) == 9


# ---------------------------------------------------------------- synpref eval's result


def fake_model(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A model that prefers any chosen but scores two same responses the same (a tie); returns the chunk sizes."""
    import synpref.shared.modeling as modeling

    scored: list[int] = []

    def score(model: Any, tok: Any, pairs: Any, *args: Any) -> list[tuple[float, float]]:
        scored.append(len(pairs))
        return [(0.5, 0.5) if p["chosen"] == p["rejected"] else (1.0, 0.0) for p in pairs]

    monkeypatch.setattr(modeling, "load_reward_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(modeling, "score_pairs", score)
    return scored


def test_eval_result_records_limit_and_truncation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the result held model and max_length only; a figure on the first N pairs, or under another
    # truncation, could not be told from one on the whole set as the trainer cuts it.
    fake_model(monkeypatch)
    path = tmp_path / "eval.jsonl"
    path.write_bytes(encoded([pair(i) for i in range(6)], ".jsonl"))
    base = ["--model", "m", "--pairs", str(path), "--no-progress"]
    assert eval_cli.main([*base, "--limit", "4", "--truncation", "right"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["limit"], result["truncation"], result["eval.jsonl"]["pairs"]) == (4, "right", 4)
    assert eval_cli.main(base) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["limit"], result["truncation"], result["eval.jsonl"]["pairs"]) == (None, "left_turns", 6)
    # Keys of the result, so no input is keyed by them (a file named `limit` keyed by its path).
    assert {"limit", "truncation"} <= set(eval_cli.RESULT_FIELDS)


def test_eval_leaves_identical_pairs_out_and_counts_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a pair whose chosen is its rejected was scored, a tie whatever the model, and counted wrong (accuracy
    # 4/6 here), where the trainer's evaluation leaves such pairs out (batching.compared_sides: eval_identical).
    scored = fake_model(monkeypatch)
    same = [{**pair(i), "rejected": pair(i)["chosen"]} for i in (90, 91)]
    pairs = [pair(0), same[0], pair(1), pair(2), same[1], pair(3)]
    path = tmp_path / "eval.jsonl"
    path.write_bytes(encoded(pairs, ".jsonl"))
    assert eval_cli.main(["--model", "m", "--pairs", str(path), "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)["eval.jsonl"]
    assert (got["pairs"], got["accuracy"], got["identical_pairs"], got["unreadable_rows"]) == (4, 1.0, 2, 0)
    assert scored == [4]
    # --limit counts the pairs scored: an identical one read on the way is counted, not scored (nor read past).
    assert eval_cli.main(["--model", "m", "--pairs", str(path), "--limit", "3", "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)["eval.jsonl"]
    assert (got["pairs"], got["accuracy"], got["identical_pairs"]) == (3, 1.0, 1)


def test_eval_leaves_out_the_pairs_the_trainers_evaluation_leaves_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from synpref.shared.batched_rewards import reward_of
    from synpref.shared.modeling import load_reward_model
    from synpref.training.batching import encode_pairs
    from synpref.training.evaluation import pairwise_metrics
    from testing.tiny import build_tiny_reward_model

    pairs = [pair(i) for i in range(6)] + [{**pair(i), "rejected": pair(i)["chosen"]} for i in range(6, 9)]
    texts = [m["content"] for p in pairs for k in ("conversation", "chosen", "rejected") for m in p[k]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two CPUs shared with other work
    try:
        model_dir = build_tiny_reward_model(tmp_path / "m", layers=1, hidden=32, texts=texts, vocab_size=300)
        path = tmp_path / "eval.jsonl"
        path.write_bytes(encoded(pairs, ".jsonl"))
        assert eval_cli.main(["--model", str(model_dir), "--pairs", str(path), "--no-progress"]) == 0
        got = json.loads(capsys.readouterr().out)["eval.jsonl"]
        model, tok = load_reward_model(str(model_dir))
        trainer = encode_pairs(tok, pairs, 4096, "left_turns", keep_unfit=True)
        rewards = reward_of(model, [ids for p in trainer.pairs for ids in (p.chosen, p.rejected)], tok.pad_token_id)
    finally:
        torch.set_num_threads(threads)
    assert trainer.identical == got["identical_pairs"] == 3 and trainer.kept == list(range(6))
    want = pairwise_metrics(list(zip(rewards[::2], rewards[1::2], strict=True)))
    assert got["pairs"] == want["pairs"] == 6 and got["accuracy"] == want["accuracy"]
