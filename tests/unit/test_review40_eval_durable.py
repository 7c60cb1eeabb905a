"""Review 40, task D2: `synpref eval` keeps the inputs' results when RM-Bench (or anything after them) fails, and an
input named like one of the result's own keys does not replace it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from synpref.shared import modeling
from synpref.training import eval_cli, evaluation
from tests.unit.test_review39_eval import fake_scoring, hh_lines, rmbench_item

__all__ = ["fake_scoring"]  # the fixture, imported for its use here


def rmbench_folder(tmp_path: Path, items: int = 2) -> Path:
    folder = tmp_path / "rmb"
    folder.mkdir()
    (folder / "chat_filtered.json").write_text(json.dumps([rmbench_item(i) for i in range(items)]))
    return folder


def hh_file(path: Path, n: int) -> Path:
    path.write_bytes(gzip.compress(hh_lines(n)))
    return path


def test_rmbench_out_of_memory_keeps_every_inputs_result(tmp_path, fake_scoring, monkeypatch, capsys) -> None:
    # Before: results were written only at the end, so RM-Bench failing after the pair inputs (hours of scoring)
    # raised out of main with nothing printed and no --out.
    a, b = hh_file(tmp_path / "a.jsonl.gz", 4), hh_file(tmp_path / "b.jsonl.gz", 6)

    def out_of_memory(*args: Any, **kwargs: Any) -> list[float]:
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(evaluation, "score_sequences", out_of_memory)
    out = tmp_path / "eval.json"
    argv = ["--model", "m", "--no-progress", "--out", str(out), "--hh-rlhf", str(a), "--hh-rlhf", str(b)]
    assert eval_cli.main([*argv, "--rmbench", str(rmbench_folder(tmp_path))]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed  # the finished file: no "pending"
    assert printed["a.jsonl.gz"]["pairs"] == 4 and printed["b.jsonl.gz"]["pairs"] == 6
    assert printed["rmbench"] == {"error": "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"}


def test_out_holds_each_finished_input_when_the_run_dies_later(tmp_path, fake_scoring, monkeypatch) -> None:
    # A kill or a crash that no except clause sees (here a BaseException while scoring the second input): the file
    # already holds the first input's figures and says what was still to come.
    a, b = hh_file(tmp_path / "a.jsonl.gz", 4), hh_file(tmp_path / "b.jsonl.gz", 6)
    scored: list[int] = []

    def dies_on_the_second_input(model: Any, tok: Any, chunk: list[Any], *rest: Any) -> list[tuple[float, float]]:
        if scored:
            raise KeyboardInterrupt
        scored.append(len(chunk))
        return [(1.0, 0.0)] * len(chunk)

    monkeypatch.setattr(modeling, "score_pairs", dies_on_the_second_input)
    out = tmp_path / "res" / "eval.json"
    argv = ["--model", "m", "--no-progress", "--out", str(out), "--hh-rlhf", str(a), "--hh-rlhf", str(b)]
    with pytest.raises(KeyboardInterrupt):
        eval_cli.main([*argv, "--rmbench", str(rmbench_folder(tmp_path))])
    partial = json.loads(out.read_text())
    first = partial["a.jsonl.gz"]
    assert (first["pairs"], first["accuracy"], first["unreadable_rows"]) == (4, 1.0, 0)
    assert partial["pending"] == ["b.jsonl.gz", "rmbench"] and "b.jsonl.gz" not in partial
    assert partial["model"] == "m"


def test_inputs_named_like_the_results_own_keys_keep_them(tmp_path, fake_scoring, monkeypatch, capsys) -> None:
    # Before: `--pairs model` (a file named model in the working folder) replaced the model's name with its metrics,
    # and `--pairs rmbench` had its metrics replaced by RM-Bench's.
    monkeypatch.chdir(tmp_path)
    for name, n in (("model", 3), ("rmbench", 5), ("pending", 2)):
        (tmp_path / name).write_bytes(hh_lines(n))  # plain JSON lines: a name without .gz is not read as gzip
    argv = ["--model", "m", "--no-progress", "--rmbench", str(rmbench_folder(tmp_path))]
    assert eval_cli.main([*argv, "--hh-rlhf", "model", "--hh-rlhf", "rmbench", "--hh-rlhf", "pending"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "m" and result["rmbench"]["items"] == 2 and "pending" not in result
    assert result[str(tmp_path / "model")]["pairs"] == 3
    assert result[str(tmp_path / "rmbench")]["pairs"] == 5
    assert result[str(tmp_path / "pending")]["pairs"] == 2


def test_result_keys_are_distinct_for_distinct_files() -> None:
    paths = ["model", "x/model", "a/test.jsonl.gz", "b/test.jsonl.gz", "eval.parquet", "rmbench/"]
    keys = [eval_cli.result_key(p, paths) for p in paths]
    assert keys[2:] == ["a/test.jsonl.gz", "b/test.jsonl.gz", "eval.parquet", "rmbench/"]
    assert keys[0] == str(Path("model").absolute()) and keys[1] == "x/model"
    assert len(set(keys)) == len(keys) and not set(keys) & set(eval_cli.RESULT_FIELDS)


def test_the_same_input_twice_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys) -> None:
    # Before: scored twice (hours), and both results went under one key.
    path = hh_file(tmp_path / "a.jsonl.gz", 3)

    def no_model(*a: Any, **k: Any) -> Any:
        raise AssertionError("the model was loaded for inputs that repeat")

    monkeypatch.setattr(modeling, "load_reward_model", no_model)
    monkeypatch.chdir(tmp_path)
    assert eval_cli.main(["--model", "m", "--hh-rlhf", str(path), "--pairs", "a.jsonl.gz", "--no-progress"]) == 2
    assert "the same input given twice" in capsys.readouterr().err
