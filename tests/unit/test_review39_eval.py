"""Review 39, area M: RM-Bench item shapes, `synpref eval`'s unreadable inputs, atomic --out, RM-Bench truncation."""

from __future__ import annotations

import errno
import gzip
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from synpref.shared import modeling
from synpref.training import eval_cli, evaluation


def rmbench_item(i: Any, chosen: int = 3, rejected: int = 3) -> dict[str, Any]:
    return {
        "id": i,
        "subset": "chat",
        "domain": "chat",
        "prompt": f"q{i}",
        "chosen": [f"good {i} {k}" for k in range(chosen)],
        "rejected": [f"bad {i} {k}" for k in range(rejected)],
    }


@pytest.fixture
def fake_scoring(monkeypatch) -> list[str]:
    """No model: a response scores 1.0 when it is a chosen one ("good ..."), else 0.0. Returns the truncation
    policies RM-Bench's encoding was asked for."""
    policies: list[str] = []

    def encode(tokenizer, msgs, max_length, truncation="left_turns"):
        policies.append(truncation)
        return SimpleNamespace(input_ids=[1 if msgs[-1]["content"].startswith("good") else 0], fits=True)

    def score(model, seqs, pad_id, batch_size=16, max_tokens=None, progress=False):
        return [float(s[0]) for s in seqs]

    monkeypatch.setattr(evaluation, "encode_conversation", encode)
    monkeypatch.setattr(evaluation, "score_sequences", score)
    monkeypatch.setattr(modeling, "load_reward_model", lambda *a, **k: (None, SimpleNamespace(pad_token_id=0)))
    monkeypatch.setattr(modeling, "score_pairs", lambda model, tok, chunk, *a: [(1.0, 0.0)] * len(chunk))
    return policies


@pytest.mark.parametrize("chosen", [2, 4])
def test_rmbench_eval_refuses_an_item_that_is_not_3x3(fake_scoring, chosen):
    # Rewards are read back 6 an item: one 2- or 4-response side shifted every later item onto its neighbours'
    # responses (silently wrong slices with 4; an IndexError after all the scoring with 2).
    items = [rmbench_item("a"), rmbench_item("b", chosen=chosen), rmbench_item("c")]
    with pytest.raises(ValueError, match=r"item 'b' \(chat\): chosen x rejected is \d x 3"):
        evaluation.rmbench_eval(None, SimpleNamespace(pad_token_id=0), items)
    assert fake_scoring == []  # refused before any encoding or scoring
    right = evaluation.rmbench_eval(None, SimpleNamespace(pad_token_id=0), [rmbench_item("a"), rmbench_item("c")])
    assert (right["hard"], right["normal"], right["easy"], right["items"]) == (1.0, 1.0, 1.0, 2)


def test_eval_cli_refuses_a_misshapen_rmbench_before_loading_the_model(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "rmb"
    folder.mkdir()
    rows = [rmbench_item(0), {**rmbench_item(1), "rejected": ["only one"]}]
    (folder / "chat_filtered.json").write_text(json.dumps(rows))

    def no_model(*a, **k):
        raise AssertionError("the model was loaded for an RM-Bench that cannot be scored")

    monkeypatch.setattr(modeling, "load_reward_model", no_model)
    assert eval_cli.main(["--model", "m", "--rmbench", str(folder), "--no-progress"]) == 2
    assert "item 1 (chat): chosen x rejected is 3 x 1" in capsys.readouterr().err


def hh_lines(n: int) -> bytes:
    prompts = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(n)]
    rows = [{"chosen": f"{p} yes {i}", "rejected": f"{p} no"} for i, p in enumerate(prompts)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_eval_cli_keeps_the_other_inputs_results_when_one_cannot_be_read(tmp_path, fake_scoring, capsys):
    good = tmp_path / "good.jsonl.gz"
    good.write_bytes(gzip.compress(hh_lines(5)))
    whole = gzip.compress(hh_lines(3000))
    truncated = tmp_path / "truncated.jsonl.gz"  # an interrupted copy: the gzip stream ends early
    truncated.write_bytes(whole[: len(whole) // 2])
    after = tmp_path / "after.jsonl.gz"
    after.write_bytes(gzip.compress(hh_lines(3)))
    out = tmp_path / "res" / "eval.json"
    argv = ["--model", "m", "--no-progress", "--out", str(out)]
    argv += ["--hh-rlhf", str(good), "--hh-rlhf", str(truncated), "--hh-rlhf", str(after)]
    assert eval_cli.main(argv) == 1
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert printed["good.jsonl.gz"]["pairs"] == 5 and printed["good.jsonl.gz"]["accuracy"] == 1.0
    assert printed["after.jsonl.gz"]["pairs"] == 3
    bad = printed["truncated.jsonl.gz"]
    assert "EOFError" in bad["error"] and str(truncated) in bad["error"] and "accuracy" not in bad
    assert 0 < bad["pairs_scored"] < 3000


def test_eval_cli_out_never_leaves_a_truncated_result(tmp_path, fake_scoring, monkeypatch):
    pairs = tmp_path / "pairs.jsonl.gz"
    pairs.write_bytes(gzip.compress(hh_lines(4)))
    out = tmp_path / "eval.json"
    out.write_text('{"previous": "result"}\n')
    real_write_text = Path.write_text

    def disk_full(self, data, *a, **k):  # writes half, then the disk is full
        real_write_text(self, data[: len(data) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        eval_cli.main(["--model", "m", "--no-progress", "--hh-rlhf", str(pairs), "--out", str(out)])
    assert json.loads(out.read_text()) == {"previous": "result"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "pairs.jsonl.gz"]


def test_eval_cli_scores_rmbench_under_the_given_truncation(tmp_path, fake_scoring, capsys):
    folder = tmp_path / "rmb"
    folder.mkdir()
    (folder / "chat_filtered.json").write_text(json.dumps([rmbench_item(i) for i in range(2)]))
    argv = ["--model", "m", "--no-progress", "--rmbench", str(folder), "--truncation", "right"]
    assert eval_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["rmbench"]["items"] == 2
    # The pair inputs were scored under --truncation and RM-Bench under left_turns whatever it said.
    assert set(fake_scoring) == {"right"} and len(fake_scoring) == 12


@pytest.mark.parametrize(("option", "value"), [("--limit", "-1"), ("--max-length", "0"), ("--batch-size", "-4")])
def test_eval_cli_refuses_negative_counts(tmp_path, fake_scoring, capsys, option, value):
    # --limit -1 (meant as "no limit") scored every pair but RM-Bench's items[:-1]: one item short, silently.
    folder = tmp_path / "rmb"
    folder.mkdir()
    (folder / "chat_filtered.json").write_text(json.dumps([rmbench_item(i) for i in range(2)]))
    with pytest.raises(SystemExit) as stop:
        eval_cli.main(["--model", "m", "--no-progress", "--rmbench", str(folder), option, value])
    assert stop.value.code == 2 and f"{value} is below" in capsys.readouterr().err
    assert fake_scoring == []
