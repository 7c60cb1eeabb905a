"""Review 46 (area I), the pair readers and ingest's preprocessing: rows of common shapes that were dropped or
published mis-formed, each read through iter_source and the Preprocessor as `synpref ingest` reads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from synpref.services.ingest.preprocess import Preprocessor
from synpref.shared.sources import iter_pairs, iter_source


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def s(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def ingest(tmp_path: Path, rows: list[dict[str, Any]]) -> Preprocessor:
    """The rows through ingest's preprocessing, each in a file of its own (the format is detected per file)."""
    folder = tmp_path / f"in{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    for i, row in enumerate(rows):
        (folder / f"{i:03d}.jsonl").write_text(json.dumps(row) + "\n")
    pre = Preprocessor(keep_rejections=None)
    list(pre.run(iter_source(folder)))
    return pre


def test_lists_with_a_system_turn_lose_the_prompt_they_repeat(tmp_path: Path) -> None:
    """A prompt column beside full lists that open with a system turn: the old reader left system + prompt in both
    responses (the question twice, a system turn inside the answer) and ingest published the pair as it was."""
    row = {"prompt": "Name a colour.", "chosen": [s("Be brief."), u("Name a colour."), a("Blue.")],
           "rejected": [s("Be brief."), u("Name a colour."), a("Dog.")]}  # fmt: skip
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    [pair] = iter_pairs(path)
    assert pair["conversation"] == [s("Be brief."), u("Name a colour.")]
    assert (pair["chosen"], pair["rejected"]) == ([a("Blue.")], [a("Dog.")])
    assert ingest(tmp_path, [row]).counts.published == 1


def test_a_response_opening_with_a_system_turn_is_refused(tmp_path: Path) -> None:
    """Lists under different system prompts answer two different prompts: refused like a user turn first, where
    the old check let them through (or counted them as "no conversation")."""
    rows = [
        {"prompt": "q", "chosen": [s("S"), u("q"), a("x")], "rejected": [s("T"), u("q"), a("y")]},
        {"chosen": [s("S"), u("q"), a("x")], "rejected": [s("T"), u("q"), a("y")]},
    ]
    pre = ingest(tmp_path, rows)
    assert pre.counts.published == 0 and pre.counts.unreadable == 2
    assert all("[0] is a system turn" in r.reason for r in pre.rejections)


def test_an_empty_history_list_does_not_hide_the_instruction(tmp_path: Path) -> None:
    """Alpaca-style preference rows (LLaMA-Factory) carry `"history": []`: the old reader took that empty list as
    the conversation and every row was dropped as "no conversation"."""
    rows = [
        {"instruction": "Name a colour.", "input": "", "chosen": "Blue.", "rejected": "Dog.", "history": []},
        {"conversation": [], "prompt": "Name a fruit.", "chosen": "Pear.", "rejected": "Car."},
    ]
    pre = ingest(tmp_path, rows)
    assert (pre.counts.published, pre.counts.empty) == (2, 0)
    # An empty prompt column and nothing else: full lists carry their prompt, bare responses are no pair.
    lists = {"prompt": [], "chosen": [u("q"), a("x")], "rejected": [u("q"), a("y")]}
    pre = ingest(tmp_path, [lists, {"conversation": [], "chosen": "x", "rejected": "y"}])
    assert (pre.counts.published, pre.counts.unreadable) == (1, 1)


def test_an_hh_transcript_prompt_is_read_as_its_turns(tmp_path: Path) -> None:
    """Dahoas/rm-static (DeepSpeed-Chat's default data): the prompt is an HH transcript up to "Assistant:". The old
    reader made it one user turn holding "Human:"/"Assistant:" as text; now its turns, and the pair has the id
    the same pair read from hh-rlhf has, so dedup drops the copy."""
    prompt = "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:"
    dahoas = {"prompt": prompt, "response": " Blue.", "chosen": " Blue.", "rejected": " Dog."}
    hh = {"chosen": prompt + " Blue.", "rejected": prompt + " Dog."}
    path = tmp_path / "dahoas.jsonl"
    path.write_text(json.dumps(dahoas) + "\n")
    [pair] = iter_pairs(path)
    assert pair["conversation"] == [u("Hi there."), a("Hello!"), u("Name a colour.")]
    assert (pair["chosen"], pair["rejected"]) == ([a("Blue.")], [a("Dog.")])
    pre = ingest(tmp_path, [hh, dahoas])
    assert (pre.counts.published, pre.counts.duplicate) == (1, 1)
